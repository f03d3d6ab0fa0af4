"""Serving configuration: batching, limits, shadow, auth. Chapter: "Serving predictions".

Every number here is a trade-off the chapter discusses: a larger ``max_batch_size`` or ``max_wait_ms`` raises
throughput and costs latency; a bounded ``queue_size`` turns overload into fast, explicit 503s instead of
ever-growing latency; size limits keep one bad client from taking the server down.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ServingConfig:
    model_ref: str = "champion"  # registry alias or version, used when bundle_path is None
    bundle_path: str | None = None  # serve a bundle directory directly (no registry)
    max_batch_size: int = 16  # 1 disables micro-batching
    max_wait_ms: float = 2.0  # how long the first request of a batch waits for company
    queue_size: int = 256  # requests waiting for inference; beyond this: 503 + Retry-After
    max_body_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_images_per_request: int = 64
    shadow: bool = True  # mirror traffic to the `challenger` alias when it exists
    shadow_queue_size: int = 64  # shadow work beyond this is dropped (and counted), never waited for
    canary_fraction: float = 0.0  # share of requests answered by the challenger (by request id)
    store_images: bool = True  # keep received images (content-addressed) for the review queue
    admin_key: str | None = None  # required for /v1/admin/*; from MLOPS_ADMIN_KEY, never from code
    predict_key: str | None = None  # if set, predict routes require it too (MLOPS_PREDICT_KEY)
    device: str = "auto"
    runtime: str = "auto"  # inference.RUNTIMES: ONNX Runtime when the bundle has a verified export, else torch

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.queue_size < 1 or self.max_wait_ms < 0:
            raise ValueError("max_batch_size and queue_size must be >= 1 and max_wait_ms >= 0")
        if not 0.0 <= self.canary_fraction <= 1.0:
            raise ValueError(f"canary_fraction must be in [0, 1], got {self.canary_fraction}")

    @classmethod
    def from_env(cls, **overrides: object) -> ServingConfig:
        """Secrets and switches from the environment; explicit keyword arguments win."""
        values: dict[str, object] = {
            "admin_key": os.environ.get("MLOPS_ADMIN_KEY") or None,
            "predict_key": os.environ.get("MLOPS_PREDICT_KEY") or None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    def with_(self, **changes: object) -> ServingConfig:
        return replace(self, **changes)  # type: ignore[arg-type]
