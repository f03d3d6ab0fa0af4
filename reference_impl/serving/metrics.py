"""Prometheus metrics for the server. Chapter: "Monitoring in production" (operational metrics).

Operational metrics answer "is the service healthy?" (latency, errors, throughput, saturation); model metrics
answer "is the model still right?" (class mix, confidence, shadow agreement). Both are exported in the
Prometheus text format on ``/metrics`` so any standard stack (Prometheus + Grafana, Datadog, ...) can scrape them.

Each app gets its own ``CollectorRegistry`` so several servers (e.g. in tests) never share counters.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class ServerMetrics:
    def __init__(self, latency_slo_s: float | None = None) -> None:
        """``latency_slo_s``: the organisation's latency SLO, added as a bucket edge, so the share of requests
        within the SLO is read off the histogram exactly, whatever value the SME chose (Monitoring: SLOs)."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("weld_requests", "HTTP requests by route and status", ["route", "method", "status"],
                                registry=r)  # fmt: skip
        self.latency = Histogram(
            "weld_request_latency_seconds",
            "Time per stage: queue (waiting for a batch), preprocess (decode + the batch's transform), "
            "inference (forward pass), total (whole request)",
            ["stage"],
            buckets=sorted({*LATENCY_BUCKETS, *((latency_slo_s,) if latency_slo_s else ())}),
            registry=r,
        )
        self.batch_size = Histogram("weld_batch_size", "Images per forward pass", buckets=(1, 2, 4, 8, 16, 32, 64),
                                    registry=r)  # fmt: skip
        self.in_flight = Gauge("weld_in_flight_requests", "Requests being handled now", registry=r)
        self.queue_depth = Gauge("weld_queue_depth", "Requests waiting for inference", registry=r)
        self.rejected = Counter("weld_rejected", "Requests refused before inference", ["reason"], registry=r)
        self.predictions = Counter("weld_predictions", "Predictions by model role, version and class",
                                   ["role", "version", "label"], registry=r)  # fmt: skip
        self.confidence = Histogram("weld_prediction_confidence", "Max softmax probability of champion answers",
                                    buckets=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
                                    registry=r)  # fmt: skip
        self.shadow_agreement = Counter("weld_shadow_predictions", "Shadow predictions by agreement with champion",
                                        ["agree"], registry=r)  # fmt: skip
        self.shadow_errors = Counter("weld_shadow_errors", "Shadow inferences that failed", registry=r)
        self.shadow_dropped = Counter("weld_shadow_dropped", "Shadow work dropped because its queue was full",
                                      registry=r)  # fmt: skip
        self.model_info = Info("weld_model", "The loaded models", ["role"], registry=r)
        self.flagged = Counter("weld_flagged_predictions", "Predictions flagged for human review, by reason",
                               ["reason"], registry=r)  # fmt: skip
        self.reloads = Counter("weld_model_reloads", "Hot reloads by outcome", ["outcome"], registry=r)

    def set_model(self, handle: object | None, role: str) -> None:
        if handle is None:
            # No model in this role: no series at all (an empty-labelled `role="challenger"` line read as "a
            # challenger is loaded" on dashboards that count series).
            with contextlib.suppress(KeyError):
                self.model_info.remove(role)
            return
        info = {"name": handle.name, "version": handle.version, "bundle_sha256": handle.bundle_sha256,  # type: ignore[attr-defined]
                "runtime": handle.predictor.runtime}  # type: ignore[attr-defined]  # fmt: skip
        self.model_info.labels(role=role).info(info)
