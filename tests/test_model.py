"""model.py: the preprocessing spec, THE transform built from it, the network, and device choice."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from reference_impl import data
from reference_impl.model import (
    SPEC_VERSION,
    ModelSpec,
    PreprocessSpec,
    SpecError,
    build_model,
    build_transform,
    resolve_device,
)

SPEC = PreprocessSpec(size=(64, 64), mean=(0.45,), std=(0.15,))


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return data.generate(1, seed=21).images[0]


@pytest.fixture(scope="module")
def transform():
    return build_transform(SPEC)


# ---------------------------------------------------------------------------------------------------------------
# PreprocessSpec
# ---------------------------------------------------------------------------------------------------------------


def test_spec_round_trips_through_json():
    spec = PreprocessSpec(size=(48, 56), channels=3, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), dtype="float16")
    text = spec.to_json()
    restored = PreprocessSpec.from_dict(json.loads(text))
    assert restored == spec
    assert restored.size == (48, 56) and isinstance(restored.size, tuple)
    assert json.loads(text)["version"] == SPEC_VERSION


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"size": (4, 64)}, "size"),
        ({"size": (64,)}, "size"),
        ({"channels": 2, "mean": (0.1, 0.1), "std": (1.0, 1.0)}, "channels"),
        ({"channels": 3}, "mean and std"),
        ({"mean": (0.4, 0.5)}, "mean and std"),
        ({"std": (0.0,)}, "std"),
        ({"std": (-0.1,)}, "std"),
        ({"dtype": "int8"}, "dtype"),
        ({"version": SPEC_VERSION + 1}, "version"),
    ],
)
def test_invalid_spec_names_the_field(kwargs, field):
    with pytest.raises(SpecError, match=field):
        PreprocessSpec(**kwargs)


def test_unknown_spec_field_is_named():
    with pytest.raises(SpecError, match="interpolation"):
        PreprocessSpec.from_dict({**SPEC.to_dict(), "interpolation": "nearest"})
    with pytest.raises(SpecError, match="depth"):
        ModelSpec.from_dict({**ModelSpec().to_dict(), "depth": 50})


# ---------------------------------------------------------------------------------------------------------------
# build_transform: every input form a server or a lab may hand it
# ---------------------------------------------------------------------------------------------------------------


def _check(out: torch.Tensor, shape: tuple[int, ...]) -> None:
    assert tuple(out.shape) == shape
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_2d_uint8_array(transform, image):
    out = transform(image)
    _check(out, (1, 64, 64))
    expected = (torch.from_numpy(image.astype(np.float32) / 255.0) - 0.45) / 0.15
    assert torch.allclose(out[0], expected, atol=1e-5)


def test_batch_tensor(transform):
    batch = torch.from_numpy(data.generate(5, seed=2).images[:, None])
    out = transform(batch)
    _check(out, (5, 1, 64, 64))
    # batched and one-at-a-time give the same numbers
    assert torch.allclose(out[3], transform(batch[3]), atol=1e-6)


def test_pil_image(transform, image):
    out = transform(Image.fromarray(image))
    _check(out, (1, 64, 64))
    assert torch.allclose(out, transform(image), atol=1e-6)


def test_rgb_array_becomes_one_channel(transform, image):
    rgb = np.stack([image, image, image], axis=-1)
    out = transform(rgb)
    _check(out, (1, 64, 64))
    # a gray image exported as RGB must reach the network as the same image (no training-serving skew)
    assert (out - transform(image)).abs().max() < 1e-3


def test_rgba_array_drops_alpha(transform, image):
    rgba = np.dstack([image, image, image, np.full_like(image, 255)])
    out = transform(rgba)
    _check(out, (1, 64, 64))
    assert (out - transform(image)).abs().max() < 1e-3


def test_uint16_matches_uint8_scaled_by_257(transform, image):
    out16 = transform(image.astype(np.uint16) * 257)
    _check(out16, (1, 64, 64))
    assert (out16 - transform(image)).abs().max() < 1e-3
    as_tensor = transform(torch.from_numpy(image.astype(np.uint16) * 257))
    assert (as_tensor - transform(image)).abs().max() < 1e-3


def test_differently_sized_image_is_resized_to_spec():
    spec = PreprocessSpec(size=(32, 48))
    t = build_transform(spec)
    for shape in [(64, 64), (100, 30), (20, 20)]:
        out = t(np.full(shape, 128, np.uint8))
        _check(out, (1, 32, 48))
    # resizing keeps content where it was: a bright top half stays on top
    img = np.zeros((80, 120), np.uint8)
    img[:40] = 255
    out = t(img)[0]
    assert out[:14].mean() > out[18:].mean() + 3


def test_normalisation_is_applied():
    spec = PreprocessSpec(mean=(0.3,), std=(0.2,))
    out = build_transform(spec)(np.full((64, 64), 100, np.uint8))
    expected = (100 / 255 - 0.3) / 0.2
    assert torch.allclose(out, torch.full_like(out, expected), atol=1e-5)


def test_three_channel_spec_expands_gray():
    spec = PreprocessSpec(channels=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    out = build_transform(spec)(np.full((64, 64), 255, np.uint8))
    _check(out, (3, 64, 64))
    assert out[:, 0, 0].tolist() == pytest.approx([2.0, 1.0, 0.5], abs=1e-5)


def test_spec_dtype_is_honoured(image):
    out = build_transform(PreprocessSpec(dtype="float16"))(image)
    assert out.dtype == torch.float16


# ---------------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------------


def test_forward_and_embed_shapes():
    torch.manual_seed(0)
    spec = ModelSpec(num_classes=5, embedding_dim=32, width=8)
    model = build_model(spec).eval()
    x = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        logits, emb = model(x), model.embed(x)
    assert logits.shape == (3, 5)
    assert emb.shape == (3, 32)
    assert (emb >= 0).all()  # ReLU embedding
    assert torch.allclose(model.head(emb), logits, atol=1e-6)


def test_model_accepts_other_image_sizes():
    model = build_model(ModelSpec()).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 48, 80)).shape == (2, 4)


def test_unknown_architecture_is_an_error():
    with pytest.raises(SpecError, match="resnet"):
        build_model(ModelSpec(arch="resnet"))


# ---------------------------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_auto_device_is_cpu_without_cuda():
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cuda_without_gpu_raises():
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_cpu_and_bad_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="tpu"):
        resolve_device("tpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_device_is_cuda_with_gpu():
    assert resolve_device("auto").type == "cuda"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_predictor_on_cuda_agrees_with_cpu(bundle_dir):
    from reference_impl.inference import Predictor
    from reference_impl.packaging import load_bundle

    images = data.generate(64, seed=31).images
    cpu = Predictor(load_bundle(bundle_dir), device="cpu").predict(images)
    gpu = Predictor(load_bundle(bundle_dir), device="cuda").predict(images, with_embeddings=True)
    assert gpu.probabilities.shape == cpu.probabilities.shape
    assert np.allclose(gpu.probabilities.sum(axis=1), 1.0, atol=1e-4)
    # float16 autocast on CUDA: close to CPU float32, same decision on (almost) every image
    assert np.abs(gpu.probabilities - cpu.probabilities).max() < 0.05
    assert (gpu.class_index == cpu.class_index).mean() >= 0.95
