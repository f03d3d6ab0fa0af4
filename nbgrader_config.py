"""nbgrader configuration for the course (instructor side).

Source notebooks (with solutions and hidden tests) live in ``solutions/``; ``nbgrader generate_assignment``
writes the student versions to ``labs/``. ``courseware.grading`` reads this same file.
"""

c = get_config()  # noqa: F821  (provided by nbgrader when it loads this file)

c.CourseDirectory.course_id = "weld-mlops"
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "labs"
# Generated data, trained models and caches inside an assignment folder are not part of the release.
c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__", "feedback", ".mlops", "*.db",
                            "lab03-evidently-report.html"]  # what running a notebook leaves beside it
# The settings trainees need too (the cell timeout) live in labs/, which trainees have: one value for validate,
# the Validate button and autograding.
load_subconfig("labs/nbgrader_config.py")  # noqa: F821
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
# nbgrader's release pipeline, with ClearSolutions replaced by a subclass whose stub names the exercise
# (courseware/stubs.py): an unfinished exercise says "Exercise 2 (...) is not done yet", not a bare
# NotImplementedError, and its cells are tagged so Run All goes on with the parts that do not need it.
from nbgrader.converters import GenerateAssignment  # noqa: E402
from nbgrader.preprocessors import ClearSolutions  # noqa: E402

from courseware.stubs import ClearSolutionsNamingTheExercise  # noqa: E402

c.GenerateAssignment.preprocessors = [
    ClearSolutionsNamingTheExercise if p is ClearSolutions else p for p in GenerateAssignment.preprocessors.default()
]
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"

# Feedback without the hidden tests: their source (nbgrader's ClearHiddenTests) and the failing lines that tracebacks
# print (courseware/feedback.py; it must run first, while the markers are still in the source).
from nbgrader.converters import GenerateFeedback  # noqa: E402
from nbgrader.preprocessors import ClearHiddenTests, GetGrades  # noqa: E402

from courseware.feedback import HiddenTestTracebacks  # noqa: E402

_feedback = GenerateFeedback.preprocessors.default()
c.GenerateFeedback.preprocessors = [*_feedback[: _feedback.index(GetGrades) + 1], HiddenTestTracebacks,
                                    ClearHiddenTests, *_feedback[_feedback.index(GetGrades) + 1:]]  # fmt: skip
