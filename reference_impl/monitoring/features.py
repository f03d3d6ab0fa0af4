"""Per-image features for drift monitoring. Chapter: "Monitoring in production" (data drift).

Interpretable statistics first: when an alert fires, "sharpness fell by 60% and noise doubled" tells an engineer to
look at the camera; "embedding dimension 7 moved" does not. Model-based features (probabilities, embeddings) catch
what hand-picked statistics miss. All image statistics are computed on pixels scaled to [0, 1], so 8- and 16-bit
images are comparable, and vectorised over a stack so a 1,000-image window takes milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IMAGE_FEATURES: tuple[str, ...] = (
    "brightness",
    "contrast",
    "sharpness",
    "noise",
    "entropy",
    "width",
    "height",
    "bit_depth",
)
# The subset that varies continuously and is tested for drift; size and bit depth are integrity checks instead.
DRIFT_FEATURES: tuple[str, ...] = ("brightness", "contrast", "sharpness", "noise", "entropy")


def _scaled(pixels: np.ndarray) -> np.ndarray:
    scale = 65535.0 if pixels.dtype == np.uint16 else 255.0 if pixels.dtype == np.uint8 else 1.0
    return pixels.astype(np.float32) / scale


def stack_features(x: np.ndarray) -> np.ndarray:
    """Features of a ``(N, H, W)`` float stack in [0, 1] -> ``(N, 5)`` in DRIFT_FEATURES order."""
    n = x.shape[0]
    flat = x.reshape(n, -1)
    brightness = flat.mean(axis=1)
    contrast = flat.std(axis=1)
    if x.shape[1] < 3 or x.shape[2] < 3:
        # Both filters need a 3x3 neighbourhood: an image thinner than 3 pixels (a client's mistake the server
        # still answers) has no measurable sharpness or noise, and NaN would poison a window's statistics.
        sharpness = noise = np.zeros(n)
    else:
        # Sharpness: variance of the 4-neighbour Laplacian. Blur (a softer lens) lowers it; noise raises it.
        lap = x[:, 1:-1, :-2] + x[:, 1:-1, 2:] + x[:, :-2, 1:-1] + x[:, 2:, 1:-1] - 4 * x[:, 1:-1, 1:-1]
        sharpness = lap.reshape(n, -1).var(axis=1)
        # Noise: Immerkaer's estimator. The 3x3 mask below cancels smooth image structure (up to second order), so
        # what is left is mostly sensor noise: sigma = sqrt(pi/2) * mean|M * I| / 6.
        m = (
            x[:, :-2, :-2]
            - 2 * x[:, :-2, 1:-1]
            + x[:, :-2, 2:]
            - 2 * x[:, 1:-1, :-2]
            + 4 * x[:, 1:-1, 1:-1]
            - 2 * x[:, 1:-1, 2:]
            + x[:, 2:, :-2]
            - 2 * x[:, 2:, 1:-1]
            + x[:, 2:, 2:]
        )
        noise = np.sqrt(np.pi / 2) * np.abs(m).reshape(n, -1).mean(axis=1) / 6
    # Entropy of a 64-bin intensity histogram (bits): a flatter, washed-out image has less.
    bins = np.clip((flat * 64).astype(np.int64), 0, 63)
    counts = np.bincount((bins + 64 * np.arange(n)[:, None]).ravel(), minlength=64 * n).reshape(n, 64)
    p = counts / flat.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.nansum(np.where(p > 0, p * np.log2(p), 0.0), axis=1)
    return np.stack([brightness, contrast, sharpness, noise, entropy], axis=1).astype(np.float64)


def image_features(images: np.ndarray | Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """All IMAGE_FEATURES for a stack ``(N, H, W)`` or a list of 2-D images (sizes may differ)."""
    stacked = isinstance(images, np.ndarray) and images.ndim == 3
    if stacked:
        groups = {images.shape[1:]: list(range(len(images)))}
        items: Sequence[np.ndarray] = images
    else:
        items = list(images)
        groups = {}
        for i, im in enumerate(items):
            if im.ndim != 2:
                raise ValueError(f"image {i}: expected a 2-D grayscale array, got shape {im.shape}")
            groups.setdefault(im.shape, []).append(i)
    n = len(items)
    out = np.zeros((n, len(DRIFT_FEATURES)))
    for idx in groups.values():  # same-sized images are processed as one vectorised stack
        stack = _scaled(np.asarray(items)[idx]) if stacked else np.stack([_scaled(np.asarray(items[i])) for i in idx])
        out[idx] = stack_features(stack)
    result = {name: out[:, k] for k, name in enumerate(DRIFT_FEATURES)}
    result["width"] = np.array([im.shape[1] for im in items], dtype=np.float64)
    result["height"] = np.array([im.shape[0] for im in items], dtype=np.float64)
    result["bit_depth"] = np.array([16 if im.dtype == np.uint16 else 8 for im in items], dtype=np.float64)
    return result


def feature_matrix(features: dict[str, np.ndarray], names: Sequence[str] = DRIFT_FEATURES) -> np.ndarray:
    return np.stack([features[n] for n in names], axis=1)


class PCA:
    """A tiny PCA (SVD of the centred data): fitted on the reference embeddings, saved in the bundle.

    Embeddings have 64 dimensions; kernel tests lose power in high dimensions and cost more, so MMD runs on the
    first ``k`` principal components, which keep most of the variance.
    """

    def __init__(self, mean: np.ndarray, components: np.ndarray, explained: np.ndarray) -> None:
        self.mean, self.components, self.explained = mean, components, explained

    @classmethod
    def fit(cls, x: np.ndarray, k: int = 16) -> PCA:
        mean = x.mean(axis=0)
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        var = s**2
        k = min(k, vt.shape[0])
        return cls(mean, vt[:k], var[:k] / var.sum())

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) @ self.components.T
