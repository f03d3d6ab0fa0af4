"""The Predictor: a loaded bundle ready to answer, on CPU or GPU, one image or many.

Chapter: "Serving predictions" and "Where inference runs". Batch scoring, the real-time server, the monitor and the
labs all predict through this class, so they share the bundle's preprocessing (no training-serving skew), the same
device logic and the same *runtime*: ONNX Runtime when the bundle carries an export that was checked against the
eager network at packaging (4-5x faster on one CPU core, ``python -m benchmarks runtime``), else PyTorch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .model import preprocess_batch, resolve_device
from .packaging import ONNX_FILE, Bundle, load_bundle, onnx_export_check

log = logging.getLogger(__name__)
RUNTIMES = ("auto", "onnxruntime", "torch")


class RuntimeUnavailableError(RuntimeError):
    """``runtime="onnxruntime"`` was asked for explicitly but this bundle or machine cannot provide it."""


@dataclass
class Prediction:
    """Predictions for a batch: class indices and names, softmax probabilities, and optionally embeddings."""

    class_index: np.ndarray
    labels: list[str]
    probabilities: np.ndarray
    embeddings: np.ndarray | None = None

    @property
    def confidence(self) -> np.ndarray:
        """Max softmax probability per image (uncalibrated unless the bundle says otherwise)."""
        return self.probabilities.max(axis=1)

    def __len__(self) -> int:
        return len(self.labels)


class Predictor:
    """Wraps a bundle's network for inference.

    ``device="auto"`` uses CUDA when present. ``runtime="auto"`` uses ONNX Runtime when the bundle has a verified
    export (on CUDA only with ONNX Runtime's CUDA provider installed), else torch; ``self.runtime`` says which and
    ``self.runtime_reason`` why. ``"onnxruntime"`` insists (``RuntimeUnavailableError`` if it cannot), ``"torch"``
    always runs the eager network. With torch on CUDA the forward pass runs under float16 autocast (about twice the
    throughput, well within our accuracy tolerance); on CPU everything runs in float32.

    ONNX Runtime uses as many threads as torch is set to (``torch.get_num_threads()`` when the Predictor is built), so
    one thread setting governs both.
    """

    def __init__(self, bundle: Bundle, device: str = "auto", batch_size: int = 64, runtime: str = "auto") -> None:
        import torch

        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        self.bundle = bundle
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.model = bundle.model.to(self.device).eval()
        self.classes = bundle.classes
        self._torch = torch
        self._session: Any = None
        self.runtime, self.runtime_reason = "torch", "runtime='torch' was asked for"
        if runtime != "torch":
            self._session, self.runtime_reason = _onnx_session(bundle, self.device.type, torch.get_num_threads())
            if self._session is not None:
                self.runtime = "onnxruntime"
            elif runtime == "onnxruntime":
                raise RuntimeUnavailableError(f"{bundle.path}: cannot serve with ONNX Runtime: {self.runtime_reason}")
            else:
                log.info("%s: serving with torch: %s", bundle.path, self.runtime_reason)

    @classmethod
    def from_path(
        cls, path: str | Path, device: str = "auto", batch_size: int = 64, runtime: str = "auto"
    ) -> Predictor:
        return cls(load_bundle(path), device=device, batch_size=batch_size, runtime=runtime)

    def preprocess(self, images: np.ndarray | Sequence[Any]) -> Any:
        """Decoded images -> model input, with the bundle's own preprocessing spec."""
        return preprocess_batch(images, self.bundle.preprocess)

    def forward(self, x: Any, *, with_embeddings: bool = False) -> tuple[Any, Any]:
        """Logits (and embeddings) for an already-preprocessed batch tensor, in chunks of ``batch_size``.

        Both come back as CPU float32 tensors whichever runtime computed them."""
        torch = self._torch
        logits, embeds = [], []
        if self._session is not None:
            # the exported graph returns the embedding with the logits, so asking for it costs nothing extra
            array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
            for start in range(0, len(array), self.batch_size):
                out, emb = self._session.run(None, {"image": array[start : start + self.batch_size]})
                logits.append(torch.from_numpy(out))
                embeds.append(torch.from_numpy(emb))
            empty = torch.empty(0, len(self.classes))
            return (torch.cat(logits) if logits else empty, torch.cat(embeds) if with_embeddings and embeds else None)
        with torch.inference_mode():
            for start in range(0, len(x), self.batch_size):
                xb = x[start : start + self.batch_size].to(self.device, non_blocking=True)
                with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.device.type == "cuda"):
                    emb = self.model.embed(xb)
                    out = self.model.head(emb)
                logits.append(out.float().cpu())
                if with_embeddings:
                    embeds.append(emb.float().cpu())
        empty = torch.empty(0, len(self.classes))
        return (torch.cat(logits) if logits else empty, torch.cat(embeds) if embeds else None)

    def predict(self, images: np.ndarray | Sequence[Any], *, with_embeddings: bool = False) -> Prediction:
        """Predict a stack ``(N, H, W)`` or a list of decoded images (any size, 8/16-bit, gray or colour)."""
        logits, emb = self.forward(self.preprocess(images), with_embeddings=with_embeddings)
        probs = self._torch.softmax(logits, dim=1).numpy()
        idx = probs.argmax(axis=1)
        return Prediction(idx, [self.classes[i] for i in idx], probs, None if emb is None else emb.numpy())

    def predict_one(self, image: np.ndarray) -> dict[str, Any]:
        """One image -> ``{"label", "probabilities": {class: p}, "confidence"}`` (handy in notebooks)."""
        p = self.predict([image])
        return {
            "label": p.labels[0],
            "probabilities": {c: float(v) for c, v in zip(self.classes, p.probabilities[0], strict=True)},
            "confidence": float(p.confidence[0]),
        }


def _onnx_session(bundle: Bundle, device_type: str, threads: int) -> tuple[Any, str]:
    """An ONNX Runtime session for the bundle's verified export, or ``(None, why not)``."""
    check = onnx_export_check(bundle)
    if check is None:
        recorded = ((bundle.metadata.get("runtimes") or {}).get("onnxruntime") or {}).get("reason")
        return None, f"the bundle has no verified {ONNX_FILE}" + (f" ({recorded})" if recorded else "")
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return None, f"onnxruntime is not installed ({exc})"
    if device_type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return None, "the GPU is used through torch: this onnxruntime build has no CUDAExecutionProvider"
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    # Idle pool threads would otherwise spin waiting for work; on a 2-core machine they take the CPU the server's
    # event loop and the micro-batcher need between batches.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(bundle.path / ONNX_FILE), options, providers=providers)
    return session, f"verified export ({check['images']} held-out images, max difference {check['max_abs_diff']:.1e})"
