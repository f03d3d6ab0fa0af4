"""The trainee's JupyterLab (``make lab`` and Binder), read because ``courseware.lab`` and ``binder/start`` put this
folder first on ``JUPYTER_CONFIG_PATH``. Instructors run ``make instructor``, which does not.

- the repository is Jupyter's root, so every relative link in the labs (chapter, self-check, reference code) opens;
- JupyterLab lands on the labs index and shows Markdown rendered (``lab-settings/overrides.json``);
- nbgrader's instructor tools are off and locked (``labconfig/page_config.json`` for the browser side,
  ``jupyter_server_config.d/`` for the server side): pip enables them for the whole environment, and the
  formgrader's *Generate* button deletes an assignment folder without asking. *Validate* stays: it runs a lab's
  visible tests with the course's cell timeout (``labs/nbgrader_config.py``).

The JSON files, not this file, switch the extensions: jupyter_server merges ``jpserver_extensions`` from
``jupyter_server_config.d`` key by key, where a dict set here would replace the environment's whole list.
"""

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
c = get_config()  # noqa: F821  (provided by the config loader)
c.ServerApp.root_dir = str(HERE.parents[1])
# `jupyter lab` makes its own default URL (/lab) the server's, so the landing page is set on both.
c.ServerApp.default_url = c.LabApp.default_url = "/lab/tree/labs/README.md"
if hasattr(os, "geteuid") and os.geteuid() == 0:  # a container's root user (CI, some Docker set-ups)
    c.ServerApp.allow_root = True
c.LabApp.app_settings_dir = str(HERE / "lab-settings")
