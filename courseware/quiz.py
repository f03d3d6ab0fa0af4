"""Quizzes from one question bank: an nbgrader-graded quiz and an interactive self-check.

``quizzes/bank.yaml`` holds the chapter's five practice questions (short answers with a model answer and a rubric)
and the multiple-choice questions (four options, one key, an explanation for every option). From it
``python -m courseware quiz`` generates:

* ``solutions/quiz/quiz.ipynb``, an nbgrader *source* assignment, released like every lab to ``labs/quiz/``. Each
  multiple-choice question is worth one autograded point; each short answer is graded by hand with the rubric,
  which sits with the model answer inside ``### BEGIN SOLUTION`` so only graders see it.
* ``quizzes/self-check.ipynb``: the chapter's five check-your-understanding questions with radio buttons, instant
  explanations and a running score ("3 / 5 correct").

What "the release does not reveal the key" means, precisely
------------------------------------------------------------
The released notebook is generated from the questions and options only: its bytes are identical whichever option is
the key (``tests/test_quiz.py`` proves it by moving every key and regenerating). The grading test that knows the key
is an nbgrader *hidden test*, which exists only in the instructor's source and gradebook. It compares a salted SHA-256
of the answer rather than the letter, so the key is not in plain text in the test cells that the gradebook stores and
the returned feedback shows (the instructor's source notebook does hold it, in its solution cells, as does the bank).
That hash is obfuscation, not secrecy: with four options, anyone holding the test can hash all four and see which one
matches (the salt only stops equal answers from having equal hashes across questions). Hence: *before grading* the key
is unrecoverable from what students receive; *after* feedback is returned, a student who reads the feedback's test
code can recover it. Return feedback after the deadline. (Questions c1-c5 also appear in the self-check notebook,
which explains every option by design: they are practised questions, not secret ones.)

nbgrader 0.9's own ``### HASHED AUTOTEST`` (with ``autotests.yml``) writes ``assert sha1(answer + salt) == digest``
into the *visible* test cell, so a student can run it against each option and learn the key before submitting. It
is meant for self-checking exercises, not graded multiple choice, which is why the hidden hashed test is generated
here instead. The self-check notebook deliberately reveals each explanation after an answer (that is its purpose);
its feedback is stored encoded so the key is not readable in the file, and it counts only the first answer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
BANK = REPO_ROOT / "quizzes" / "bank.yaml"
QUIZ_ID = "quiz"
SELF_CHECK = REPO_ROOT / "quizzes" / "self-check.ipynb"
SELF_CHECK_IDS = ("c1", "c2", "c3", "c4", "c5")  # the chapter's "Check your understanding" questions
LETTERS = "ABCD"
CHAPTER_LINK = "../../_build/chapter/model-deployment-and-monitoring.md"


class QuizBankError(ValueError):
    """The question bank is malformed; the message names the question and the field."""


# --------------------------------------------------------------------------------------------------------------
# The bank.
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    text: str
    correct: bool
    explanation: str


@dataclass(frozen=True)
class Choice:
    """A multiple-choice question: exactly four options, exactly one correct."""

    id: str
    source: str  # "outline" (the chapter's own questions) or "labs"
    section: str  # MyST label of the chapter section it checks
    objective: str
    stem: str
    options: tuple[Option, ...]

    @property
    def key(self) -> str:
        """The letter of the correct option."""
        return next(LETTERS[i] for i, o in enumerate(self.options) if o.correct)


@dataclass(frozen=True)
class Practice:
    """A short-answer question graded by hand against ``rubric`` (points, criterion)."""

    id: str
    section: str
    objective: str
    stem: str
    model_answer: str
    rubric: tuple[tuple[int, str], ...]

    @property
    def points(self) -> int:
        return sum(p for p, _ in self.rubric)


@dataclass(frozen=True)
class Bank:
    practice: tuple[Practice, ...]
    check: tuple[Choice, ...]

    def choice(self, qid: str) -> Choice:
        for q in self.check:
            if q.id == qid:
                return q
        raise KeyError(f"no multiple-choice question {qid!r} in the bank")


def _text(raw: dict[str, Any], key: str, where: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value.strip():
        raise QuizBankError(f"{where}.{key} must be non-empty text; got {value!r}")
    return " ".join(value.split()) if key != "model_answer" else value.strip()


def parse_bank(raw: Any, source: str = "bank") -> Bank:
    """Validate the bank's structure (ids unique, four options, one key, every option explained)."""
    if not isinstance(raw, dict) or set(raw) != {"practice", "check"}:
        raise QuizBankError(f"{source}: expected exactly two sections, practice and check")
    seen: set[str] = set()

    def new_id(item: dict[str, Any], where: str) -> str:
        qid = _text(item, "id", where)
        if qid in seen:
            raise QuizBankError(f"{where}: duplicate id {qid!r}")
        seen.add(qid)
        return qid

    practice = []
    for i, item in enumerate(raw["practice"] or []):
        where = f"{source}: practice[{i}]"
        qid = new_id(item, where)
        rubric = item.get("rubric")
        if not isinstance(rubric, list) or not rubric:
            raise QuizBankError(f"{where} ({qid}).rubric must be a list of {{points, criterion}}")
        criteria = []
        for j, r in enumerate(rubric):
            if not isinstance(r.get("points"), int) or isinstance(r.get("points"), bool) or r["points"] <= 0:
                raise QuizBankError(f"{where} ({qid}).rubric[{j}].points must be a positive whole number")
            criteria.append((r["points"], _text(r, "criterion", f"{where}.rubric[{j}]")))
        practice.append(
            Practice(
                qid,
                _text(item, "section", where),
                _text(item, "objective", where),
                _text(item, "stem", where),
                _text(item, "model_answer", where),
                tuple(criteria),
            )
        )
    check = []
    for i, item in enumerate(raw["check"] or []):
        where = f"{source}: check[{i}]"
        qid = new_id(item, where)
        options = item.get("options")
        if not isinstance(options, list) or len(options) != len(LETTERS):
            raise QuizBankError(f"{where} ({qid}) must have exactly {len(LETTERS)} options")
        opts = []
        for j, o in enumerate(options):
            if not isinstance(o.get("correct"), bool):
                raise QuizBankError(f"{where} ({qid}).options[{j}].correct must be true or false")
            text, explanation = (
                _text(o, "text", f"{where}.options[{j}]"),
                _text(o, "explanation", f"{where}.options[{j}]"),
            )
            opts.append(Option(text, o["correct"], explanation))
        if sum(o.correct for o in opts) != 1:
            raise QuizBankError(f"{where} ({qid}) must have exactly one correct option")
        if item.get("source") not in ("outline", "labs"):
            raise QuizBankError(f"{where} ({qid}).source must be 'outline' or 'labs'")
        check.append(
            Choice(
                qid,
                item["source"],
                _text(item, "section", where),
                _text(item, "objective", where),
                _text(item, "stem", where),
                tuple(opts),
            )
        )
    return Bank(tuple(practice), tuple(check))


def load_bank(path: str | Path = BANK) -> Bank:
    import yaml

    path = Path(path)
    return parse_bank(yaml.safe_load(path.read_text(encoding="utf-8")), source=path.name)


# --------------------------------------------------------------------------------------------------------------
# Salted answer hashes.
# --------------------------------------------------------------------------------------------------------------
def salt_for(question: Choice, purpose: str) -> str:
    """A per-question salt, deterministic so regenerating the quiz gives byte-identical notebooks.

    It depends only on public text (id, stem), never on the key: its job is to make equal letters hash differently
    in different questions, not to be secret.
    """
    return hashlib.sha256(f"{purpose}:{question.id}:{question.stem}".encode()).hexdigest()[:16]


def answer_digest(salt: str, qid: str, letter: str) -> str:
    """The hash the graders compare: ``sha256("<salt>:<id>:<LETTER>")``, letter stripped and upper-cased."""
    return hashlib.sha256(f"{salt}:{qid}:{letter.strip().upper()}".encode()).hexdigest()


# --------------------------------------------------------------------------------------------------------------
# The graded nbgrader quiz.
# --------------------------------------------------------------------------------------------------------------
def _meta(grade_id: str, *, grade: bool = False, solution: bool = False, locked: bool = True, points: int = 0) -> dict:
    meta: dict[str, Any] = {
        "schema_version": 3,
        "task": False,
        "grade": grade,
        "grade_id": grade_id,
        "locked": locked,
        "solution": solution,
    }
    if grade:
        meta["points"] = points
    return {"nbgrader": meta}


def _cell(kind: str, source: str, metadata: dict | None = None) -> dict[str, Any]:
    cell: dict[str, Any] = {"cell_type": kind, "id": "", "metadata": metadata or {}, "source": source}
    if kind == "code":
        cell |= {"execution_count": None, "outputs": []}
    return cell


def _notebook(cells: list[dict[str, Any]]) -> dict[str, Any]:
    for n, cell in enumerate(cells):
        cell["id"] = f"cell-{n:02d}"  # deterministic ids: regenerating gives byte-identical files
        cell["source"] = cell["source"].rstrip("\n").splitlines(keepends=True)  # nbformat's list form
    return {
        "cells": cells,
        "metadata": {
            "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
            "language_info": {"name": "python", "version": "3.11"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def _options_markdown(q: Choice) -> str:
    return "\n".join(f"- **{LETTERS[i]}.** {o.text}" for i, o in enumerate(q.options))


QUIZ_INTRO = """\
# Quiz: Model Deployment and Monitoring

**Chapter:** [Model Deployment and Monitoring]({chapter}) (all sections) and the labs.
**Depth:** Tier 4, architecture and tradeoffs. **Time:** about 40 minutes.

**Part 1** has {n_practice} short-answer questions ({manual} points, graded by your instructor with a rubric): answer
each in the cell below it, in a few sentences. **Part 2** has {n_mcq} multiple-choice questions ({n_mcq} points, one
each, graded automatically): each has exactly one best answer.

**How to answer a multiple-choice question.** In the cell under the question, replace the two lines
`# YOUR CODE HERE` and `raise NotImplementedError()` with one line such as `answer_c1 = "B"`. Run the check cell after
it: it only confirms that you answered with one letter (A, B, C or D), not whether the answer is right; grading uses
hidden tests. Do not rename the `answer_...` variables.
"""


def _practice_cells(q: Practice) -> list[dict[str, Any]]:
    rubric = "\n".join(f"- {p} point{'s' if p != 1 else ''}: {c}" for p, c in q.rubric)
    answer = (
        f"### BEGIN SOLUTION\n**Model answer.** {q.model_answer}\n\n"
        f"**Rubric ({q.points} points).**\n{rubric}\n### END SOLUTION"
    )
    return [
        _cell("markdown", f"### {q.id.upper()} ({q.points} points)\n\n{q.stem}", _meta(f"{q.id}-question")),
        # A manually graded answer: the model answer and rubric are the "solution", so only graders see them.
        _cell("markdown", answer, _meta(f"{q.id}-answer", grade=True, solution=True, locked=False, points=q.points)),
    ]


def _choice_cells(q: Choice) -> list[dict[str, Any]]:
    var, salt = f"answer_{q.id}", salt_for(q, QUIZ_ID)
    answer = (
        f'# Set {var} to the letter of the best option: "A", "B", "C" or "D".\n'
        f'### BEGIN SOLUTION\n{var} = "{q.key}"\n### END SOLUTION'
    )
    # Visible: a form check, identical whatever the key is. Hidden (instructor's copy only): the salted hash.
    check = (
        "# Checks the form of your answer only; the test that grades it is hidden.\n"
        f'assert str({var}).strip().upper() in ("A", "B", "C", "D"), '
        f'f"answer with one letter, A, B, C or D; got {{{var}!r}}"\n'
        "### BEGIN HIDDEN TESTS\n"
        "import hashlib\n\n"
        f'_given = hashlib.sha256(f"{salt}:{q.id}:{{str({var}).strip().upper()}}".encode()).hexdigest()\n'
        f'assert _given == "{answer_digest(salt, q.id, q.key)}", "{q.id}: not the best answer"\n'
        "### END HIDDEN TESTS"
    )
    return [
        _cell(
            "markdown", f"### {q.id.upper()} (1 point)\n\n{q.stem}\n\n{_options_markdown(q)}", _meta(f"{q.id}-question")
        ),
        _cell("code", answer, _meta(f"{q.id}-answer", solution=True, locked=False)),
        _cell("code", check, _meta(f"{q.id}-check", grade=True, points=1)),
    ]


def quiz_notebook(bank: Bank) -> dict[str, Any]:
    """The nbgrader source notebook of the graded quiz (solutions, rubrics and hidden hashed tests included)."""
    intro = QUIZ_INTRO.format(
        chapter=CHAPTER_LINK,
        n_practice=len(bank.practice),
        manual=sum(p.points for p in bank.practice),
        n_mcq=len(bank.check),
    )
    cells = [_cell("markdown", intro, _meta("md-intro")), _cell("markdown", "## Part 1: short answers")]
    for p in bank.practice:
        cells += _practice_cells(p)
    cells.append(_cell("markdown", "## Part 2: multiple choice"))
    for q in bank.check:
        cells += _choice_cells(q)
    done = "## Done\n\nSave the notebook and submit it as your instructor explained."
    cells.append(_cell("markdown", done))
    return _notebook(cells)


def write_json(path: Path, nb: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------------
# The self-check notebook and its widget.
# --------------------------------------------------------------------------------------------------------------
def encode_payload(questions: list[dict[str, Any]]) -> str:
    """Questions, options and feedback as one base64 blob: the answers are not in plain sight in the file."""
    return base64.b64encode(zlib.compress(json.dumps(questions, ensure_ascii=False).encode(), 9)).decode()


def decode_payload(payload: str) -> list[dict[str, Any]]:
    return json.loads(zlib.decompress(base64.b64decode("".join(payload.split()))))


def self_check_payload(bank: Bank, ids: tuple[str, ...] = SELF_CHECK_IDS) -> str:
    questions = []
    for qid in ids:
        q = bank.choice(qid)
        salt = salt_for(q, "self-check")
        questions.append(
            {
                "id": q.id,
                "stem": q.stem,
                "options": [o.text for o in q.options],
                # "Correct." is added back by the widget when the hash matches; stored explanations don't say it.
                "feedback": [o.explanation.removeprefix("Correct.").strip() for o in q.options],
                "salt": salt,
                "key": answer_digest(salt, q.id, q.key),
            }
        )
    return encode_payload(questions)


def self_check_notebook(bank: Bank, ids: tuple[str, ...] = SELF_CHECK_IDS) -> dict[str, Any]:
    payload = self_check_payload(bank, ids)
    chunks = [payload[i : i + 100] for i in range(0, len(payload), 100)]
    blob = "\n".join(f'    "{c}"' for c in chunks)
    intro = f"""# Check your understanding: Model Deployment and Monitoring

The chapter's {len(ids)} questions at *Tier 4* depth (architecture and tradeoffs). Each has one best answer; the other
options are choices practitioners really make, so read why each is wrong.

**How it works.** Run the cell below (or *Run > Run All Cells*). Pick an option and press **Check**: you see whether
it is the best answer and why. Your **first** answer to each question counts toward the score; afterwards you may
try the other options to read their explanations. Nothing is recorded or sent anywhere.

Chapter: [Model Deployment and Monitoring](../_build/chapter/model-deployment-and-monitoring.md#sec-quiz). The graded
quiz, which also covers the labs, is `labs/quiz/quiz.ipynb`.
"""
    code = f"""from courseware.quiz import SelfCheck

# Questions and feedback are encoded so the answers are not in plain sight; this is a self-check, not an exam.
quiz = SelfCheck.from_payload(
{blob}
)
quiz
"""
    return _notebook([_cell("markdown", intro), _cell("code", code)])


@dataclass
class Attempt:
    letter: str
    correct: bool


class SelfCheck:
    """Multiple-choice self-check with instant feedback and a running score (chapter: "Check your understanding").

    The logic (:meth:`answer`, :attr:`score`) works without a display, so it is testable and usable in a plain
    terminal; :meth:`widget` wraps it in ipywidgets: radio buttons and a **Check** button per question.
    """

    def __init__(self, questions: list[dict[str, Any]]) -> None:
        self.questions = {q["id"]: q for q in questions}
        self.first: dict[str, Attempt] = {}  # the first answer per question is the one that counts
        self._score_label: Any = None

    @classmethod
    def from_payload(cls, payload: str) -> SelfCheck:
        return cls(decode_payload(payload))

    def answer(self, qid: str, letter: str) -> tuple[bool, str]:
        """Check ``letter`` for question ``qid``: (is it the best answer, the explanation to show)."""
        q = self.questions[qid]
        letter = letter.strip().upper()
        if len(letter) != 1 or letter not in LETTERS[: len(q["options"])]:
            raise ValueError(f"answer with one of {', '.join(LETTERS[: len(q['options'])])}; got {letter!r}")
        correct = answer_digest(q["salt"], qid, letter) == q["key"]
        self.first.setdefault(qid, Attempt(letter, correct))
        explanation = q["feedback"][LETTERS.index(letter)]
        return correct, (f"Correct. {explanation}" if correct else f"Not the best answer. {explanation}")

    @property
    def score(self) -> tuple[int, int]:
        """(first answers that were correct, number of questions)."""
        return sum(a.correct for a in self.first.values()), len(self.questions)

    def score_text(self) -> str:
        right, total = self.score
        return f"{right} / {total} correct"

    def widget(self) -> Any:
        """The interactive version: one block per question, the running score at the bottom."""
        import html

        import ipywidgets as w

        self._score_label = w.HTML(f"<b>{self.score_text()}</b>")
        blocks = []
        for n, (qid, q) in enumerate(self.questions.items(), start=1):
            choices = [(f"{LETTERS[i]}. {text}", LETTERS[i]) for i, text in enumerate(q["options"])]
            radio = w.RadioButtons(options=choices, value=None, layout=w.Layout(width="100%"))
            button = w.Button(description="Check", button_style="primary")
            feedback = w.HTML()

            def on_click(_: Any, qid: str = qid, radio: Any = radio, feedback: Any = feedback) -> None:
                if radio.value is None:
                    feedback.value = "<i>Choose an option first.</i>"
                    return
                correct, text = self.answer(qid, radio.value)
                colour = "#1b7f3b" if correct else "#b3261e"
                feedback.value = f'<div style="color:{colour}">{html.escape(text)}</div>'
                self._score_label.value = f"<b>{self.score_text()}</b>"

            button.on_click(on_click)
            stem = w.HTML(f"<p><b>{n}. {html.escape(q['stem'])}</b></p>")
            blocks.append(w.VBox([stem, radio, button, feedback], layout=w.Layout(margin="0 0 1.5em 0")))
        return w.VBox([*blocks, self._score_label])

    def _ipython_display_(self) -> None:
        from IPython.display import display

        try:
            display(self.widget())
        except ImportError:  # no ipywidgets: fall back to text, answer with quiz.answer("c1", "B")
            for qid, q in self.questions.items():
                print(f"{qid}: {q['stem']}")
                for i, text in enumerate(q["options"]):
                    print(f"   {LETTERS[i]}. {text}")
            print('ipywidgets is not installed: answer with quiz.answer("c1", "B")')


# --------------------------------------------------------------------------------------------------------------
# Generation.
# --------------------------------------------------------------------------------------------------------------
def generate(root: Path = REPO_ROOT, bank_path: Path | None = None, *, release: bool = True) -> list[Path]:
    """Write the quiz source, release it to ``labs/quiz/`` (nbgrader) and write the self-check notebook."""
    from . import grading

    bank = load_bank(bank_path or root / "quizzes" / "bank.yaml")
    written = [write_json(root / grading.SOURCE_DIR / QUIZ_ID / f"{QUIZ_ID}.ipynb", quiz_notebook(bank))]
    if release:
        written += grading.release([QUIZ_ID], root=root)
    written.append(write_json(root / "quizzes" / "self-check.ipynb", self_check_notebook(bank)))
    return written
