"""The real-time inference server (FastAPI + uvicorn). Chapter: "Serving predictions".

``create_app(settings, config)`` builds the app; ``python -m reference_impl serve`` runs it with uvicorn.
Modules: ``config`` (knobs), ``models`` (loaded champion/challenger), ``batcher`` (micro-batching),
``service`` (decode, route, log, shadow), ``predlog`` (the prediction log), ``metrics`` (Prometheus),
``app`` (v1 routes), ``v2`` (Open Inference Protocol) and ``process`` (run it as a process, ``ServerProcess``,
or on a thread of the calling process, ``ServerThread``).
"""

from .app import create_app
from .config import ServingConfig

__all__ = ["ServingConfig", "create_app"]
