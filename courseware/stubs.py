"""The code stub of a released lab names its exercise (nbgrader preprocessor, used by ``nbgrader_config.py``).

nbgrader replaces every solution with one fixed stub, ``raise NotImplementedError()``. A trainee who presses
*Run All* then sees a bare ``NotImplementedError:`` somewhere below, with nothing saying which exercise is missing or
what to do. This subclass of nbgrader's ``ClearSolutions`` remembers the last ``## Exercise N ...`` heading above a
solution cell and puts it in that cell's stub, so the run stops with e.g. ``NotImplementedError: Exercise 2 (a
sha256 manifest) is not done yet: ...``. It runs inside nbgrader's own pipeline, before the checksums nbgrader keeps
of each released cell, so validating and autograding see the stub as the release's unchanged text.
"""

from __future__ import annotations

import re
from typing import Any

from nbgrader.preprocessors import ClearSolutions

EXERCISE_HEADING = re.compile(r"^#+\s*Exercise\s+(\w+)\s*(?:\([^)]*\))?\s*:?\s*(.*?)\s*$", re.M)


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


class ClearSolutionsNamingTheExercise(ClearSolutions):
    """``ClearSolutions`` whose code stub names the exercise the solution cell belongs to."""

    def preprocess(self, nb: Any, resources: Any) -> Any:
        self._exercise: str | None = None
        return super().preprocess(nb, resources)

    def preprocess_cell(self, cell: Any, resources: Any, cell_index: int) -> Any:
        if cell.cell_type == "markdown" and (name := exercise_name(cell.source)):
            self._exercise = name
        if cell.cell_type != "code" or self._exercise is None:
            return super().preprocess_cell(cell, resources, cell_index)
        plain = dict(self.code_stub)
        self.code_stub = {language: named_stub(stub, self._exercise) for language, stub in plain.items()}
        try:
            return super().preprocess_cell(cell, resources, cell_index)
        finally:
            self.code_stub = plain
