"""Start a real JupyterLab for a test (``make lab``, Binder's ``start``) and talk to it over HTTP."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from reference_impl.serving.process import free_port

TOKEN = "course-test-token"


@dataclass
class Lab:
    url: str
    proc: subprocess.Popen[str]
    log: Path

    def get(self, path: str, *, follow: bool = True) -> tuple[int, dict[str, str], str]:
        """GET ``path`` with the token; returns (status, headers, body). Redirects are not followed if ``follow``
        is False, so a test can see where the server sends a browser."""

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: object, **kwargs: object) -> None:
                return None

        opener = urllib.request.build_opener() if follow else urllib.request.build_opener(NoRedirect)
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"token {TOKEN}"})
        try:
            with opener.open(request, timeout=30) as response:
                return response.status, dict(response.headers), response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read().decode(errors="replace")

    def post_json(self, path: str, body: dict, timeout: float = 600) -> tuple[int, dict]:
        """POST a JSON body with the token (what JupyterLab's front end does for a button such as Validate)."""
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Authorization": f"token {TOKEN}",
                                                  "Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read().decode())
        except urllib.error.HTTPError as exc:
            return exc.code, {"error": exc.read().decode(errors="replace")}

    def page_config(self, path: str = "/lab") -> dict:
        """The configuration JupyterLab renders into its page (what the browser's JupyterLab actually reads)."""
        status, _, html = self.get(path)
        assert status == 200, f"{path}: HTTP {status}"
        m = re.search(r'<script id="jupyter-config-data" type="application/json">(.*?)</script>', html, re.S)
        assert m, "no jupyter-config-data in the page"
        return json.loads(m.group(1))


def jupyter_args(port: int) -> list[str]:
    return ["--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={TOKEN}",
            "--ServerApp.port_retries=0"]  # fmt: skip


@contextmanager
def running_lab(
    command: Sequence[str], *, cwd: Path, env: dict[str, str], log: Path, port: int | None = None,
    ready_timeout_s: float = 180.0,
) -> Iterator[Lab]:  # fmt: skip
    """Run ``command`` (which must start JupyterLab on ``port``) until the block ends, then stop it with SIGTERM
    (JupyterLab then shuts its kernels down) and wait for it."""
    port = port or free_port()
    out = log.open("w")
    proc = subprocess.Popen([*command], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    lab = Lab(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"JupyterLab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if lab.get("/api/status")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"JupyterLab not up after {ready_timeout_s:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield lab
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # make, python -m courseware lab (exec'd into jupyter) alike
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out.close()
