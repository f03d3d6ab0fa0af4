"""nbgrader configuration for the course (instructor side).

Source notebooks (with solutions and hidden tests) live in ``solutions/``; ``nbgrader generate_assignment``
writes the student versions to ``labs/``. ``courseware.grading`` reads this same file.
"""

c = get_config()  # noqa: F821  (provided by nbgrader when it loads this file)

c.CourseDirectory.course_id = "weld-mlops"
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "labs"
# Generated data, trained models and caches inside an assignment folder are not part of the release.
c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__", "feedback", ".mlops", "*.db"]
# Labs train small models; a cell may take longer than nbgrader's 30 s default on a 2-core laptop.
c.Execute.timeout = 300
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"
