"""Binder: the config is well-formed, pinned like the rest of the repo, and postBuild works, all without Docker.

postBuild runs for real against a copy of the repository, in a scratch Python environment layered over the course's
virtual environment: the jupyter commands write their configuration into the scratch prefix (never into the shared
venv, which the test checks), and the baseline step runs against the copy's state dir. Only `pip install` is
replaced by a recorder (installing the package again would change nothing this test can observe, and could touch
the network), and the copy's state dir is seeded with an already trained model so the step verifies it instead of
spending ~25 s training again.
"""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from courseware import jupyter_chapter
from courseware.book import Link, link_status

REPO = Path(__file__).resolve().parent.parent
BINDER = REPO / "binder"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[a-z,]+\])?==(\S+)", line)
        if m:
            pins[_key(m.group(1))] = m.group(3)
    return pins


def _requirement_lines() -> list[str]:
    lines = [ln.split("#", 1)[0].strip() for ln in (BINDER / "requirements.txt").read_text().splitlines()]
    return [ln for ln in lines if ln]


# --------------------------------------------------------------------------------------------------------------
# Well-formed configuration.
# --------------------------------------------------------------------------------------------------------------
def test_binder_files_are_well_formed() -> None:
    assert (BINDER / "runtime.txt").read_text().strip() == "python-3.11"
    for line in _requirement_lines():
        assert (
            re.fullmatch(r"[A-Za-z0-9_.-]+(\[[a-z,]+\])?==[0-9][0-9A-Za-z.+]*", line)
            or line == f"--extra-index-url {CPU_INDEX}"
            or line == "-c ../requirements/constraints.txt"
        ), f"unexpected line in binder/requirements.txt: {line!r}"
    assert (BINDER / "../requirements/constraints.txt").resolve().is_file(), "pip resolves -c relative to the file"
    for script in ("postBuild", "start"):
        path = BINDER / script
        text = path.read_text()
        assert os.access(path, os.X_OK), f"binder/{script} must be executable"
        assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
        subprocess.run(["bash", "-n", str(path)], check=True)
    assert (BINDER / "start").read_text().rstrip().endswith('exec "$@"'), "start must hand over to JupyterLab"


def test_pins_match_the_constraints_except_for_cpu_torch() -> None:
    binder = _pins(BINDER / "requirements.txt")
    constraints = _pins(REPO / "requirements" / "constraints.txt")
    for name, version in binder.items():
        assert constraints.get(name) == version, f"binder pins {name}=={version}, constraints {constraints.get(name)}"
    runtime = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    missing = [d for d in runtime if _key(re.match(r"[A-Za-z0-9_.-]+", d).group(0)) not in binder]
    assert not missing, f"runtime dependencies not pinned for Binder: {missing}"
    # CPU torch: the extra index is there and nothing drags in the CUDA stack.
    assert f"--extra-index-url {CPU_INDEX}" in _requirement_lines()
    assert not [n for n in binder if n.startswith(("nvidia-", "cuda-")) or n == "triton"]
    assert binder["torch"] == "2.14.1" and binder["torchvision"] == "0.29.1", "no +cpu suffix: see the comment"


def test_labs_index_links_every_released_lab() -> None:
    index = (REPO / "labs" / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)\)", index)
    for aid in sorted(p.name for p in (REPO / "labs").iterdir() if p.is_dir() and not p.name.startswith(".")):
        assert f"{aid}/{aid}.ipynb" in targets, f"labs/README.md does not link {aid}"
    rendered_chapter = jupyter_chapter.OUT_DIR / "model-deployment-and-monitoring.md"
    for target in targets:  # links resolve, or point at a lab that is not written yet
        path = (REPO / "labs" / target).resolve()
        if path == rendered_chapter:  # written when JupyterLab starts (tests/test_trainee_lab.py checks it)
            continue
        link = Link(os.path.relpath(path, REPO / "chapters"), 0)
        assert link_status(link) in ("ok", "pending"), f"labs/README.md links a missing file: {target}"


# --------------------------------------------------------------------------------------------------------------
# postBuild in a scratch environment.
# --------------------------------------------------------------------------------------------------------------
def _scratch_python(tmp_path: Path) -> Path:
    """A throw-away venv that sees the course venv's packages (a .pth file) but has its own prefix for config."""
    env_dir = tmp_path / "scratch-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    site_dir = next(env_dir.glob("lib/python3*/site-packages"))
    (site_dir / "course-venv.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # pip installs nbgrader's Jupyter configuration (which registers its server extensions) into the environment's
    # prefix; a layered environment has to be given a copy.
    shutil.copytree(Path(sys.prefix) / "etc" / "jupyter", env_dir / "etc" / "jupyter")
    return env_dir / "bin" / "python"


def _copy_repo(dest: Path) -> Path:
    for name in ("binder", "reference_impl", "courseware", "labs", "chapters", "requirements"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", ".mlops"))
    for name in ("pyproject.toml", "README.md", "nbgrader_config.py"):
        shutil.copy(REPO / name, dest / name)
    return dest


def _tree(path: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in path.rglob("*")} if path.exists() else {}


JUPYTER_SHIM = """#!/usr/bin/env bash
# Stand-in for the `jupyter` launcher: the real one runs `jupyter-<subcommand>` from PATH, which could be another
# environment's. Here each subcommand runs as a module of the scratch Python, so it configures the scratch prefix.
case "$1 $2" in
  "labextension "*) shift; exec python -m jupyterlab.labextensions "$@" ;;
  "server extension") shift 2; exec python -m jupyter_server.extension.serverextension "$@" ;;
  *) echo "postBuild called an unexpected jupyter command: $*" >&2; exit 64 ;;
esac
"""


@pytest.fixture(scope="module")
def baseline_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state dir holding the trained baseline model, shared by this session's tests (trained at most once).

    tests/test_instructor.py uses the same folder, so whichever runs first pays the ~25 s of training.
    """
    from reference_impl.loop import baseline_bundle
    from reference_impl.settings import Settings

    state = tmp_path_factory.getbasetemp() / "shared-baseline-state"
    baseline_bundle(Settings(state_dir=state))
    return state


@pytest.mark.slow
def test_postbuild_installs_renders_the_chapter_and_pretrains(tmp_path: Path, baseline_state: Path) -> None:
    repo = _copy_repo(tmp_path / "repo")
    # Training is baseline_bundle's job (and takes ~25 s); what postBuild must get right is calling it with the state
    # dir the labs will use. Seed that dir with a trained bundle: postBuild then verifies it instead of training,
    # and its output shows which bundle it resolved.
    shutil.copytree(baseline_state / "bundles", repo / ".mlops" / "bundles")
    python = _scratch_python(tmp_path)
    prefix = python.parent.parent
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    bin_dir.mkdir()
    home.mkdir()
    calls = tmp_path / "pip-calls.txt"
    # `python` and `jupyter` run in the scratch environment; `pip` only records its arguments and directory.
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{python}" "$@"\n')
    (bin_dir / "jupyter").write_text(JUPYTER_SHIM)
    # What `pip install -e .` amounts to for imports: the repository on the environment's sys.path.
    site_dir = next(prefix.glob("lib/python3*/site-packages"))
    (bin_dir / "pip").write_text(f'#!/bin/sh\necho "$PWD $*" >> "{calls}"\necho "$PWD" > "{site_dir}/course.pth"\n')
    for exe in ("python", "jupyter", "pip"):
        (bin_dir / exe).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLOPS_", "JUPYTER", "VIRTUAL_ENV"))}
    # Nothing of the course venv on PATH, and a private HOME: the shared environment cannot be touched.
    env |= {"PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": str(home)}
    shared_config = Path(sys.prefix) / "etc" / "jupyter"
    before = _tree(shared_config)

    # Run it from elsewhere: postBuild must find the repository by itself.
    proc = subprocess.run([str(repo / "binder" / "postBuild")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert _tree(shared_config) == before, "postBuild changed the course venv's Jupyter configuration"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert calls.read_text().split() == [str(repo), "install", "--no-deps", "-e", "."]

    # The trainee's JupyterLab is not configured in the environment (binder/start points at courseware/trainee/,
    # tests/test_trainee_lab.py starts it), so postBuild leaves the environment's Jupyter configuration alone.
    assert not (prefix / "etc/jupyter/labconfig").exists() and not (prefix / "share/jupyter/lab/settings").exists()
    chapter = repo / "_build" / "chapter" / "model-deployment-and-monitoring.md"
    assert chapter.is_file() and "{{" not in chapter.read_text(), "postBuild renders the chapter the labs link"

    # The model is in the repository's state dir, and `start` points every kernel there.
    bundles = list((repo / ".mlops" / "bundles").glob("baseline-*"))
    assert len(bundles) == 1 and f"baseline model: {bundles[0]}" in proc.stdout, proc.stdout
    probe = (
        "import time; from reference_impl.loop import baseline_bundle; t = time.perf_counter(); "
        "print(baseline_bundle()); print(time.perf_counter() - t)"
    )
    out = subprocess.run([str(repo / "binder" / "start"), "python", "-c", probe], cwd=repo / "labs",
                         env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    path, seconds = out.stdout.split()
    assert Path(path) == bundles[0], "labs find the pre-trained model through the state dir start exports"
    assert float(seconds) < 10, "a cached model verifies in seconds instead of training again"
