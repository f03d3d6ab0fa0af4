"""Quizzes: generated files are current, the release cannot reveal the key, grading is right, the self-check works.

"The key can't be recovered from the release" is tested in its strongest honest form: the released notebook is
byte-identical whichever option is the key. What a student CAN do after feedback is returned (hash four options
against the hidden test shown in the feedback) is stated in courseware/quiz.py and asserted below, so the
documentation cannot drift from the truth.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml

from courseware import grading, quiz
from courseware.quiz import LETTERS, QuizBankError, SelfCheck

REPO = Path(__file__).resolve().parent.parent
BANK_PATH = REPO / "quizzes" / "bank.yaml"
RAW_BANK = yaml.safe_load(BANK_PATH.read_text(encoding="utf-8"))
BANK = quiz.parse_bank(RAW_BANK)
COVERAGE = yaml.safe_load((REPO / "chapters" / "outline-coverage.yaml").read_text(encoding="utf-8"))
SOURCE_NB = REPO / "solutions" / "quiz" / "quiz.ipynb"
RELEASE_NB = REPO / "labs" / "quiz" / "quiz.ipynb"


def text_of(nb: dict) -> str:
    return "\n".join("".join(c["source"]) for c in nb["cells"])


def normalise(text: str) -> str:
    text = text.lower().replace("\u2019", "'")
    for short, long in (("you're", "you are"), ("you'd", "you would")):
        text = text.replace(short, long)
    return " ".join(re.sub(r"[*_`'\"]", "", text).split()).rstrip(".?!")


def cell_by_id(nb: dict, grade_id: str) -> dict:
    return next(c for c in nb["cells"] if c["metadata"].get("nbgrader", {}).get("grade_id") == grade_id)


# --------------------------------------------------------------------------------------------------------------
# The bank and the generated files.
# --------------------------------------------------------------------------------------------------------------
def test_bank_shape() -> None:
    assert [p.id for p in BANK.practice] == ["p1", "p2", "p3", "p4", "p5"]
    assert [q.id for q in BANK.check] == [f"c{i}" for i in range(1, len(BANK.check) + 1)]
    assert len(BANK.check) >= 10, "the five outline questions plus at least five on the labs"
    assert sum(q.source == "labs" for q in BANK.check) >= 5
    for q in BANK.check:
        assert len({o.text for o in q.options}) == 4, f"{q.id}: four different options"
        assert all(len(o.explanation) > 40 for o in q.options), f"{q.id}: explain every option"
        assert q.options[LETTERS.index(q.key)].explanation.startswith("Correct."), q.id
    for p in BANK.practice:
        assert p.points == 3 and len(p.model_answer) > 200, p.id


def test_the_key_is_not_guessable_from_position_or_length() -> None:
    keys = Counter(q.key for q in BANK.check)
    assert set(keys) == set(LETTERS) and min(keys.values()) >= 2, f"keys are spread over A-D: {keys}"
    longest = sum(max(range(4), key=lambda i: len(q.options[i].text)) == LETTERS.index(q.key) for q in BANK.check)
    assert longest <= len(BANK.check) // 2, f"the key is the longest option in {longest} questions: a test-wise cue"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b["check"][0]["options"].pop(), "must have exactly 4 options"),
        (lambda b: b["check"][1]["options"][0].update(correct=True), "exactly one correct option"),
        (lambda b: b["check"][2]["options"][3].update(explanation=""), r"options\[3\]\.explanation must be non-empty"),
        (lambda b: b["practice"][1].update(id="p1"), "duplicate id 'p1'"),
        (lambda b: b["practice"][0]["rubric"][0].update(points=0), r"rubric\[0\]\.points must be a positive"),
    ],
)
def test_malformed_bank_is_refused_with_the_question_named(mutate, message: str) -> None:
    raw = copy.deepcopy(RAW_BANK)
    mutate(raw)
    with pytest.raises(QuizBankError, match=message):
        quiz.parse_bank(raw)


def test_generated_notebooks_are_up_to_date() -> None:
    assert json.loads(SOURCE_NB.read_text()) == quiz.quiz_notebook(BANK), "run `python -m courseware quiz`"
    assert json.loads(quiz.SELF_CHECK.read_text()) == quiz.self_check_notebook(BANK), "run `python -m courseware quiz`"


def test_every_outline_question_is_present_in_order() -> None:
    practice = [p for p in BANK.practice]
    assert [normalise(p.stem) for p in practice] == [normalise(i["text"]) for i in COVERAGE["practice"]]
    outline_check = [q for q in BANK.check if q.source == "outline"]
    assert [q.id for q in outline_check] == [i["id"] for i in COVERAGE["check"]] == list(quiz.SELF_CHECK_IDS)
    assert [normalise(q.stem) for q in outline_check] == [normalise(i["text"]) for i in COVERAGE["check"]]
    # ... and in that order in the graded quiz (release) and the self-check.
    release = json.loads(RELEASE_NB.read_text())
    question_ids = [
        c["metadata"]["nbgrader"]["grade_id"].removesuffix("-question")
        for c in release["cells"]
        if c["metadata"].get("nbgrader", {}).get("grade_id", "").endswith("-question")
    ]
    assert question_ids == [p.id for p in BANK.practice] + [q.id for q in BANK.check]
    for qid in question_ids:
        stem = next(q.stem for q in (*BANK.practice, *BANK.check) if q.id == qid)
        assert stem in "".join(cell_by_id(release, f"{qid}-question")["source"])
    self_check = SelfCheck.from_payload(_payload_of(json.loads(quiz.SELF_CHECK.read_text())))
    assert [q["stem"] for q in self_check.questions.values()] == [q.stem for q in outline_check]


def test_points_manual_rubrics_and_hidden_tests_in_the_source() -> None:
    source = json.loads(SOURCE_NB.read_text())
    for p in BANK.practice:
        meta = cell_by_id(source, f"{p.id}-answer")["metadata"]["nbgrader"]
        assert meta["grade"] and meta["solution"] and meta["points"] == 3
        answer = "".join(cell_by_id(source, f"{p.id}-answer")["source"])
        assert "### BEGIN SOLUTION" in answer and p.rubric[0][1] in answer, "model answer and rubric for graders"
    for q in BANK.check:
        meta = cell_by_id(source, f"{q.id}-check")["metadata"]["nbgrader"]
        assert meta["grade"] and meta["points"] == 1 and meta["locked"]
        assert "### BEGIN HIDDEN TESTS" in "".join(cell_by_id(source, f"{q.id}-check")["source"])


# --------------------------------------------------------------------------------------------------------------
# The key cannot be recovered from the release.
# --------------------------------------------------------------------------------------------------------------
def test_release_contains_no_key_material() -> None:
    release_text = RELEASE_NB.read_text()
    source = json.loads(SOURCE_NB.read_text())
    for q in BANK.check:
        salt = quiz.salt_for(q, quiz.QUIZ_ID)
        assert salt not in release_text and quiz.answer_digest(salt, q.id, q.key) not in release_text, q.id
        assert f'answer_{q.id} = "{q.key}"' not in release_text
        for option in q.options:  # explanations would give the key away ("Correct. ...")
            assert option.explanation[:60] not in release_text
        assert f'answer_{q.id} = "{q.key}"' in text_of(source), "the source does hold the key (sanity check)"
    for marker in ('"correct"', "Correct.", "HIDDEN", "BEGIN SOLUTION", "hashlib", "Model answer", "Rubric"):
        assert marker not in release_text, marker


def _bank_with_keys_moved(raw: dict) -> dict:
    moved = copy.deepcopy(raw)
    for q in moved["check"]:
        k = next(i for i, o in enumerate(q["options"]) if o["correct"])
        for i, o in enumerate(q["options"]):
            o["correct"] = i == (k + 1) % 4
    return moved


@pytest.mark.grading
def test_release_is_identical_whichever_option_is_the_key(tmp_path: Path) -> None:
    """The strongest form of "can't be recovered": the released bytes do not depend on the key at all.

    Every key moves to another option; the source changes, the release must not. (The committed release is the
    generated one for the real keys: tests/test_grading.py checks that.)
    """
    moved = quiz.quiz_notebook(quiz.parse_bank(_bank_with_keys_moved(RAW_BANK)))
    assert moved != json.loads(SOURCE_NB.read_text()), "the source notebooks differ (they hold the keys)"
    quiz.write_json(tmp_path / "solutions" / "quiz" / "quiz.ipynb", moved)
    grading.release(["quiz"], root=tmp_path)
    released = (tmp_path / "labs" / "quiz" / "quiz.ipynb").read_bytes()
    assert released == RELEASE_NB.read_bytes(), "the release changed when only the keys changed: it leaks the key"


def test_hidden_hash_is_obfuscation_not_secrecy() -> None:
    """What the module docstring admits: whoever sees the hidden test (e.g. in returned feedback) finds the key by
    hashing the four letters. The salt only makes equal letters hash differently across questions."""
    source = json.loads(SOURCE_NB.read_text())
    digests = set()
    for q in BANK.check:
        hidden = "".join(cell_by_id(source, f"{q.id}-check")["source"])
        salt, digest = re.search(r'f"([0-9a-f]{16}):' + q.id + r':.*?== "([0-9a-f]{64})"', hidden, flags=re.S).groups()
        matches = [x for x in LETTERS if hashlib.sha256(f"{salt}:{q.id}:{x}".encode()).hexdigest() == digest]
        assert matches == [q.key]
        digests.add(quiz.answer_digest(salt, q.id, "A"))
    assert len(digests) == len(BANK.check), "per-question salts: the same letter never hashes the same"


# --------------------------------------------------------------------------------------------------------------
# Grading a student's answers (written like a student would: replacing the stub in the release).
# --------------------------------------------------------------------------------------------------------------
def _student_copy(answers: dict[str, str]) -> dict:
    nb = json.loads(RELEASE_NB.read_text())
    for qid, letter in answers.items():
        cell = cell_by_id(nb, f"{qid}-answer")
        src = "".join(cell["source"])
        assert "raise NotImplementedError()" in src
        cell["source"] = src.replace("# YOUR CODE HERE\nraise NotImplementedError()", f'answer_{qid} = "{letter}"')
    for p in BANK.practice:
        cell_by_id(nb, f"{p.id}-answer")["source"] = "Because models drift; monitoring and retraining close the loop."
    return nb


@pytest.fixture(scope="module")
def quiz_course(tmp_path_factory: pytest.TempPathFactory) -> grading.GradingCourse:
    return grading.GradingCourse(tmp_path_factory.mktemp("quiz-course"))


@pytest.mark.slow
@pytest.mark.grading
def test_all_correct_scores_full_and_all_wrong_scores_zero(quiz_course: grading.GradingCourse) -> None:
    right = {q.id: q.key.lower() if i % 2 else q.key for i, q in enumerate(BANK.check)}  # case doesn't matter
    report = quiz_course.autograde("quiz", "all-right", {"quiz": _student_copy(right)})
    assert report.auto_max == len(BANK.check) and report.auto_score == report.auto_max, report.failed()
    assert sum(report.manual.values()) == 15, "five short answers x 3 points, left for the grader"

    wrong = {q.id: LETTERS[(LETTERS.index(q.key) + 1 + i % 3) % 4] for i, q in enumerate(BANK.check)}
    report = quiz_course.autograde("quiz", "all-wrong", {"quiz": _student_copy(wrong)})
    assert report.auto_score == 0, f"wrong answers earned points in {[k for k, v in report.cells.items() if v[0]]}"


def test_quiz_mutants_are_wrong_options_of_the_current_bank() -> None:
    mutants = yaml.safe_load((REPO / "tests" / "mutants" / "quiz.yaml").read_text())
    for m in mutants:
        qid = m["cell"].removesuffix("-answer")
        value = m["source"].split("=", 1)[1].strip().strip('"')
        assert value.upper() != BANK.choice(qid).key, f"mutant {m['name']} is the right answer"
        assert m["fails"] == [f"{qid}-check"]
    assert {m["cell"] for m in mutants} == {f"{q.id}-answer" for q in BANK.check}


# --------------------------------------------------------------------------------------------------------------
# The self-check notebook.
# --------------------------------------------------------------------------------------------------------------
def _payload_of(nb: dict) -> str:
    code = "".join(next(c for c in nb["cells"] if c["cell_type"] == "code")["source"])
    return "".join(re.findall(r'^\s+"([A-Za-z0-9+/=]+)"$', code, flags=re.M))


def test_self_check_file_hides_keys_and_explanations() -> None:
    raw = quiz.SELF_CHECK.read_text()
    for qid in quiz.SELF_CHECK_IDS:
        q = BANK.choice(qid)
        assert q.stem not in raw and all(o.explanation[:50] not in raw for o in q.options)
    assert '"correct"' not in raw and "Correct." not in raw


def test_self_check_scores_first_answers_and_explains_each_choice() -> None:
    check = SelfCheck.from_payload(_payload_of(json.loads(quiz.SELF_CHECK.read_text())))
    assert check.score_text() == "0 / 5 correct"
    keys = {qid: BANK.choice(qid).key for qid in quiz.SELF_CHECK_IDS}
    for qid in ("c1", "c2", "c3"):
        correct, text = check.answer(qid, keys[qid].lower())
        assert correct and text.startswith("Correct.")
    wrong = LETTERS[(LETTERS.index(keys["c4"]) + 1) % 4]
    correct, text = check.answer("c4", wrong)
    expected = BANK.choice("c4").options[LETTERS.index(wrong)].explanation
    assert not correct and text == f"Not the best answer. {expected}"
    check.answer("c4", keys["c4"])  # a second try teaches, but the first answer is the one that counts
    assert check.score_text() == "3 / 5 correct"
    with pytest.raises(ValueError, match="answer with one of A, B, C, D"):
        check.answer("c5", "E")


def test_self_check_widget_runs_from_the_notebook_cell() -> None:
    """Execute the notebook's code cell as Jupyter would, then click through the widgets."""
    nb = json.loads(quiz.SELF_CHECK.read_text())
    namespace: dict = {}
    exec("".join(nb["cells"][1]["source"]), namespace)
    check = namespace["quiz"]
    box = check.widget()
    blocks, score = box.children[:-1], box.children[-1]
    assert len(blocks) == 5 and "0 / 5 correct" in score.value
    for qid, block in zip(quiz.SELF_CHECK_IDS, blocks, strict=True):
        _, radio, button, feedback = block.children
        button.click()
        assert "Choose an option first" in feedback.value
        radio.value = BANK.choice(qid).key if qid != "c5" else LETTERS[(LETTERS.index(BANK.choice(qid).key) + 1) % 4]
        button.click()
        assert ("Correct." in feedback.value) == (qid != "c5")
    assert "4 / 5 correct" in score.value


@pytest.mark.slow
def test_self_check_notebook_executes_in_a_kernel(tmp_path: Path) -> None:
    import nbformat
    from nbclient import NotebookClient

    shutil.copy(quiz.SELF_CHECK, tmp_path / "self-check.ipynb")
    nb = nbformat.read(tmp_path / "self-check.ipynb", as_version=4)
    NotebookClient(nb, timeout=60, resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = nb.cells[1].outputs
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs), outputs
