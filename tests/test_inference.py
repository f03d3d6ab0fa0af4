"""inference.py: the Predictor used by batch scoring, the server and the labs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from reference_impl import data, training
from reference_impl.inference import Prediction, Predictor
from reference_impl.packaging import load_bundle


@pytest.fixture(scope="module")
def predictor(bundle_dir) -> Predictor:
    return Predictor(load_bundle(bundle_dir), device="cpu", batch_size=16)


@pytest.fixture(scope="module")
def images() -> data.WeldImages:
    return data.generate(50, seed=99)


def test_predict_a_stack(predictor, images):
    p = predictor.predict(images.images)
    assert isinstance(p, Prediction) and len(p) == 50
    assert p.probabilities.shape == (50, 4) and p.class_index.shape == (50,)
    assert np.allclose(p.probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (p.probabilities >= 0).all()
    assert p.labels == [predictor.classes[i] for i in p.class_index]
    assert np.array_equal(p.class_index, p.probabilities.argmax(axis=1))
    assert np.array_equal(p.confidence, p.probabilities.max(axis=1))
    assert p.embeddings is None
    # the model actually works on unseen data (trained to ~0.85 on this distribution)
    assert (p.class_index == images.labels).mean() > 0.6


def test_predict_a_list_of_differently_sized_images(predictor, images):
    img = images.images[0]
    batch = [img, np.kron(img, np.ones((2, 2), np.uint8)), img[:48], Image.fromarray(img), np.dstack([img] * 3)]
    p = predictor.predict(batch)
    assert len(p) == 5 and p.probabilities.shape == (5, 4)
    assert np.allclose(p.probabilities.sum(axis=1), 1.0, atol=1e-5)
    # the same picture as PIL or RGB gets (practically) the same answer as the 2-D array
    assert np.allclose(p.probabilities[3], p.probabilities[0], atol=1e-6)
    assert np.allclose(p.probabilities[4], p.probabilities[0], atol=1e-3)


def test_list_and_stack_agree(predictor, images):
    stacked = predictor.predict(images.images[:10])
    listed = predictor.predict(list(images.images[:10]))
    assert np.array_equal(stacked.class_index, listed.class_index)
    assert np.allclose(stacked.probabilities, listed.probabilities, atol=1e-6)


def test_with_embeddings(predictor, images):
    p = predictor.predict(images.images[:20], with_embeddings=True)
    assert p.embeddings.shape == (20, predictor.bundle.model_spec.embedding_dim)
    assert p.embeddings.dtype == np.float32 and (p.embeddings >= 0).all()
    # batching (batch_size=16) does not change the numbers
    whole = Predictor(predictor.bundle, device="cpu", batch_size=64).predict(images.images[:20], with_embeddings=True)
    assert np.allclose(p.embeddings, whole.embeddings, atol=1e-5)
    assert np.allclose(p.probabilities, whole.probabilities, atol=1e-6)


def test_predict_one(predictor, images):
    out = predictor.predict_one(images.images[3])
    assert set(out) == {"label", "probabilities", "confidence"}
    assert list(out["probabilities"]) == list(data.CLASSES)
    assert sum(out["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert out["label"] == max(out["probabilities"], key=out["probabilities"].get)
    assert out["confidence"] == pytest.approx(max(out["probabilities"].values()))
    assert out["label"] == predictor.predict(images.images[3:4]).labels[0]


def test_predictions_match_training_predict_logits(predictor, images, small_training):
    x = training.preprocess_batch(images.images, small_training.preprocess)
    logits = training.predict_logits(small_training.model, x, torch.device("cpu"))
    p = predictor.predict(images.images)
    assert np.array_equal(p.class_index, logits.argmax(1).numpy())
    assert np.allclose(p.probabilities, torch.softmax(logits, 1).numpy(), atol=1e-6)


def test_8bit_and_16bit_give_the_same_classes(predictor):
    img8 = data.generate(60, seed=42).images
    img16 = data.generate(60, seed=42, bit_depth=16).images
    assert img16.dtype == np.uint16
    p8, p16 = predictor.predict(img8), predictor.predict(img16)
    # the two differ only by quantisation (1/255 vs 1/65535), so the probabilities barely move (measured 0.007)
    assert np.abs(p8.probabilities - p16.probabilities).max() < 0.02
    # same decisions; an image sitting exactly on a decision boundary may be excused, at most one
    top2 = np.sort(p8.probabilities, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.04
    assert np.array_equal(p8.class_index[clear], p16.class_index[clear])
    assert (p8.class_index != p16.class_index).sum() <= 1


def test_empty_batch(predictor):
    p = predictor.predict([])
    assert len(p) == 0 and p.probabilities.shape == (0, 4)


def test_from_path_and_device(bundle_dir):
    pred = Predictor.from_path(bundle_dir, device="cpu")
    assert pred.device == torch.device("cpu")
    assert pred.classes == data.CLASSES
    assert next(pred.model.parameters()).device.type == "cpu"


# ---------------------------------------------------------------------------------------------------------------
# Runtimes: ONNX Runtime by default when the bundle's export was verified, torch on request (chapter: "Where
# inference runs")
# ---------------------------------------------------------------------------------------------------------------


def test_onnx_runtime_is_the_default_and_agrees_with_torch(bundle_dir, images):
    bundle = load_bundle(bundle_dir)
    fast, eager = Predictor(bundle, device="cpu"), Predictor(bundle, device="cpu", runtime="torch")
    assert fast.runtime == "onnxruntime" and "verified export" in fast.runtime_reason
    assert eager.runtime == "torch"
    a = fast.predict(images.images, with_embeddings=True)
    b = eager.predict(images.images, with_embeddings=True)
    assert np.array_equal(a.class_index, b.class_index)
    assert np.abs(a.probabilities - b.probabilities).max() < 1e-5
    assert np.abs(a.embeddings - b.embeddings).max() < 1e-4
    assert a.probabilities.dtype == b.probabilities.dtype == np.float32
    assert fast.predict(images.images[:3]).embeddings is None  # only when asked for, as with torch
    empty = fast.predict(np.zeros((0, 64, 64), np.uint8), with_embeddings=True)
    assert len(empty) == 0 and empty.probabilities.shape == (0, 4)


def test_onnx_runtime_uses_torchs_thread_setting(bundle_dir):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = Predictor(load_bundle(bundle_dir), device="cpu")
        torch.set_num_threads(2)
        two = Predictor(load_bundle(bundle_dir), device="cpu")
    finally:
        torch.set_num_threads(before)
    assert one._session.get_session_options().intra_op_num_threads == 1
    assert two._session.get_session_options().intra_op_num_threads == 2


def test_an_unknown_runtime_is_refused(bundle_dir, monkeypatch):
    from reference_impl.settings import Settings, SettingsError

    with pytest.raises(ValueError, match="runtime must be one of"):
        Predictor(load_bundle(bundle_dir), device="cpu", runtime="tensorrt")
    monkeypatch.setenv("MLOPS_RUNTIME", "onnx")
    with pytest.raises(SettingsError, match="MLOPS_RUNTIME"):
        Settings.from_env()
    monkeypatch.setenv("MLOPS_RUNTIME", "torch")
    assert Settings.from_env().runtime == "torch"
