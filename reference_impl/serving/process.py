"""Run the inference server as a real process (for labs, the demo and benchmarks). Chapter: "Serving predictions".

``ServerProcess`` starts ``python -m reference_impl serve`` on a free loopback port, waits until the readiness
probe says the model is loaded, and stops it with SIGTERM (a graceful shutdown that flushes the prediction log),
killing it only if it does not exit in time. Use it as a context manager so the server never outlives you.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        state_dir: str | Path | None = None,
        env: dict[str, str] | None = None,
        port: int | None = None,
        ready_timeout_s: float = 120.0,
        log_path: str | Path | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        if state_dir is not None:
            self.env["MLOPS_STATE_DIR"] = str(state_dir)
        self.ready_timeout_s = ready_timeout_s
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None

    def start(self) -> ServerProcess:
        if self.proc is not None and self.proc.poll() is None:
            # A second start would launch a second server and lose track of the first (it would outlive us).
            raise RuntimeError(f"this server is already running (pid {self.proc.pid}); stop() it first")
        cmd = [sys.executable, "-m", "reference_impl", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               *self.args]  # fmt: skip
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT if self.log_path else None)
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with status {self.proc.returncode} before becoming ready "
                                   f"(command: {' '.join(cmd)})")  # fmt: skip
            try:
                with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not ready after {self.ready_timeout_s:.0f} s")

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, wait, then SIGKILL if needed. Returns the exit status: 0 after a graceful shutdown (the serve
        command drains the queue and flushes the prediction log first), negative if it had to be killed."""
        if self.proc is None or self.proc.poll() is not None:
            self.returncode = self.proc.returncode if self.proc else None
            return self.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.returncode = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.returncode = self.proc.wait()
        return self.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
