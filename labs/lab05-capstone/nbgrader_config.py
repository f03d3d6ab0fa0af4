# `nbgrader validate` run in this lab's folder: the course's settings (cell timeout) from ../nbgrader_config.py.
load_subconfig("../nbgrader_config.py")  # noqa: F821  (provided by nbgrader's config loader)
