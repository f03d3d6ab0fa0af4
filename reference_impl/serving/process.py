"""Run the inference server for labs, the demo and benchmarks. Chapter: "Serving predictions".

``ServerProcess`` starts ``python -m reference_impl serve`` on a free loopback port, waits until the readiness
probe says the model is loaded, and stops it with SIGTERM (a graceful shutdown that flushes the prediction log),
killing it only if it does not exit in time. Use it as a context manager so the server never outlives you.

``ServerThread`` runs the very same app (``create_app``) under the very same uvicorn, on a background thread of
the calling process. Clients still talk HTTP to it, so nothing they do changes; what changes is memory: a second
Python process imports torch, MLflow and FastAPI again (about 0.5 GB), which a 2 GB Binder session cannot spare
when a lab also trains a model. Production runs the server as its own process (or container); the thread is a
lab convenience, and its trade-off (the server shares the kernel's GIL and dies with it) is the reason.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

from ..services import wait_for_http

if TYPE_CHECKING:
    import uvicorn

    from ..settings import Settings
    from .config import ServingConfig


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin_to_cpus(cpus: set[int] | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that pins a child process (and every thread it starts) to ``cpus``, as a container's cpuset
    would; None when there is nothing to pin or the platform cannot (sched_setaffinity is Linux only)."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return None
    return lambda: os.sched_setaffinity(0, cpus)


class _StartStop:
    """``with server:`` starts it and always stops it, so a server never outlives the block that started it."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self, timeout_s: float = 20.0) -> int | None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class ServerProcess(_StartStop):
    def __init__(
        self,
        args: Sequence[str] = (),
        *,
        state_dir: str | Path | None = None,
        env: dict[str, str] | None = None,
        port: int | None = None,
        ready_timeout_s: float = 120.0,
        log_path: str | Path | None = None,
        cpus: set[int] | None = None,
    ) -> None:
        self.port = port or free_port()
        # Pin the server (all its threads, created after the pinning) to these CPUs, as a container's cpuset
        # would: benchmarks use it to keep the load generator off the server's cores. Linux only.
        self.cpus = cpus
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
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT if self.log_path else None,
                                     preexec_fn=pin_to_cpus(self.cpus))  # fmt: skip
        proc = self.proc

        def exited() -> str | None:
            if proc.poll() is None:
                return None
            return f"server exited with status {proc.returncode} before becoming ready (command: {' '.join(cmd)})"

        if wait_for_http(f"{self.url}/v2/health/ready", self.ready_timeout_s, exited):
            return self
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


class _ErrorRecorder(logging.Handler):
    """Keeps the error uvicorn logs, so a failed start-up can say why (e.g. no model under that alias)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.last: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:  # the cause; uvicorn's "Application startup failed. Exiting." follows it
            self.last = f"{type(exc).__name__}: {exc}"
        elif self.last is None:
            # Starlette reports a failed lifespan as a formatted traceback: its last line names the exception.
            lines = [line for line in record.getMessage().splitlines() if line.strip()]
            self.last = lines[-1] if lines else None


class ServerThread(_StartStop):
    """The inference server on a background thread of this process: same app, same uvicorn, real HTTP.

    Settings and serving options are passed as objects (no environment variables, no command line), e.g.
    ``ServerThread(settings, ServingConfig(model_ref="champion", admin_key=key))``. ``url``, ``start()``,
    ``stop()`` and the context manager behave like ``ServerProcess``; ``stop()`` returns 0 after a graceful
    shutdown (queue drained, prediction log flushed), 1 if the server thread did not finish in time, and
    uvicorn's exit status (3) if the app failed to start.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        config: ServingConfig | None = None,
        *,
        port: int | None = None,
        ready_timeout_s: float = 120.0,
    ) -> None:
        self.settings = settings
        self.config = config
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_timeout_s = ready_timeout_s
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None
        self.returncode: int | None = None

    def start(self) -> ServerThread:
        import uvicorn

        from .app import create_app

        if self.thread is not None and self.thread.is_alive():
            raise RuntimeError(f"this server is already running at {self.url}; stop() it first")
        app = create_app(self.settings, self.config)
        # Leave the host process's logging (e.g. a notebook's) as it is: log_config=None skips uvicorn's dictConfig,
        # but with access_log=False uvicorn still empties the "uvicorn.access" logger, so that one is restored.
        access = logging.getLogger("uvicorn.access")
        access_handlers, access_propagate = list(access.handlers), access.propagate
        uv_config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None, log_level="warning",
                                   access_log=False, timeout_graceful_shutdown=15)  # fmt: skip
        access.handlers[:], access.propagate = access_handlers, access_propagate
        self.server = uvicorn.Server(uv_config)
        errors = _ErrorRecorder()
        uv_logger = logging.getLogger("uvicorn.error")
        uv_logger.addHandler(errors)
        # daemon: a thread left running must not keep the process alive at exit. Stop it yourself (or register
        # server.stop with atexit, as the labs do) so the last prediction-log records are flushed.
        self.thread = threading.Thread(target=self._serve, name=f"inference-server-{self.port}", daemon=True)
        server, thread = self.server, self.thread
        self.returncode = None
        deadline = time.monotonic() + self.ready_timeout_s

        def died() -> str | None:
            if thread.is_alive():
                return None
            return f"server stopped before becoming ready: {errors.last or 'see the uvicorn log above'}"

        try:
            thread.start()
            # uvicorn loads the app (the model) before it binds the port. Poll HTTP only once it listens, so that
            # another process on this port can never be mistaken for our server.
            while not server.started and time.monotonic() < deadline:
                failure = died()
                if failure is not None:
                    raise RuntimeError(failure)
                time.sleep(0.05)
            if server.started and wait_for_http(
                f"{self.url}/v2/health/ready", max(deadline - time.monotonic(), 0.5), died
            ):
                return self
        except BaseException:  # including Ctrl-C while waiting: never leave a half-started server behind
            self.stop()
            raise
        finally:
            uv_logger.removeHandler(errors)
        self.stop()
        raise TimeoutError(f"server not ready after {self.ready_timeout_s:.0f} s")

    def _serve(self) -> None:
        assert self.server is not None
        try:
            self.server.run()
        except SystemExit as exc:
            # uvicorn ends with sys.exit(3) when the app fails to start (e.g. the model can't be loaded). In a
            # thread that would only print a stray traceback; start() reports the logged cause instead.
            self.returncode = exc.code if isinstance(exc.code, int) else 1
        except Exception:  # a crash must not read as a graceful stop (returncode 0) later
            logging.getLogger(__name__).exception("the inference server thread crashed")
            self.returncode = 1

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """Ask uvicorn to shut down gracefully (what SIGTERM does to the process) and wait for the thread."""
        if self.server is None or self.thread is None:
            return self.returncode
        if self.thread.is_alive():
            self.server.should_exit = True
            self.thread.join(timeout_s)
            self.returncode = 1 if self.thread.is_alive() else 0
        elif self.returncode is None:
            self.returncode = 0
        return self.returncode
