"""Model quality on live data: measured when labels arrive, estimated when they do not.

Chapter: "Monitoring in production" (model metrics on live data). Inspector labels come late and for a subset, so
for most windows the true accuracy is unknown. A *calibrated* model's confidence is an honest probability of being
right, so the average calibrated confidence of a window estimates its accuracy. Raw softmax confidence is usually
over-confident; temperature scaling (one number T, fitted on held-out labelled data at packaging time) fixes that
without changing any prediction: p = softmax(log p_raw / T).

Know its limits: the estimate is only as good as the model's confidence *on the new data*. Under the
``new_camera`` condition this model becomes confidently wrong (sensor noise looks like cracks to it): the estimate
stays near 97% while the true accuracy falls to about a third. That is why monitoring never relies on one signal:
the drift tests fire on that window, and inspectors' labels from the review queue give the true accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def temper(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax probabilities re-calibrated with temperature T (logits are recovered up to a constant by log p)."""
    logits = np.log(np.clip(probs, 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The T in [0.05, 20] minimising the negative log-likelihood of the true labels."""
    from scipy.optimize import minimize_scalar

    labels = np.asarray(labels, dtype=int)

    def nll(log_t: float) -> float:
        p = temper(probs, float(np.exp(log_t)))
        return float(-np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, 1.0)).mean())

    res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(res.x))


def estimated_accuracy(probs: np.ndarray, temperature: float) -> float:
    """Mean calibrated confidence of the predicted class."""
    return float(temper(probs, temperature).max(axis=1).mean()) if len(probs) else float("nan")


def measured_quality(predicted: Sequence[str], true: Sequence[str], classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy and per-class recall on the labelled subset of a window."""
    pred, truth = np.asarray(predicted), np.asarray(true)
    if len(truth) == 0:
        return {"n_labelled": 0, "accuracy": None, "recall": {}}
    recall = {c: float((pred[truth == c] == c).mean()) for c in classes if (truth == c).any()}
    return {"n_labelled": len(truth), "accuracy": float((pred == truth).mean()), "recall": recall}


def labelled_quality(
    rows: Sequence[Mapping[str, Any]], labels: Mapping[str, tuple[str, str]], classes: Sequence[str], min_audit: int = 5
) -> dict[str, Any]:
    """Measured quality of one window: its served predictions (``rows``, with ``input_sha256`` and ``label``)
    against inspector labels (``labels``: image sha256 -> (true label, why the item was reviewed)).

    Items queued for low confidence are, by construction, the ones the model gets wrong most: accuracy measured on
    them is biased low. The random audit sample is unbiased, so it is preferred when there is enough of it.
    """
    labelled = [(r["label"], *labels[r["input_sha256"]]) for r in rows if r["input_sha256"] in labels]
    audit = [t for t in labelled if t[2] == "random_audit"]
    truth, sample = (audit, "random_audit") if len(audit) >= min_audit else (labelled, "all_labelled")
    quality = measured_quality([t[0] for t in truth], [t[1] for t in truth], classes)
    quality["sample"] = sample if truth else None
    return quality
