"""The code stub of a released lab names its exercise (nbgrader preprocessor, used by ``nbgrader_config.py``).

nbgrader replaces every solution with one fixed stub, ``raise NotImplementedError()``. A trainee who presses
*Run All* then sees a bare ``NotImplementedError:`` somewhere below, with nothing saying which exercise is missing or
what to do. This subclass of nbgrader's ``ClearSolutions`` remembers the last ``## Exercise N ...`` heading above a
solution cell and puts it in that cell's stub, so the run stops with e.g. ``NotImplementedError: Exercise 2 (a
sha256 manifest) is not done yet: ...``. It runs inside nbgrader's own pipeline, before the checksums nbgrader keeps
of each released cell, so validating and autograding see the stub as the release's unchanged text.

It also lets *Run All* go past an unfinished exercise when the rest of the lab does not need it: every code cell
of an exercise's section (from its ``## Exercise N`` heading to the next heading of a non-exercise part) gets the
``raises-exception`` tag, which JupyterLab's Run All (and nbclient) honour by reporting the error and going on. So
a trainee who runs the blank Lab 3 still sees the stream, the timeline and the review panel, with each unfinished
exercise's cells showing its "not done yet" message. A lab whose parts each need the exercise before (the capstone)
opts out in its notebook metadata: ``{"courseware": {"run_all_past_exercises": false}}``; its Run All stops at the
first unfinished exercise, with that exercise's name.
"""

from __future__ import annotations

import re
from typing import Any

from nbgrader.preprocessors import ClearSolutions

EXERCISE_HEADING = re.compile(r"^#+\s*Exercise\s+(\w+)\s*(?:\([^)]*\))?\s*:?\s*(.*?)\s*$", re.M)
SECTION_HEADING = re.compile(r"^#{1,2}\s+(.*?)\s*$", re.M)  # "# Lab 3 ..." or "## Part 3 ..." / "## Exercise 2 ..."
CONTINUE_TAG = "raises-exception"


def exercise_name(markdown: str) -> str | None:
    """``## Exercise 2 (4 points): a sha256 manifest`` -> ``Exercise 2 (a sha256 manifest)``."""
    m = EXERCISE_HEADING.search(markdown)
    if not m:
        return None
    return f"Exercise {m.group(1)}" + (f" ({m.group(2)})" if m.group(2) else "")


def named_stub(stub: str, exercise: str) -> str:
    message = (f"{exercise} is not done yet: replace this line with your code (the exercise's text above says "
               "what to write), then run the cells again from here")  # fmt: skip
    return stub.replace("raise NotImplementedError()", f"raise NotImplementedError({message!r})")


def in_exercise_after(markdown: str, before: bool) -> bool:
    """Whether the cells after this markdown cell belong to an exercise's section (``before``: they did above it).

    The last level-1 or level-2 heading of the cell decides: an ``Exercise`` heading opens a section, any other
    (``## Part 5``, ``## Written answer``) closes it; a cell without such a heading changes nothing.
    """
    headings = SECTION_HEADING.findall(markdown)
    if not headings:
        return before
    return bool(EXERCISE_HEADING.match("## " + headings[-1]))


def runs_past_exercises(nb: Any) -> bool:
    """Whether a notebook (nbformat node or plain JSON) lets Run All go past its unfinished exercises."""
    return bool((nb.get("metadata") or {}).get("courseware", {}).get("run_all_past_exercises", True))


class ClearSolutionsNamingTheExercise(ClearSolutions):
    """``ClearSolutions`` whose code stub names the exercise the solution cell belongs to, and which tags the code
    cells of each exercise's section so Run All continues past them (unless the notebook opts out)."""

    def preprocess(self, nb: Any, resources: Any) -> Any:
        self._exercise: str | None = None
        self._in_exercise = False
        self._tag_exercises = runs_past_exercises(nb)
        return super().preprocess(nb, resources)

    def preprocess_cell(self, cell: Any, resources: Any, cell_index: int) -> Any:
        if cell.cell_type == "markdown":
            if name := exercise_name(cell.source):
                self._exercise = name
            self._in_exercise = in_exercise_after(cell.source, self._in_exercise)
        elif self._tag_exercises and self._in_exercise:
            tags = list(cell.metadata.get("tags", []))
            cell.metadata["tags"] = tags if CONTINUE_TAG in tags else [*tags, CONTINUE_TAG]
        if cell.cell_type != "code" or self._exercise is None:
            return super().preprocess_cell(cell, resources, cell_index)
        plain = dict(self.code_stub)
        self.code_stub = {language: named_stub(stub, self._exercise) for language, stub in plain.items()}
        try:
            return super().preprocess_cell(cell, resources, cell_index)
        finally:
            self.code_stub = plain
