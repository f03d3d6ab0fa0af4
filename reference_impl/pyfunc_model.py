"""The MLflow pyfunc that wraps a bundle: "models from code" (MLflow 3), so nothing is pickled.

Chapter: "Packaging a model" (model registry). Registering a bare network would lose the preprocessing; this
wrapper carries the whole bundle as an artifact, so ``mlflow.pyfunc.load_model("models:/weld-defect@champion")``
predicts on *raw image files* with exactly the preprocessing the model was trained with.

Accepted inputs to ``predict``: a pandas DataFrame with an ``image`` column of encoded image files (bytes, or
base64 text as sent by ``mlflow models serve`` JSON), a list of such files, or a numpy stack ``(N, H, W)`` of
decoded pixels. Output: a DataFrame with ``label``, ``confidence`` and one ``p_<class>`` column per class.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


def _find_bundle(root: Path) -> Path:
    if (root / "MANIFEST.json").is_file():
        return root
    for manifest in root.rglob("MANIFEST.json"):
        return manifest.parent
    raise FileNotFoundError(f"no bundle (MANIFEST.json) under {root}")


def _as_bytes(item: Any) -> bytes:
    if isinstance(item, bytes | bytearray):
        return bytes(item)
    if isinstance(item, str):
        try:
            return base64.b64decode(item, validate=True)
        except binascii.Error as exc:
            raise ValueError("image strings must be base64-encoded image files") from exc
    raise ValueError(f"each image must be bytes or base64 text, got {type(item).__name__}")


class WeldDefectModel(PythonModel):
    """Loads the bundle once per process; predicts with the bundle's own preprocessing."""

    # MLflow 3 reads predict()'s type hints when this class is defined, to validate inputs, and warns on stderr when
    # there are none (in every lab that registers a model). The input may be a DataFrame with an ``image`` column, an
    # array or a list, and decode_image rejects a bad image with a clear message; the hints MLflow accepts
    # (list[...]) would make it convert the DataFrame first. This flag is MLflow's own switch for "no type-hint
    # validation" (its ChatModel uses it); if it ever goes away, only the warning comes back, and
    # tests/test_grading.py's clean-stderr check says so.
    _skip_type_hint_validation = True

    def load_context(self, context):
        from reference_impl.inference import Predictor
        from reference_impl.packaging import load_bundle

        self.predictor = Predictor(load_bundle(_find_bundle(Path(context.artifacts["bundle"]))), device="cpu")

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from reference_impl.data import decode_image

        if isinstance(model_input, np.ndarray) and model_input.dtype != object:
            images = model_input
        else:
            items = model_input["image"].tolist() if isinstance(model_input, pd.DataFrame) else list(model_input)
            images = [decode_image(_as_bytes(item)) for item in items]
        pred = self.predictor.predict(images)
        out = pd.DataFrame({"label": pred.labels, "confidence": pred.confidence})
        for i, name in enumerate(self.predictor.classes):
            out[f"p_{name}"] = pred.probabilities[:, i]
        return out


mlflow.models.set_model(WeldDefectModel())
