"""The trainee's JupyterLab: ``make lab`` (``python -m courseware lab``); Binder's ``start`` sets up the same.

What a trainee gets, and why (issue: "the trainee's JupyterLab"):

- the chapter rendered with the organisation's overlay (:mod:`courseware.jupyter_chapter`), written before
  JupyterLab starts, so every "chapter" link of the labs opens a page that reads like the book;
- the trainee configuration in ``courseware/trainee/`` first on ``JUPYTER_CONFIG_PATH``: the repository as the root
  (links, the self-check and ``reference_impl/`` all open from the file browser), the labs index as the landing
  page, Markdown shown rendered, nbgrader's instructor tools off and locked;
- one state directory for every lab (``.mlops/`` in the repository), so the baseline model is trained once.

Instructors keep nbgrader's formgrader with ``make instructor``, which starts JupyterLab without this configuration.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

from .book import REPO_ROOT

TRAINEE_CONFIG = REPO_ROOT / "courseware" / "trainee"


def trainee_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment JupyterLab (and every kernel it starts) runs with in the trainee's set-up."""
    env = dict(os.environ if base is None else base)
    paths = [str(TRAINEE_CONFIG), *filter(None, env.get("JUPYTER_CONFIG_PATH", "").split(os.pathsep))]
    env["JUPYTER_CONFIG_PATH"] = os.pathsep.join(dict.fromkeys(paths))  # ours first: it overrides the others
    env.setdefault("MLOPS_STATE_DIR", str(REPO_ROOT / ".mlops"))
    return env


def lab_command(extra: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "jupyterlab", *extra]


def main(extra: Sequence[str] = ()) -> int:
    """Render the chapter, then replace this process with JupyterLab (Ctrl-C then stops JupyterLab directly)."""
    from .jupyter_chapter import write_chapter

    chapter = write_chapter()
    print(f"chapter rendered for JupyterLab: {chapter.relative_to(REPO_ROOT)}", flush=True)
    command = lab_command(extra)
    os.execve(command[0], command, trainee_environment())
    return 0  # not reached
