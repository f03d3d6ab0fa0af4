"""The server as a real process (the standard v2 client over HTTP, prediction-log durability on SIGTERM), and on a
thread of this process (the lab variant: same HTTP API, graceful stop, clear start-up errors)."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from reference_impl.serving import ServingConfig, predlog
from reference_impl.serving.predlog import read_predictions
from reference_impl.serving.process import ServerProcess, ServerThread
from reference_impl.settings import Settings

MODEL = "weld-defect"
ADMIN_KEY = "process-admin-key-42"
N_TRITON = 20
N_V1 = 30

# Imported by the server process at start-up (a sitecustomize on its PYTHONPATH): the prediction log's disk writes
# become slow, so the writer is still behind when SIGTERM arrives. Only a shutdown that drains the log's queue keeps
# every row; with a fast disk the test could pass even if nothing were flushed on exit.
SLOW_DISK = """
import time
from reference_impl.serving import predlog

_write = predlog.PredictionLog._write


def _slow_write(self, batch):
    time.sleep(0.4)
    _write(self, batch)


predlog.PredictionLog._write = _slow_write
"""


def test_real_server_with_tritonclient_and_a_durable_prediction_log(
    bundle_dir, tmp_path, weld_images, weld_pngs, serving_predictor
):
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    state = tmp_path / "state"
    slow_disk = tmp_path / "slow-disk"
    slow_disk.mkdir()
    (slow_disk / "sitecustomize.py").write_text(SLOW_DISK)
    pythonpath = os.pathsep.join(p for p in (str(slow_disk), os.environ.get("PYTHONPATH")) if p)
    server = ServerProcess(
        ["--bundle", str(bundle_dir), "--device", "cpu"],
        state_dir=state,
        env={"MLOPS_ADMIN_KEY": ADMIN_KEY, "PYTHONPATH": pythonpath},
        log_path=tmp_path / "server.log",
        ready_timeout_s=90,
    )
    server.start()
    expected_ids: list[str] = []
    try:
        client = triton.InferenceServerClient(f"127.0.0.1:{server.port}", connection_timeout=30, network_timeout=30)
        try:
            assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
            assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
            meta = client.get_model_metadata(MODEL)
            assert meta["name"] == MODEL and meta["versions"] == ["1.0-test"]
            assert meta["inputs"][0]["datatype"] == "UINT8" and meta["inputs"][0]["shape"] == [-1, 64, 64]
            with pytest.raises(InferenceServerException, match="unknown model"):
                client.get_model_metadata("nope")

            expected = serving_predictor.predict(list(weld_images.images))
            for i in range(N_TRITON):
                k = i % len(weld_images)
                image = triton.InferInput("image", [1, 64, 64], "UINT8")
                image.set_data_from_numpy(weld_images.images[k][None], binary_data=True)
                outputs = [
                    triton.InferRequestedOutput("probabilities", binary_data=True),
                    triton.InferRequestedOutput("label", binary_data=True),
                ]
                request_id = f"triton-{i:03d}"
                # every third request compressed the way tritonclient offers it (gzip, then deflate)
                compression = (None, "gzip", "deflate")[i % 3]
                result = client.infer(MODEL, [image], outputs=outputs, request_id=request_id,
                                      request_compression_algorithm=compression)  # fmt: skip
                expected_ids.append(request_id)
                assert result.get_response()["id"] == request_id
                assert result.as_numpy("label")[0].decode() == expected.labels[k]
                assert np.allclose(result.as_numpy("probabilities")[0], expected.probabilities[k], atol=1e-5)
        finally:
            client.close()

        # v1 raw-PNG requests from 4 concurrent clients (so some of them share a batch)
        def predict(i: int) -> dict:
            rid = f"v1-{i:03d}"
            response = http.post(
                "/v1/predict",
                content=weld_pngs[i % len(weld_pngs)],
                headers={"content-type": "image/png", "x-request-id": rid},
            )
            assert response.status_code == 200, response.text
            return response.json()

        with httpx.Client(base_url=server.url, timeout=30) as http, ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(predict, range(N_V1)))
            assert http.post("/v1/admin/reload").status_code == 401
            assert http.post("/v1/admin/reload", headers={"x-api-key": ADMIN_KEY}).status_code == 200
        for i, answer in enumerate(answers):
            assert answer["request_id"] == f"v1-{i:03d}"
            assert answer["label"] == expected.labels[i % len(weld_pngs)]
        expected_ids += [f"v1-{i:03d}" for i in range(N_V1)]
    finally:
        server.stop(timeout_s=20)  # SIGTERM right after the last answer; SIGKILL if not gone within 20 s
    log = (tmp_path / "server.log").read_text()
    # The raw status, not ServerProcess's reading of it. uvicorn (>= 0.29) shuts down gracefully on SIGTERM and
    # then re-raises the signal, so the process ends with -SIGTERM rather than 0; a SIGKILL (-9) after the 20 s
    # would mean it hung. That the shutdown was graceful (not the signal's default action) is shown by the
    # prediction log below: the slow disk guarantees rows were still queued when SIGTERM arrived.
    assert server.proc.returncode in (0, -signal.SIGTERM), (server.proc.returncode, log)
    assert "Traceback" not in log, log

    rows = read_predictions(state / "predictions.db")
    assert len(rows) == N_TRITON + N_V1 == len(expected_ids)
    assert {r["role"] for r in rows} == {"champion"} and {r["model_version"] for r in rows} == {"1.0-test"}
    assert sorted(r["request_id"] for r in rows) == sorted(expected_ids)
    assert {r["route"] for r in rows} == {"/v1/predict", f"/v2/models/{MODEL}/infer"}
    # received image files are kept, content-addressed; tensors have no file to keep
    for row in rows:
        stored = list((state / "images").glob(f"*/{row['input_sha256']}.*"))
        if row["request_id"].startswith("v1-"):
            assert len(stored) == 1 and stored[0].parent.name == row["input_sha256"][:2]
            assert hashlib.sha256(stored[0].read_bytes()).hexdigest() == row["input_sha256"]
        else:
            assert stored == [] and row["input_format"] is None
    assert len(list((state / "images").rglob("*.png"))) == len({hashlib.sha256(p).hexdigest() for p in weld_pngs})
    assert not list(Path(state / "images").rglob("*.tmp"))


def test_a_server_cannot_be_started_twice_and_stops_on_exit(bundle_dir, tmp_path):
    """A second start() would launch a second server and lose track of the first, which would then outlive us."""
    with ServerProcess(["--bundle", str(bundle_dir), "--device", "cpu"], state_dir=tmp_path / "state") as server:
        first = server.proc
        with pytest.raises(RuntimeError, match="already running"):
            server.start()
        assert server.proc is first
    assert first.poll() is not None, "the server must be stopped when the with-block ends"


def test_server_thread_serves_over_http_and_drains_its_log_on_stop(
    bundle_dir, tmp_path, weld_pngs, serving_predictor, weld_images, monkeypatch
):
    """The lab variant (Labs 4-5): the same app on a thread of this process. Clients see the same HTTP API, and
    stop() is as graceful as SIGTERM is for the process: every accepted request ends up in the prediction log."""
    _write = predlog.PredictionLog._write

    def slow_write(self, batch):  # the writer is still behind when stop() is called
        time.sleep(0.3)
        _write(self, batch)

    monkeypatch.setattr(predlog.PredictionLog, "_write", slow_write)
    # uvicorn's default logging config would add handlers to these loggers; access_log=False empties the last one
    watched = ("", "uvicorn", "uvicorn.access")
    sentinel = logging.NullHandler()  # a handler the host put on uvicorn's access logger must survive
    logging.getLogger("uvicorn.access").addHandler(sentinel)
    handlers_before = {name: list(logging.getLogger(name).handlers) for name in watched}
    settings = Settings(state_dir=tmp_path / "state")
    server = ServerThread(settings, ServingConfig(bundle_path=str(bundle_dir), admin_key=ADMIN_KEY, device="cpu"))
    with server:
        assert server.thread is not None and server.thread.is_alive()
        with pytest.raises(RuntimeError, match="already running"):
            server.start()
        with httpx.Client(base_url=server.url, timeout=30) as http:
            answers = [http.post("/v1/predict", content=weld_pngs[i % len(weld_pngs)],
                                 headers={"content-type": "image/png"}) for i in range(N_V1)]  # fmt: skip
            assert http.post("/v1/admin/reload").status_code == 401
            assert http.post("/v1/admin/reload", headers={"x-api-key": ADMIN_KEY}).status_code == 200
            assert http.get("/v1/model").json()["champion"]["version"] == "1.0-test"
    assert server.returncode == 0 and not server.thread.is_alive()
    expected = serving_predictor.predict(list(weld_images.images)).labels
    assert [a.json()["label"] for a in answers] == [expected[i % len(weld_pngs)] for i in range(N_V1)]
    assert len(read_predictions(tmp_path / "state" / "predictions.db")) == N_V1
    handlers_after = {name: list(logging.getLogger(name).handlers) for name in watched}
    logging.getLogger("uvicorn.access").removeHandler(sentinel)
    assert handlers_after == handlers_before, "starting a server must not reconfigure the host's logging"
    assert server.stop() == 0, "a second stop is harmless"


def test_server_thread_that_cannot_load_its_model_says_why(tmp_path):
    settings = Settings(state_dir=tmp_path / "state")  # an empty registry: no champion to serve
    server = ServerThread(settings, ServingConfig(model_ref="champion", device="cpu"), ready_timeout_s=60)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="no version or alias 'champion'"):
        server.start()
    assert time.monotonic() - started < 30, "a start-up failure is reported at once, not after the timeout"
    assert server.thread is not None and not server.thread.is_alive() and server.stop() == 3


def test_server_thread_that_crashes_is_not_reported_as_stopped_cleanly(tmp_path, monkeypatch):
    import uvicorn

    def crash(self, sockets=None):
        raise OSError("address already in use")

    monkeypatch.setattr(uvicorn.Server, "run", crash)
    server = ServerThread(Settings(state_dir=tmp_path / "state"), ServingConfig(device="cpu"), ready_timeout_s=30)
    with pytest.raises(RuntimeError, match="server stopped before becoming ready"):
        server.start()
    assert server.stop() == 1, "a crash is not a graceful stop"
