"""An nbgrader term from the instructor's side: collect, autograde, feedback, grades to CSV.

``INSTRUCTORS.md`` walks the term; these functions are what ``python -m courseware <command>`` (and ``make``) run.
The course directory is the repository root by default (``nbgrader_config.py``: source ``solutions/``, release
``labs/``); submissions live in ``submitted/<student>/<assignment>/<notebook>.ipynb``, nbgrader's layout, and the
gradebook is ``gradebook.db`` in the course root. None of these are committed (see ``.gitignore``).

Autograding runs every submitted notebook in a fresh kernel. The labs start from a cached trained model, so all
kernels are pointed at ONE state directory (``$MLOPS_STATE_DIR``, default ``<course root>/.mlops``): the model trains
once (~25 s) instead of once per student.
"""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from . import grading
from .grading import REPO_ROOT, GradingError

SUBMITTED = "submitted"
FEEDBACK = "feedback"
CSV_COLUMNS = (
    "assignment",
    "student",
    "auto_score",  # autograded test cells (after any manual override in formgrader)
    "auto_max",
    "manual_score",  # written answers and tasks graded by hand with the rubric
    "manual_max",
    "total",
    "total_max",
    "needs_manual_grading",  # "yes" while formgrader still has cells for a person to grade
    "submitted_at",
)


@dataclass(frozen=True)
class StudentGrade:
    """One row of the grade export."""

    assignment: str
    student: str
    auto_score: float
    auto_max: float
    manual_score: float
    manual_max: float
    needs_manual_grading: bool
    submitted_at: str

    @property
    def total(self) -> float:
        return self.auto_score + self.manual_score

    @property
    def total_max(self) -> float:
        return self.auto_max + self.manual_max

    def row(self) -> dict[str, str]:
        values = {
            "assignment": self.assignment,
            "student": self.student,
            "auto_score": f"{self.auto_score:g}",
            "auto_max": f"{self.auto_max:g}",
            "manual_score": f"{self.manual_score:g}",
            "manual_max": f"{self.manual_max:g}",
            "total": f"{self.total:g}",
            "total_max": f"{self.total_max:g}",
            "needs_manual_grading": "yes" if self.needs_manual_grading else "no",
            "submitted_at": self.submitted_at,
        }
        return {k: values[k] for k in CSV_COLUMNS}


@contextmanager
def shared_state(root: Path) -> Iterator[Path]:
    """Point every notebook kernel at one state dir (unless ``$MLOPS_STATE_DIR`` already says where)."""
    old = os.environ.get("MLOPS_STATE_DIR")
    state = Path(old) if old else Path(root) / ".mlops"
    os.environ["MLOPS_STATE_DIR"] = str(state)
    try:
        yield state
    finally:
        if old is None:
            os.environ.pop("MLOPS_STATE_DIR", None)


def collect(assignment: str, source: Path, root: Path = REPO_ROOT) -> list[str]:
    """Copy submissions laid out as ``<source>/<student>/<assignment>/*.ipynb`` into the course's ``submitted/``.

    Use it for notebooks downloaded from an LMS or pulled from students' git repositories (the nbgrader exchange has
    its own ``nbgrader collect``). Existing submissions of the same students are replaced. Returns the student ids.
    """
    source, target_root = Path(source).resolve(), Path(root).resolve() / SUBMITTED
    if source == target_root:
        return submitted_students(assignment, root)
    students = []
    for folder in sorted(source.glob(f"*/{assignment}")):
        if not any(folder.glob("*.ipynb")):
            continue
        student = folder.parent.name
        dest = target_root / student / assignment
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(folder, dest, ignore=shutil.ignore_patterns(".ipynb_checkpoints", ".mlops", "__pycache__"))
        if not (dest / "timestamp.txt").exists():
            # nbgrader reads the submission time (for late penalties) from timestamp.txt; without one, use the
            # time the newest notebook was last modified, which is what an LMS download preserves.
            mtime = max(p.stat().st_mtime for p in folder.glob("*.ipynb"))
            (dest / "timestamp.txt").write_text(datetime.fromtimestamp(mtime, tz=UTC).isoformat(" "))
        students.append(student)
    if not students:
        raise GradingError(f"no submissions of {assignment!r} under {source} (expected <student>/{assignment}/*.ipynb)")
    return students


def submitted_students(assignment: str, root: Path = REPO_ROOT) -> list[str]:
    """Students with a notebook in ``submitted/<student>/<assignment>/``."""
    base = Path(root) / SUBMITTED
    return sorted(p.parent.name for p in base.glob(f"*/{assignment}") if any(p.glob("*.ipynb")))


def autograde(
    assignment: str, root: Path = REPO_ROOT, students: Iterable[str] | None = None, timeout: int = 300
) -> list[StudentGrade]:
    """Autograde submissions of ``assignment`` (all submitted students by default) and return their grades.

    The assignment must have been released from this course root (``python -m courseware release``), because
    autograding restores the locked and hidden test cells from the gradebook that the release wrote.
    """
    root = Path(root)
    ids = list(students or submitted_students(assignment, root))
    if not ids:
        raise GradingError(f"nobody has submitted {assignment!r}: put notebooks in {root / SUBMITTED}/<student>/")
    _ensure_released(assignment, root)
    with shared_state(root) as state, grading._venv_on_path():
        # Train (or verify) the labs' shared baseline before the first kernel starts: its first training takes
        # 1.5 minutes on one modern core and about 4 on an old one, which would otherwise be charged to the first
        # student's setup cell, within the course's cell timeout.
        from reference_impl.loop import baseline_bundle
        from reference_impl.settings import Settings

        baseline_bundle(Settings.from_env().with_(state_dir=state), progress=True)
        api = grading._api(root, timeout)
        for student in ids:
            grading._check(api.autograde(assignment, student, force=True, create=True), f"autograde {student}")
    by_student = {g.student: g for g in grades(root, [assignment])}
    return [by_student[s] for s in ids]


def _ensure_released(assignment: str, root: Path) -> None:
    from nbgrader.api import Gradebook, MissingEntry

    with Gradebook(f"sqlite:///{Path(root) / 'gradebook.db'}") as gb:
        try:
            gb.find_assignment(assignment)
        except MissingEntry:
            raise GradingError(
                f"{assignment!r} is not in this course's gradebook: release it first (python -m courseware release)"
            ) from None


def feedback(assignment: str, root: Path = REPO_ROOT, students: Iterable[str] | None = None) -> list[Path]:
    """Write HTML feedback (``feedback/<student>/<assignment>/<notebook>.html``) from the autograded notebooks.

    Feedback shows each student's answers, scores and the test cells with what each failed test said, but not the
    hidden tests' source (nbgrader_config.py: ClearHiddenTests, courseware/feedback.py for the tracebacks).
    """
    root = Path(root)
    autograded = root / "autograded"
    ids = list(students or sorted(p.parent.name for p in autograded.glob(f"*/{assignment}")))
    if not ids:
        raise GradingError(f"nothing autograded for {assignment!r} yet: run autograde first")
    with grading._venv_on_path():
        api = grading._api(root)
        for student in ids:
            grading._check(api.generate_feedback(assignment, student, force=True), f"feedback for {student}")
    return sorted(p for s in ids for p in (root / FEEDBACK / s / assignment).glob("*.html"))


def grades(root: Path = REPO_ROOT, assignments: Iterable[str] | None = None) -> list[StudentGrade]:
    """Every submission's scores from the gradebook, split into autograded and manually graded points."""
    from nbgrader.api import Gradebook

    db = Path(root) / "gradebook.db"
    if not db.exists():
        raise GradingError(f"no gradebook at {db}: release and autograde an assignment first")
    wanted = set(assignments) if assignments else None
    rows = []
    with Gradebook(f"sqlite:///{db}") as gb:
        for assignment in gb.assignments:
            if wanted is not None and assignment.name not in wanted:
                continue
            for sub in gb.assignment_submissions(assignment.name):
                manual = (sub.written_score or 0.0) + (sub.task_score or 0.0)
                manual_max = (sub.max_written_score or 0.0) + (sub.max_task_score or 0.0)
                rows.append(
                    StudentGrade(
                        assignment=assignment.name,
                        student=sub.student.id,
                        auto_score=float(sub.code_score or 0.0),
                        auto_max=float(sub.max_code_score or 0.0),
                        manual_score=float(manual),
                        manual_max=float(manual_max),
                        needs_manual_grading=bool(sub.needs_manual_grade),
                        submitted_at=sub.timestamp.isoformat() if sub.timestamp else "",
                    )
                )
    return sorted(rows, key=lambda g: (g.assignment, g.student))


def export_csv(out: Path, root: Path = REPO_ROOT, assignments: Iterable[str] | None = None) -> Path:
    """Write the grades as CSV (one row per student and assignment) for the LMS or a spreadsheet."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for g in grades(root, assignments):
            writer.writerow(g.row())
    return out


def describe(g: StudentGrade) -> str:
    manual = (
        f"{g.manual_max:g} manual point(s) waiting in formgrader"
        if g.needs_manual_grading
        else f"manual {g.manual_score:g}/{g.manual_max:g}"
    )
    return f"{g.student:<20} {g.assignment}: auto {g.auto_score:g}/{g.auto_max:g}, {manual}"
