"""Feedback a trainee can read without learning the hidden tests (nbgrader's ``generate_feedback`` pipeline).

Autograding restores each test cell with its hidden part, so a feedback page would show the hidden assertions twice:
in the cell's source, and in the traceback of a failed test (Python prints the failing line). nbgrader's own
``ClearHiddenTests`` removes the first (see ``nbgrader_config.py``); :class:`HiddenTestTracebacks` removes the second,
keeping what the trainee needs: which error, and the message the test gives (``"keep the order"``). Hidden tests then
stay useful for the next cohort, and feedback can go back before the deadline of a later section.
"""

from __future__ import annotations

from typing import Any

from nbgrader.preprocessors import NbGraderPreprocessor

HIDDEN_MARKER = "BEGIN HIDDEN TESTS"


class HiddenTestTracebacks(NbGraderPreprocessor):
    """In a graded test cell that has hidden tests, reduce each error output to ``ename: evalue``.

    (nbgrader's base class: nbconvert's own preprocessors are disabled unless configured otherwise.)
    """

    def preprocess_cell(self, cell: Any, resources: Any, index: int) -> tuple[Any, Any]:
        grade = cell.get("metadata", {}).get("nbgrader", {}).get("grade")
        if cell.get("cell_type") != "code" or not grade or HIDDEN_MARKER not in cell.get("source", ""):
            return cell, resources
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                output["traceback"] = [f"{output.get('ename', 'Error')}: {output.get('evalue', '')}"]
        return cell, resources
