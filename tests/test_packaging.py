"""packaging.py: bundles, their hash manifest, tamper detection, safe loading, fresh-process reproduction, exports."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import pickle
import platform
import shutil
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from reference_impl import data, packaging
from reference_impl.packaging import MANIFEST, REQUIRED_FILES, BundleError, load_bundle, verify_bundle


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def bundle_copy(bundle_dir, tmp_path) -> Path:
    return Path(shutil.copytree(bundle_dir, tmp_path / "copy"))


# ---------------------------------------------------------------------------------------------------------------
# Contents
# ---------------------------------------------------------------------------------------------------------------


def test_bundle_contains_required_files_and_manifest_hashes_match(bundle_dir):
    names = {p.name for p in bundle_dir.iterdir()}
    assert names == {MANIFEST, *REQUIRED_FILES, packaging.ONNX_FILE}
    manifest = json.loads((bundle_dir / MANIFEST).read_text())
    assert manifest["format"] == packaging.BUNDLE_FORMAT
    assert manifest["format_version"] == packaging.BUNDLE_FORMAT_VERSION
    assert set(manifest["files"]) == {*REQUIRED_FILES, packaging.ONNX_FILE}
    for name, digest in manifest["files"].items():
        assert digest == _sha(bundle_dir / name), name


def test_metadata_records_provenance(bundle_dir, bundle_version, data_manifest, small_training):
    meta = json.loads((bundle_dir / "metadata.json").read_text())
    assert meta["bundle_format_version"] == packaging.BUNDLE_FORMAT_VERSION
    assert meta["model_version"] == bundle_version
    assert meta["model_name"] == "weld-defect"
    created = dt.datetime.fromisoformat(meta["created_at"])
    assert created.tzinfo is not None
    assert abs((dt.datetime.now(dt.UTC) - created).total_seconds()) < 3600
    assert meta["versions"]["python"] == platform.python_version()
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["versions"]["torchvision"] == torchvision.__version__
    assert meta["training_data_manifest_sha256"] == _sha(data_manifest)
    assert meta["metrics"]["accuracy"] == small_training.metrics["accuracy"]
    assert meta["metrics"]["per_class"].keys() == set(data.CLASSES)
    assert meta["confusion_matrix"] == small_training.metrics["confusion_matrix"]


def test_requirements_are_pinned(bundle_dir):
    lines = [ln for ln in (bundle_dir / "requirements.txt").read_text().splitlines() if ln.strip()]
    assert f"torch=={metadata.version('torch')}" in lines
    assert f"torchvision=={metadata.version('torchvision')}" in lines
    assert all("==" in ln for ln in lines)
    assert not any(ln.startswith(("mlflow", "jupyterlab", "nbgrader")) for ln in lines)  # serving needs only


def test_load_bundle_round_trip(bundle_dir, bundle_version, small_training):
    bundle = load_bundle(bundle_dir)
    original = small_training.model.state_dict()
    loaded = bundle.model.state_dict()
    assert original.keys() == loaded.keys()
    for key in original:
        assert torch.equal(original[key], loaded[key]), key
    assert bundle.preprocess == small_training.preprocess
    assert bundle.model_spec == small_training.model_spec
    assert bundle.classes == small_training.classes
    assert bundle.version == bundle_version
    assert not bundle.model.training
    assert bundle.sha256 == _sha(bundle_dir / MANIFEST)
    assert bundle.files == json.loads((bundle_dir / MANIFEST).read_text())["files"]


def test_extra_files_are_covered_by_the_manifest(small_training, tmp_path):
    out = packaging.save_bundle(small_training, tmp_path / "b", extra_files={"monitoring/reference.json": b"{}"})
    assert verify_bundle(out)["monitoring/reference.json"] == hashlib.sha256(b"{}").hexdigest()
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["training_data_manifest_sha256"] is None
    (out / "monitoring" / "reference.json").write_bytes(b"[]")
    with pytest.raises(BundleError, match=r"reference\.json"):
        verify_bundle(out)


def test_save_bundle_refuses_a_non_empty_directory(small_training, tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "something.txt").write_text("x")
    with pytest.raises(BundleError, match="not empty"):
        packaging.save_bundle(small_training, target)
    assert sorted(p.name for p in target.iterdir()) == ["something.txt"]


# ---------------------------------------------------------------------------------------------------------------
# Tampering: every change is refused and the message names the file
# ---------------------------------------------------------------------------------------------------------------


def _flip_byte(root: Path, name: str = "weights.pt") -> None:
    path = root / name
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _truncate(root: Path) -> None:
    path = root / "weights.pt"
    path.write_bytes(path.read_bytes()[:-100])


def _edit_preprocessing(root: Path) -> None:
    path = root / "preprocessing.json"
    spec = json.loads(path.read_text())
    spec["mean"] = [0.5]
    path.write_text(json.dumps(spec))


def _manifest_version_99(root: Path) -> None:
    path = root / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 99
    path.write_text(json.dumps(manifest))


def _unlist_labels(root: Path) -> None:
    path = root / MANIFEST
    manifest = json.loads(path.read_text())
    del manifest["files"]["labels.json"]
    path.write_text(json.dumps(manifest))


def _path_escape(root: Path) -> None:
    path = root / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["files"]["../outside.txt"] = "0" * 64
    path.write_text(json.dumps(manifest))


TAMPERING = {
    "flip-byte": (_flip_byte, "weights.pt"),
    "flip-byte-onnx": (lambda root: _flip_byte(root, packaging.ONNX_FILE), packaging.ONNX_FILE),
    "truncate": (_truncate, "weights.pt"),
    "delete-labels": (lambda root: (root / "labels.json").unlink(), "labels.json"),
    "extra-file": (lambda root: (root / "notes.txt").write_text("hi"), "notes.txt"),
    "edit-preprocessing": (_edit_preprocessing, "preprocessing.json"),
    "format-version": (_manifest_version_99, "format version 99"),
    "corrupt-manifest": (lambda root: (root / MANIFEST).write_text('{"format": "weld-bundle", '), MANIFEST),
    "unlisted-required-file": (_unlist_labels, "labels.json"),
    "path-escape": (_path_escape, "outside the bundle"),
    "delete-manifest": (lambda root: (root / MANIFEST).unlink(), MANIFEST),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampered_bundle_is_refused_naming_the_file(bundle_copy, case):
    tamper, expected = TAMPERING[case]
    verify_bundle(bundle_copy)  # intact before
    tamper(bundle_copy)
    with pytest.raises(BundleError) as info:
        load_bundle(bundle_copy)
    assert expected in str(info.value)


def test_missing_bundle_directory(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------------------------
# Safe loading: weights are a state_dict read with weights_only=True
# ---------------------------------------------------------------------------------------------------------------


class _Exploit:
    """Unpickling this would create a marker file, if the loader allowed arbitrary objects."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_malicious_pickle_is_refused_without_running_it(bundle_copy, tmp_path, writer):
    exploit = _Exploit()
    exploit.marker = str(tmp_path / "PWNED")
    weights = bundle_copy / "weights.pt"
    if writer == "pickle":
        weights.write_bytes(pickle.dumps(exploit, protocol=2))
    else:
        torch.save(exploit, weights)
    packaging.write_manifest(bundle_copy)  # an attacker who can write files can also re-hash them
    verify_bundle(bundle_copy)  # the hashes are consistent: only safe loading protects us now
    with pytest.raises(BundleError, match=r"weights\.pt"):
        load_bundle(bundle_copy)
    assert not (tmp_path / "PWNED").exists()


def test_weights_that_are_not_a_state_dict_are_refused(bundle_copy):
    torch.save([1, 2, 3], bundle_copy / "weights.pt")
    packaging.write_manifest(bundle_copy)
    with pytest.raises(BundleError, match=r"weights\.pt"):
        load_bundle(bundle_copy)


def test_weights_for_another_architecture_are_refused(bundle_copy):
    spec = json.loads((bundle_copy / "model.json").read_text())
    spec["width"] = 8
    (bundle_copy / "model.json").write_text(json.dumps(spec))
    packaging.write_manifest(bundle_copy)
    with pytest.raises(BundleError, match=r"weights\.pt"):
        load_bundle(bundle_copy)


def test_labels_must_match_the_network(bundle_copy):
    (bundle_copy / "labels.json").write_text(json.dumps(["good", "porosity", "crack"]))
    packaging.write_manifest(bundle_copy)
    with pytest.raises(BundleError, match=r"labels\.json"):
        load_bundle(bundle_copy)


def test_invalid_preprocessing_spec_is_a_bundle_error(bundle_copy):
    spec = json.loads((bundle_copy / "preprocessing.json").read_text())
    spec["std"] = [0.0]
    (bundle_copy / "preprocessing.json").write_text(json.dumps(spec))
    packaging.write_manifest(bundle_copy)
    with pytest.raises(BundleError, match="std"):
        load_bundle(bundle_copy)


# ---------------------------------------------------------------------------------------------------------------
# A fresh process reproduces the trained model bit for bit
# ---------------------------------------------------------------------------------------------------------------


FRESH_PROCESS = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    from reference_impl.packaging import load_bundle

    bundle_dir, images_path, x_path, out_path = sys.argv[1:]
    bundle = load_bundle(bundle_dir)
    x = torch.load(x_path)
    with torch.inference_mode():
        logits = bundle.model(x)
    # the bundle's own preprocessing, applied in this process to raw images
    from reference_impl.training import preprocess_batch
    x2 = preprocess_batch(np.load(images_path), bundle.preprocess)
    with torch.inference_mode():
        logits2 = bundle.model(x2)
    torch.save({"logits": logits, "logits_from_images": logits2}, out_path)
    """
)


def test_fresh_process_reproduces_logits_bitwise(bundle_dir, small_training, tmp_path):
    from reference_impl.training import preprocess_batch

    images = data.generate(32, seed=77).images
    x = preprocess_batch(images, small_training.preprocess)
    np.save(tmp_path / "images.npy", images)
    torch.save(x, tmp_path / "x.pt")
    out = tmp_path / "logits.pt"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(bundle_dir), str(tmp_path / "images.npy"), str(tmp_path / "x.pt"),
         str(out)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = torch.load(out)
    model = small_training.model.eval()
    with torch.inference_mode():
        expected = model(x)
    assert got["logits"].shape == (32, 4)
    assert torch.equal(got["logits"], expected)
    assert torch.equal(got["logits_from_images"], expected)


# ---------------------------------------------------------------------------------------------------------------
# Exports
# ---------------------------------------------------------------------------------------------------------------


def _random_batch(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_torchscript_export_matches_eager(bundle_dir, tmp_path):
    import warnings

    bundle = load_bundle(bundle_dir)
    path = packaging.export_torchscript(bundle, tmp_path / "model.pt")
    assert path.is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in favour of torch.export
        scripted = torch.jit.load(str(path))
    x = _random_batch(9, seed=123)
    with torch.inference_mode():
        expected, got = bundle.model(x), scripted(x)
    assert got.shape == (9, 4)
    assert torch.allclose(got, expected, atol=1e-5)


def test_onnx_export_matches_eager(bundle_dir, tmp_path):
    import onnxruntime as ort

    bundle = load_bundle(bundle_dir)
    path = packaging.export_onnx(bundle, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    for n in (1, 13):  # batch sizes the exporter never saw
        x = _random_batch(n, seed=200 + n)
        got = session.run(None, {"image": x.numpy()})[0]
        with torch.inference_mode():
            expected = bundle.model(x).numpy()
        assert got.shape == (n, 4)
        assert np.allclose(got, expected, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# The runtime export every bundle carries (chapter: "Where inference runs")
# ---------------------------------------------------------------------------------------------------------------


def test_bundle_carries_an_onnx_export_checked_on_held_out_images(bundle_dir):
    import onnxruntime as ort

    check = json.loads((bundle_dir / "metadata.json").read_text())["runtimes"]["onnxruntime"]
    assert check["verified"] is True and check["file"] == packaging.ONNX_FILE
    assert check["images"] == packaging.RUNTIME_CHECK_IMAGES and check["argmax_agreement"] == 1.0
    assert 0 <= check["max_abs_diff"] <= packaging.ONNX_ATOL
    session = ort.InferenceSession(str(bundle_dir / packaging.ONNX_FILE), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "embedding"]
    bundle = load_bundle(bundle_dir)
    x = _random_batch(5, seed=9)
    logits, embedding = session.run(None, {"image": x.numpy()})
    with torch.inference_mode():
        assert np.allclose(logits, bundle.model(x).numpy(), atol=1e-4)
        assert np.allclose(embedding, bundle.model.embed(x).numpy(), atol=1e-4)
    assert packaging.onnx_export_check(bundle) == check


def test_an_export_that_disagrees_with_the_network_is_left_out(small_training, tmp_path, monkeypatch, caplog):
    """The check must catch an export of the wrong network: the bundle is still good, served by torch."""
    import logging

    from reference_impl.inference import Predictor, RuntimeUnavailableError
    from reference_impl.model import build_model

    real_export = packaging._export_onnx_file
    untrained = packaging._logits_and_embedding(build_model(small_training.model_spec))
    monkeypatch.setattr(
        packaging, "_export_onnx_file", lambda _net, example, path: real_export(untrained, example, path)
    )
    out = packaging.save_bundle(small_training, tmp_path / "b")
    check = json.loads((out / "metadata.json").read_text())["runtimes"]["onnxruntime"]
    assert check["verified"] is False and "differs from eager torch" in check["reason"]
    assert check["argmax_agreement"] < 1.0 and check["max_abs_diff"] > packaging.ONNX_ATOL
    assert not (out / packaging.ONNX_FILE).exists()
    bundle = load_bundle(out)  # the manifest does not list what was removed
    with caplog.at_level(logging.INFO, logger="reference_impl.inference"):
        predictor = Predictor(bundle, device="cpu")
    assert predictor.runtime == "torch" and "no verified model.onnx" in predictor.runtime_reason
    assert "differs from eager torch" in caplog.text
    with pytest.raises(RuntimeUnavailableError, match=r"no verified model\.onnx"):
        Predictor(bundle, device="cpu", runtime="onnxruntime")


def test_a_bundle_packaged_without_the_export_is_served_by_torch(small_training, tmp_path):
    from reference_impl.inference import Predictor

    out = packaging.save_bundle(small_training, tmp_path / "b", onnx=False)
    assert not (out / packaging.ONNX_FILE).exists()
    assert "runtimes" not in json.loads((out / "metadata.json").read_text())
    predictor = Predictor(load_bundle(out), device="cpu")
    assert predictor.runtime == "torch"
