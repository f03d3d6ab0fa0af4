"""Per-image out-of-distribution score: is this input like anything the model was profiled on?

Chapter: "Monitoring in production" (alerts and human review). Drift tests look at windows: 10 photographs mixed
into 90 radiographs move no window statistic, yet the model answers each photo with a confident "crack". A softmax
cannot say "none of these"; the score here can. It combines two Mahalanobis distances to the bundle's held-out
reference images:

- of the model's **embedding** (what the network makes of the image), and
- of five **statistics of the model input** (brightness, contrast, sharpness, noise, entropy of the resized image
  the network sees, so a 4,000-pixel photo and a 64-pixel radiograph are compared at the same size).

Each distance is divided by its median on the reference images, the larger of the two is taken, and the result is
divided by a threshold calibrated at packaging on a *second* held-out set (the profile's null pool) so that a chosen
share of normal images is flagged (``false_flag_rate``, the policy's ``drift.ood_false_flag_rate``, default 1 %).
The published score therefore reads directly: **above 1.0 is flagged**. ``python -m benchmarks ood`` measures false
flags on new baseline images and how many line changes, novel defects and non-weld images are flagged.

Stored in the bundle as ``monitoring/ood.json`` (56 KB for the baseline model: two means, two precision matrices, three
numbers; the server loads only this file, not the profile's arrays).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .features import stack_features

OOD_JSON = "monitoring/ood.json"
OOD_VERSION = 1


def input_features(x: Any, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """The five image statistics of a preprocessed batch ``(N, 1, H, W)`` (normalised by ``mean``/``std``), on the
    [0, 1] pixel scale they were computed on before normalisation."""
    arr = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    pixels = arr[:, 0].astype(np.float32) * np.float32(std[0]) + np.float32(mean[0])
    return stack_features(np.clip(pixels, 0.0, 1.0))


def _precision(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = samples.mean(axis=0)
    cov = np.atleast_2d(np.cov(samples, rowvar=False))
    # A ridge keeps dimensions that never vary on the reference (ReLU units that stay at zero) from dividing by 0.
    ridge = 1e-3 * float(np.trace(cov)) / cov.shape[0] + 1e-12
    return mean, np.linalg.inv(cov + ridge * np.eye(cov.shape[0]))


def _squared_distance(values: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    d = np.asarray(values, dtype=np.float64) - mean
    return np.einsum("ij,jk,ik->i", d, precision, d)


@dataclass(frozen=True)
class OODDetector:
    embedding_mean: np.ndarray
    embedding_precision: np.ndarray
    embedding_scale: float
    feature_mean: np.ndarray
    feature_precision: np.ndarray
    feature_scale: float
    threshold: float
    false_flag_rate: float
    calibration_images: int

    @classmethod
    def fit(
        cls,
        reference: tuple[np.ndarray, np.ndarray],
        calibration: tuple[np.ndarray, np.ndarray],
        false_flag_rate: float = 0.01,
    ) -> OODDetector:
        """``reference`` and ``calibration``: ``(embeddings, input features)`` of two disjoint held-out sets."""
        if not 0 < false_flag_rate < 1:
            raise ValueError(f"false_flag_rate must be between 0 and 1, got {false_flag_rate}")
        (ref_emb, ref_feat), (cal_emb, cal_feat) = reference, calibration
        emb_mean, emb_precision = _precision(ref_emb)
        feat_mean, feat_precision = _precision(ref_feat)
        emb_scale = float(np.median(_squared_distance(ref_emb, emb_mean, emb_precision)))
        feat_scale = float(np.median(_squared_distance(ref_feat, feat_mean, feat_precision)))
        raw = cls(emb_mean, emb_precision, emb_scale, feat_mean, feat_precision, feat_scale, 1.0, false_flag_rate,
                  len(cal_emb))  # fmt: skip
        threshold = float(np.quantile(raw.scores(cal_emb, cal_feat), 1 - false_flag_rate))
        return cls(emb_mean, emb_precision, emb_scale, feat_mean, feat_precision, feat_scale, threshold,
                   false_flag_rate, len(cal_emb))  # fmt: skip

    def scores(self, embeddings: np.ndarray, features: np.ndarray) -> np.ndarray:
        """One score per image; above 1.0 means out of distribution."""
        if len(embeddings) == 0:
            return np.zeros(0)
        e = _squared_distance(embeddings, self.embedding_mean, self.embedding_precision) / self.embedding_scale
        f = _squared_distance(features, self.feature_mean, self.feature_precision) / self.feature_scale
        return np.maximum(e, f) / self.threshold

    # -- bundle file ---------------------------------------------------------------------------------------------
    def to_files(self) -> dict[str, bytes]:
        embedding = {"mean": self.embedding_mean.tolist(), "precision": self.embedding_precision.tolist(),
                     "scale": self.embedding_scale}  # fmt: skip
        features = {"mean": self.feature_mean.tolist(), "precision": self.feature_precision.tolist(),
                    "scale": self.feature_scale}  # fmt: skip
        doc = {
            "ood_version": OOD_VERSION,
            "false_flag_rate": self.false_flag_rate,
            "calibration_images": self.calibration_images,
            "threshold": self.threshold,
            "embedding": embedding,
            "input_features": features,
        }
        return {OOD_JSON: (json.dumps(doc) + "\n").encode()}

    @classmethod
    def load(cls, bundle_dir: str | Path) -> OODDetector | None:
        """The bundle's detector, or None for a bundle packaged before it existed (no score, nothing flagged)."""
        path = Path(bundle_dir) / OOD_JSON
        if not path.is_file():
            return None
        doc = json.loads(path.read_text())
        if doc.get("ood_version") != OOD_VERSION:
            raise ValueError(f"{path}: out-of-distribution detector version {doc.get('ood_version')} not understood")
        emb, feat = doc["embedding"], doc["input_features"]
        return cls(np.array(emb["mean"]), np.array(emb["precision"]), float(emb["scale"]), np.array(feat["mean"]),
                   np.array(feat["precision"]), float(feat["scale"]), float(doc["threshold"]),
                   float(doc["false_flag_rate"]), int(doc["calibration_images"]))  # fmt: skip

    def describe(self) -> dict[str, Any]:
        return {"false_flag_rate": self.false_flag_rate, "calibration_images": self.calibration_images}
