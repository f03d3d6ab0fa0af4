"""The server's OpenAPI document, exact: the real request bodies and every status each route returns.

Chapter: "Serving predictions" (the interface). The routes read their bodies themselves (raw images, multipart,
v2 JSON or its binary extension), so FastAPI cannot infer them, and it would list its own 422 for path parameters
while this server answers every client mistake with 400 and a JSON ``{"error": ...}``. One table here says what
each route takes and answers; :func:`document` writes it into ``/openapi.json``, and ``tests/test_openapi.py``
runs schemathesis against it (every check, with only one allowance: a body can match the schema and still not be
a readable image).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
STATUS_TEXT = {
    200: "OK",
    400: "The request is malformed: an unreadable image, a bad header, a body that breaks the protocol",
    401: "Missing or wrong X-API-Key header (see the WWW-Authenticate header)",
    403: "The admin API is disabled (the server was started without MLOPS_ADMIN_KEY)",
    404: "Unknown model name or version",
    409: "Reload refused: the registry points at something this server will not serve",
    413: "Too large: body bytes, pixels, or images per request above the server's limits",
    415: "Unsupported Content-Type",
    503: "Not ready, or saturated: retry after the Retry-After header's seconds",
}

_BINARY = {"schema": {"type": "string", "format": "binary"}}
IMAGE_BODY = {
    "required": True,
    "description": "One encoded image as the raw body, or multipart/form-data with file field(s)",
    "content": {
        "image/png": _BINARY,
        "image/jpeg": _BINARY,
        "image/tiff": _BINARY,
        "application/octet-stream": _BINARY,
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary"}},
            }
        },
    },
}
ROLLOUT_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "minProperties": 1,
                "additionalProperties": False,
                "properties": {
                    "canary_fraction": {"type": "number", "minimum": 0, "maximum": 1},
                    "shadow": {"type": "boolean"},
                },
            }
        }
    },
}
_V2_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string", "enum": ["image"]},
        "shape": {"type": "array", "minItems": 1, "maxItems": 4, "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": ["UINT8", "UINT16", "FP32", "BYTES"]},
        "parameters": {"type": "object"},
        "data": {"type": "array"},
    },
}
V2_BODY = {
    "required": True,
    "description": "An inference request (Open Inference Protocol v2); with the binary tensor extension, the JSON "
    "header is followed by raw tensor bytes and its length is sent as Inference-Header-Content-Length",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["inputs"],
                "properties": {
                    "id": {"type": "string"},
                    "parameters": {"type": "object"},
                    "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": _V2_TENSOR},
                    "outputs": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
                        },
                    },
                },
            }
        },
        "application/octet-stream": _BINARY,
    },
}
_JSON_OBJECT = {"application/json": {"schema": {"type": "object"}}}
_V2_ANSWER = {**_JSON_OBJECT, "application/octet-stream": _BINARY}  # binary outputs: JSON header + tensor bytes
_METRICS = {"text/plain": {"schema": {"type": "string"}}}
_PREDICT = (400, 401, 413, 415, 503)
_MODEL = (400, 404)  # 400: the model is not ready (the protocol's "false")

# (path, method) -> (request body or None, statuses besides 200, the 200 content)
ROUTES: dict[tuple[str, str], tuple[dict[str, Any] | None, tuple[int, ...], dict[str, Any]]] = {
    ("/v1/health/live", "get"): (None, (), _JSON_OBJECT),
    ("/v1/health/ready", "get"): (None, (503,), _JSON_OBJECT),
    ("/v1/model", "get"): (None, (503,), _JSON_OBJECT),
    ("/v1/predict", "post"): (IMAGE_BODY, _PREDICT, _JSON_OBJECT),
    ("/v1/predict/batch", "post"): (IMAGE_BODY, _PREDICT, _JSON_OBJECT),
    ("/v1/admin/reload", "post"): (None, (401, 403, 409, 503), _JSON_OBJECT),
    ("/v1/admin/rollout", "post"): (ROLLOUT_BODY, (400, 401, 403, 413, 415), _JSON_OBJECT),
    ("/metrics", "get"): (None, (), _METRICS),
    ("/v2", "get"): (None, (), _JSON_OBJECT),
    ("/v2/health/live", "get"): (None, (), _JSON_OBJECT),
    ("/v2/health/ready", "get"): (None, (400,), _JSON_OBJECT),
    ("/v2/models/{name}", "get"): (None, _MODEL, _JSON_OBJECT),
    ("/v2/models/{name}/versions/{version}", "get"): (None, _MODEL, _JSON_OBJECT),
    ("/v2/models/{name}/ready", "get"): (None, _MODEL, _JSON_OBJECT),
    ("/v2/models/{name}/versions/{version}/ready", "get"): (None, _MODEL, _JSON_OBJECT),
    ("/v2/models/{name}/infer", "post"): (V2_BODY, (*_MODEL, 401, 413, 415, 503), _V2_ANSWER),
    ("/v2/models/{name}/versions/{version}/infer", "post"): (V2_BODY, (*_MODEL, 401, 413, 415, 503), _V2_ANSWER),
}
_HEADERS = {
    "x-request-id": {
        "name": "X-Request-ID",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
    },
    "x-api-key": {"name": "X-API-Key", "in": "header", "required": False, "schema": {"type": "string"}},
}


def _operation(path: str, method: str, op: dict[str, Any], model: Any) -> None:
    body, statuses, ok = ROUTES[path, method]
    if body is not None:
        op["requestBody"] = body
    op["responses"] = {"200": {"description": STATUS_TEXT[200], "content": ok}}
    for status in statuses:
        op["responses"][str(status)] = {
            "description": STATUS_TEXT[status],
            "content": {"application/json": {"schema": ERROR}},
        }
    params = [p for p in op.get("parameters", []) if p.get("in") != "query"]  # no route takes a query parameter
    if "{version}" in path and not any(p["name"] == "version" for p in params):
        params.append({"name": "version", "in": "path", "required": True, "schema": {"type": "string"}})
    for p in params:  # this server serves one model: name the values its routes accept (others: 404)
        if p["in"] == "path" and model is not None:
            p["schema"] = {"type": "string", "enum": [model.name if p["name"] == "name" else model.version]}
    if path.startswith(("/v1/predict", "/v2/models/")) and method == "post":
        params += [_HEADERS["x-request-id"], _HEADERS["x-api-key"]]
    elif path.startswith("/v1/admin/"):
        params.append(_HEADERS["x-api-key"])
    if params:
        op["parameters"] = params
    else:
        op.pop("parameters", None)


def document(app: FastAPI) -> None:
    """Make ``app.openapi()`` return the exact document (built on the first request for it once the model is
    loaded, since the v2 paths name the model and version it serves; rebuilt after a reload changes them)."""

    def openapi() -> dict[str, Any]:
        model = app.state.service.champion
        key = None if model is None else (model.name, model.version)
        if app.openapi_schema is None or getattr(app.state, "openapi_for", None) != key:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for path, methods in schema.get("paths", {}).items():
                for method, op in methods.items():
                    if (path, method) in ROUTES:
                        _operation(path, method, op, model)
            schema.get("components", {}).pop("schemas", None)  # only FastAPI's 422 models lived there
            app.openapi_schema, app.state.openapi_for = schema, key
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
