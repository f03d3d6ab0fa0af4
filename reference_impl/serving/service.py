"""The inference service behind every route: decode -> route (champion / canary) -> batch -> log -> shadow.

Chapter: "Serving predictions" and "Retraining" (shadow and canary). The HTTP layers (``app.py`` for our v1 API,
``v2.py`` for the Open Inference Protocol) only translate requests; everything that matters for correctness lives
here once, so both protocols behave identically.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..data import DatasetError, ImageTooLargeError, decode_image
from ..settings import Settings
from .batcher import MicroBatcher, QueueFullError
from .config import ServingConfig
from .metrics import ServerMetrics
from .models import ModelHandle, load_models
from .predlog import PredictionLog, PredictionRecord

log = logging.getLogger(__name__)


class ClientError(Exception):
    """A problem with the request: becomes a 4xx JSON answer saying what was wrong and what to do."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass
class DecodedImage:
    pixels: np.ndarray  # 2-D uint8 or uint16
    sha256: str
    fmt: str | None  # "png", "jpeg", "tiff" for files; None for tensors
    payload: bytes | None  # the original bytes, kept for the review queue

    @property
    def bit_depth(self) -> int:
        return 16 if self.pixels.dtype == np.uint16 else 8

    def stats(self) -> tuple[float, float]:
        """Mean and std of the pixels scaled to [0, 1]: logged for drift monitoring."""
        scaled = self.pixels.astype(np.float32) / (65535.0 if self.bit_depth == 16 else 255.0)
        return float(scaled.mean()), float(scaled.std())


@dataclass
class RawFile:
    """An uploaded image file not decoded yet: decoding happens off the event loop."""

    name: str
    payload: bytes


@dataclass
class _Prepared:
    images: list[DecodedImage]
    stats: list[tuple[float, float]]


def sniff_format(payload: bytes) -> str | None:
    if payload.startswith(b"\x89PNG"):
        return "png"
    if payload.startswith(b"\xff\xd8"):
        return "jpeg"
    if payload[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def decode_file(payload: bytes, max_pixels: int, name: str = "image") -> DecodedImage:
    """Bytes of an uploaded image file -> pixels, with the server's limits. Raises ClientError (4xx)."""
    if not payload:
        raise ClientError(400, f"{name}: empty body; send the bytes of a PNG, JPEG or TIFF file")
    try:
        pixels = decode_image(payload, name=name, max_pixels=max_pixels)
    except ImageTooLargeError as exc:
        raise ClientError(413, str(exc)) from exc
    except DatasetError as exc:
        raise ClientError(400, str(exc)) from exc
    return DecodedImage(pixels, hashlib.sha256(payload).hexdigest(), sniff_format(payload), payload)


def decode_array(pixels: np.ndarray) -> DecodedImage:
    """A tensor from the v2 protocol -> a DecodedImage (hash of its raw bytes, no stored file)."""
    return DecodedImage(pixels, hashlib.sha256(pixels.tobytes()).hexdigest(), None, None)


def in_canary(request_id: str, fraction: float) -> bool:
    """Deterministic by request id: the same request always goes the same way (reproducible, debuggable)."""
    if fraction <= 0:
        return False
    bucket = int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "big") / 2**64
    return bucket < fraction


# Small PNGs are decoded on the event loop itself. A 64x64 weld PNG (~3 KB) decodes, hashes and yields its statistics
# in ~0.2 ms, less than the round trip to a worker thread and back costs in CPU and latency. Anything else goes to a
# thread so that one upload never stalls every other request. "Small" means both a small file and few pixels in the
# PNG header: a 16 KB PNG of zeros can hold 16 million pixels, and a PNG saying 1x1 can carry megabytes of chunks.
INLINE_DECODE_MAX_PIXELS = 256 * 256
INLINE_DECODE_MAX_BYTES = 64 * 1024


def _decode_inline(item: DecodedImage | RawFile) -> bool:
    if not isinstance(item, RawFile):
        return item.pixels.size <= INLINE_DECODE_MAX_PIXELS  # a v2 tensor: only its statistics are computed
    head = item.payload[:24]
    if len(item.payload) > INLINE_DECODE_MAX_BYTES or len(head) < 24:
        return False
    if not head.startswith(b"\x89PNG\r\n\x1a\n") or head[12:16] != b"IHDR":
        return False
    width, height = struct.unpack(">II", head[16:24])
    return width * height <= INLINE_DECODE_MAX_PIXELS


class InferenceService:
    def __init__(self, settings: Settings, config: ServingConfig, metrics: ServerMetrics) -> None:
        self.settings = settings
        self.config = config
        self.metrics = metrics
        self.champion: ModelHandle | None = None
        self.challenger: ModelHandle | None = None
        self.ready = False
        self._preparing = 0  # requests decoding/preprocessing right now: they will reach the batcher soon
        self._shadow_pending = 0
        self._shadow_lock = threading.Lock()
        self._reload_lock = asyncio.Lock()
        self._open()

    def _open(self) -> None:
        """Create the worker pieces. Called again by ``start`` after a ``stop``, so an app can be restarted
        (e.g. entering a test client twice)."""
        config, settings = self.config, self.settings
        self.batcher = MicroBatcher(config.max_batch_size, config.max_wait_ms, config.queue_size,
                                    on_batch=self.metrics.batch_size.observe)  # fmt: skip
        self.batcher.expect_more = lambda: self._preparing > 0
        self.log = PredictionLog(settings.state_dir / "predictions.db",
                                 settings.state_dir / "images" if config.store_images else None)  # fmt: skip
        # Shadow work has its own thread and a bounded backlog: it can fall behind or fail, never slow the champion.
        self._shadow_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shadow")
        self._stopped = False

    # ------------------------------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._stopped:
            self._open()
        champion, challenger = await asyncio.to_thread(load_models, self.settings, self.config)
        self._install(champion, challenger)
        await self.batcher.start()
        self.ready = True  # only now: the model is loaded and a warm-up inference has run

    async def stop(self) -> None:
        self.ready = False
        await self.batcher.stop()
        self._shadow_pool.shutdown(wait=True)
        self.log.close()
        self._stopped = True

    def _install(self, champion: ModelHandle, challenger: ModelHandle | None) -> None:
        self.champion, self.challenger = champion, challenger
        self.metrics.set_model(champion, "champion")
        self.metrics.set_model(challenger, "challenger")

    async def reload(self) -> dict[str, Any]:
        """Re-read the aliases, load and warm the new models, then swap. In-flight requests finish on the old ones."""
        async with self._reload_lock:
            try:
                champion, challenger = await asyncio.to_thread(load_models, self.settings, self.config)
            except Exception:
                self.metrics.reloads.labels(outcome="failed").inc()
                raise
            before = self.champion.version if self.champion else None
            self._install(champion, challenger)
            self.metrics.reloads.labels(outcome="ok").inc()
            return {"previous_champion": before, "champion": champion.version,
                    "challenger": challenger.version if challenger else None}  # fmt: skip

    # ---------------------------------------------------------------------------------------------- predicting
    def _prepare(self, inputs: list[DecodedImage | RawFile]) -> _Prepared:
        """Decode and compute the logged statistics, all in one go (on a worker thread, or inline for a small PNG).
        The model's preprocessing runs later, once per micro-batch, on the inference thread (see batcher.py)."""
        images = [decode_file(i.payload, self.config.max_pixels, i.name) if isinstance(i, RawFile) else i
                  for i in inputs]  # fmt: skip
        return _Prepared(images, [im.stats() for im in images])

    async def predict(self, inputs: list[DecodedImage | RawFile], route: str, request_id: str) -> dict[str, Any]:
        if not self.ready or self.champion is None:
            raise ClientError(503, "model is not loaded yet; retry shortly", {"Retry-After": "1"})
        if not inputs:
            raise ClientError(400, "no images in the request")
        if len(inputs) > self.config.max_images_per_request:
            raise ClientError(413, f"{len(inputs)} images in one request; the limit is "
                                   f"{self.config.max_images_per_request}")  # fmt: skip
        start = time.perf_counter()
        champion, challenger = self.champion, self.challenger
        canary = challenger is not None and in_canary(request_id, self.config.canary_fraction)
        handle = challenger if canary else champion
        assert handle is not None
        if len(inputs) == 1 and _decode_inline(inputs[0]):
            prepared = self._prepare(inputs)  # small: decoding takes less time than a hop to a worker thread
        else:
            self._preparing += 1
            try:
                prepared = await asyncio.to_thread(self._prepare, inputs)
            finally:
                self._preparing -= 1
        images = prepared.images
        decode_s = time.perf_counter() - start
        self.metrics.queue_depth.set(self.batcher.depth)
        try:
            result = await self.batcher.submit([im.pixels for im in images], handle)
        except QueueFullError as exc:
            self.metrics.rejected.labels(reason="queue_full").inc()
            raise ClientError(503, f"{exc}; the server is saturated, retry after a short pause",
                              {"Retry-After": "1"}) from exc  # fmt: skip
        total_s = time.perf_counter() - start
        m = self.metrics
        m.latency.labels(stage="preprocess").observe(decode_s + result.preprocess_seconds)  # decode + transform
        m.latency.labels(stage="queue").observe(result.queue_seconds)
        m.latency.labels(stage="inference").observe(result.inference_seconds)
        role = "canary" if canary else "champion"
        predictions = []
        now = time.time()
        # Plain Python floats and ints from here on: one numpy call per request, not one per image and field.
        winners = result.probabilities.argmax(axis=1).tolist()
        embeddings = result.embeddings if result.embeddings is not None else [None] * len(images)
        ood_scores = result.ood_scores.tolist() if result.ood_scores is not None else [None] * len(images)
        for i, (im, (mean, std), probs, k, emb, ood) in enumerate(
            zip(images, prepared.stats, result.probabilities.tolist(), winners, embeddings, ood_scores, strict=True)
        ):
            label, conf = handle.classes[k], probs[k]
            m.predictions.labels(role=role, version=handle.version, label=label).inc()
            m.confidence.observe(conf)
            prob_map = dict(zip(handle.classes, probs, strict=True))
            flagged = ood is not None and ood > 1.0
            if flagged:
                m.flagged.labels(reason="out_of_distribution").inc()
            predictions.append({"label": label, "confidence": conf, "probabilities": prob_map,
                                "input_sha256": im.sha256, "ood_score": ood,
                                "out_of_distribution": flagged})  # fmt: skip
            self.log.append(
                PredictionRecord(
                    now,
                    request_id,
                    i,
                    role,
                    handle.name,
                    handle.version,
                    route,
                    im.sha256,
                    im.fmt,
                    int(im.pixels.shape[1]),
                    int(im.pixels.shape[0]),
                    "I;16" if im.bit_depth == 16 else "L",
                    im.bit_depth,
                    mean,
                    std,
                    label,
                    conf,
                    prob_map,
                    latency_ms=total_s * 1000,
                    bundle_sha256=handle.bundle_sha256,
                    embedding=emb,
                    ood_score=ood,
                ),
                im.payload,
                im.pixels,
            )
        if challenger is not None and self.config.shadow and not canary:
            self._shadow(challenger, images, [p["label"] for p in predictions], route, request_id)
        return {
            "request_id": request_id,
            "model": {"name": handle.name, "version": handle.version, "role": role},
            "predictions": predictions,
            "latency_ms": round(total_s * 1000, 3),
            "batch_size": result.batch_size,
        }

    # -------------------------------------------------------------------------------------------------- shadow
    def _shadow(self, challenger: ModelHandle, images: list[DecodedImage], champion_labels: list[str], route: str,
                request_id: str) -> None:  # fmt: skip
        with self._shadow_lock:
            if self._shadow_pending >= self.config.shadow_queue_size:
                self.metrics.shadow_dropped.inc()
                return
            self._shadow_pending += 1
        self._shadow_pool.submit(self._run_shadow, challenger, images, champion_labels, route, request_id)

    def _run_shadow(self, challenger: ModelHandle, images: list[DecodedImage], champion_labels: list[str],
                    route: str, request_id: str) -> None:  # fmt: skip
        try:
            start = time.perf_counter()
            outputs = challenger.infer(challenger.preprocess([im.pixels for im in images]))
            probs = outputs.probabilities
            embeddings = outputs.embeddings if outputs.embeddings is not None else [None] * len(images)
            oods = outputs.ood_scores.tolist() if outputs.ood_scores is not None else [None] * len(images)
            latency_ms = (time.perf_counter() - start) * 1000
            now = time.time()
            for i, (im, p, champ, emb, ood) in enumerate(
                zip(images, probs, champion_labels, embeddings, oods, strict=True)
            ):
                k = int(np.argmax(p))
                label = challenger.classes[k]
                agree = label == champ
                self.metrics.shadow_agreement.labels(agree=str(agree).lower()).inc()
                self.metrics.predictions.labels(role="shadow", version=challenger.version, label=label).inc()
                mean, std = im.stats()
                self.log.append(PredictionRecord(
                    now, request_id, i, "shadow", challenger.name, challenger.version, route, im.sha256, im.fmt,
                    int(im.pixels.shape[1]), int(im.pixels.shape[0]), "I;16" if im.bit_depth == 16 else "L",
                    im.bit_depth, mean, std, label, float(p[k]),
                    {c: float(v) for c, v in zip(challenger.classes, p, strict=True)}, agree, latency_ms,
                    challenger.bundle_sha256, emb, ood_score=ood), None, im.pixels)  # fmt: skip
        except Exception:  # a broken challenger must never affect the champion: count it, log it, move on
            self.metrics.shadow_errors.inc()
            log.exception("shadow inference failed for request %s", request_id)
        finally:
            with self._shadow_lock:
                self._shadow_pending -= 1
