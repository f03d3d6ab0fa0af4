"""Loaded models the server can answer with: the champion, and optionally a challenger (shadow / canary).

Chapter: "Serving predictions". A ``ModelHandle`` is immutable: hot reload builds new handles, warms them up, then
swaps one reference. Requests already preprocessed for the old model finish on the old model, so a reload can never
mix one model's preprocessing with another model's weights.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..inference import Predictor
from ..monitoring.ood import OODDetector, input_features
from ..packaging import Bundle, load_bundle
from ..settings import Settings
from .batcher import Outputs
from .config import ServingConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelHandle:
    name: str
    version: str
    role: str  # "champion" or "challenger"
    predictor: Predictor
    bundle_sha256: str
    ood: OODDetector | None = None  # the bundle's out-of-distribution detector (None: packaged before it existed)
    loaded_at: float = field(default_factory=time.time)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.predictor.classes

    @property
    def bundle(self) -> Bundle:
        return self.predictor.bundle

    def preprocess(self, pixels: Any) -> Any:
        """Decoded images (a list of 2-D arrays) -> the model's input tensor, with this bundle's own spec."""
        return self.predictor.preprocess(pixels)

    def infer(self, x: Any) -> Outputs:
        """Softmax probabilities, embeddings and out-of-distribution scores for a preprocessed batch tensor.

        The embedding is what the monitor compares with the bundle's reference; with ONNX Runtime it comes out of
        the same forward pass, so the server logs it instead of the monitor running the model a second time. The
        OOD score needs it too, plus five statistics of the batch tensor (vectorised: ~10 us per image)."""
        import torch

        logits, embeddings = self.predictor.forward(x, with_embeddings=True)
        emb = embeddings.numpy()
        scores = None
        if self.ood is not None:
            spec = self.bundle.preprocess
            scores = self.ood.scores(emb, input_features(x, spec.mean, spec.std))
        return Outputs(torch.softmax(logits, dim=1).numpy(), emb, scores)

    def warm_up(self) -> None:
        """One inference on a blank image: the first call pays for lazy allocations, not a user's request."""
        spec = self.bundle.preprocess
        blank = np.zeros((1, *spec.size), dtype=np.uint8)
        self.infer(self.preprocess(blank))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "role": self.role,
            "bundle_sha256": self.bundle_sha256,
            "bundle_model_version": self.bundle.version,
            "labels": list(self.classes),
            "preprocessing": self.bundle.preprocess.to_dict(),
            "device": str(self.predictor.device),
            "runtime": self.predictor.runtime,
            "out_of_distribution": None if self.ood is None else self.ood.describe(),
            "loaded_at": self.loaded_at,
        }


def _handle(bundle: Bundle, name: str, version: str, role: str, config: ServingConfig) -> ModelHandle:
    predictor = Predictor(bundle, device=config.device, runtime=config.runtime)
    log.info("%s %s v%s runs on %s with %s: %s", role, name, version, predictor.device, predictor.runtime,
             predictor.runtime_reason)  # fmt: skip
    handle = ModelHandle(name, version, role, predictor, bundle.sha256, OODDetector.load(bundle.path))
    handle.warm_up()
    return handle


def load_models(settings: Settings, config: ServingConfig) -> tuple[ModelHandle, ModelHandle | None]:
    """Champion (required) and challenger (optional, from the registry's `challenger` alias)."""
    if config.bundle_path:
        bundle = load_bundle(Path(config.bundle_path))
        return _handle(bundle, settings.model_name, bundle.version, "champion", config), None
    from ..registry import CHALLENGER, Registry

    registry = Registry(settings)
    bundle, info = registry.load(config.model_ref)
    champion = _handle(bundle, info.name, info.version, "champion", config)
    challenger = None
    if (config.shadow or config.canary_fraction > 0) and CHALLENGER in registry.aliases():
        c_bundle, c_info = registry.load(CHALLENGER)
        if c_info.version != info.version:
            challenger = _handle(c_bundle, c_info.name, c_info.version, "challenger", config)
    return champion, challenger
