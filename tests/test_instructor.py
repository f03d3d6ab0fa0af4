"""A term in miniature, through the instructor's commands: release, collect, autograde, feedback, export to CSV.

Two fake students hand in Lab 1: one the solution notebook, one the untouched release. Everything runs in a
temporary course directory with the same `python -m courseware` commands INSTRUCTORS.md tells instructors to type.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from courseware import instructor
from courseware.grading import GradingError

REPO = Path(__file__).resolve().parent.parent
LAB = "lab01-packaging"


@pytest.fixture(scope="module")
def baseline_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state dir holding the trained baseline model, shared by this session's tests (trained at most once).

    tests/test_binder.py uses the same folder, so whichever runs first pays the ~25 s of training.
    """
    from reference_impl.loop import baseline_bundle
    from reference_impl.settings import Settings

    state = tmp_path_factory.getbasetemp() / "shared-baseline-state"
    baseline_bundle(Settings(state_dir=state))
    return state


def courseware(root: Path, *args: str, timeout: int = 600) -> str:
    """Run ``python -m courseware --root <root> ...`` as an instructor would, failing with its output."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        [sys.executable, "-m", "courseware", "--root", str(root), *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, f"courseware {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def new_course(tmp_path: Path, *assignments: str) -> Path:
    root = tmp_path / "course"
    for aid in assignments:
        shutil.copytree(REPO / "solutions" / aid, root / "solutions" / aid)
    return root


@pytest.mark.slow
@pytest.mark.grading
def test_a_term_from_release_to_grades_csv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, baseline_state: Path
) -> None:
    # One state dir for every kernel, as `make autograde` arranges: the baseline model is trained once, not per student.
    monkeypatch.setenv("MLOPS_STATE_DIR", str(baseline_state))
    root = new_course(tmp_path, LAB)
    assert f"released {root / 'labs' / LAB}" in courseware(root, "release", LAB)

    # Students hand in through the LMS: a folder per student, as downloaded.
    inbox = tmp_path / "lms-download"
    (inbox / "alice" / LAB).mkdir(parents=True)
    (inbox / "bob" / LAB).mkdir(parents=True)
    shutil.copy(REPO / "solutions" / LAB / f"{LAB}.ipynb", inbox / "alice" / LAB)  # the model student
    shutil.copy(root / "labs" / LAB / f"{LAB}.ipynb", inbox / "bob" / LAB)  # handed in untouched
    assert "collected 2 submission(s)" in courseware(root, "collect", LAB, str(inbox))
    assert (root / "submitted" / "alice" / LAB / "timestamp.txt").exists()

    out = courseware(root, "autograde", LAB)
    assert "alice" in out and "bob" in out and "formgrader" in out
    assert len(list((baseline_state / "bundles").glob("baseline-*"))) == 1, "kernels reused the shared model"

    out = courseware(root, "feedback", LAB)
    for student in ("alice", "bob"):
        html = root / "feedback" / student / LAB / f"{LAB}.html"
        assert str(html) in out and html.stat().st_size > 10_000

    csv_path = tmp_path / "grades.csv"
    courseware(root, "export", "--out", str(csv_path))
    rows = {r["student"]: r for r in csv.DictReader(csv_path.open())}
    assert set(rows) == {"alice", "bob"}
    alice, bob = rows["alice"], rows["bob"]
    assert list(alice) == list(instructor.CSV_COLUMNS)
    assert float(alice["auto_max"]) >= 10 and alice["auto_score"] == alice["auto_max"], alice
    assert bob["auto_score"] == "0" and bob["auto_max"] == alice["auto_max"], bob
    assert alice["manual_max"] == "3" and alice["needs_manual_grading"] == "yes", "the written answer awaits a grader"
    assert alice["total"] == alice["auto_score"], "manual points count only once a person has graded them"
    assert alice["submitted_at"], "the submission time is kept for late penalties"


def test_autograde_before_release_says_what_to_do(tmp_path: Path) -> None:
    root = new_course(tmp_path, LAB)
    (root / "submitted" / "alice" / LAB).mkdir(parents=True)
    shutil.copy(REPO / "solutions" / LAB / f"{LAB}.ipynb", root / "submitted" / "alice" / LAB)
    (root / "gradebook.db").touch()
    with pytest.raises(GradingError, match=r"not in this course's gradebook: release it first"):
        instructor.autograde(LAB, root)


def test_autograde_with_no_submissions_says_where_they_go(tmp_path: Path) -> None:
    with pytest.raises(GradingError, match=r"nobody has submitted 'lab01-packaging': put notebooks in .*submitted"):
        instructor.autograde(LAB, new_course(tmp_path, LAB))


def test_collect_refuses_an_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "inbox" / "alice").mkdir(parents=True)
    with pytest.raises(GradingError, match=r"no submissions of 'lab01-packaging' under .*inbox"):
        instructor.collect(LAB, tmp_path / "inbox", new_course(tmp_path, LAB))


def test_export_without_a_gradebook_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(GradingError, match="no gradebook"):
        instructor.export_csv(tmp_path / "grades.csv", tmp_path)
