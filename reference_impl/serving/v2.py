"""Open Inference Protocol v2 (the REST protocol of KServe and NVIDIA Triton). Chapter: "Serving predictions".

Speaking the standard protocol means an SME can put this model behind their own serving platform, or point
existing v2 clients (``tritonclient``, KServe's SDK, load testers) at our server, without custom glue.

Implemented: server/model health and metadata, and ``POST /v2/models/{name}[/versions/{v}]/infer`` with

- ``UINT8`` / ``UINT16`` / ``FP32`` pixel tensors shaped ``[H, W]``, ``[N, H, W]`` or ``[N, C, H, W]``
  (C = 1 or 3; FP32 values are intensities in [0, 1], *not* normalised: normalisation is the model's business);
- ``BYTES`` tensors ``[N]`` of encoded image files (base64 strings in JSON, raw bytes in binary form);
- the binary tensor data extension (``Inference-Header-Content-Length``), which ``tritonclient`` uses by default;
- outputs ``probabilities`` (FP32 ``[N, K]``), ``label`` (BYTES ``[N]``), ``class_index`` (INT64 ``[N]``).

Errors are ``{"error": "..."}`` with a 4xx status, as the specification requires.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .app import _REQUEST_ID, read_body, request_id_of
from .service import ClientError, DecodedImage, RawFile, decode_array

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])

PIXEL_TYPES = {"UINT8": np.uint8, "UINT16": np.uint16, "FP32": np.float32}
OUTPUTS = ("probabilities", "label", "class_index")
OOD_OUTPUTS = ("ood_score", "out_of_distribution")  # when the bundle has an out-of-distribution detector
INPUT = "image"
# Triton's platform names, so stock tooling recognises what runs the model
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "torch": "pytorch_libtorch"}


def _service(request: Request) -> Any:
    return request.app.state.service


def _check_model(request: Request, name: str, version: str | None = None) -> Any:
    service = _service(request)
    handle = service.champion
    if handle is None or not service.ready:
        raise ClientError(400, f"model {name!r} is not ready")
    if name != handle.name:
        raise ClientError(404, f"unknown model {name!r}; this server serves {handle.name!r}")
    if version is not None and version != handle.version:
        raise ClientError(404, f"model {name!r} has no loaded version {version!r} (loaded: {handle.version})")
    return handle


def _path_version(request: Request) -> str | None:
    """The ``{version}`` of a versioned route, from the path only. (As a function argument, FastAPI would also read
    it from a ``?version=`` query on the unversioned route, which the protocol does not have.)"""
    return request.path_params.get("version")


@router.get("")
async def server_metadata() -> dict[str, Any]:
    return {"name": "weld-inference-server", "version": "1.0", "extensions": ["binary_tensor_data"]}


@router.get("/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready")
async def ready(request: Request) -> JSONResponse:
    ok = _service(request).ready
    # The spec: 200 means true, a 4xx means false.
    return JSONResponse({"ready": ok}, status_code=200 if ok else 400)


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
async def model_metadata(request: Request, name: str) -> dict[str, Any]:
    handle = _check_model(request, name, _path_version(request))
    h, w = handle.bundle.preprocess.size
    k = len(handle.classes)
    return {
        "name": handle.name,
        "versions": [handle.version],
        "platform": PLATFORMS.get(handle.predictor.runtime, handle.predictor.runtime),
        "inputs": [{"name": INPUT, "datatype": "UINT8", "shape": [-1, h, w]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, k]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "class_index", "datatype": "INT64", "shape": [-1]},
            *(
                [
                    {"name": "ood_score", "datatype": "FP32", "shape": [-1]},
                    {"name": "out_of_distribution", "datatype": "BOOL", "shape": [-1]},
                ]
                if handle.ood is not None
                else []
            ),
        ],
        "parameters": {"labels": list(handle.classes), "accepts": "UINT8/UINT16/FP32 pixels or BYTES image files"},
    }


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
async def model_ready(request: Request, name: str) -> JSONResponse:
    try:
        handle = _check_model(request, name, _path_version(request))
    except ClientError as exc:
        if exc.status == 404:
            raise
        return JSONResponse({"name": name, "ready": False}, status_code=400)
    return JSONResponse({"name": handle.name, "ready": True})


# ------------------------------------------------------------------------------------------------- decoding
def _split_binary(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is None:
        json_part, binary = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise ClientError(400, "Inference-Header-Content-Length must be the byte length of the JSON header")
        json_part, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        payload = json.loads(json_part)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ClientError(400, f"request body is not valid JSON: {exc}") from exc
    except RecursionError:  # ~1,000 nested brackets exhaust the parser's stack: a hostile body, not our failure
        raise ClientError(400, "request body is nested too deeply to be a v2 inference request") from None
    if not isinstance(payload, dict):
        raise ClientError(400, "request body must be a JSON object with an 'inputs' list")
    return payload, binary


def _deserialize_bytes(raw: bytes) -> list[bytes]:
    """BYTES in binary form: each element is a 4-byte little-endian length followed by the bytes."""
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise ClientError(400, "truncated BYTES tensor in binary data")
        (n,) = struct.unpack_from("<I", raw, i)
        if i + 4 + n > len(raw):
            raise ClientError(400, "truncated BYTES tensor in binary data")
        out.append(raw[i + 4 : i + 4 + n])
        i += 4 + n
    return out


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    """The optional ``parameters`` object of a request, input or output. Anything but an object is a client
    mistake (a 400), never an AttributeError (a 500)."""
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ClientError(400, f"{where}: 'parameters' must be a JSON object, got {type(params).__name__}")
    return params


def _flatten(data: Any, depth: int = 0) -> list[Any]:
    if depth > 4:  # [N, C, H, W] is the deepest tensor an image input has
        raise ClientError(400, "tensor 'data' is nested deeper than the input's 4 dimensions")
    if isinstance(data, list) and data and isinstance(data[0], list):
        return [x for row in data for x in _flatten(row, depth + 1)]
    if not isinstance(data, list):
        raise ClientError(400, "tensor 'data' must be a JSON array")
    return data


def _tensor_images(
    tensor: dict[str, Any], binary: bytes, offset: int, max_pixels: int
) -> tuple[list[DecodedImage | RawFile], int]:
    name = tensor.get("name")
    datatype = tensor.get("datatype")
    shape = tensor.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list):
        raise ClientError(400, "each input needs 'name' (string), 'datatype' (string) and 'shape' (list of ints)")
    if name != INPUT:
        raise ClientError(400, f"unknown input {name!r}: this model has one input, {INPUT!r} (see the model metadata)")
    # bool is a subclass of int in Python: `true` is not a dimension.
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ClientError(400, f"input {name!r}: shape must be non-negative integers, got {shape}")
    size = _parameters(tensor, f"input {name!r}").get("binary_data_size")
    raw = None
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
            raise ClientError(400, f"input {name!r}: binary_data_size {size} exceeds the binary payload")
        raw, offset = binary[offset : offset + size], offset + size
    elif "data" not in tensor:
        raise ClientError(400, f"input {name!r} has neither 'data' nor a binary_data_size parameter")

    if datatype == "BYTES":
        if len(shape) != 1:
            raise ClientError(400, f"input {name!r}: BYTES input must have shape [N] (one encoded file each)")
        if raw is not None:
            files = _deserialize_bytes(raw)
        else:
            try:
                files = [base64.b64decode(s, validate=True) for s in _flatten(tensor["data"])]
            except (binascii.Error, TypeError, ValueError) as exc:
                raise ClientError(400, f"input {name!r}: BYTES elements in JSON must be base64-encoded image "
                                       "files") from exc  # fmt: skip
        if len(files) != shape[0]:
            raise ClientError(400, f"input {name!r}: shape says {shape[0]} elements, got {len(files)}")
        return [RawFile(f"{name}[{i}]", f) for i, f in enumerate(files)], offset

    if datatype not in PIXEL_TYPES:
        raise ClientError(400, f"input {name!r}: datatype {datatype} not supported; use UINT8, UINT16, FP32 or BYTES")
    if len(shape) not in (2, 3, 4):
        raise ClientError(400, f"input {name!r}: shape {shape} must be [H, W], [N, H, W] or [N, C, H, W]")
    count = int(np.prod(shape))
    h, w = shape[-2], shape[-1]
    if h == 0 or w == 0:  # an empty image cannot be preprocessed: say so instead of failing inside the model
        raise ClientError(400, f"input {name!r}: shape {shape} has an empty image; height and width must be >= 1")
    if h * w > max_pixels:
        raise ClientError(413, f"input {name!r}: {h}x{w} images exceed the limit of {max_pixels:,} pixels")
    dtype = np.dtype(PIXEL_TYPES[datatype]).newbyteorder("<")
    values = _flatten(tensor["data"]) if raw is None else []
    # numpy would truncate 1.7 to 1 and read `true` as 1: integer pixels must be integers in the JSON
    bad = next((v for v in values if type(v) is not int), None) if datatype != "FP32" else None
    if bad is not None:
        raise ClientError(400, f"input {name!r}: {datatype} data must be whole numbers, got {bad!r}")
    try:
        arr = np.frombuffer(raw, dtype=dtype) if raw is not None else np.asarray(values, dtype)
    # OverflowError: numpy 2 refuses e.g. 300 or -1 for UINT8 instead of wrapping around; that is the client's.
    except (ValueError, TypeError, OverflowError) as exc:
        raise ClientError(400, f"input {name!r}: data is not a flat list of {datatype} numbers ({exc})") from exc
    if arr.size != count:
        raise ClientError(400, f"input {name!r}: shape {shape} needs {count} values, got {arr.size}")
    arr = arr.reshape(shape)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim == 4:
        channels = arr.shape[1]
        if channels == 3:
            weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 luma, as Pillow's "L"
            arr = np.tensordot(weights, arr.astype(np.float32), axes=([0], [1]))
            arr = arr.astype(dtype) if datatype != "FP32" else arr
        elif channels != 1:
            raise ClientError(400, f"input {name!r}: {channels} channels; send 1 (grayscale) or 3 (RGB)")
        else:
            arr = arr[:, 0]
    if datatype == "FP32":
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise ClientError(400, f"input {name!r}: FP32 pixels must be finite intensities in [0, 1]")
        arr = np.round(arr * 65535).astype(np.uint16)  # lossless enough for 8-bit sources, exact for 16-bit
    return [decode_array(np.ascontiguousarray(a)) for a in arr], offset


def _encode_output(name: str, values: np.ndarray | list[str], binary: bool) -> tuple[dict[str, Any], bytes]:
    if name == "label":
        items = [str(v).encode() for v in values]
        spec: dict[str, Any] = {"name": name, "datatype": "BYTES", "shape": [len(items)]}
        if binary:
            raw = b"".join(struct.pack("<I", len(b)) + b for b in items)
            return {**spec, "parameters": {"binary_data_size": len(raw)}}, raw
        return {**spec, "data": [b.decode() for b in items]}, b""
    arr = np.asarray(values)
    if arr.dtype == np.bool_:  # BOOL: one byte per element in binary form, true/false in JSON
        spec = {"name": name, "datatype": "BOOL", "shape": list(arr.shape)}
        if binary:
            raw = arr.astype(np.uint8).tobytes()
            return {**spec, "parameters": {"binary_data_size": len(raw)}}, raw
        return {**spec, "data": arr.ravel().tolist()}, b""
    datatype = "FP32" if arr.dtype == np.float32 else "INT64"
    spec = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
    if binary:
        raw = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        return {**spec, "parameters": {"binary_data_size": len(raw)}}, raw
    return {**spec, "data": arr.ravel().tolist()}, b""


@router.post("/models/{name}/infer")
@router.post("/models/{name}/versions/{version}/infer")
async def infer(request: Request, name: str) -> Response:
    request.app.state.require_predict_key(request)
    handle = _check_model(request, name, _path_version(request))
    config = request.app.state.config
    body = await read_body(request, config.max_body_bytes)
    payload, binary = _split_binary(body, request.headers.get("inference-header-content-length"))
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ClientError(400, "'inputs' must be a list with exactly one tensor (the images)")
    from starlette.concurrency import run_in_threadpool

    images, _ = await run_in_threadpool(_tensor_images, inputs[0], binary, 0, config.max_pixels)
    params = _parameters(payload, "request")
    requested = payload.get("outputs")
    available = OUTPUTS + (OOD_OUTPUTS if handle.ood is not None else ())
    if requested is None:
        wanted = [(o, bool(params.get("binary_data_output", False))) for o in available]
    elif isinstance(requested, list) and all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in requested):
        unknown = [o["name"] for o in requested if o["name"] not in available]
        if unknown:
            raise ClientError(400, f"unknown output(s) {unknown}; this model has {list(available)}")
        wanted = [(o["name"], bool(_parameters(o, f"output {o['name']!r}").get(
                      "binary_data", params.get("binary_data_output", False)))) for o in requested]  # fmt: skip
    else:
        raise ClientError(400, "'outputs' must be a list of objects with a 'name'")
    # The v2 "id" is a request id like X-Request-ID (it routes canaries and lands in the prediction log): the same
    # rules apply, rather than str() of whatever JSON value was sent.
    given_id = payload.get("id")
    if given_id is None:
        request_id = request_id_of(request)
    elif isinstance(given_id, str) and _REQUEST_ID.match(given_id):
        request_id = given_id
    else:
        raise ClientError(400, "'id' must be a string of 1-128 letters, digits, '.', '_', ':' or '-'")
    result = await _service(request).predict(images, f"/v2/models/{name}/infer", request_id)
    preds = result["predictions"]
    classes = list(preds[0]["probabilities"])
    values = {
        "probabilities": np.array([[p["probabilities"][c] for c in classes] for p in preds], dtype=np.float32),
        "label": [p["label"] for p in preds],
        "class_index": np.array([classes.index(p["label"]) for p in preds], dtype=np.int64),
        # 0.0 for an answer without a score: a canary challenger packaged before the detector existed
        "ood_score": np.array([p["ood_score"] or 0.0 for p in preds], dtype=np.float32),
        "out_of_distribution": np.array([p["out_of_distribution"] for p in preds], dtype=bool),
    }
    outputs, blobs = [], []
    for out_name, as_binary in wanted:
        spec, raw = _encode_output(out_name, values[out_name], as_binary)
        outputs.append(spec)
        blobs.append(raw)
    response = {"model_name": result["model"]["name"], "model_version": result["model"]["version"],
                "id": request_id, "outputs": outputs}  # fmt: skip
    header = json.dumps(response).encode()
    if any(blobs):
        return Response(header + b"".join(blobs), media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(len(header))})  # fmt: skip
    return Response(header, media_type="application/json")
