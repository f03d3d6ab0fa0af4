"""Foundation benchmark: data generation, training, bundle round trip, accuracy vs line-condition severity.

Targets (issue "Foundation"): 5,000 images generated in <= 10 s; >= 98% test accuracy in <= 60 s of training on
2 CPU cores; a bundle that reloads bit for bit in a fresh process and exports to TorchScript/ONNX. The severity
table grades the drift scenarios the monitoring and retraining labs are built on.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SEVERITIES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def _fresh_process_logits(bundle_dir: Path, x_path: Path, y_path: Path) -> None:
    code = (
        "import torch\nfrom reference_impl.packaging import load_bundle\n"
        f"b = load_bundle({str(bundle_dir)!r})\n"
        "with torch.inference_mode():\n"
        f"    torch.save(b.model(torch.load({str(x_path)!r})), {str(y_path)!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def run(quick: bool = False) -> dict[str, Any]:
    import numpy as np
    import torch

    from reference_impl import data, training
    from reference_impl.inference import Predictor
    from reference_impl.packaging import export_onnx, export_torchscript, load_bundle, save_bundle

    n_images, n_eval = (1500, 200) if quick else (5000, 400)
    out: dict[str, Any] = {"threads": torch.get_num_threads()}

    t = time.perf_counter()
    baseline = data.generate(n_images, seed=0)
    out["generate_seconds"] = time.perf_counter() - t
    out["generate_images"] = n_images
    print(f"data generation: {n_images} images in {out['generate_seconds']:.2f} s "
          f"({n_images / out['generate_seconds']:.0f} images/s; target 5,000 in <= 10 s)")  # fmt: skip

    result = training.train_model(baseline, training.TrainConfig(epochs=2 if quick else 6, device="cpu"))
    out["train_seconds"] = result.seconds
    out["test_accuracy"] = result.metrics["accuracy"]
    print(f"training: {result.seconds:.1f} s, test accuracy {result.metrics['accuracy']:.2%} "
          f"on {result.metrics['n']} images (target >= 98% in <= 60 s)")  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        manifest = data.write_dataset(baseline.subset(np.arange(200)), tmp_path / "data")
        t = time.perf_counter()
        bundle_dir = save_bundle(result, tmp_path / "bundle", data_manifest=manifest)
        bundle = load_bundle(bundle_dir)
        out["bundle_save_load_seconds"] = time.perf_counter() - t
        x = training.preprocess_batch(baseline.images[:64], bundle.preprocess)
        torch.save(x, tmp_path / "x.pt")
        _fresh_process_logits(bundle_dir, tmp_path / "x.pt", tmp_path / "y.pt")
        with torch.inference_mode():
            expected = result.model(x)
        out["fresh_process_bitwise_equal"] = bool(torch.equal(expected, torch.load(tmp_path / "y.pt")))
        export_torchscript(bundle, tmp_path / "model.ts")
        export_onnx(bundle, tmp_path / "model.onnx")
        out["exports_checked"] = ["torchscript", "onnx"]
    print(f"bundle round trip: save+verify+load {out['bundle_save_load_seconds']:.2f} s; fresh-process logits "
          f"bitwise equal: {out['fresh_process_bitwise_equal']}; TorchScript and ONNX match eager")  # fmt: skip

    predictor = Predictor(bundle, device="cpu")

    def accuracy(images: data.WeldImages) -> float:
        return float((predictor.predict(images.images).class_index == images.labels).mean())

    table: dict[str, list[float]] = {}
    severities = SEVERITIES[::2] if quick else SEVERITIES
    for name in data.CONDITIONS[1:]:
        table[name] = [accuracy(data.generate(n_eval, seed=7, condition=name if s else "baseline", severity=s))
                       for s in severities]  # fmt: skip
    out["severity_table"] = {"severities": list(severities), "accuracy": table}
    print(f"\naccuracy vs severity (fresh images, seed 7, n={n_eval} per cell)")
    print(f"{'condition':<14}" + "".join(f"{s:>7.1f}" for s in severities))
    for name, row in table.items():
        print(f"{name:<14}" + "".join(f"{a:>7.1%}" for a in row))

    mix = {"good": 0.7, "porosity": 0.1, "crack": 0.1, "lack_of_fusion": 0.1}
    prior = data.generate(n_eval, seed=8, class_mix=mix)
    novel = data.generate(n_eval, seed=9, classes=data.CLASSES + data.NOVEL_CLASSES,
                          class_mix={"tungsten_inclusion": 1.0})  # fmt: skip
    pred_novel = predictor.predict(novel.images)
    out["prior_shift_accuracy"] = accuracy(prior)
    out["novel_defect_predicted_as"] = {c: int((np.array(pred_novel.labels) == c).sum()) for c in bundle.classes}
    out["novel_defect_mean_confidence"] = float(pred_novel.confidence.mean())
    out["baseline_mean_confidence"] = float(predictor.predict(prior.images).confidence.mean())
    print(f"\nclass-prior shift (70% good): accuracy {out['prior_shift_accuracy']:.1%}")
    print(f"novel tungsten inclusions (never seen): predicted as {out['novel_defect_predicted_as']}, "
          f"mean confidence {out['novel_defect_mean_confidence']:.2f} vs {out['baseline_mean_confidence']:.2f} "
          "on known classes")  # fmt: skip
    return out


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv), indent=2))
