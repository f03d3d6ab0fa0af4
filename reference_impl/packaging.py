"""Bundles: everything that must ship with the weights, verified by hashes.

Chapter: "Packaging a model". Weights alone do not make a model you can run: you also need the exact
preprocessing, the label order, the architecture, the library versions it was built with, and proof that none of
it changed on the way. A bundle is a plain directory::

    MANIFEST.json       format + version, and the sha256 of every other file
    weights.pt          a state_dict only, loaded with weights_only=True: opening a bundle can never run code
    model.json          architecture hyper-parameters (rebuilds the network)
    preprocessing.json  the PreprocessSpec (the ONE preprocessing, see model.build_transform)
    labels.json         class names in output order
    metadata.json       model name/version, created-at, git commit, training-data manifest hash, metrics, versions
    requirements.txt    pinned packages needed to serve it
    model.onnx          the same network exported to ONNX (logits and embedding), written only when it matched the
                        eager model on held-out images; ``metadata.json`` records the check (chapter: "Where
                        inference runs": ONNX Runtime answers 4-5x faster than eager PyTorch on one CPU core)

``load_bundle`` refuses a bundle whose files were changed, truncated, removed or added, naming the file.
"""

from __future__ import annotations

import datetime as dt
import json
import pickle
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .data import sha256_file
from .model import ModelSpec, PreprocessSpec, SpecError, build_model

if TYPE_CHECKING:
    from torch import nn

    from .training import TrainResult

BUNDLE_FORMAT = "weld-bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
REQUIRED_FILES = ("weights.pt", "model.json", "preprocessing.json", "labels.json", "metadata.json", "requirements.txt")
# What the *server* needs: no training, notebook or monitoring-report dependencies.
SERVING_PACKAGES = ("torch", "torchvision", "numpy", "pillow", "fastapi", "uvicorn", "python-multipart",
                    "prometheus-client", "onnxruntime")  # fmt: skip
ONNX_FILE = "model.onnx"
ONNX_ATOL = 1e-4  # largest |difference| of a logit or embedding value accepted between ONNX Runtime and eager torch
RUNTIME_CHECK_SEED = 10_003  # held-out images for the export check: a seed stream no training or golden set uses
RUNTIME_CHECK_IMAGES = 128  # eager torch takes ~3 ms per image on one core: the check costs each bundle ~0.6 s


class BundleError(ValueError):
    """A bundle is missing, incomplete, tampered with, or of a format this code does not understand."""


@dataclass
class Bundle:
    """A verified, loaded bundle: the network in eval mode on CPU plus what it needs to run."""

    path: Path
    model: nn.Module
    model_spec: ModelSpec
    preprocess: PreprocessSpec
    classes: tuple[str, ...]
    metadata: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256, from the manifest

    @property
    def sha256(self) -> str:
        """Identity of the whole bundle: the hash of its manifest (which hashes every file)."""
        return sha256_file(self.path / MANIFEST)

    @property
    def version(self) -> str:
        return str(self.metadata.get("model_version", "unversioned"))


def pinned_requirements(packages: tuple[str, ...] = SERVING_PACKAGES) -> list[str]:
    """``name==version`` for each installed package, so serving reproduces the training environment."""
    lines = []
    for name in packages:
        try:
            lines.append(f"{name}=={importlib_metadata.version(name)}")
        except importlib_metadata.PackageNotFoundError:
            continue  # e.g. fastapi in a training-only environment: the server installs its own
    return lines


def git_commit(cwd: Path | None = None) -> str | None:
    """The commit of the code that trained the model, if we are in a git checkout (else None)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def library_versions() -> dict[str, str]:
    import numpy
    import torch
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": numpy.__version__}  # fmt: skip


def build_manifest(bundle_dir: str | Path) -> dict[str, str]:
    """sha256 of every file under ``bundle_dir`` except the manifest itself, keyed by POSIX relative path."""
    root = Path(bundle_dir)
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def write_manifest(bundle_dir: str | Path) -> Path:
    root = Path(bundle_dir)
    manifest = {"format": BUNDLE_FORMAT, "format_version": BUNDLE_FORMAT_VERSION, "files": build_manifest(root)}
    path = root / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def save_bundle(
    result: TrainResult,
    out_dir: str | Path,
    *,
    model_name: str = "weld-defect",
    model_version: str | None = None,
    data_manifest: str | Path | None = None,
    extra_files: dict[str, bytes] | None = None,
    extra_metadata: dict[str, Any] | None = None,
    check_images: Any = None,
    onnx: bool | CheckedExport = True,
) -> Path:
    """Write a bundle for a trained model and return its directory.

    ``data_manifest`` is the training data's manifest.csv: its hash ties the model to the exact images it saw.
    ``extra_files`` lets later stages (e.g. the monitoring reference profile) add files that the manifest covers.
    ``onnx`` adds ``model.onnx`` when the export matches the eager model on ``check_images`` (held-out decoded
    images; default: 128 freshly generated baseline radiographs); the result of the check is in the metadata
    either way, and a bundle without the export is served by torch. A ``CheckedExport`` made earlier (by
    :func:`export_checked_onnx`, e.g. to build the monitoring profile with it) is copied instead of exported again.
    """
    import torch

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"{out} already exists and is not empty; bundles are immutable, choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    torch.save(result.model.state_dict(), out / "weights.pt")
    (out / "model.json").write_text(json.dumps(result.model_spec.to_dict(), indent=2, sort_keys=True) + "\n")
    (out / "preprocessing.json").write_text(result.preprocess.to_json() + "\n")
    (out / "labels.json").write_text(json.dumps(list(result.classes)) + "\n")
    (out / "requirements.txt").write_text("\n".join(pinned_requirements()) + "\n")
    meta = {
        "bundle_format": BUNDLE_FORMAT,
        "bundle_format_version": BUNDLE_FORMAT_VERSION,
        "model_name": model_name,
        "model_version": model_version or dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M%S"),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "training_data_manifest_sha256": sha256_file(data_manifest) if data_manifest else None,
        "metrics": {k: v for k, v in result.metrics.items() if k != "confusion_matrix"},
        "confusion_matrix": result.metrics.get("confusion_matrix"),
        "train_seconds": round(result.seconds, 2),
        "versions": library_versions(),
        **(extra_metadata or {}),
    }
    if isinstance(onnx, CheckedExport):
        if onnx.check.get("verified"):
            shutil.copyfile(onnx.path, out / ONNX_FILE)
        meta["runtimes"] = {"onnxruntime": onnx.check}
    elif onnx:
        meta["runtimes"] = {"onnxruntime": export_checked_onnx(result, out, check_images).check}
    (out / "metadata.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    for rel, payload in (extra_files or {}).items():
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(payload)
    write_manifest(out)
    return out


def verify_bundle(bundle_dir: str | Path) -> dict[str, str]:
    """Check format, completeness and every hash; return the manifest's file map or raise ``BundleError``."""
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(f"{root}: bundle directory not found")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path}: missing; this is not a bundle (or it is incomplete)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path}: not valid JSON ({exc}); the bundle is damaged") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{manifest_path}: not a {BUNDLE_FORMAT!r} manifest")
    if manifest.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path}: bundle format version {manifest.get('format_version')!r} is not understood by this "
            f"code (it reads version {BUNDLE_FORMAT_VERSION}); upgrade reference_impl or re-package the model"
        )
    files: dict[str, str] = manifest.get("files") or {}
    for name in REQUIRED_FILES:
        if name not in files:
            raise BundleError(f"{root / name}: required file is not listed in the manifest; the bundle is incomplete")
    for rel, expected in files.items():
        path = root / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise BundleError(f"{manifest_path}: file entry {rel!r} points outside the bundle")
        if not path.is_file():
            raise BundleError(f"{path}: listed in the manifest but missing; the bundle is incomplete")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(f"{path}: sha256 {actual[:12]}... does not match the manifest ({expected[:12]}...); "
                              "the file was modified or truncated")  # fmt: skip
    unlisted = sorted(set(build_manifest(root)) - set(files))
    if unlisted:
        raise BundleError(f"{root / unlisted[0]}: file is not in the manifest (added after packaging?)")
    return files


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from exc


def load_bundle(bundle_dir: str | Path, *, verify: bool = True) -> Bundle:
    """Verify (by default) and load a bundle. The network comes back in eval mode on the CPU."""
    import torch

    root = Path(bundle_dir)
    files = verify_bundle(root) if verify else {}
    try:
        model_spec = ModelSpec.from_dict(_read_json(root / "model.json"))
        preprocess = PreprocessSpec.from_dict(_read_json(root / "preprocessing.json"))
    except (SpecError, TypeError) as exc:
        raise BundleError(f"{root}: invalid model or preprocessing spec: {exc}") from exc
    classes = tuple(_read_json(root / "labels.json"))
    if len(classes) != model_spec.num_classes:
        raise BundleError(f"{root / 'labels.json'}: {len(classes)} labels for a {model_spec.num_classes}-class model")
    model = build_model(model_spec)
    try:
        # weights_only=True: unpickling arbitrary objects could execute code, a state_dict needs none of that
        state = torch.load(root / "weights.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    # torch.load reports a damaged file as RuntimeError/EOFError, a refused (non-weights) pickle as
    # UnpicklingError, and a pickle that is not a state_dict fails load_state_dict with TypeError
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, TypeError) as exc:
        raise BundleError(f"{root / 'weights.pt'}: cannot load weights into the network ({exc})") from exc
    model.eval()
    return Bundle(root, model, model_spec, preprocess, classes, _read_json(root / "metadata.json"), files)


def _logits_and_embedding(model: nn.Module) -> nn.Module:
    """The network with both outputs serving needs, so the exported graph gives the monitor's embedding for free."""
    from torch import nn

    class LogitsAndEmbedding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: Any) -> tuple[Any, Any]:
            embedding = self.model.embed(x)
            return self.model.head(embedding), embedding

    return LogitsAndEmbedding().eval()


@dataclass(frozen=True)
class CheckedExport:
    """An ONNX export and the record of its check against eager torch (``metadata.json["runtimes"]``)."""

    path: Path
    check: dict[str, Any]


def export_checked_onnx(result: TrainResult, directory: str | Path, check_images: Any = None) -> CheckedExport:
    """Export ``result.model`` to ``directory/model.onnx`` and compare it with eager torch on held-out images.

    ``check`` says ``verified`` with the measured maximum difference and argmax agreement, or ``verified: False``
    with the reason (and no file left behind): a bundle whose export disagrees is still a good bundle, served by
    torch.
    """
    path = Path(directory) / ONNX_FILE
    return CheckedExport(path, _export_and_check(result, path, check_images))


def _export_and_check(result: TrainResult, path: Path, check_images: Any) -> dict[str, Any]:
    import numpy as np

    if result.preprocess.dtype != "float32":
        return {"verified": False, "reason": f"preprocessing dtype {result.preprocess.dtype} (the export is float32)"}
    try:
        import onnxruntime as ort
        import torch
    except ImportError as exc:
        return {"verified": False, "reason": f"onnxruntime is not installed ({exc})"}
    from .model import preprocess_batch

    if check_images is None:
        from .data import generate

        check_images = generate(RUNTIME_CHECK_IMAGES, seed=RUNTIME_CHECK_SEED, size=result.preprocess.size[0]).images
    x = preprocess_batch(check_images, result.preprocess)
    wrapped = _logits_and_embedding(result.model.eval())
    try:
        _export_onnx_file(wrapped, x[:4], path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        got_logits, got_emb = session.run(None, {"image": x.numpy()})
    # the exporter raises many types (torch.onnx.errors.*, RuntimeError, TypeError); ORT raises its own
    # Fail/InvalidGraph (RuntimeError subclasses): whatever it is, the bundle goes on without the export
    except Exception as exc:  # recorded in the metadata, never swallowed silently
        path.unlink(missing_ok=True)
        return {"verified": False, "reason": f"export failed: {type(exc).__name__}: {exc}"[:300]}
    with torch.inference_mode():
        logits, emb = (t.numpy() for t in wrapped(x))
    max_diff = float(max(np.abs(logits - got_logits).max(), np.abs(emb - got_emb).max()))
    agreement = float((logits.argmax(1) == got_logits.argmax(1)).mean())
    check = {"file": ONNX_FILE, "images": len(x), "max_abs_diff": max_diff, "argmax_agreement": agreement,
             "atol": ONNX_ATOL, "onnxruntime": ort.__version__, "inputs": ["image"],
             "outputs": ["logits", "embedding"]}  # fmt: skip
    if max_diff > ONNX_ATOL or agreement < 1.0:
        path.unlink(missing_ok=True)
        return {"verified": False, "reason": f"export differs from eager torch (max {max_diff:.2e}, argmax "
                f"agreement {agreement:.4f} on {len(x)} held-out images)", **check}  # fmt: skip
    return {"verified": True, **check}


def _export_onnx_file(model: nn.Module, example: Any, path: Path) -> None:
    """ONNX with a dynamic batch axis. The TorchScript-based exporter (``dynamo=False``) takes 0.1 s for this
    network where the dynamo exporter takes ~7 s, with identical outputs; every bundle pays this, the labs and the
    tests make dozens. If a future torch drops it, the dynamo exporter takes over."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices of the legacy exporter, on every bundle a lab saves
        try:
            torch.onnx.export(model, (example,), str(path), input_names=["image"], output_names=["logits", "embedding"],
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}, "embedding": {0: "batch"}},
                              dynamo=False)  # fmt: skip
        except TypeError:  # no `dynamo=False` any more
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(model, (example,), str(path), input_names=["image"],
                              output_names=["logits", "embedding"], dynamic_shapes={"x": {0: batch}},
                              dynamo=True)  # fmt: skip


def onnx_export_check(bundle: Bundle) -> dict[str, Any] | None:
    """The bundle's recorded ONNX check if it passed and its file is in the (verified) bundle, else None."""
    check = (bundle.metadata.get("runtimes") or {}).get("onnxruntime") or {}
    if not check.get("verified"):
        return None
    if bundle.files and ONNX_FILE not in bundle.files:
        return None
    return check if (bundle.path / ONNX_FILE).is_file() else None


# --------------------------------------------------------------------------------------------------------------
# Exports for batch and edge use. Each export is checked against the eager model before it is trusted.
# --------------------------------------------------------------------------------------------------------------


def _example_input(bundle: Bundle, n: int = 4) -> Any:
    import torch

    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, bundle.preprocess.channels, *bundle.preprocess.size, generator=gen)


def export_torchscript(bundle: Bundle, path: str | Path, atol: float = 1e-5) -> Path:
    """Trace to TorchScript (runs without Python model code, e.g. from C++ libtorch or a slim container)."""
    import warnings

    import torch

    x = _example_input(bundle)
    with torch.inference_mode(), warnings.catch_warnings():
        # torch 2.10+ marks jit.trace deprecated in favour of torch.export; libtorch (C++) deployments still
        # load TorchScript, so we keep this export and the ONNX one below as the forward-looking path.
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(bundle.model, x)
        expected, got = bundle.model(x), traced(x)
    if not torch.allclose(expected, got, atol=atol):
        raise BundleError(
            f"TorchScript export differs from the eager model (max {float((expected - got).abs().max())})"
        )
    traced.save(str(path))
    return Path(path)


def export_onnx(bundle: Bundle, path: str | Path, atol: float = 1e-4) -> Path:
    """Export to ONNX (outputs ``logits`` and ``embedding``, dynamic batch axis), checked with onnxruntime.

    The same export ``save_bundle`` puts into every bundle as ``model.onnx``; this writes it anywhere, e.g. for an
    edge device's runtime."""
    import numpy as np
    import onnxruntime as ort
    import torch

    wrapped = _logits_and_embedding(bundle.model)
    _export_onnx_file(wrapped, _example_input(bundle), Path(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x2 = _example_input(bundle, n=7)  # a different batch size proves the batch axis is really dynamic
    got = session.run(None, {"image": x2.numpy()})[0]
    with torch.inference_mode():
        expected = bundle.model(x2).numpy()
    if not np.allclose(expected, got, atol=atol):
        raise BundleError(f"ONNX export differs from the eager model (max {float(np.abs(expected - got).max())})")
    return Path(path)
