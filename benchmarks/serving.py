"""Serving benchmark: in-process Predictor vs our server (batching off/on) vs ``mlflow models serve``.

All measured in one run on loopback with the same registered model and the same PNG payloads, so the ratios are
meaningful on any machine. Targets (issue "Registry and serving"):

- at 16 concurrent clients our server's throughput >= 3x ``mlflow models serve`` and >= 0.5x in-process batched;
- at 1 client our p50 within 3 ms of the in-process batch-1 latency (decode + predict of one PNG);
- batch scoring >= 0.8x the bare model's throughput on the same batches. "The bare model" here is a plain loop that
  reads, decodes and predicts the same files in the same batches of 64: scoring must also read and decode files, so
  a forward pass on tensors decoded beforehand is not the same work; that ceiling is reported too.

The load generator runs in this process, on the same 2 cores as the server, so absolute numbers understate a real
deployment; the ratios are what to compare.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _p50(values: list[float]) -> float:
    from reference_impl.loadtest import percentile

    return percentile(values, 50)


def _in_process(predictor: Any, payloads: list[bytes], n: int) -> dict[str, float]:
    from reference_impl.data import decode_image

    for p in payloads[:10]:
        predictor.predict([decode_image(p)])
    lat = []
    for i in range(n):
        start = time.perf_counter()
        predictor.predict([decode_image(payloads[i % len(payloads)])])
        lat.append((time.perf_counter() - start) * 1000)
    start = time.perf_counter()
    done = 0
    while done < n * 2:
        batch = [decode_image(payloads[(done + j) % len(payloads)]) for j in range(16)]
        predictor.predict(batch)
        done += 16
    batched = done / (time.perf_counter() - start)
    return {"batch1_p50_ms": _p50(lat), "batch1_rps": 1000 / (sum(lat) / len(lat)), "batched16_rps": batched}


def _mlflow_serve(state_dir: Path, version: str, port: int) -> subprocess.Popen:
    from reference_impl.services import wait_for_http

    env = {**os.environ, "MLOPS_STATE_DIR": str(state_dir), "MLFLOW_TRACKING_URI": f"sqlite:///{state_dir}/mlflow.db",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    cmd = [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", f"models:/weld-defect/{version}",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not wait_for_http(f"http://127.0.0.1:{port}/ping", timeout_s=120):
        proc.terminate()
        raise RuntimeError("mlflow models serve did not become ready")
    return proc


def run(quick: bool = False) -> dict[str, Any]:
    import torch

    from reference_impl import data
    from reference_impl.inference import Predictor
    from reference_impl.loadtest import run_load
    from reference_impl.loop import baseline_bundle
    from reference_impl.registry import Registry
    from reference_impl.scoring import score_folder
    from reference_impl.serving.process import ServerProcess, free_port
    from reference_impl.settings import Settings

    n = 150 if quick else 600
    out: dict[str, Any] = {"requests_per_run": n}
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        settings = Settings(state_dir=state)
        bundle_dir = baseline_bundle(Settings.from_env())  # the cached lab model (trains once if missing)
        registry = Registry(settings)
        info = registry.register_bundle(bundle_dir, alias="champion")
        images = data.generate(64, seed=11)
        payloads = [data.encode_png(im) for im in images.images]
        predictor = Predictor.from_path(bundle_dir, device="cpu")
        out["in_process"] = ip = _in_process(predictor, payloads, n)
        print(f"in-process: batch-1 p50 {ip['batch1_p50_ms']:.2f} ms, batched(16) {ip['batched16_rps']:.0f} img/s")

        env = {"MLFLOW_TRACKING_URI": settings.tracking_uri}
        for label, args in (("ours_batching_off", ["--max-batch-size", "1"]),
                            ("ours_batching_on", ["--max-batch-size", "16", "--max-wait-ms", "2"])):  # fmt: skip
            with ServerProcess(args, state_dir=state, env=env) as server:
                for c in (1, 16):
                    run_load(server.url, payloads, concurrency=c, n_requests=40)  # warm-up
                    r = run_load(server.url, payloads, concurrency=c, n_requests=n)
                    out[f"{label}_c{c}"] = r.summary()
                    print(f"{label:<18} clients={c:<2} {r.throughput:7.1f} req/s  p50 {r.p(50):6.2f} ms  "
                          f"p99 {r.p(99):6.2f} ms  errors {r.errors}")  # fmt: skip

        port = free_port()
        proc = _mlflow_serve(state, info.version, port)
        try:
            url = f"http://127.0.0.1:{port}"
            for c in (1, 16):
                run_load(url, payloads, kind="mlflow", concurrency=c, n_requests=20)
                r = run_load(url, payloads, kind="mlflow", concurrency=c, n_requests=max(60, n // 4))
                out[f"mlflow_serve_c{c}"] = r.summary()
                print(f"{'mlflow models serve':<18} clients={c:<2} {r.throughput:7.1f} req/s  p50 {r.p(50):6.2f} ms  "
                      f"p99 {r.p(99):6.2f} ms  errors {r.errors}")  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(timeout=30)

        # Batch scoring vs the bare model on the same images and batch size.
        folder = state / "score"
        data.write_dataset(data.generate(400 if quick else 2000, seed=12), folder)
        files = sorted(folder.rglob("*.png"))
        # Baseline 1, what a data scientist writes first: a plain loop over the same files in batches of 64 that
        # reads, decodes and predicts (no workers, no hashing, no idempotency, no output file).
        start = time.perf_counter()
        for i in range(0, len(files), 64):
            predictor.predict([data.decode_image(f.read_bytes()) for f in files[i : i + 64]])
        plain = len(files) / (time.perf_counter() - start)
        # Baseline 2, the ceiling: the forward pass alone on already decoded and preprocessed tensors.
        x = predictor.preprocess([data.decode_image(f) for f in files])
        start = time.perf_counter()
        for i in range(0, len(x), 64):
            predictor.forward(x[i : i + 64])
        bare = len(x) / (time.perf_counter() - start)
        summary = score_folder(folder, state / "scores.jsonl", predictor, batch_size=64, num_workers=2, progress=False)
        out["scoring"] = {"plain_loop_img_s": plain, "bare_forward_img_s": bare,
                          "score_folder_img_s": summary.images_per_second, "workers": 2,
                          "images": summary.scored}  # fmt: skip
        print(f"batch scoring: {summary.images_per_second:.0f} img/s (2 workers; reads, decodes, hashes, writes) vs "
              f"a plain read+decode+predict loop {plain:.0f} img/s; forward pass alone {bare:.0f} img/s")  # fmt: skip

    ours16 = out["ours_batching_on_c16"]["throughput_rps"]
    ratios = {
        "ours16_over_mlflow16 (target >= 3)": ours16 / max(out["mlflow_serve_c16"]["throughput_rps"], 1e-9),
        "ours16_over_inprocess_batched (target >= 0.5)": ours16 / ip["batched16_rps"],
        "ours1_p50_minus_inprocess_batch1_ms (target <= 3)": out["ours_batching_on_c1"]["p50_ms"] - ip["batch1_p50_ms"],
        "batching_on_over_off_at_16": ours16 / max(out["ours_batching_off_c16"]["throughput_rps"], 1e-9),
        "scoring_over_plain_loop (target >= 0.8)": out["scoring"]["score_folder_img_s"] / plain,
        "scoring_over_forward_pass_alone": out["scoring"]["score_folder_img_s"] / bare,
    }
    out["ratios"] = ratios
    out["torch_threads"] = torch.get_num_threads()
    print("\nratios (same run, same machine):")
    for k, v in ratios.items():
        print(f"  {k:<52} {v:6.2f}")
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(run("--quick" in sys.argv), indent=2, default=str))
