"""The grading pipeline: release labs from solutions and autograde submissions with nbgrader's Python API.

Instructor tooling (not course content). ``solutions/<lab>/<lab>.ipynb`` are nbgrader *source* notebooks;
``labs/`` is generated from them and committed. The same functions drive ``make release`` and the tests that prove
each lab's grading works (solutions score full marks, the blank release scores zero, realistic mistakes lose
points). The Python API is used instead of the CLI because it is several times faster inside tests.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIR = "solutions"
RELEASE_DIR = "labs"


class GradingError(RuntimeError):
    """nbgrader failed; the message carries its log so the instructor sees why."""


def course_config(root: Path, *, timeout: int = 300) -> Any:
    """nbgrader configuration for a course rooted at ``root``: the repo's ``nbgrader_config.py`` plus the root.

    Reading the repo's config file keeps one source of truth for the instructor's CLI and these functions.
    """
    from traitlets.config import Config
    from traitlets.config.loader import PyFileConfigLoader

    config = PyFileConfigLoader("nbgrader_config.py", path=str(REPO_ROOT)).load_config()
    merged = Config()
    merged.merge(config)
    merged.CourseDirectory.root = str(root)
    merged.Execute.timeout = timeout
    return merged


def assignments(root: Path = REPO_ROOT) -> list[str]:
    """Assignment ids: the folders of ``solutions/`` that contain a notebook."""
    src = root / SOURCE_DIR
    return sorted(p.name for p in src.iterdir() if p.is_dir() and any(p.glob("*.ipynb")))


@contextmanager
def _venv_on_path() -> Iterable[None]:
    """nbgrader runs the ``alembic`` executable for its gradebook: make sure this interpreter's bin is on PATH."""
    import sys

    old = os.environ.get("PATH", "")
    bindir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bindir + os.pathsep + old
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _api(root: Path, timeout: int = 300) -> Any:
    from nbgrader.apps import NbGraderAPI
    from nbgrader.coursedir import CourseDirectory

    config = course_config(root, timeout=timeout)
    return NbGraderAPI(coursedir=CourseDirectory(config=config), config=config)


def _check(result: dict[str, Any], what: str) -> None:
    if not result.get("success"):
        raise GradingError(f"nbgrader {what} failed:\n{result.get('error') or ''}\n{result.get('log') or ''}")


def release(assignment_ids: Iterable[str] | None = None, root: Path = REPO_ROOT) -> list[Path]:
    """Regenerate ``labs/<id>/`` from ``solutions/<id>/`` (solutions stripped, hidden tests removed)."""
    ids = list(assignment_ids or assignments(root))
    with _venv_on_path():
        api = _api(root)
        for aid in ids:
            _check(api.generate_assignment(aid, force=True, create=True), f"generate_assignment {aid}")
    for aid in ids:
        for nb in (root / RELEASE_DIR / aid).glob("*.ipynb"):
            strip_outputs(nb)
    return [root / RELEASE_DIR / aid for aid in ids]


def strip_outputs(path: Path) -> None:
    """Remove outputs and execution counts: notebooks are committed clean so diffs stay readable."""
    nb = json.loads(path.read_text())
    changed = False
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code" and (cell.get("outputs") or cell.get("execution_count") is not None):
            cell["outputs"], cell["execution_count"] = [], None
            changed = True
    if changed:
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


@dataclass
class GradeReport:
    """Autograded result of one submitted notebook: points per graded cell and the totals."""

    assignment: str
    student: str
    cells: dict[str, tuple[float, float]] = field(default_factory=dict)  # grade_id -> (auto score, max)
    manual: dict[str, float] = field(default_factory=dict)  # grade_id -> max points of manually graded cells

    @property
    def auto_score(self) -> float:
        return sum(score for score, _ in self.cells.values())

    @property
    def auto_max(self) -> float:
        return sum(mx for _, mx in self.cells.values())

    def failed(self) -> list[str]:
        return [gid for gid, (score, mx) in self.cells.items() if score < mx]


class GradingCourse:
    """A throw-away nbgrader course in ``workdir`` for autograding submissions of the repo's labs.

    ``add_submission`` + ``autograde`` mirror what happens in a real term; ``workdir`` isolates the gradebook so
    tests and graders never touch the instructor's database.
    """

    def __init__(self, workdir: Path, root: Path = REPO_ROOT, timeout: int = 300) -> None:
        self.workdir = Path(workdir)
        self.root = root
        self.timeout = timeout
        self._generated: set[str] = set()

    def _ensure_assignment(self, aid: str) -> None:
        if aid in self._generated:
            return
        src = self.root / SOURCE_DIR / aid
        if not src.is_dir():
            raise GradingError(f"no assignment {aid!r} under {self.root / SOURCE_DIR}")
        dst = self.workdir / SOURCE_DIR / aid
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".ipynb_checkpoints", ".mlops", "__pycache__"))
        with _venv_on_path():
            _check(_api(self.workdir, self.timeout).generate_assignment(aid, force=True, create=True), "generate")
        self._generated.add(aid)

    def release_dir(self, aid: str) -> Path:
        self._ensure_assignment(aid)
        return self.workdir / RELEASE_DIR / aid

    def autograde(self, aid: str, student: str, notebooks: dict[str, dict[str, Any]]) -> GradeReport:
        """Submit ``{notebook name: notebook JSON}`` as ``student`` and autograde it."""
        from nbgrader.api import Gradebook

        self._ensure_assignment(aid)
        sub = self.workdir / "submitted" / student / aid
        if sub.exists():
            shutil.rmtree(sub)
        sub.mkdir(parents=True)
        for name, nb in notebooks.items():
            (sub / f"{name}.ipynb").write_text(json.dumps(nb))
        with _venv_on_path():
            _check(_api(self.workdir, self.timeout).autograde(aid, student, force=True, create=True), "autograde")
        report = GradeReport(aid, student)
        with Gradebook(f"sqlite:///{self.workdir / 'gradebook.db'}") as gb:
            for name in notebooks:
                submitted = gb.find_submission_notebook(name, aid, student)
                for grade in submitted.grades:
                    cell = grade.cell
                    if cell.cell_type == "code":
                        report.cells[grade.name] = (float(grade.auto_score or 0.0), float(grade.max_score))
                    else:
                        report.manual[grade.name] = float(grade.max_score)
        return report

    def feedback(self, aid: str, student: str) -> dict[str, str]:
        """Generate the HTML feedback of an autograded submission, as ``make feedback`` does: {notebook: html}."""
        with _venv_on_path():
            _check(_api(self.workdir, self.timeout).generate_feedback(aid, student, force=True), "feedback")
        folder = self.workdir / "feedback" / student / aid
        return {p.stem: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.html"))}


def load_notebook(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def replace_cell(nb: dict[str, Any], grade_id: str, source: str) -> dict[str, Any]:
    """A copy of ``nb`` with the cell whose nbgrader ``grade_id`` matches given a new source (for mutants)."""
    import copy

    out = copy.deepcopy(nb)
    for cell in out["cells"]:
        if cell.get("metadata", {}).get("nbgrader", {}).get("grade_id") == grade_id:
            cell["source"] = source
            return out
    raise KeyError(f"no cell with grade_id {grade_id!r}")
