"""Runtime benchmark: the same bundle's network under four runtimes (chapter: "Where inference runs").

Eager PyTorch, TorchScript, ONNX Runtime FP32 (what ``inference.Predictor`` serves with when the bundle's export was
verified) and ONNX Runtime INT8 (static quantization, calibrated on 256 baseline images the golden set does not
contain). For each: milliseconds per image at batch 1 and batch 16 on ONE thread (a fair comparison of kernels, and
what a 2-core server gives the forward pass), accuracy on the golden set, and agreement of the predicted class with
eager torch. Rounds are interleaved and the median round is reported, so a noisy minute on a shared machine hits
every runtime alike.

Target (issue "Serving at the speed of the model"): the served runtime is the fastest one whose golden accuracy and
agreement show no loss (FP32 within 1e-4 of eager; INT8 is reported, not served: quantization changes numerics, so
it would be a new artifact that must pass the evaluation gate, as the chapter says).
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

CALIBRATION_SEED = 20_001  # quantization calibration images: a seed no training, golden or check set uses


def _timed(fn: Any, x: np.ndarray, batch: int, repeats: int) -> float:
    """Median ms per image of ``fn`` on consecutive batches of ``x``."""
    batches = [x[i : i + batch] for i in range(0, len(x) - batch + 1, batch)][:repeats]
    for b in batches[:5]:
        fn(b)  # warm-up: lazy allocations, ORT's first-run graph work
    times = []
    for b in batches:
        start = time.perf_counter()
        fn(b)
        times.append((time.perf_counter() - start) * 1000 / batch)
    return statistics.median(times)


def _runtimes(bundle: Any, scratch: Path, calibration: np.ndarray) -> dict[str, Any]:
    """name -> function from a float32 batch (N, 1, H, W) to logits, for each runtime measured."""
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from reference_impl.packaging import ONNX_FILE, onnx_export_check

    model = bundle.model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace's deprecation notice
        scripted = torch.jit.trace(model, torch.from_numpy(calibration[:4]))

    def eager(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    def torchscript(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return scripted(torch.from_numpy(x)).numpy()

    if onnx_export_check(bundle) is None:
        raise RuntimeError(f"{bundle.path} has no verified {ONNX_FILE}; package it with this version of the code")
    fp32 = bundle.path / ONNX_FILE

    class Calibration(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"image": calibration[i : i + 32]} for i in range(0, len(calibration), 32)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    prepared, int8 = scratch / "model-prepared.onnx", scratch / "model-int8.onnx"
    quant_pre_process(str(fp32), str(prepared))  # shape inference + graph clean-up, ONNX Runtime's recommended step
    quantize_static(str(prepared), str(int8), Calibration(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip

    def session(path: Path) -> Any:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        s = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda x: s.run(["logits"], {"image": x})[0]

    return {"torch eager": eager, "torchscript": torchscript, "onnxruntime fp32": session(fp32),
            "onnxruntime int8": session(int8)}  # fmt: skip


def run(quick: bool = False, rounds: int | None = None) -> dict[str, Any]:
    import torch

    from reference_impl import data, loop
    from reference_impl.model import preprocess_batch
    from reference_impl.packaging import load_bundle
    from reference_impl.settings import Settings

    rounds = rounds or (1 if quick else 3)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    settings = Settings.from_env()
    bundle = load_bundle(loop.baseline_bundle(settings, progress=not quick))
    golden = data.generate(400 if quick else 1000, seed=settings.seed + loop.GOLDEN_SEED_OFFSET)
    x = preprocess_batch(golden.images, bundle.preprocess).numpy()
    calibration = preprocess_batch(data.generate(256, seed=CALIBRATION_SEED).images, bundle.preprocess).numpy()
    repeats = 40 if quick else 60
    out: dict[str, Any] = {"threads": 1, "rounds": rounds, "golden_images": len(x), "runtimes": {}}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            runtimes = _runtimes(bundle, Path(scratch), calibration)
            reference = runtimes["torch eager"](x).argmax(1)
            per_round: dict[str, dict[str, list[float]]] = {n: {"b1": [], "b16": []} for n in runtimes}
            for _ in range(rounds):
                for name, fn in runtimes.items():
                    per_round[name]["b1"].append(_timed(fn, x, 1, repeats))
                    per_round[name]["b16"].append(_timed(fn, x, 16, repeats))
            for name, fn in runtimes.items():
                pred = fn(x).argmax(1)
                out["runtimes"][name] = {
                    "ms_per_image_batch1": statistics.median(per_round[name]["b1"]),
                    "ms_per_image_batch16": statistics.median(per_round[name]["b16"]),
                    "golden_accuracy": float((pred == golden.labels).mean()),
                    "agreement_with_eager": float((pred == reference).mean()),
                }
    finally:
        torch.set_num_threads(threads_before)
    eager = out["runtimes"]["torch eager"]
    print(f"one thread, median of {rounds} round(s), golden set of {len(x)} images")
    print(f"{'runtime':<18} {'ms/img b1':>10} {'ms/img b16':>11} {'speed-up b1':>12} {'b16':>6} "
          f"{'golden acc':>11} {'agree':>7}")  # fmt: skip
    for name, r in out["runtimes"].items():
        r["speedup_batch1"] = eager["ms_per_image_batch1"] / r["ms_per_image_batch1"]
        r["speedup_batch16"] = eager["ms_per_image_batch16"] / r["ms_per_image_batch16"]
        print(f"{name:<18} {r['ms_per_image_batch1']:10.3f} {r['ms_per_image_batch16']:11.3f} "
              f"{r['speedup_batch1']:11.2f}x {r['speedup_batch16']:5.2f}x {r['golden_accuracy']:11.4f} "
              f"{r['agreement_with_eager']:7.4f}")  # fmt: skip
    return out
