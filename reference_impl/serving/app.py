"""The real-time inference server: FastAPI app factory and the v1 routes. Chapter: "Serving predictions".

Routes:

- ``POST /v1/predict`` (one image: multipart upload or raw body) and ``POST /v1/predict/batch`` (several files);
- ``GET /v1/model``: what is loaded; ``POST /v1/admin/reload``: hot reload from the registry (API key);
- ``POST /v1/admin/rollout``: how the challenger takes part, changed at run time (shadow on/off, canary fraction);
- ``GET /metrics``: Prometheus; ``/v2/...``: the Open Inference Protocol (see ``v2.py``);
- liveness (process is up) is separate from readiness (model loaded *and* warmed up), as Kubernetes probes expect.

Every client mistake is a 4xx with a JSON body ``{"error": "..."}`` that says what was wrong.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..settings import Settings
from .config import ServingConfig
from .metrics import ServerMetrics
from .service import ClientError, InferenceService, RawFile

log = logging.getLogger(__name__)

IMAGE_TYPES = ("image/png", "image/jpeg", "image/tiff", "application/octet-stream")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# RFC 9110: a 401 names how to authenticate. No registered scheme covers API keys; this names the header to send.
AUTH_CHALLENGE = {"WWW-Authenticate": 'ApiKey realm="weld-inference", header="X-API-Key"'}


def request_id_of(request: Request) -> str:
    """The caller's X-Request-ID if it is sane (used for canary routing and tracing), else a new one."""
    given = request.headers.get("x-request-id")
    if given is None:
        return uuid.uuid4().hex
    if not _REQUEST_ID.match(given):
        raise ClientError(400, "X-Request-ID must be 1-128 characters of letters, digits, '.', '_', ':' or '-'")
    return given


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes *while reading* (a lying or absent Content-Length
    cannot make us buffer an unbounded upload). A gzip or deflate body (``Content-Encoding``, as tritonclient's
    ``request_compression_algorithm`` sends it) is decompressed, with the same limit on what it expands to."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip", "deflate"):
        raise ClientError(415, f"unsupported Content-Encoding {encoding!r}; send gzip, deflate or an uncompressed body")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ClientError(400, "Content-Length must be a number")
        if int(declared) > limit:
            raise ClientError(413, f"payload of {int(declared):,} bytes exceeds the limit of {limit:,} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ClientError(413, f"payload exceeds the limit of {limit:,} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    return body if encoding == "identity" else _decompress(body, encoding, limit)


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    # zlib with a bounded output: a 10 KB "zip bomb" must not expand into gigabytes before the limit is checked.
    # wbits 16+15 reads the gzip wrapper; 15 the zlib wrapper that HTTP calls "deflate".
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ClientError(400, f"the body is not valid {encoding} data ({exc})") from exc
    if len(out) > limit or inflater.unconsumed_tail:
        raise ClientError(413, f"the {encoding} body expands beyond the limit of {limit:,} bytes")
    if not inflater.eof:
        raise ClientError(400, f"the {encoding} body is truncated")
    return out


async def read_images(request: Request, config: ServingConfig, *, many: bool) -> list[RawFile]:
    """Image files from a multipart form (any file fields) or a raw image body (decoded later, off the loop)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, config.max_body_bytes)
    if ctype == "multipart/form-data":
        # The body is already read (with the size limit); Starlette's form parser reads from this cached copy.
        request._body = body
        try:
            form = await request.form(max_files=config.max_images_per_request, max_fields=16)
        except (ValueError, KeyError, AssertionError) as exc:
            raise ClientError(400, f"malformed multipart body: {exc}") from exc
        files = [v for _, v in form.multi_items() if hasattr(v, "read")]
        if not files:
            raise ClientError(400, "multipart request has no file field; send the image as e.g. -F file=@weld.png")
        if not many and len(files) > 1:
            raise ClientError(400, f"{len(files)} files sent to /v1/predict; use /v1/predict/batch for several")
        payloads = [(f.filename or f"file{i}", await f.read()) for i, f in enumerate(files)]
    elif ctype in IMAGE_TYPES or ctype.startswith("image/"):
        payloads = [("body", body)]
    elif not ctype:
        raise ClientError(415, "missing Content-Type; send image/png (raw body) or multipart/form-data")
    else:
        raise ClientError(415, f"unsupported Content-Type {ctype!r}; send an image (image/png, image/jpeg, "
                               "image/tiff) or multipart/form-data")  # fmt: skip
    return [RawFile(name, payload) for name, payload in payloads]


class MetricsMiddleware:
    """Counts requests by route template and status, tracks in-flight requests, times predictions end to end.

    A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` would add a task and a stream copy per request.
    """

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_record(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self.metrics.in_flight.dec()
            path = getattr(scope.get("route"), "path", "unmatched")  # the template: bounded label values
            self.metrics.requests.labels(route=path, method=scope["method"], status=str(status)).inc()
            if path.startswith(
                ("/v1/predict", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")
            ):
                self.metrics.latency.labels(stage="total").observe(time.perf_counter() - start)


def _check_key(given: str | None, expected: str) -> bool:
    # compare_digest takes the same time however many characters match: no timing side channel.
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def create_app(settings: Settings | None = None, config: ServingConfig | None = None) -> FastAPI:
    """Build the app. The model loads in the lifespan, so readiness turns true only once it can answer."""
    settings = settings or Settings.from_env()
    config = config or ServingConfig.from_env()
    metrics = ServerMetrics(latency_slo_s=settings.policy.serving.p99_latency_ms_slo / 1000)
    service = InferenceService(settings, config, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await service.start()
            yield
        finally:
            # drains the batch queue and flushes the prediction log (SIGTERM included); after a failed start it
            # still closes the log's writer thread and database, which matters when the server runs on a thread
            await service.stop()

    app = FastAPI(title="Weld defect inference server", version="1.0", lifespan=lifespan,
                  description="Reference server for the course chapter 'Serving predictions'.")  # fmt: skip
    app.state.service = service
    app.state.metrics = metrics
    app.state.config = config

    # `async def` although it awaits nothing: FastAPI runs a plain `def` dependency in a worker thread.
    async def require_admin(request: Request) -> None:
        if config.admin_key is None:
            raise ClientError(403, "the admin API is disabled: start the server with MLOPS_ADMIN_KEY set")
        if not _check_key(request.headers.get("x-api-key"), config.admin_key):
            raise ClientError(401, "missing or wrong X-API-Key header for an admin route", AUTH_CHALLENGE)

    def check_predict_key(request: Request) -> None:
        if config.predict_key is not None and not _check_key(request.headers.get("x-api-key"), config.predict_key):
            raise ClientError(401, "missing or wrong X-API-Key header (this server requires a key for predictions)",
                              AUTH_CHALLENGE)  # fmt: skip

    app.state.require_predict_key = check_predict_key  # the v2 infer route checks it too

    # ------------------------------------------------------------------------------------------ error handling
    @app.exception_handler(ClientError)
    async def client_error(request: Request, exc: ClientError) -> JSONResponse:
        # A refused prediction request never reaches the prediction log as a prediction, yet the monitor must count
        # it (an unreadable upload is an integrity failure, a 503 a failed request): record it, without the body.
        path = request.url.path
        if path.startswith("/v1/predict") or (path.startswith("/v2/models/") and path.endswith("/infer")):
            headers = request.headers
            service.log.log_rejection(
                path, exc.status, exc.message, headers.get("content-type"), headers.get("content-length")
            )
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": f"invalid request: {problems}"}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # keep Starlette's headers: a 405 carries the `Allow` list of methods the route does accept
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"error": "internal server error; see the server log"}, status_code=500)

    app.add_middleware(MetricsMiddleware, metrics=metrics)

    # ----------------------------------------------------------------------------------------------- v1 routes
    @app.get("/v1/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v1/health/ready")
    async def ready() -> JSONResponse:
        return JSONResponse({"ready": service.ready}, status_code=200 if service.ready else 503)

    @app.get("/v1/model")
    async def model_info() -> dict[str, Any]:
        if service.champion is None:
            raise ClientError(503, "model is not loaded yet")
        return {
            "champion": service.champion.describe(),
            "challenger": service.challenger.describe() if service.challenger else None,
            "serving": {
                "max_batch_size": config.max_batch_size,
                "max_wait_ms": config.max_wait_ms,
                "queue_size": config.queue_size,
                "shadow": service.config.shadow,
                "canary_fraction": service.config.canary_fraction,
            },
        }

    # The predict routes check the key themselves rather than through Depends(): a dependency costs FastAPI a
    # resolution step on every request, measurable on the hottest route (the admin routes keep Depends()).
    @app.post("/v1/predict")
    async def predict(request: Request) -> dict[str, Any]:
        check_predict_key(request)
        rid = request_id_of(request)
        images = await read_images(request, config, many=False)
        out = await service.predict(images, "/v1/predict", rid)
        pred = out.pop("predictions")[0]
        return {**out, **pred}

    @app.post("/v1/predict/batch")
    async def predict_batch(request: Request) -> dict[str, Any]:
        check_predict_key(request)
        rid = request_id_of(request)
        images = await read_images(request, config, many=True)
        return await service.predict(images, "/v1/predict/batch", rid)

    @app.post("/v1/admin/reload", dependencies=[Depends(require_admin)])
    async def reload() -> dict[str, Any]:
        from ..packaging import BundleError
        from ..registry import RegistryError

        try:
            return await service.reload()
        except (RegistryError, BundleError) as exc:
            # The registry points at something we refuse to serve (unknown alias, tampered artifacts): tell the
            # operator why, instead of an anonymous 500. The old models keep serving (see service.reload).
            current = service.champion.version if service.champion else None
            raise ClientError(409, f"reload refused, still serving version {current}: {exc}") from exc

    @app.post("/v1/admin/rollout", dependencies=[Depends(require_admin)])
    async def rollout(request: Request) -> dict[str, Any]:
        """Body ``{"canary_fraction": 0.25, "shadow": true}`` (either key). Chapter: "Retraining" (safe rollout).

        Shadow and canary are steps of one rollout, taken minutes apart while the same models stay loaded, so they
        are switched at run time instead of by restarting the server (a restart would drop in-flight requests).
        """
        import json

        try:
            body = json.loads(await read_body(request, 4096) or b"{}")
        # RecursionError: a few hundred nested brackets fit in 4 KB and exhaust the parser's stack
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise ClientError(400, 'the body must be JSON such as {"canary_fraction": 0.25, "shadow": true}') from None
        if not isinstance(body, dict) or not body or set(body) - {"canary_fraction", "shadow"}:
            raise ClientError(400, f"expected an object with 'canary_fraction' and/or 'shadow'; got {body!r:.200}")
        changes: dict[str, Any] = {}
        if "shadow" in body:
            if not isinstance(body["shadow"], bool):
                raise ClientError(400, f"'shadow' must be true or false; got {body['shadow']!r:.50}")
            changes["shadow"] = body["shadow"]
        if "canary_fraction" in body:
            fraction = body["canary_fraction"]
            if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction <= 1:
                raise ClientError(400, f"'canary_fraction' must be a number from 0 to 1; got {fraction!r:.50}")
            changes["canary_fraction"] = float(fraction)
        service.config = service.config.with_(**changes)  # one attribute swap: each request sees old or new
        log.info("rollout changed: %s", changes)
        return {"shadow": service.config.shadow, "canary_fraction": service.config.canary_fraction,
                "challenger": service.challenger.version if service.challenger else None}  # fmt: skip

    @app.get("/metrics")
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        metrics.queue_depth.set(service.batcher.depth)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    from .openapi import document
    from .v2 import router as v2_router

    app.include_router(v2_router)
    document(app)  # the real request bodies and statuses (the routes read their bodies themselves)
    return app
