"""nbgrader settings a trainee's ``nbgrader validate`` needs, wherever it runs (and the Validate button).

nbgrader reads ``nbgrader_config.py`` from the folder it runs in: this file serves ``labs/``, each lab's folder loads
it (``labs/<lab>/nbgrader_config.py``) and so does the course's own ``nbgrader_config.py`` at the repository root,
so validating, autograding and the instructor's tools all use the same cell timeout.
"""

c = get_config()  # noqa: F821  (provided by nbgrader when it loads this file)

# Labs train and serve small models: on one core a lab's longest cell takes about a minute and a half (Lab 5's
# retraining), far over nbgrader's 30 s default, which would interrupt the kernel and fail a correct answer.
c.Execute.timeout = 300
