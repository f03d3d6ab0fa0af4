"""The grading pipeline: release == generated, nothing leaks, solutions score full, blanks score zero, mutants lose.

Autograding runs each notebook in a real kernel, so these tests are slow; the labs share one cached baseline model
(MLOPS_STATE_DIR points every kernel at the same state dir) so only the first run trains.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from courseware import grading
from courseware.stubs import CONTINUE_TAG, runs_past_exercises

REPO = grading.REPO_ROOT
ASSIGNMENTS = grading.assignments()
MUTANT_DIR = Path(__file__).parent / "mutants"


def _cells(nb: dict) -> list[dict]:
    return nb["cells"]


def _nbgrader(cell: dict) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def _source(cell: dict) -> str:
    src = cell["source"]
    return "".join(src) if isinstance(src, list) else src


def _source_notebooks() -> list[Path]:
    return sorted((REPO / "solutions").glob("*/*.ipynb"))


def _blocks(text: str, begin: str, end: str) -> list[str]:
    return re.findall(rf"{re.escape(begin)}\n(.*?){re.escape(end)}", text, flags=re.S)


@pytest.fixture(scope="module")
def lab_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Shared with the other notebook-running tests of this session, so the baseline model is trained only once.
    path = tmp_path_factory.getbasetemp() / "shared-baseline-state"
    path.mkdir(exist_ok=True)
    # Trained before any kernel starts, as `make autograde` does (courseware/instructor.py): on a slow CPU the first
    # training would otherwise eat into the first notebook's setup-cell timeout.
    from reference_impl.loop import baseline_bundle
    from reference_impl.settings import Settings

    baseline_bundle(Settings(state_dir=path))
    return path


@pytest.fixture(scope="module")
def course(tmp_path_factory: pytest.TempPathFactory) -> grading.GradingCourse:
    return grading.GradingCourse(tmp_path_factory.mktemp("course"))


@pytest.fixture
def shared_state(monkeypatch: pytest.MonkeyPatch, lab_state: Path) -> Path:
    """Every notebook kernel in this module uses one state dir, so the baseline model is trained once."""
    monkeypatch.setenv("MLOPS_STATE_DIR", str(lab_state))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{lab_state / 'mlflow.db'}")
    return lab_state


def test_there_are_labs() -> None:
    assert "lab01-packaging" in ASSIGNMENTS


@pytest.mark.parametrize("path", _source_notebooks() + sorted((REPO / "labs").glob("*/*.ipynb")), ids=str)
def test_notebooks_are_committed_without_outputs(path: Path) -> None:
    nb = json.loads(path.read_text())
    for cell in _cells(nb):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [] and cell.get("execution_count") is None, f"{path}: strip outputs"


@pytest.mark.grading
@pytest.mark.parametrize("aid", ASSIGNMENTS)
def test_committed_release_equals_generated(aid: str, course: grading.GradingCourse) -> None:
    fresh = course.release_dir(aid)
    committed = REPO / "labs" / aid
    assert sorted(p.name for p in fresh.iterdir()) == sorted(p.name for p in committed.iterdir()), (
        "labs/ and a fresh release contain different files: run `make release`"
    )
    for nb_path in fresh.glob("*.ipynb"):
        grading.strip_outputs(nb_path)
        assert json.loads(nb_path.read_text()) == json.loads((committed / nb_path.name).read_text()), (
            f"labs/{aid}/{nb_path.name} is out of date with solutions/: run `make release`"
        )


@pytest.mark.parametrize("aid", ASSIGNMENTS)
def test_release_leaks_no_solutions_hidden_tests_or_keys(aid: str) -> None:
    source = json.loads((REPO / "solutions" / aid / f"{aid}.ipynb").read_text())
    release_text = "\n".join(_source(c) for c in _cells(json.loads((REPO / "labs" / aid / f"{aid}.ipynb").read_text())))
    for marker in ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS"):
        assert marker not in release_text
    secret_lines, public_text = set(), []
    for cell in _cells(source):
        text = _source(cell)
        blocks = _blocks(text, "### BEGIN SOLUTION", "### END SOLUTION") + _blocks(
            text, "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
        )
        for block in blocks:
            secret_lines |= {ln.strip() for ln in block.splitlines() if len(ln.strip()) > 25}
            text = text.replace(block, "")
        public_text.append(text)
    # A line that also appears in the public part of the source (e.g. a list of candidates) is not a secret.
    secret_lines = {ln for ln in secret_lines if ln not in "\n".join(public_text)}
    assert secret_lines, "the source notebook should contain solutions and hidden tests"
    leaked = sorted(ln for ln in secret_lines if ln in release_text)
    assert not leaked, f"lines from solutions/hidden tests appear in the release: {leaked[:5]}"


@pytest.mark.parametrize("aid", ASSIGNMENTS)
def test_every_autograded_exercise_has_a_mutant(aid: str) -> None:
    source = json.loads((REPO / "solutions" / aid / f"{aid}.ipynb").read_text())
    solution_cells = {
        _nbgrader(c)["grade_id"] for c in _cells(source) if c["cell_type"] == "code" and _nbgrader(c).get("solution")
    }
    test_cells = {
        _nbgrader(c)["grade_id"] for c in _cells(source) if _nbgrader(c).get("grade") and c["cell_type"] == "code"
    }
    mutants = yaml.safe_load((MUTANT_DIR / f"{aid}.yaml").read_text())
    assert {m["cell"] for m in mutants} == solution_cells, "every solution cell needs at least one mutant"
    assert {f for m in mutants for f in m["fails"]} == test_cells, "every graded test cell must catch some mutant"


def _autograde_with_no_errors(course: grading.GradingCourse, aid: str, student: str, nb: dict) -> grading.GradeReport:
    report = course.autograde(aid, student, {aid: nb})
    graded = json.loads((course.workdir / "autograded" / student / aid / f"{aid}.ipynb").read_text())
    for cell in _cells(graded):
        if cell["cell_type"] != "code" or _nbgrader(cell).get("grade"):
            continue  # errors in test cells are what grading is about
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        if errors and student.startswith("solution"):
            raise AssertionError(f"{aid}: cell {_nbgrader(cell).get('grade_id')} raised {errors[0].get('ename')}")
    return report


def _stderr_of(aid: str, course: grading.GradingCourse, student: str) -> dict[str, str]:
    """What each cell of an autograded notebook wrote to stderr (a trainee sees it as red-tinted noise)."""
    graded = json.loads((course.workdir / "autograded" / student / aid / f"{aid}.ipynb").read_text())
    found = {}
    for i, cell in enumerate(_cells(graded)):
        text = "".join("".join(o.get("text", "")) for o in cell.get("outputs", []) if o.get("name") == "stderr")
        # An alert the lab's monitor raises is what the lab means to show: the log sink writes it to stderr (red,
        # the intended style for an alert). Anything else there is noise a trainee should not have to read past.
        # matplotlib says once per machine that it builds its font cache (~/.cache/matplotlib): not the lab's noise.
        text = "".join(line for line in text.splitlines(keepends=True)
                       if not line.startswith(("ALERT ", "Matplotlib is building the font cache")))  # fmt: skip
        if text.strip():
            found[_nbgrader(cell).get("grade_id") or f"cell {i}"] = text[:600]
    return found


# Plausible edits of an SME to chapters/organization.yaml, each within what `make overlay` accepts: another approver
# role, other serving SLOs, a wider gate tolerance, more labels before retraining, another accuracy floor, another
# alert cool-down. The labs read every one of these from the policy, so a solution scores full marks under them too.
SME_EDITS = (
    ('approvers: ["quality-lead"]', 'approvers: ["change-board"]'),
    ("p99_latency_ms_slo: 200", "p99_latency_ms_slo: 250"),
    ("error_rate_slo: 0.01", "error_rate_slo: 0.02"),
    ("max_class_recall_drop: 0.02", "max_class_recall_drop: 0.03"),
    ("min_new_labels: 100", "min_new_labels: 250"),
    ("min_accuracy: 0.90", "min_accuracy: 0.88"),
    ("cooldown_minutes: 30", "cooldown_minutes: 10"),
)


@pytest.fixture(scope="module")
def sme_overlay(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from courseware.overlay import load_overlay

    text = (REPO / "chapters" / "organization.yaml").read_text()
    for old, new in SME_EDITS:
        assert text.count(old) == 1, f"SME_EDITS out of date: {old!r} occurs {text.count(old)} times in the overlay"
        text = text.replace(old, new)
    path = tmp_path_factory.mktemp("sme-overlay") / "organization.yaml"
    path.write_text(text)
    policy = load_overlay(path).policy  # the same validation as `make overlay`, course limits included
    assert policy.retraining.approvers == ("change-board",)
    return path


@pytest.mark.slow
@pytest.mark.grading
@pytest.mark.parametrize(
    ("aid", "overlay"), [(a, "default") for a in ASSIGNMENTS] + [(a, "sme") for a in ASSIGNMENTS if a.startswith("lab")]
)
def test_solution_scores_full_marks(
    aid: str, overlay: str, course: grading.GradingCourse, shared_state: Path, sme_overlay: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The solution scores full marks without any other stderr, under the shipped overlay and an SME's edited one."""
    student = "solution" if overlay == "default" else "solution-sme"
    if overlay == "sme":
        monkeypatch.setenv("MLOPS_OVERLAY", str(sme_overlay))  # every kernel nbgrader starts inherits it
    nb = grading.load_notebook(REPO / "solutions" / aid / f"{aid}.ipynb")
    report = _autograde_with_no_errors(course, aid, student, nb)
    assert not (noise := _stderr_of(aid, course, student)), f"{aid}: stderr output, top to bottom: {noise}"
    assert report.auto_max >= 10, f"{aid}: at least 10 autograded points, found {report.auto_max}"
    assert report.auto_score == report.auto_max, f"{aid}: solution failed {report.failed()}"
    assert report.manual, f"{aid}: needs at least one manually graded written answer"
    if overlay == "default":
        _assert_feedback_hides_hidden_tests(course, aid, student)


@pytest.mark.slow
@pytest.mark.grading
@pytest.mark.parametrize("aid", ASSIGNMENTS)
def test_untouched_release_scores_zero(aid: str, course: grading.GradingCourse, shared_state: Path) -> None:
    nb = grading.load_notebook(REPO / "labs" / aid / f"{aid}.ipynb")
    report = course.autograde(aid, "blank", {aid: nb})
    assert report.auto_max > 0
    assert report.auto_score == 0, (
        f"{aid}: the blank release earned points in {[k for k, v in report.cells.items() if v[0]]}"
    )
    if aid.startswith("lab"):  # the quiz has no exercise sections: its Run All still stops at the first question
        _run_all_of_a_blank_lab_behaves(aid, json.loads((course.workdir / "autograded" / "blank" / aid /
                                                         f"{aid}.ipynb").read_text()))  # fmt: skip


def _hidden_test_lines(aid: str) -> list[str]:
    """The lines of the source notebook's hidden tests that say something and appear nowhere else in it (a line such
    as ``with torch.inference_mode():`` is in the trainee's own code too)."""
    nb = grading.load_notebook(REPO / "solutions" / aid / f"{aid}.ipynb")
    hidden, elsewhere = [], set()
    for cell in _cells(nb):
        text = _source(cell)
        blocks = _blocks(text, "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS")
        for block in blocks:
            hidden += [line.strip() for line in block.splitlines() if len(line.strip()) >= 16]
            text = text.replace(block, "")
        elsewhere |= {line.strip() for line in text.splitlines()}
    return [line for line in hidden if line not in elsewhere]


def _assert_feedback_hides_hidden_tests(course: grading.GradingCourse, aid: str, student: str) -> None:
    """`make feedback` for this autograded submission shows no line of a hidden test, in a cell or a traceback."""
    import html

    pages = course.feedback(aid, student)
    assert pages, f"{aid}: no feedback written for {student}"
    hidden = _hidden_test_lines(aid)
    assert hidden, f"{aid}: found no hidden tests to look for"
    for name, page in pages.items():
        # The page highlights code token by token: compare the text a reader sees, not the markup.
        text = html.unescape(re.sub(r"<[^>]+>", "", page))
        leaked = [line for line in hidden if line in text]
        assert not leaked, f"{aid} feedback {name} ({student}) shows hidden test lines: {leaked[:3]}"


def _run_all_of_a_blank_lab_behaves(aid: str, graded: dict) -> None:
    """What a trainee's Run All does on the untouched lab (autograding ran every cell, as Run All would with the
    release's ``raises-exception`` tags honoured; JupyterLab stops at the first error of an untagged cell).

    A lab whose parts do not need the exercises: only exercise cells (tagged) fail, so every part runs. The
    capstone (opted out): its first error is the first exercise's own "not done yet" message."""
    failing = []
    for cell in _cells(graded):
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        if cell["cell_type"] == "code" and errors:
            failing.append((_nbgrader(cell).get("grade_id"), cell["metadata"].get("tags", []), errors[0]))
    assert failing, f"{aid}: the blank release ran without a single error"
    if runs_past_exercises(graded):
        stopping = [(gid, e["ename"]) for gid, tags, e in failing if CONTINUE_TAG not in tags]
        assert not stopping, f"{aid}: Run All of the blank lab would stop in a cell that is no exercise's: {stopping}"
    else:
        gid, tags, error = failing[0]
        assert CONTINUE_TAG not in tags and "Exercise 1 (" in error["evalue"] and "not done yet" in error["evalue"], (
            f"{aid}: Run All must stop at Exercise 1 with its name; the first error is {gid}: {error['evalue'][:200]}"
        )


@pytest.mark.slow
@pytest.mark.grading
@pytest.mark.parametrize("aid", ASSIGNMENTS)
def test_realistic_mistakes_lose_points(aid: str, course: grading.GradingCourse, shared_state: Path) -> None:
    """Each mutant must lose the points of the cells it names and nothing else.

    Mutants of different exercises are independent, so one submission carries one mutant per exercise ("rounds"):
    the same checks with a fraction of the kernel start-ups.
    """
    solution = grading.load_notebook(REPO / "solutions" / aid / f"{aid}.ipynb")
    mutants = yaml.safe_load((MUTANT_DIR / f"{aid}.yaml").read_text())
    by_cell: dict[str, list[dict]] = {}
    for m in mutants:
        by_cell.setdefault(m["cell"], []).append(m)
    rounds = max(len(v) for v in by_cell.values())
    for r in range(rounds):
        nb, in_round = solution, []
        for ms in by_cell.values():
            if r < len(ms):
                nb = grading.replace_cell(nb, ms[r]["cell"], ms[r]["source"])
                in_round.append(ms[r])
        report = course.autograde(aid, f"mutant-round-{r}", {aid: nb})
        expected_failures = {f for m in in_round for f in m["fails"]}
        for m in in_round:
            for gid in m["fails"]:
                score, mx = report.cells[gid]
                assert score < mx, f"mutant {m['name']!r} ({m['why']}) was not caught by {gid}"
        unexpected = set(report.failed()) - expected_failures
        assert not unexpected, f"round {r}: cells {sorted(unexpected)} failed although no mutant targets them"
    # Failed hidden tests print their lines in tracebacks: the feedback of the first round must show none of them.
    _assert_feedback_hides_hidden_tests(course, aid, "mutant-round-0")
