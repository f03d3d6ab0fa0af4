"""The inference server (serving/): v1 routes, Open Inference Protocol v2, metrics, bad input, auth, batching,
shadow, canary and hot reload. In-process: FastAPI's TestClient, or httpx over ASGITransport for concurrency."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import struct
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from reference_impl import data
from reference_impl.data import decode_image, sha256_file
from reference_impl.serving import ServingConfig, create_app
from reference_impl.serving.predlog import read_predictions
from reference_impl.serving.service import in_canary
from reference_impl.settings import Settings

ADMIN_KEY = "test-admin-key-0123456789"
MODEL = "weld-defect"
INFER = f"/v2/models/{MODEL}/infer"
PNG = {"content-type": "image/png"}


# ------------------------------------------------------------------------------------------------------ helpers
def samples(client: Any, text: str | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every Prometheus sample of /metrics, keyed by (sample name, sorted labels)."""
    if text is None:
        response = client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        text = response.text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(found: dict, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def total(found: dict, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(v for (n, lab), v in found.items() if n == name and set(labels.items()) <= set(lab))


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def assert_client_error(response: httpx.Response, status: int | tuple[int, ...]) -> str:
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body.get("error"), str) and body["error"].strip(), body
    return body["error"]


def encode(image: np.ndarray | Image.Image, fmt: str, **kwargs: Any) -> bytes:
    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels (a decompression bomb's calling card), with no data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def tensor(datatype: str, shape: list[int], values: Any, **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "image", "datatype": datatype, "shape": shape, "data": values}], **extra}


def expected_for(predictor: Any, payload: bytes) -> tuple[str, np.ndarray]:
    p = predictor.predict([decode_image(payload)])
    return p.labels[0], p.probabilities[0]


def probs_of(answer: dict[str, Any], classes: tuple[str, ...]) -> np.ndarray:
    return np.array([answer["probabilities"][c] for c in classes])


def binary_request(header: dict[str, Any], blobs: list[bytes]) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(head)),
    }


def split_binary_response(response: httpx.Response) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The JSON header and each output's raw bytes of a binary-extension v2 response."""
    length = int(response.headers["inference-header-content-length"])
    header = json.loads(response.content[:length])
    blobs, offset = {}, length
    for out in header["outputs"]:
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            blobs[out["name"]] = response.content[offset : offset + size]
            offset += size
    assert offset == len(response.content)
    return header, blobs


def run_async(app: Any, scenario: Callable[[httpx.AsyncClient], Awaitable[Any]]) -> Any:
    """Run ``scenario(http)`` with the app's lifespan (model load, warm-up, shutdown) around it, in one event
    loop: requests sent with asyncio.gather are really concurrent."""

    async def main() -> Any:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://server", timeout=60) as http:
                return await scenario(http)

    return asyncio.run(main())


def slow_down(handle: Any, seconds: float) -> Callable[[], None]:
    """Make one model handle's inference slow; returns the function that undoes it. Handles are frozen
    dataclasses, so the instance attribute is set with object.__setattr__."""
    original = handle.infer

    def slow_infer(x: Any) -> np.ndarray:
        time.sleep(seconds)
        return original(x)

    object.__setattr__(handle, "infer", slow_infer)
    return lambda: object.__setattr__(handle, "infer", original)


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def server_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server-state")


@pytest.fixture(scope="module")
def client(bundle_dir: Path, server_state: Path) -> Iterator[TestClient]:
    """One server for the read-mostly tests of this module (bundle mode, admin key set)."""
    config = ServingConfig(bundle_path=str(bundle_dir), admin_key=ADMIN_KEY, device="cpu")
    app = create_app(Settings(state_dir=server_state), config)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def limited_client(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """A server with small limits: 256x256 pixels, 256 KiB bodies, 4 images per request."""
    config = ServingConfig(
        bundle_path=str(bundle_dir),
        max_pixels=256 * 256,
        max_body_bytes=256 * 1024,
        max_images_per_request=4,
        device="cpu",
    )
    app = create_app(Settings(state_dir=tmp_path_factory.mktemp("limited-state")), config)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def images16() -> np.ndarray:
    return data.generate(2, seed=321, bit_depth=16).images


# ---------------------------------------------------------------------------------------------- health, model
def test_health_and_model_routes(client, bundle_dir, serving_predictor):
    assert client.get("/v1/health/live").json() == {"live": True}
    ready = client.get("/v1/health/ready")
    assert ready.status_code == 200 and ready.json() == {"ready": True}
    info = client.get("/v1/model").json()
    champion = info["champion"]
    assert champion["name"] == MODEL and champion["version"] == "1.0-test" and champion["role"] == "champion"
    assert champion["bundle_sha256"] == sha256_file(bundle_dir / "MANIFEST.json")
    assert champion["labels"] == list(serving_predictor.classes)
    assert champion["preprocessing"] == json.loads(json.dumps(serving_predictor.bundle.preprocess.to_dict()))
    assert champion["device"] == "cpu"
    assert info["challenger"] is None
    assert info["serving"]["max_batch_size"] == 16 and info["serving"]["queue_size"] == 256


def test_not_ready_until_the_model_is_loaded(bundle_dir, tmp_path, weld_pngs):
    """Without the lifespan (model not loaded): liveness says yes, readiness says no, predictions are refused."""
    app = create_app(Settings(state_dir=tmp_path / "s"), ServingConfig(bundle_path=str(bundle_dir)))
    c = TestClient(app, raise_server_exceptions=False)  # not entered: the lifespan (model loading) never runs
    assert c.get("/v1/health/live").status_code == 200
    assert c.get("/v2/health/live").json() == {"live": True}
    assert c.get("/v1/health/ready").status_code == 503
    not_ready = c.get("/v2/health/ready")
    assert not_ready.status_code == 400 and not_ready.json() == {"ready": False}
    assert c.get(f"/v2/models/{MODEL}/ready").status_code == 400
    assert_client_error(c.get(f"/v2/models/{MODEL}"), 400)
    assert_client_error(c.post(INFER, json=tensor("UINT8", [2, 2], [1, 2, 3, 4])), 400)
    refused = c.post("/v1/predict", content=weld_pngs[0], headers=PNG)
    assert_client_error(refused, 503)
    assert refused.headers["retry-after"] == "1"
    assert_client_error(c.get("/v1/model"), 503)
    app.state.service.log.close()


# ------------------------------------------------------------------------------------------------ v1 predict
def test_predict_raw_png(client, weld_pngs, serving_predictor):
    response = client.post("/v1/predict", content=weld_pngs[0], headers={**PNG, "x-request-id": "raw-png-1"})
    assert response.status_code == 200, response.text
    body = response.json()
    label, probs = expected_for(serving_predictor, weld_pngs[0])
    assert body["label"] == label
    assert np.allclose(probs_of(body, serving_predictor.classes), probs, atol=1e-5)
    assert body["confidence"] == pytest.approx(float(probs.max()), abs=1e-6)
    assert body["model"] == {"name": MODEL, "version": "1.0-test", "role": "champion"}
    assert body["request_id"] == "raw-png-1"
    assert body["input_sha256"] == hashlib.sha256(weld_pngs[0]).hexdigest()
    assert body["latency_ms"] > 0 and body["batch_size"] >= 1


def test_request_ids_are_generated_when_absent(client, weld_pngs):
    ids = {client.post("/v1/predict", content=weld_pngs[1], headers=PNG).json()["request_id"] for _ in range(3)}
    assert len(ids) == 3


@pytest.mark.parametrize("fmt", ["png16", "tiff", "tiff16", "jpeg", "rgb_png", "rgba_png"])
def test_predict_file_formats(client, fmt, weld_images, images16, serving_predictor):
    img = weld_images.images[2]
    payload, ctype = {
        "png16": lambda: (data.encode_png(images16[0]), "image/png"),
        "tiff": lambda: (encode(img, "TIFF"), "image/tiff"),
        "tiff16": lambda: (
            encode(Image.frombytes("I;16", (64, 64), images16[1].astype("<u2").tobytes()), "TIFF"),
            "image/tiff",
        ),
        "jpeg": lambda: (encode(img, "JPEG", quality=95), "image/jpeg"),
        "rgb_png": lambda: (encode(np.dstack([img, img, img]), "PNG"), "image/png"),
        "rgba_png": lambda: (encode(np.dstack([img, img, img, np.full_like(img, 255)]), "PNG"), "image/png"),
    }[fmt]()
    response = client.post("/v1/predict", content=payload, headers={"content-type": ctype})
    assert response.status_code == 200, response.text
    label, probs = expected_for(serving_predictor, payload)
    assert response.json()["label"] == label
    assert np.allclose(probs_of(response.json(), serving_predictor.classes), probs, atol=1e-5)
    if fmt in ("rgb_png", "tiff"):  # lossless encodings of the same gray picture: the very same answer
        gray = serving_predictor.predict([img])
        assert np.allclose(probs, gray.probabilities[0], atol=1e-3)


def test_predict_16_bit_png_is_scaled_like_8_bit(client, weld_images, serving_predictor):
    img8 = weld_images.images[3]
    img16 = img8.astype(np.uint16) * 257  # the same intensities on the 16-bit scale
    a = client.post("/v1/predict", content=data.encode_png(img8), headers=PNG).json()
    b = client.post("/v1/predict", content=data.encode_png(img16), headers=PNG).json()
    assert a["label"] == b["label"]
    assert np.allclose(probs_of(a, serving_predictor.classes), probs_of(b, serving_predictor.classes), atol=1e-5)


def test_predict_multipart(client, weld_pngs, serving_predictor):
    response = client.post("/v1/predict", files={"file": ("weld.png", weld_pngs[4], "image/png")})
    assert response.status_code == 200, response.text
    assert response.json()["label"] == expected_for(serving_predictor, weld_pngs[4])[0]
    two = client.post(
        "/v1/predict", files=[("f", ("a.png", weld_pngs[0], "image/png")), ("f", ("b.png", weld_pngs[1], "image/png"))]
    )
    assert "/v1/predict/batch" in assert_client_error(two, 400)


def test_predict_batch(client, weld_images, weld_pngs, serving_predictor):
    files = [("files", (f"weld{i}.png", p, "image/png")) for i, p in enumerate(weld_pngs[:6])]
    response = client.post("/v1/predict/batch", files=files, headers={"x-request-id": "batch-1"})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = serving_predictor.predict(list(weld_images.images[:6]))
    assert [p["label"] for p in body["predictions"]] == expected.labels
    got = np.array([probs_of(p, serving_predictor.classes) for p in body["predictions"]])
    assert np.allclose(got, expected.probabilities, atol=1e-5)
    assert [p["input_sha256"] for p in body["predictions"]] == [hashlib.sha256(p).hexdigest() for p in weld_pngs[:6]]
    assert body["request_id"] == "batch-1" and body["model"]["version"] == "1.0-test"
    # a raw body is a batch of one
    one = client.post("/v1/predict/batch", content=weld_pngs[0], headers=PNG).json()
    assert [p["label"] for p in one["predictions"]] == expected.labels[:1]


def test_predictions_are_logged_with_features_and_stored_images(client, server_state, images16, bundle_dir):
    payload = data.encode_png(images16[0])
    sha = hashlib.sha256(payload).hexdigest()
    answer = client.post("/v1/predict", content=payload, headers={**PNG, "x-request-id": "logged-16bit"}).json()
    db = server_state / "predictions.db"
    rows: list[dict] = []

    def logged() -> bool:
        rows[:] = read_predictions(db, "request_id = ?", ("logged-16bit",)) if db.exists() else []
        return len(rows) == 1

    wait_until(logged, what="the prediction log row")
    row = rows[0]
    assert row["role"] == "champion" and row["model_version"] == "1.0-test" and row["route"] == "/v1/predict"
    assert row["input_sha256"] == sha and row["input_format"] == "png"
    assert (row["width"], row["height"], row["mode"], row["bit_depth"]) == (64, 64, "I;16", 16)
    scaled = images16[0] / 65535.0
    assert row["mean"] == pytest.approx(scaled.mean(), abs=1e-5) and row["std"] == pytest.approx(scaled.std(), abs=1e-5)
    assert row["label"] == answer["label"] and row["confidence"] == pytest.approx(answer["confidence"])
    assert row["probabilities"] == pytest.approx(answer["probabilities"])
    assert row["agrees_with_champion"] is None and row["latency_ms"] > 0
    stored = server_state / "images" / sha[:2] / f"{sha}.png"
    wait_until(stored.exists, what="the stored image")
    assert stored.read_bytes() == payload
    # What the monitor needs, logged once: the image statistics and the embedding of the bundle that answered.
    from reference_impl.inference import Predictor
    from reference_impl.monitoring.features import DRIFT_FEATURES, image_features
    from reference_impl.packaging import load_bundle

    bundle = load_bundle(bundle_dir)
    assert row["bundle_sha256"] == bundle.sha256
    expected = image_features(images16[:1])
    assert set(row["features"]) == set(DRIFT_FEATURES)
    assert all(row["features"][name] == pytest.approx(float(expected[name][0]), abs=1e-9) for name in DRIFT_FEATURES)
    torch_emb = Predictor(bundle, device="cpu", runtime="torch").predict(images16[:1], with_embeddings=True).embeddings
    assert row["embedding"].dtype == np.float32 and row["embedding"].shape == (bundle.model_spec.embedding_dim,)
    assert np.abs(row["embedding"] - torch_emb[0]).max() < 1e-4


# --------------------------------------------------------------------------------------------------- metrics
def test_metrics(client, weld_pngs):
    before = samples(client)
    ok = client.post("/v1/predict", content=weld_pngs[5], headers=PNG).json()
    client.post("/v1/predict", content=b"not an image", headers=PNG)
    client.post(INFER, json=tensor("UINT8", [1, 64, 64], [0] * 4096))
    after = samples(client)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("weld_requests_total", route="/v1/predict", method="POST", status="200") == 1
    assert delta("weld_requests_total", route="/v1/predict", method="POST", status="400") == 1
    assert delta("weld_requests_total", route="/v2/models/{name}/infer", method="POST", status="200") == 1
    assert sample(after, "weld_requests_total", route="/metrics", method="GET", status="200") >= 1
    for stage in ("queue", "preprocess", "inference"):
        assert delta("weld_request_latency_seconds_count", stage=stage) == 2, stage
    assert delta("weld_request_latency_seconds_count", stage="total") == 3  # the 400 took time too
    assert sample(after, "weld_request_latency_seconds_bucket", stage="total", le="+Inf") >= 3
    assert delta("weld_batch_size_count") == 2 and delta("weld_batch_size_sum") == 2
    assert sample(after, "weld_in_flight_requests") == 1  # only the scrape itself is in flight
    assert delta("weld_predictions_total", role="champion", version="1.0-test", label=ok["label"]) >= 1
    assert (
        sum(delta("weld_predictions_total", role="champion", version="1.0-test", label=c) for c in ok["probabilities"])
        == 2
    )
    assert delta("weld_prediction_confidence_count") == 2
    info = {dict(lab)["role"]: dict(lab) for (n, lab), v in after.items() if n == "weld_model_info" and v == 1}
    assert info["champion"]["version"] == "1.0-test" and info["champion"]["name"] == MODEL
    assert len(info["champion"]["bundle_sha256"]) == 64 and info["champion"]["runtime"] == "onnxruntime"
    assert "challenger" not in info, "no challenger loaded: no challenger series (not one with empty labels)"


# ------------------------------------------------------------------------------------------------------- v2
def test_compressed_request_bodies(client, weld_pngs):
    """gzip / deflate bodies (tritonclient's request_compression_algorithm) are decoded; other codings, damaged
    streams and bodies that expand past the limit are the client's mistakes."""
    import gzip
    import zlib

    plain = client.post("/v1/predict", content=weld_pngs[0], headers=PNG).json()
    for name, packed in (("gzip", gzip.compress(weld_pngs[0])), ("deflate", zlib.compress(weld_pngs[0]))):
        r = client.post("/v1/predict", content=packed, headers={**PNG, "content-encoding": name})
        assert r.status_code == 200 and r.json()["probabilities"] == plain["probabilities"], (name, r.text)
    body = json.dumps(tensor("UINT8", [2, 2], [0] * 4)).encode()
    r = client.post(INFER, content=gzip.compress(body), headers={"content-type": "application/json",
                                                                 "content-encoding": "gzip"})  # fmt: skip
    assert r.status_code == 200, r.text
    assert_client_error(
        client.post("/v1/predict", content=weld_pngs[0], headers={**PNG, "content-encoding": "br"}), 415
    )
    broken = gzip.compress(weld_pngs[0])[:-20]
    assert "truncated" in assert_client_error(
        client.post("/v1/predict", content=broken, headers={**PNG, "content-encoding": "gzip"}), 400
    )
    assert_client_error(
        client.post("/v1/predict", content=b"not gzip", headers={**PNG, "content-encoding": "gzip"}), 400
    )


def test_a_compressed_body_cannot_expand_past_the_limit(limited_client):
    import gzip

    bomb = gzip.compress(b"\0" * (4 * 1024 * 1024))  # 4 MiB of zeros in ~4 KB; the limit is 256 KiB
    assert len(bomb) < 10_000
    r = limited_client.post("/v1/predict", content=bomb, headers={**PNG, "content-encoding": "gzip"})
    assert "expands beyond the limit" in assert_client_error(r, 413)


def test_protocol_details_stock_clients_check(client):
    """405 names the allowed methods; the unversioned routes take no version from the query string."""
    r = client.get("/v1/predict")
    assert r.status_code == 405 and "POST" in r.headers["allow"] and "error" in r.json()
    assert client.put(f"/v2/models/{MODEL}/infer").headers["allow"] == "POST"
    assert client.get(f"/v2/models/{MODEL}?version=nope").status_code == 200, "?version= is not part of the route"
    assert client.get(f"/v2/models/{MODEL}/versions/nope").status_code == 404
    body = tensor("UINT8", [2, 2], [0] * 4)
    assert client.post(f"/v2/models/{MODEL}/infer?version=nope", json=body).status_code == 200


def test_v2_server_and_model_metadata(client, serving_predictor):
    meta = client.get("/v2").json()
    assert meta["name"] and meta["version"] and "binary_tensor_data" in meta["extensions"]
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").status_code == 200
    model = client.get(f"/v2/models/{MODEL}").json()
    assert model["name"] == MODEL and model["versions"] == ["1.0-test"] and model["platform"] == "onnxruntime_onnx"
    assert model["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, 64, 64]}]
    assert {o["name"]: (o["datatype"], o["shape"]) for o in model["outputs"]} == {
        "probabilities": ("FP32", [-1, 4]),
        "label": ("BYTES", [-1]),
        "class_index": ("INT64", [-1]),
    }
    assert model["parameters"]["labels"] == list(serving_predictor.classes)
    assert client.get(f"/v2/models/{MODEL}/versions/1.0-test").status_code == 200
    ready = client.get(f"/v2/models/{MODEL}/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert client.get(f"/v2/models/{MODEL}/versions/1.0-test/ready").status_code == 200


def test_v2_unknown_model_or_version_is_404(client):
    for path in (
        "/v2/models/nope",
        "/v2/models/nope/ready",
        f"/v2/models/{MODEL}/versions/99",
        f"/v2/models/{MODEL}/versions/99/ready",
    ):
        message = assert_client_error(client.get(path), 404)
        assert "'nope'" in message or "'99'" in message, message
    assert_client_error(client.post("/v2/models/nope/infer", json=tensor("UINT8", [2, 2], [0, 0, 0, 0])), 404)
    assert_client_error(client.post(f"/v2/models/{MODEL}/versions/99/infer", json={}), 404)


def _v2_outputs(response: httpx.Response) -> dict[str, dict[str, Any]]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == MODEL and body["model_version"] == "1.0-test"
    return {o["name"]: o for o in body["outputs"]}


def _check_v2_answer(outputs: dict[str, dict[str, Any]], expected: Any, atol: float = 1e-5) -> None:
    n = len(expected.labels)
    assert outputs["label"]["datatype"] == "BYTES" and outputs["label"]["shape"] == [n]
    assert outputs["label"]["data"] == expected.labels
    assert outputs["class_index"]["datatype"] == "INT64" and outputs["class_index"]["data"] == list(
        expected.class_index
    )
    probs = outputs["probabilities"]
    assert probs["datatype"] == "FP32" and probs["shape"] == [n, 4]
    assert np.allclose(np.array(probs["data"]).reshape(n, 4), expected.probabilities, atol=atol)


@pytest.mark.parametrize("layout", ["NHW", "N1HW", "HW", "N3HW"])
def test_v2_uint8_layouts(client, weld_images, serving_predictor, layout):
    stack = weld_images.images[:3]
    arr = {"NHW": stack, "N1HW": stack[:, None], "HW": stack[0], "N3HW": np.stack([stack] * 3, axis=1)}[layout]
    expected = serving_predictor.predict(list(stack[:1] if layout == "HW" else stack))
    response = client.post(INFER, json=tensor("UINT8", list(arr.shape), arr.ravel().tolist()))
    _check_v2_answer(_v2_outputs(response), expected, atol=1e-3 if layout == "N3HW" else 1e-5)


def test_v2_nested_data_is_accepted(client, weld_images, serving_predictor):
    stack = weld_images.images[:2]
    response = client.post(INFER, json=tensor("UINT8", [2, 64, 64], stack.tolist()))
    _check_v2_answer(_v2_outputs(response), serving_predictor.predict(list(stack)))


def test_v2_fp32_and_uint16(client, weld_images, serving_predictor):
    stack = weld_images.images[:3]
    expected = serving_predictor.predict(list(stack))
    fp32 = client.post(INFER, json=tensor("FP32", [3, 64, 64], (stack / 255.0).ravel().tolist()))
    _check_v2_answer(_v2_outputs(fp32), expected, atol=1e-4)
    u16 = client.post(INFER, json=tensor("UINT16", [3, 64, 64], (stack.astype(np.uint16) * 257).ravel().tolist()))
    _check_v2_answer(_v2_outputs(u16), expected, atol=1e-5)


def test_v2_bytes_base64(client, weld_images, weld_pngs, serving_predictor):
    b64 = [base64.b64encode(p).decode() for p in weld_pngs[:3]]
    response = client.post(INFER, json=tensor("BYTES", [3], b64, id="bytes-json"))
    _check_v2_answer(_v2_outputs(response), serving_predictor.predict(list(weld_images.images[:3])))
    assert response.json()["id"] == "bytes-json"


def test_v2_requested_outputs_subset(client, weld_images, serving_predictor):
    stack = weld_images.images[:2]
    body = tensor("UINT8", [2, 64, 64], stack.ravel().tolist(), outputs=[{"name": "label"}, {"name": "class_index"}])
    outputs = client.post(INFER, json=body).json()["outputs"]
    expected = serving_predictor.predict(list(stack))
    assert [o["name"] for o in outputs] == ["label", "class_index"]
    assert outputs[0]["data"] == expected.labels and outputs[1]["data"] == list(expected.class_index)


def test_v2_binary_extension_by_hand(client, weld_images, weld_pngs, serving_predictor):
    stack = weld_images.images[:3]
    expected = serving_predictor.predict(list(stack))
    header = {
        "id": "bin-1",
        "inputs": [
            {
                "name": "image",
                "datatype": "UINT8",
                "shape": [3, 64, 64],
                "parameters": {"binary_data_size": stack.nbytes},
            }
        ],
        "outputs": [
            {"name": "probabilities", "parameters": {"binary_data": True}},
            {"name": "label", "parameters": {"binary_data": True}},
            {"name": "class_index"},
        ],
    }
    body, headers = binary_request(header, [stack.tobytes()])
    response = client.post(INFER, content=body, headers=headers)
    assert response.status_code == 200, response.text
    head, blobs = split_binary_response(response)
    assert head["id"] == "bin-1"
    probs = np.frombuffer(blobs["probabilities"], dtype="<f4").reshape(3, 4)
    assert np.allclose(probs, expected.probabilities, atol=1e-5)
    labels, raw = [], blobs["label"]
    while raw:
        (n,) = struct.unpack_from("<I", raw)
        labels.append(raw[4 : 4 + n].decode())
        raw = raw[4 + n :]
    assert labels == expected.labels
    assert head["outputs"][2]["data"] == list(expected.class_index)  # not asked for in binary: JSON

    # BYTES input in binary form (4-byte little-endian length + file bytes), all outputs binary by default
    files = b"".join(struct.pack("<I", len(p)) + p for p in weld_pngs[:3])
    header = {
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [3], "parameters": {"binary_data_size": len(files)}}
        ],
        "parameters": {"binary_data_output": True},
    }
    body, headers = binary_request(header, [files])
    head, blobs = split_binary_response(client.post(INFER, content=body, headers=headers))
    assert set(blobs) == {"probabilities", "label", "class_index"}
    assert np.array_equal(np.frombuffer(blobs["class_index"], dtype="<i8"), expected.class_index)


def test_v2_with_tritonclient_encoding(client, weld_images, weld_pngs, serving_predictor):
    """The request and response bodies of the standard client (tritonclient), without its socket."""
    import tritonclient.http as triton

    def call(inputs: list, outputs: list | None = None, request_id: str = "") -> Any:
        body, json_size = triton.InferenceServerClient.generate_request_body(inputs, outputs, request_id=request_id)
        headers = {"content-type": "application/octet-stream"}
        if json_size is not None:
            headers["inference-header-content-length"] = str(json_size)
        response = client.post(INFER, content=body, headers=headers)
        assert response.status_code == 200, response.text
        length = response.headers.get("inference-header-content-length")
        return triton.InferenceServerClient.parse_response_body(
            response.content, header_length=int(length) if length else None
        )

    stack = weld_images.images[:4]
    expected = serving_predictor.predict(list(stack))
    image = triton.InferInput("image", list(stack.shape), "UINT8")
    image.set_data_from_numpy(stack, binary_data=True)
    wanted = [
        triton.InferRequestedOutput("probabilities", binary_data=True),
        triton.InferRequestedOutput("label", binary_data=False),
    ]
    result = call([image], wanted, request_id="triton-1")
    assert result.get_response()["id"] == "triton-1"
    assert np.allclose(result.as_numpy("probabilities"), expected.probabilities, atol=1e-5)
    assert [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label")] == expected.labels
    assert result.as_numpy("class_index") is None  # not requested

    # JSON tensor data (binary_data=False), all outputs by default
    image = triton.InferInput("image", list(stack.shape), "UINT8")
    image.set_data_from_numpy(stack, binary_data=False)
    result = call([image])
    assert np.array_equal(result.as_numpy("class_index"), expected.class_index)

    # FP32 and BYTES (encoded files) inputs
    image = triton.InferInput("image", list(stack.shape), "FP32")
    image.set_data_from_numpy((stack / 255.0).astype(np.float32), binary_data=True)
    assert np.allclose(call([image]).as_numpy("probabilities"), expected.probabilities, atol=1e-4)
    files = triton.InferInput("image", [4], "BYTES")
    files.set_data_from_numpy(np.array(weld_pngs[:4], dtype=np.object_), binary_data=True)
    result = call([files], [triton.InferRequestedOutput("label", binary_data=True)])
    assert [x.decode() for x in result.as_numpy("label")] == expected.labels


# -------------------------------------------------------------------------------------------------- bad input
CMYK = "cmyk"
BAD_INPUTS: dict[str, tuple[Callable[[Any], dict[str, Any]], int | tuple[int, ...], str]] = {
    # name: (request kwargs, expected status, a word the error message must contain)
    "empty body": (lambda im: {"content": b"", "headers": PNG}, 400, "empty"),
    "not an image": (lambda im: {"content": b"hello, world" * 10, "headers": PNG}, 400, "not a readable image"),
    "truncated png": (lambda im: {"content": data.encode_png(im)[:200], "headers": PNG}, 400, "truncated"),
    "cmyk jpeg": (
        lambda im: {
            "content": encode(Image.fromarray(im).convert("CMYK"), "JPEG"),
            "headers": {"content-type": "image/jpeg"},
        },
        400,
        "CMYK",
    ),
    "float tiff": (
        lambda im: {
            "content": encode(Image.fromarray(im.astype(np.float32)), "TIFF"),
            "headers": {"content-type": "image/tiff"},
        },
        400,
        "mode",
    ),
    "bomb header": (lambda im: {"content": png_header_only(100_000, 100_000), "headers": PNG}, 413, "pixels"),
    "too many pixels": (lambda im: {"content": png_header_only(5000, 5000), "headers": PNG}, 413, "limit"),
    "wrong content type": (
        lambda im: {"content": data.encode_png(im), "headers": {"content-type": "text/plain"}},
        415,
        "Content-Type",
    ),
    "missing content type": (lambda im: {"content": data.encode_png(im)}, 415, "Content-Type"),
    "form urlencoded": (lambda im: {"data": {"image": "x"}}, 415, "Content-Type"),
    "multipart without boundary": (
        lambda im: {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}},
        400,
        "boundary",
    ),
    "multipart without a file": (lambda im: {"files": {"note": (None, "hello")}}, 400, "file"),
    "multipart empty file": (lambda im: {"files": {"file": ("a.png", b"", "image/png")}}, 400, "empty"),
    "bad request id": (
        lambda im: {"content": data.encode_png(im), "headers": {**PNG, "x-request-id": "a b"}},
        400,
        "X-Request-ID",
    ),
    "too long request id": (
        lambda im: {"content": data.encode_png(im), "headers": {**PNG, "x-request-id": "a" * 200}},
        400,
        "X-Request-ID",
    ),
}

V2_BAD_INPUTS: dict[str, tuple[Callable[[Any], dict[str, Any]], int | tuple[int, ...], str]] = {
    "malformed json": (
        lambda im: {"content": b'{"inputs": [', "headers": {"content-type": "application/json"}},
        400,
        "JSON",
    ),
    "json not an object": (lambda im: {"json": [1, 2, 3]}, 400, "object"),
    "no inputs": (lambda im: {"json": {"outputs": []}}, 400, "inputs"),
    "two inputs": (lambda im: {"json": {"inputs": [tensor("UINT8", [2, 2], [0] * 4)["inputs"][0]] * 2}}, 400, "one"),
    "input without shape": (lambda im: {"json": {"inputs": [{"name": "image", "datatype": "UINT8"}]}}, 400, "shape"),
    "no data": (
        lambda im: {"json": {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 2]}]}},
        400,
        "data",
    ),
    "shape/data mismatch": (lambda im: {"json": tensor("UINT8", [1, 64, 64], [0] * 100)}, 400, "4096"),
    "negative shape": (lambda im: {"json": tensor("UINT8", [-1, 64, 64], [0] * 4096)}, 400, "shape"),
    "boolean shape": (lambda im: {"json": tensor("UINT8", [True, 2, 2], [0] * 4)}, 400, "shape"),
    "empty image shape": (lambda im: {"json": tensor("UINT8", [1, 0, 0], [])}, 400, "empty"),
    "zero images": (lambda im: {"json": tensor("UINT8", [0, 64, 64], [])}, 400, "no images"),
    "five dimensions": (lambda im: {"json": tensor("UINT8", [1, 1, 1, 2, 2], [0] * 4)}, 400, "shape"),
    "wrong datatype": (lambda im: {"json": tensor("INT32", [1, 2, 2], [0] * 4)}, 400, "INT32"),
    "five channels": (lambda im: {"json": tensor("UINT8", [1, 5, 2, 2], [0] * 20)}, 400, "channels"),
    "fp32 out of range": (lambda im: {"json": tensor("FP32", [1, 2, 2], [0.5, 1.5, 0.0, 0.1])}, 400, "[0, 1]"),
    "fp32 nan": (
        lambda im: {
            "content": b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 2], "data": [NaN, 0.5]}]}',
            "headers": {"content-type": "application/json"},
        },
        400,
        "finite",
    ),
    "uint8 out of range": (lambda im: {"json": tensor("UINT8", [1, 2, 2], [0, 300, -1, 4])}, 400, "UINT8"),
    "text in pixel data": (lambda im: {"json": tensor("UINT8", [1, 2, 2], ["a", "b", "c", "d"])}, 400, "UINT8"),
    "bad base64": (lambda im: {"json": tensor("BYTES", [1], ["***not base64***"])}, 400, "base64"),
    "base64 of garbage": (
        lambda im: {"json": tensor("BYTES", [1], [base64.b64encode(b"garbage").decode()])},
        400,
        "not a readable image",
    ),
    "bytes count mismatch": (lambda im: {"json": tensor("BYTES", [2], [base64.b64encode(b"x").decode()])}, 400, "2"),
    "bytes wrong rank": (lambda im: {"json": tensor("BYTES", [1, 1], [base64.b64encode(b"x").decode()])}, 400, "[N]"),
    "tensor too large": (lambda im: {"json": tensor("UINT8", [1, 5000, 5000], [0])}, 413, "pixels"),
    "unknown output": (
        lambda im: {"json": tensor("UINT8", [2, 2], [0] * 4, outputs=[{"name": "embedding"}])},
        400,
        "embedding",
    ),
    "parameters not an object": (
        lambda im: {"json": tensor("UINT8", [2, 2], [0] * 4, parameters="fast")},
        400,
        "parameters",
    ),
    "input parameters not an object": (
        lambda im: {"json": {"inputs": [{**tensor("UINT8", [2, 2], [0] * 4)["inputs"][0], "parameters": [1]}]}},
        400,
        "parameters",
    ),
    "output parameters not an object": (
        lambda im: {"json": tensor("UINT8", [2, 2], [0] * 4, outputs=[{"name": "label", "parameters": 1}])},
        400,
        "parameters",
    ),
    "id not a string": (lambda im: {"json": tensor("UINT8", [2, 2], [0] * 4, id={"a": 1})}, 400, "id"),
    "unknown input name": (
        lambda im: {"json": {"inputs": [{**tensor("UINT8", [2, 2], [0] * 4)["inputs"][0], "name": "foo"}]}},
        400,
        "'image'",
    ),
    "uint8 fractions": (lambda im: {"json": tensor("UINT8", [1, 2, 2], [0, 1.7, 2, 3])}, 400, "whole numbers"),
    "uint8 booleans": (lambda im: {"json": tensor("UINT8", [1, 2, 2], [True, 0, 1, 2])}, 400, "whole numbers"),
    "data nested deeper than 4 dimensions": (
        lambda im: {"json": tensor("UINT8", [1, 1, 1, 1], [[[[[[0]]]]]])},
        400,
        "nested",
    ),
    "deeply nested json": (
        lambda im: {"content": b"[" * 5000 + b"]" * 5000, "headers": {"content-type": "application/json"}},
        400,
        "nested too deeply",
    ),
    "bad header length": (
        lambda im: {
            "content": b'{"inputs": []}',
            "headers": {"content-type": "application/octet-stream", "inference-header-content-length": "999"},
        },
        400,
        "Inference-Header-Content-Length",
    ),
    "binary size beyond payload": (
        lambda im: dict(
            zip(
                ("content", "headers"),
                binary_request(
                    {
                        "inputs": [
                            {
                                "name": "image",
                                "datatype": "UINT8",
                                "shape": [1, 64, 64],
                                "parameters": {"binary_data_size": 4096},
                            }
                        ]
                    },
                    [b"\0" * 100],
                ),
                strict=True,
            )
        ),
        400,
        "binary_data_size",
    ),
    "truncated binary bytes": (
        lambda im: dict(
            zip(
                ("content", "headers"),
                binary_request(
                    {
                        "inputs": [
                            {"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 8}}
                        ]
                    },
                    [struct.pack("<I", 100) + b"abcd"],
                ),
                strict=True,
            )
        ),
        400,
        "truncated",
    ),
    "odd byte count for uint16": (
        lambda im: dict(
            zip(
                ("content", "headers"),
                binary_request(
                    {
                        "inputs": [
                            {
                                "name": "image",
                                "datatype": "UINT16",
                                "shape": [1, 2, 2],
                                "parameters": {"binary_data_size": 7},
                            }
                        ]
                    },
                    [b"\0" * 7],
                ),
                strict=True,
            )
        ),
        400,
        "UINT16",
    ),
    "bad request id": (
        lambda im: {"json": tensor("UINT8", [2, 2], [0] * 4), "headers": {"x-request-id": "a/b"}},
        400,
        "X-Request-ID",
    ),
}


def _check_bad_input(client, make, status, word, path, im, good_png) -> None:
    response = client.post(path, **make(im))
    message = assert_client_error(response, status)
    assert word.lower() in message.lower(), message
    good = client.post("/v1/predict", content=good_png, headers=PNG)  # the server is still fine
    assert good.status_code == 200, good.text


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_v1(client, case, weld_images, weld_pngs):
    make, status, word = BAD_INPUTS[case]
    _check_bad_input(client, make, status, word, "/v1/predict", weld_images.images[0], weld_pngs[0])


@pytest.mark.parametrize("case", list(V2_BAD_INPUTS))
def test_bad_input_v2(client, case, weld_images, weld_pngs):
    make, status, word = V2_BAD_INPUTS[case]
    _check_bad_input(client, make, status, word, INFER, weld_images.images[0], weld_pngs[0])


def test_no_bad_input_caused_a_500(client):
    """After the bad-input cases above (same module server), no request of this server was counted as a 5xx."""
    assert client.post(INFER, content=b"{", headers={"content-type": "application/json"}).status_code == 400
    found = samples(client)
    statuses = {dict(lab)["status"] for (n, lab), v in found.items() if n == "weld_requests_total" and v > 0}
    assert "400" in statuses
    assert not any(s.startswith("5") for s in statuses), statuses


def test_refused_predict_requests_are_recorded_for_the_monitor(bundle_dir, tmp_path, weld_pngs):
    """Refused uploads never become predictions; the server records them (never their bytes) for the monitor."""
    import sqlite3

    from reference_impl.serving.predlog import read_rejections

    state = tmp_path / "s"
    config = ServingConfig(bundle_path=str(bundle_dir), admin_key=ADMIN_KEY, device="cpu")
    secret = b"hello, world " * 10  # what the client sent: must not be kept anywhere
    with TestClient(create_app(Settings(state_dir=state), config), raise_server_exceptions=False) as c:
        not_an_image = assert_client_error(c.post("/v1/predict", content=secret, headers=PNG), 400)
        assert_client_error(c.post("/v1/predict/batch", content=b"x", headers={"content-type": "text/plain"}), 415)
        assert_client_error(c.post(INFER, content=b'{"inputs": [', headers={"content-type": "application/json"}), 400)
        assert_client_error(c.post("/v1/admin/reload"), 401)  # not a prediction request: not recorded
        assert c.post("/v1/predict", content=weld_pngs[0], headers=PNG).status_code == 200
    # The app has stopped: the log is flushed.
    rows = read_rejections(state / "predictions.db", None, time.time())
    assert [(r["route"], r["status"]) for r in rows] == [("/v1/predict", 400), ("/v1/predict/batch", 415), (INFER, 400)]
    first = rows[0]
    assert first["reason"] == not_an_image  # the same words the client got
    assert first["content_type"] == "image/png" and first["body_bytes"] == len(secret)
    assert rows[1]["content_type"] == "text/plain"
    assert all(time.time() - 120 < r["ts"] <= time.time() for r in rows)
    assert len(read_predictions(state / "predictions.db")) == 1  # only the good image became a prediction
    conn = sqlite3.connect(state / "predictions.db")
    try:
        stored = "".join(repr(row) for row in conn.execute("SELECT * FROM rejections"))
    finally:
        conn.close()
    assert "hello" not in stored


def test_recording_a_rejection_never_breaks_the_answer(tmp_path):
    import sqlite3

    from reference_impl.serving.predlog import PredictionLog, read_rejections

    log = PredictionLog(tmp_path / "predictions.db")
    log.log_rejection("/v1/predict", 413, "x" * 5000, "image/png; charset=binary", "not a number")
    log.close()
    log.log_rejection("/v1/predict", 400, "after shutdown")  # dropped with a warning, no exception
    (row,) = read_rejections(tmp_path / "predictions.db", None, time.time())
    assert len(row["reason"]) == 200 and row["content_type"] == "image/png" and row["body_bytes"] is None
    # A log written by an older server has no rejections table: nothing was refused on record.
    old = sqlite3.connect(tmp_path / "old.db")
    old.execute("CREATE TABLE predictions (id INTEGER PRIMARY KEY)")
    old.close()
    assert read_rejections(tmp_path / "old.db", None, time.time()) == []


def test_a_log_written_by_an_older_server_gains_the_new_columns(tmp_path):
    """A prediction log from before the statistics and embeddings were logged: opened by a new server, it gains
    the columns (empty for the old rows, which the monitor recomputes), and old and new rows read side by side."""
    import sqlite3

    from reference_impl.serving.predlog import PredictionLog, PredictionRecord, read_predictions

    db = tmp_path / "predictions.db"
    conn = sqlite3.connect(db)
    conn.execute(  # the table as the first release of the server wrote it
        "CREATE TABLE predictions (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, request_id TEXT NOT NULL, "
        "item INTEGER NOT NULL, role TEXT NOT NULL, model_name TEXT NOT NULL, model_version TEXT NOT NULL, "
        "route TEXT NOT NULL, input_sha256 TEXT NOT NULL, input_format TEXT, width INTEGER, height INTEGER, mode TEXT, "
        "bit_depth INTEGER, mean REAL, std REAL, label TEXT NOT NULL, confidence REAL NOT NULL, "
        "probabilities TEXT NOT NULL, agrees_with_champion INTEGER, latency_ms REAL)"
    )
    conn.execute("INSERT INTO predictions (ts, request_id, item, role, model_name, model_version, route, input_sha256, "
                 "label, confidence, probabilities) VALUES (1, 'old', 0, 'champion', 'm', '1', '/v1/predict', 'abc', "
                 "'good', 0.9, '{\"good\": 0.9}')")  # fmt: skip
    conn.commit()
    conn.close()
    log = PredictionLog(db)
    pixels = np.full((8, 8), 100, np.uint8)
    log.append(PredictionRecord(2, "new", 0, "champion", "m", "1", "/v1/predict", "def", "png", 8, 8, "L", 8, 0.4, 0.0,
                                "good", 0.9, {"good": 0.9}, bundle_sha256="f" * 64,
                                embedding=np.arange(4, dtype=np.float32)), b"png", pixels)  # fmt: skip
    log.close()
    old, new = read_predictions(db)
    assert old["features"] is None and old["embedding"] is None and old["bundle_sha256"] is None
    assert new["bundle_sha256"] == "f" * 64 and new["features"]["brightness"] == pytest.approx(100 / 255)
    assert np.array_equal(new["embedding"], np.arange(4, dtype=np.float32))


def test_limits(limited_client, weld_images, weld_pngs):
    c = limited_client
    assert c.post("/v1/predict", content=weld_pngs[0], headers=PNG).status_code == 200
    big = np.zeros((5000, 5000), np.uint8)  # a real image, small when compressed, too many pixels when decoded
    assert "65,536" in assert_client_error(c.post("/v1/predict", content=data.encode_png(big), headers=PNG), 413)
    medium = data.encode_png(np.kron(weld_images.images[0], np.ones((5, 5), np.uint8)))  # 320 x 320
    assert_client_error(c.post("/v1/predict", content=medium, headers=PNG), 413)
    too_big = np.random.default_rng(0).bytes(300 * 1024)
    assert "limit" in assert_client_error(c.post("/v1/predict", content=too_big, headers=PNG), 413)
    # without a Content-Length (chunked upload), the limit still holds while reading
    chunks = iter([too_big[:100_000], too_big[100_000:200_000], too_big[200_000:]])
    assert_client_error(c.post("/v1/predict", content=chunks, headers=PNG), 413)
    assert_client_error(c.post(INFER, json=tensor("BYTES", [1], [base64.b64encode(too_big).decode()])), 413)
    b64 = [base64.b64encode(p).decode() for p in weld_pngs[:5]]
    assert "limit is 4" in assert_client_error(c.post(INFER, json=tensor("BYTES", [5], b64)), 413)
    files = [("f", (f"{i}.png", p, "image/png")) for i, p in enumerate(weld_pngs[:5])]
    assert_client_error(c.post("/v1/predict/batch", files=files), (400, 413))
    assert c.post("/v1/predict/batch", files=files[:4]).status_code == 200
    assert c.post("/v1/predict", content=weld_pngs[0], headers=PNG).status_code == 200


# -------------------------------------------------------------------------------------------------------- auth
def test_admin_reload_requires_the_key(client):
    assert "X-API-Key" in assert_client_error(client.post("/v1/admin/reload"), 401)
    challenge = client.post("/v1/admin/reload").headers["www-authenticate"]
    assert challenge.startswith("ApiKey ") and 'header="X-API-Key"' in challenge  # RFC 9110: a 401 says how
    assert_client_error(client.post("/v1/admin/reload", headers={"x-api-key": "wrong"}), 401)
    assert_client_error(client.post("/v1/admin/reload", headers={"x-api-key": ADMIN_KEY + "x"}), 401)
    assert_client_error(client.post("/v1/admin/reload", headers={"x-api-key": ADMIN_KEY[:-1]}), 401)
    ok = client.post("/v1/admin/reload", headers={"x-api-key": ADMIN_KEY})
    assert ok.status_code == 200, ok.text
    assert ok.json()["champion"] == "1.0-test" and ok.json()["previous_champion"] == "1.0-test"


def test_admin_api_disabled_without_a_key(bundle_dir, tmp_path):
    app = create_app(Settings(state_dir=tmp_path / "s"), ServingConfig(bundle_path=str(bundle_dir)))
    with TestClient(app, raise_server_exceptions=False) as c:
        assert "MLOPS_ADMIN_KEY" in assert_client_error(c.post("/v1/admin/reload"), 403)
        assert_client_error(c.post("/v1/admin/reload", headers={"x-api-key": "anything"}), 403)


def test_keys_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("MLOPS_ADMIN_KEY", "from-env")
    monkeypatch.setenv("MLOPS_PREDICT_KEY", "predict-env")
    config = ServingConfig.from_env(bundle_path="b")
    assert (config.admin_key, config.predict_key) == ("from-env", "predict-env")
    monkeypatch.setenv("MLOPS_ADMIN_KEY", "")
    assert ServingConfig.from_env().admin_key is None  # an empty key does not switch the admin API on
    assert ServingConfig().admin_key is None and ServingConfig().predict_key is None  # never a default key


def test_predict_key_and_constant_time_comparison(bundle_dir, tmp_path, weld_pngs, monkeypatch):
    calls: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    config = ServingConfig(bundle_path=str(bundle_dir), predict_key="pk-123", admin_key=ADMIN_KEY)
    app = create_app(Settings(state_dir=tmp_path / "s"), config)
    v2_body = tensor("UINT8", [2, 2], [0, 1, 2, 3])
    with TestClient(app, raise_server_exceptions=False) as c:
        assert_client_error(c.post("/v1/predict", content=weld_pngs[0], headers=PNG), 401)
        assert_client_error(c.post("/v1/predict", content=weld_pngs[0], headers={**PNG, "x-api-key": "pk-12"}), 401)
        assert_client_error(c.post("/v1/predict/batch", content=weld_pngs[0], headers=PNG), 401)
        assert_client_error(c.post(INFER, json=v2_body), 401)
        assert_client_error(c.post(INFER, json=v2_body, headers={"x-api-key": ADMIN_KEY}), 401)
        assert (b"pk-12", b"pk-123") in calls
        calls.clear()
        good = {"x-api-key": "pk-123"}
        assert c.post("/v1/predict", content=weld_pngs[0], headers={**PNG, **good}).status_code == 200
        assert c.post("/v1/predict/batch", content=weld_pngs[0], headers={**PNG, **good}).status_code == 200
        assert c.post(INFER, json=v2_body, headers=good).status_code == 200
        assert calls.count((b"pk-123", b"pk-123")) == 3
        # the predict key is not an admin key, and health/metadata stay open (probes carry no key)
        assert_client_error(c.post("/v1/admin/reload", headers=good), 401)
        assert (b"pk-123", ADMIN_KEY.encode()) in calls
        for path in ("/v1/health/ready", "/v2/health/ready", f"/v2/models/{MODEL}", "/metrics"):
            assert c.get(path).status_code == 200, path


# ----------------------------------------------------------------------------------- batching and the queue
def test_full_queue_answers_503_with_retry_after(bundle_dir, tmp_path, weld_pngs):
    config = ServingConfig(bundle_path=str(bundle_dir), queue_size=1, max_batch_size=1, max_wait_ms=0, device="cpu")
    app = create_app(Settings(state_dir=tmp_path / "s"), config)
    service = app.state.service

    async def scenario(http: httpx.AsyncClient) -> tuple[list[httpx.Response], httpx.Response, str]:
        restore = slow_down(service.champion, 0.25)
        responses = await asyncio.gather(
            *(http.post("/v1/predict", content=weld_pngs[i % 4], headers=PNG) for i in range(12))
        )
        restore()
        after = await http.post("/v1/predict", content=weld_pngs[0], headers=PNG)
        return list(responses), after, (await http.get("/metrics")).text

    responses, after, metrics_text = run_async(app, scenario)
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    rejected = [r for r in responses if r.status_code == 503]
    assert rejected and len(rejected) < len(responses), statuses
    for r in rejected:
        assert r.headers["retry-after"].isdigit()
        assert "queue is full" in r.json()["error"]
    for r in responses:
        if r.status_code == 200:
            assert r.json()["label"] in r.json()["probabilities"]
    assert after.status_code == 200  # the server recovers once the burst is over
    found = samples(None, metrics_text)
    assert sample(found, "weld_rejected_total", reason="queue_full") == len(rejected)
    assert sample(found, "weld_requests_total", route="/v1/predict", method="POST", status="503") == len(rejected)


def test_concurrent_requests_are_batched(bundle_dir, tmp_path, weld_images, weld_pngs, serving_predictor):
    config = ServingConfig(bundle_path=str(bundle_dir), max_batch_size=8, max_wait_ms=50, device="cpu")
    app = create_app(Settings(state_dir=tmp_path / "s"), config)

    async def scenario(http: httpx.AsyncClient) -> tuple[list[httpx.Response], str]:
        slow_down(app.state.service.champion, 0.05)  # while one batch runs, the others queue up together
        responses = await asyncio.gather(
            *(http.post("/v1/predict", content=weld_pngs[i], headers=PNG) for i in range(8))
        )
        return list(responses), (await http.get("/metrics")).text

    responses, metrics_text = run_async(app, scenario)
    assert [r.status_code for r in responses] == [200] * 8
    sizes = [r.json()["batch_size"] for r in responses]
    assert max(sizes) > 1 and max(sizes) <= 8, sizes
    # batching never mixes up answers: each request gets its own image's prediction
    expected = serving_predictor.predict(list(weld_images.images[:8]))
    assert [r.json()["label"] for r in responses] == expected.labels
    got = np.array([probs_of(r.json(), serving_predictor.classes) for r in responses])
    assert np.allclose(got, expected.probabilities, atol=1e-5)
    found = samples(None, metrics_text)
    passes = sample(found, "weld_batch_size_count")
    assert sample(found, "weld_batch_size_sum") == 8 and passes < 8
    assert sample(found, "weld_batch_size_bucket", le="1.0") < passes  # some forward pass had more than 1 image


class _CountingHandle:
    """A stand-in model for the batcher: counts preprocessing calls, refuses images marked bad (value 13)."""

    def __init__(self) -> None:
        self.preprocess_calls: list[int] = []

    def preprocess(self, pixels: list[np.ndarray]) -> np.ndarray:
        self.preprocess_calls.append(len(pixels))
        if any(int(p[0, 0]) == 13 for p in pixels):
            raise ValueError("unsupported image")
        return np.stack(pixels).astype(np.float32)

    def infer(self, x: np.ndarray) -> np.ndarray:
        time.sleep(0.02)  # while one batch runs, the next requests queue up together
        from reference_impl.serving.batcher import Outputs

        return Outputs(np.stack([x[:, 0, 0], -x[:, 0, 0]], axis=1))  # "probabilities" that identify each image


def test_batcher_preprocesses_once_per_batch_and_isolates_a_bad_request():
    from reference_impl.serving.batcher import MicroBatcher

    handle = _CountingHandle()

    async def scenario(bad: int | None) -> list[Any]:
        batcher = MicroBatcher(max_batch_size=8, max_wait_ms=50)
        batcher.expect_more = lambda: True
        await batcher.start()
        try:
            images = [np.full((4, 4), 13 if i == bad else i, dtype=np.uint8) for i in range(6)]
            return await asyncio.gather(*(batcher.submit([im], handle) for im in images), return_exceptions=True)
        finally:
            await batcher.stop()

    results = asyncio.run(scenario(bad=None))
    assert [float(r.probabilities[0, 0]) for r in results] == [0, 1, 2, 3, 4, 5], "each request gets its own answer"
    assert handle.preprocess_calls == [6] and {r.batch_size for r in results} == {6}, "one call for the batch"
    assert all(r.preprocess_seconds >= 0 and r.inference_seconds >= 0.02 for r in results)

    handle.preprocess_calls.clear()
    results = asyncio.run(scenario(bad=2))
    assert isinstance(results[2], ValueError), "the bad request gets its error"
    good = [r for i, r in enumerate(results) if i != 2]
    assert [float(r.probabilities[0, 0]) for r in good] == [0, 1, 3, 4, 5], "its batch neighbours are answered"
    assert handle.preprocess_calls == [6, 1, 1, 1, 1, 1, 1], "the failed batch is retried one request at a time"


def test_batcher_stop_waits_for_the_batch_in_progress():
    """stop() must not cancel the worker while a batch runs: those requests would never be answered."""
    from reference_impl.serving.batcher import MicroBatcher

    handle = _CountingHandle()  # its inference takes 20 ms

    async def scenario() -> Any:
        batcher = MicroBatcher(max_batch_size=8, max_wait_ms=0)
        await batcher.start()
        request = asyncio.ensure_future(batcher.submit([np.full((4, 4), 7, dtype=np.uint8)], handle))
        await asyncio.sleep(0.005)  # the worker has taken the request and is running it
        assert batcher.queue.empty()
        await batcher.stop()
        return await asyncio.wait_for(request, 1)

    result = asyncio.run(scenario())
    assert float(result.probabilities[0, 0]) == 7


# ------------------------------------------------------------------------------------------- shadow and canary
def registry_app(**config: Any) -> Any:
    """An app serving the registry's champion (the registry of the `registry` fixture, via the environment)."""
    return create_app(Settings.from_env(), ServingConfig(model_ref="champion", device="cpu", **config))


def rotated(label: str, classes: tuple[str, ...]) -> str:
    """The challenger bundle's name for the class the champion calls ``label`` (see conftest)."""
    return classes[(classes.index(label) + 1) % len(classes)]


def test_shadow_predictions_are_logged_and_counted(
    registry_with_challenger, isolated_state, tmp_path, weld_pngs, serving_predictor
):
    app = registry_app(admin_key=ADMIN_KEY)
    with TestClient(app, raise_server_exceptions=False) as c:
        info = c.get("/v1/model").json()
        assert info["champion"]["version"] == "1" and info["challenger"]["version"] == "2"
        answers = [
            c.post("/v1/predict", content=weld_pngs[i], headers={**PNG, "x-request-id": f"shadow-{i}"}).json()
            for i in range(4)
        ]
        assert all(a["model"] == {"name": MODEL, "version": "1", "role": "champion"} for a in answers)
        wait_until(lambda: total(samples(c), "weld_shadow_predictions_total") == 4, what="4 shadow predictions")
        found = samples(c)
        assert sample(found, "weld_shadow_predictions_total", agree="false") == 4  # rotated labels never agree
        assert total(found, "weld_predictions_total", role="shadow", version="2") == 4
        assert sample(found, "weld_shadow_errors_total") == 0
    rows = read_predictions(isolated_state / "predictions.db")  # the app has stopped: the log is flushed
    champion = {r["request_id"]: r for r in rows if r["role"] == "champion"}
    shadow = {r["request_id"]: r for r in rows if r["role"] == "shadow"}
    assert set(champion) == set(shadow) == {f"shadow-{i}" for i in range(4)}
    for rid, row in shadow.items():
        assert row["model_version"] == "2" and champion[rid]["model_version"] == "1"
        assert row["label"] == rotated(champion[rid]["label"], serving_predictor.classes)
        assert row["agrees_with_champion"] == 0 and champion[rid]["agrees_with_champion"] is None
        assert row["input_sha256"] == champion[rid]["input_sha256"]


def test_a_crashing_shadow_never_changes_the_champion_answer(
    registry_with_challenger, isolated_state, tmp_path, weld_pngs
):
    app = registry_app()
    headers = {**PNG, "x-request-id": "same-request"}

    def comparable(response: httpx.Response) -> dict[str, Any]:
        assert response.status_code == 200, response.text
        return {k: v for k, v in response.json().items() if k not in ("latency_ms", "batch_size")}

    with TestClient(app, raise_server_exceptions=False) as c:
        healthy = comparable(c.post("/v1/predict", content=weld_pngs[0], headers=headers))
        wait_until(lambda: total(samples(c), "weld_shadow_predictions_total") == 1, what="the shadow prediction")

        def broken(x: Any) -> np.ndarray:
            raise RuntimeError("challenger exploded")

        object.__setattr__(app.state.service.challenger, "infer", broken)
        assert comparable(c.post("/v1/predict", content=weld_pngs[0], headers=headers)) == healthy
        wait_until(lambda: sample(samples(c), "weld_shadow_errors_total") == 1, what="the shadow error count")
        assert comparable(c.post("/v1/predict", content=weld_pngs[0], headers=headers)) == healthy
        wait_until(lambda: sample(samples(c), "weld_shadow_errors_total") == 2, what="the second shadow error")
        assert total(samples(c), "weld_shadow_predictions_total") == 1
        assert c.get("/v1/health/ready").status_code == 200
    roles = [r["role"] for r in read_predictions(isolated_state / "predictions.db")]
    assert roles.count("champion") == 3 and roles.count("shadow") == 1


def test_a_slow_shadow_never_delays_the_champion(registry_with_challenger, tmp_path, weld_pngs):
    app = registry_app(shadow_queue_size=1)
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    with TestClient(app, raise_server_exceptions=False) as c:
        challenger = app.state.service.challenger
        original = challenger.infer

        def stuck(x: Any) -> np.ndarray:
            started.set()
            release.wait(timeout=15)  # the shadow is held here until the test lets it go
            try:
                return original(x)
            finally:
                finished.set()

        object.__setattr__(challenger, "infer", stuck)
        try:
            first = c.post("/v1/predict", content=weld_pngs[0], headers=PNG)
            assert first.status_code == 200 and not finished.is_set()  # answered while the shadow is stuck
            assert started.wait(timeout=10)
            # the shadow backlog is bounded (shadow_queue_size=1): more traffic is answered, its shadow dropped
            more = [c.post("/v1/predict", content=weld_pngs[i], headers=PNG) for i in (1, 2)]
            assert [r.status_code for r in more] == [200, 200] and not finished.is_set()
            assert sample(samples(c), "weld_shadow_dropped_total") == 2
        finally:
            release.set()
        assert finished.wait(timeout=10)
        wait_until(lambda: total(samples(c), "weld_shadow_predictions_total") == 1, what="the released shadow")


def test_canary_routing_is_deterministic_and_proportional():
    ids = [f"req-{i:04d}" for i in range(400)]
    chosen = [in_canary(rid, 0.3) for rid in ids]
    assert chosen == [in_canary(rid, 0.3) for rid in ids]  # the same id always goes the same way
    assert 0.23 <= sum(chosen) / len(ids) <= 0.37
    assert not any(in_canary(rid, 0.0) for rid in ids) and all(in_canary(rid, 1.0) for rid in ids)
    # a larger fraction keeps every request that a smaller one sent to the canary (a smooth ramp-up)
    assert all(in_canary(rid, 0.5) for rid, c in zip(ids, chosen, strict=True) if c)
    with pytest.raises(ValueError, match="canary_fraction"):
        ServingConfig(canary_fraction=1.5)


def test_canary_answers_follow_the_request_id(registry_with_challenger, isolated_state, tmp_path, weld_pngs):
    app = registry_app(canary_fraction=0.3)
    ids = [f"canary-{i:03d}" for i in range(100)]
    with TestClient(app, raise_server_exceptions=False) as c:
        answers = {
            rid: c.post("/v1/predict", content=weld_pngs[i % 12], headers={**PNG, "x-request-id": rid}).json()
            for i, rid in enumerate(ids)
        }
        again = c.post("/v1/predict", content=weld_pngs[0], headers={**PNG, "x-request-id": ids[0]}).json()
        assert again["model"] == answers[ids[0]]["model"]
    # the app has stopped: shadow work finished and the prediction log is flushed
    roles = {rid: a["model"]["role"] for rid, a in answers.items()}
    assert roles == {rid: "canary" if in_canary(rid, 0.3) else "champion" for rid in ids}
    assert 0.15 <= list(roles.values()).count("canary") / len(ids) <= 0.45
    for a in answers.values():
        assert a["model"]["version"] == ("2" if a["model"]["role"] == "canary" else "1")
    logged = read_predictions(isolated_state / "predictions.db", "request_id LIKE 'canary-%'")
    by_role: dict[str, set[str]] = {}
    for row in logged:
        by_role.setdefault(row["role"], set()).add(row["request_id"])
    assert by_role["canary"] == {rid for rid, r in roles.items() if r == "canary"}
    assert by_role["champion"] == {rid for rid, r in roles.items() if r == "champion"}
    assert by_role["shadow"] == by_role["champion"]  # canary requests are not mirrored again


# ------------------------------------------------------------------------------------------------- hot reload
def test_hot_reload_under_load_has_zero_failures(registry, bundle_dir, challenger_bundle_dir, tmp_path, weld_pngs):
    registry.register_bundle(bundle_dir, alias="champion")
    registry.register_bundle(challenger_bundle_dir)
    app = registry_app(admin_key=ADMIN_KEY, shadow=False)
    results: list[tuple[float, float, int, str | None]] = []  # (sent, answered, status, model version)
    marks: dict[str, float] = {}

    async def scenario(http: httpx.AsyncClient) -> httpx.Response:
        sent = 0

        async def client_loop(k: int) -> None:
            nonlocal sent
            # ~150 requests; and at least 30 sent after the reload finished, whatever the machine's speed
            while sent < 2000 and (sent < 150 or len([r for r in results if r[0] > marks.get("reloaded", 1e18)]) < 30):
                sent += 1
                t0 = time.monotonic()
                r = await http.post("/v1/predict", content=weld_pngs[(sent + k) % 12], headers=PNG)
                version = r.json()["model"]["version"] if r.status_code == 200 else None
                results.append((t0, time.monotonic(), r.status_code, version))

        async def reloader() -> httpx.Response:
            while len(results) < 40:
                await asyncio.sleep(0.005)
            await asyncio.to_thread(registry.promote, "2")
            marks["reload"] = time.monotonic()
            response = await http.post("/v1/admin/reload", headers={"x-api-key": ADMIN_KEY})
            marks["reloaded"] = time.monotonic()
            return response

        *_, reload_response = await asyncio.gather(*(client_loop(k) for k in range(8)), reloader())
        return reload_response

    reload_response = run_async(app, scenario)
    assert reload_response.status_code == 200, reload_response.text
    assert reload_response.json() == {"previous_champion": "1", "champion": "2", "challenger": None}
    statuses = [r[2] for r in results]
    assert len(results) >= 150 and statuses.count(200) == len(results), [s for s in statuses if s != 200]
    before = [v for sent, done, _, v in results if done < marks["reload"]]
    after = [v for sent, done, _, v in results if sent > marks["reloaded"]]
    assert len(before) >= 40 and set(before) == {"1"}
    assert len(after) >= 30 and set(after) == {"2"}


def test_a_refused_reload_keeps_the_old_model(registry, bundle_dir, isolated_state, tmp_path, weld_pngs):
    registry.register_bundle(bundle_dir, alias="champion")
    registry.register_bundle(bundle_dir)
    app = registry_app(admin_key=ADMIN_KEY)
    with TestClient(app, raise_server_exceptions=False) as c:
        manifests = [p for p in (isolated_state / "mlartifacts").rglob("MANIFEST.json")]
        assert len(manifests) == 2
        for m in manifests:  # tamper with both stored copies; version 2 is not cached yet
            (m.parent / "labels.json").write_text('["x", "y", "z", "w"]\n')
        registry.promote("2")
        refused = c.post("/v1/admin/reload", headers={"x-api-key": ADMIN_KEY})
        message = assert_client_error(refused, 409)
        assert "verification" in message and "still serving version 1" in message
        answer = c.post("/v1/predict", content=weld_pngs[0], headers=PNG)
        assert answer.status_code == 200 and answer.json()["model"]["version"] == "1"
        assert sample(samples(c), "weld_model_reloads_total", outcome="failed") == 1


def test_rollout_is_switched_at_run_time(registry_with_challenger, isolated_state, weld_pngs):
    """Shadow -> canary -> off without a restart: /v1/admin/rollout changes routing for the next requests."""
    app = registry_app(admin_key=ADMIN_KEY)
    key = {"x-api-key": ADMIN_KEY}
    ids = [f"ramp-{i:03d}" for i in range(60)]
    with TestClient(app, raise_server_exceptions=False) as c:
        assert "X-API-Key" in assert_client_error(c.post("/v1/admin/rollout", json={"canary_fraction": 0.5}), 401)
        for body in ({}, {"canary_fraction": 1.5}, {"canary_fraction": "half"}, {"shadow": "yes"}, {"canary": 0.1}, []):
            assert_client_error(c.post("/v1/admin/rollout", json=body, headers=key), 400)
        assert_client_error(c.post("/v1/admin/rollout", content=b"{not json", headers=key), 400)
        nested = b"[" * 2000 + b"]" * 2000  # fits the 4 KB body limit, exhausts the JSON parser's stack
        assert_client_error(c.post("/v1/admin/rollout", content=nested, headers=key), 400)
        assert c.get("/v1/model").json()["serving"]["canary_fraction"] == 0.0

        def roles() -> dict[str, str]:
            return {
                rid: c.post("/v1/predict", content=weld_pngs[i % 12], headers={**PNG, "x-request-id": rid}).json()[
                    "model"
                ]["role"]
                for i, rid in enumerate(ids)
            }

        assert set(roles().values()) == {"champion"}
        answer = c.post("/v1/admin/rollout", json={"canary_fraction": 0.5, "shadow": False}, headers=key)
        assert answer.status_code == 200 and answer.json() == {
            "shadow": False,
            "canary_fraction": 0.5,
            "challenger": "2",
        }
        assert (
            c.get("/v1/model").json()["serving"] | {"shadow": False, "canary_fraction": 0.5}
            == c.get("/v1/model").json()["serving"]
        )
        assert roles() == {rid: "canary" if in_canary(rid, 0.5) else "champion" for rid in ids}
        assert c.post("/v1/admin/rollout", json={"canary_fraction": 0}, headers=key).status_code == 200
        assert set(roles().values()) == {"champion"}


def test_only_small_inputs_are_decoded_on_the_event_loop(weld_pngs):
    """Decoding on the loop saves a thread hop, but only an image known to be small may stall the loop: the pixel
    count comes from the PNG header, because a small file can hold a huge image."""
    from reference_impl.serving.service import RawFile, _decode_inline, decode_array

    huge = io.BytesIO()
    Image.new("L", (4096, 4096)).save(huge, format="PNG")
    assert len(huge.getvalue()) < 64 * 1024, "a few KB of zeros: file size alone would wave it through"
    jpeg = io.BytesIO()
    Image.new("L", (64, 64)).save(jpeg, format="JPEG")
    assert _decode_inline(RawFile("weld.png", weld_pngs[0]))
    assert not _decode_inline(RawFile("huge.png", huge.getvalue()))
    assert not _decode_inline(RawFile("weld.jpg", jpeg.getvalue())), "other formats: decoded on a thread"
    assert not _decode_inline(RawFile("cut.png", weld_pngs[0][:20])), "a truncated header: refused on a thread"
    assert _decode_inline(decode_array(np.zeros((64, 64), np.uint8))), "a small v2 tensor: only its statistics"
    assert not _decode_inline(decode_array(np.zeros((1024, 1024), np.uint8))), "a big one: on a thread"
    padded = weld_pngs[0][:-12] + b"\x00" * (70 * 1024) + weld_pngs[0][-12:]  # a small header, a big file
    assert not _decode_inline(RawFile("padded.png", padded))


# ------------------------------------------------------------------------------- out-of-distribution flag
@pytest.fixture(scope="module")
def ood_client(profile_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Path]]:
    """A server for a bundle packaged with its monitoring profile, hence with an out-of-distribution detector."""
    state = tmp_path_factory.mktemp("ood-state")
    app = create_app(Settings(state_dir=state), ServingConfig(bundle_path=str(profile_bundle), device="cpu"))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c, state


def test_every_answer_says_whether_the_image_is_out_of_distribution(ood_client):
    c, state = ood_client
    welds = [data.encode_png(im) for im in data.generate(20, seed=808).images]
    others = [data.encode_png(im) for im in data.not_welds(10, seed=9)]
    before = samples(c)
    weld_answers = [c.post("/v1/predict", content=p, headers=PNG).json() for p in welds]
    other_answers = [c.post("/v1/predict", content=p, headers=PNG).json() for p in others]
    assert all(isinstance(a["ood_score"], float) for a in weld_answers + other_answers)
    assert sum(a["out_of_distribution"] for a in weld_answers) <= 2, "calibrated to flag 1 % of normal images"
    assert all(a["out_of_distribution"] and a["ood_score"] > 1.0 for a in other_answers)
    assert all(a["out_of_distribution"] == (a["ood_score"] > 1.0) for a in weld_answers)
    flagged = sum(a["out_of_distribution"] for a in weld_answers + other_answers)
    after = samples(c)
    assert (
        sample(after, "weld_flagged_predictions_total", reason="out_of_distribution")
        - sample(before, "weld_flagged_predictions_total", reason="out_of_distribution")
        == flagged
    )
    described = c.get("/v1/model").json()["champion"]["out_of_distribution"]
    assert described == {"false_flag_rate": 0.01, "calibration_images": 800}

    # the prediction log has the score, and the review queue takes the flagged images first
    from reference_impl.monitoring.review import ReviewQueue

    db = state / "predictions.db"
    wait_until(lambda: db.exists() and len(read_predictions(db)) >= 30, what="the prediction log rows")
    scores = {r["input_sha256"]: r["ood_score"] for r in read_predictions(db)}
    assert all(scores[a["input_sha256"]] == pytest.approx(a["ood_score"]) for a in other_answers)
    queue = ReviewQueue(Settings(state_dir=state))
    queue.enqueue_from_predictions(db, confidence_below=0.0)
    queued = {i.input_sha256: i.reason for i in queue.claim("inspector", n=50)}
    assert {a["input_sha256"] for a in other_answers} <= set(queued)
    assert {queued[a["input_sha256"]] for a in other_answers} == {"out_of_distribution"}


def test_v2_carries_the_flag_as_outputs(ood_client):
    import tritonclient.http as triton

    c, _ = ood_client
    name = c.get("/v1/model").json()["champion"]["name"]
    meta = c.get(f"/v2/models/{name}").json()
    assert {o["name"]: o["datatype"] for o in meta["outputs"]}["out_of_distribution"] == "BOOL"
    stack = np.concatenate([data.generate(2, seed=1).images, data.not_welds(2, seed=2)])
    image = triton.InferInput("image", list(stack.shape), "UINT8")
    image.set_data_from_numpy(stack, binary_data=True)
    wanted = [triton.InferRequestedOutput(n, binary_data=True) for n in ("ood_score", "out_of_distribution")]
    body, json_size = triton.InferenceServerClient.generate_request_body([image], wanted)
    headers = {"content-type": "application/octet-stream", "inference-header-content-length": str(json_size)}
    r = c.post(f"/v2/models/{name}/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    result = triton.InferenceServerClient.parse_response_body(
        r.content, header_length=int(r.headers["inference-header-content-length"])
    )
    flags, scores = result.as_numpy("out_of_distribution"), result.as_numpy("ood_score")
    assert flags.dtype == np.bool_ and list(flags[2:]) == [True, True]
    assert np.array_equal(flags, scores > 1.0)
    plain = c.post(f"/v2/models/{name}/infer", json=tensor("UINT8", list(stack.shape), stack.ravel().tolist()))
    outputs = {o["name"]: o for o in plain.json()["outputs"]}
    assert outputs["out_of_distribution"]["data"][2:] == [True, True]
