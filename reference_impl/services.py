"""Local services for the labs: the MLflow tracking/registry UI on loopback. Chapter: "Packaging a model".

``python -m reference_impl services`` starts a real ``mlflow server`` on the same SQLite store and artifact folder
that the registry code uses, so trainees can browse versions, aliases and tags in a browser. It stops cleanly on
Ctrl-C or SIGTERM (the child process is terminated and waited for).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from .settings import Settings


def mlflow_server_command(settings: Settings, host: str, port: int) -> list[str]:
    artifacts = (settings.state_dir / "mlartifacts").resolve()
    return [
        str(Path(sys.executable).with_name("mlflow")), "server",
        "--backend-store-uri", settings.tracking_uri,
        "--default-artifact-root", artifacts.as_uri(),
        "--host", host, "--port", str(port), "--workers", "1",
    ]  # fmt: skip


def wait_for_http(url: str, timeout_s: float = 60.0, failed: Callable[[], str | None] | None = None) -> bool:
    """Poll ``url`` until it answers 200 (True) or the timeout passes (False).

    ``failed``, if given, is asked before each attempt whether the server is known to have died; its message is
    raised as RuntimeError at once instead of waiting for the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        failure = failed() if failed else None
        if failure is not None:
            raise RuntimeError(failure)
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    return False


def run_mlflow_ui(settings: Settings, host: str = "127.0.0.1", port: int = 5000) -> int:
    if host not in ("127.0.0.1", "localhost", "::1"):
        print("warning: the MLflow server has no authentication; bind it to loopback only", file=sys.stderr)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(mlflow_server_command(settings, host, port), env=env)
    url = f"http://{host}:{port}"
    try:
        if wait_for_http(f"{url}/health"):
            print(f"MLflow UI: {url}  (store: {settings.tracking_uri}); Ctrl-C to stop", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
