"""Batch scoring: score a whole folder of images offline. Chapter: "Serving predictions" (batch vs real-time).

When nobody waits for an individual answer (a shift's radiographs reviewed next morning, a re-score after a model
change), batch scoring is simpler and cheaper than a service: no server to keep up, full batches, all cores busy.

- A ``DataLoader`` with worker processes decodes and preprocesses images while the model computes.
- Re-runs are idempotent: images already scored *by the same bundle* (keyed by the sha256 of the file's bytes)
  are skipped, so an interrupted job resumes where it stopped and never scores an image twice.
- An unreadable file is reported by name in ``<out>.errors.jsonl`` and does not stop the run.
- Every output row records the model version and bundle hash that produced it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import DatasetError, decode_image, iter_image_files
from .inference import Predictor
from .model import PreprocessSpec, build_transform

log = logging.getLogger(__name__)


@dataclass
class ScoreSummary:
    scored: int
    skipped: int
    errors: int
    seconds: float
    out: Path
    errors_path: Path

    @property
    def images_per_second(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else 0.0


class _ImageFiles:
    """Map-style dataset: path -> (index, tensor or None, sha256, error message or None). Runs in worker processes."""

    def __init__(self, paths: list[Path], spec: PreprocessSpec) -> None:
        self.paths = paths
        self.spec = spec
        self._transform = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Any, str, str | None]:
        if self._transform is None:  # built lazily, inside the worker process
            self._transform = build_transform(self.spec)
        path = self.paths[i]
        try:
            payload = path.read_bytes()
            sha = hashlib.sha256(payload).hexdigest()
            return i, self._transform(decode_image(payload, name=str(path))), sha, None
        except (DatasetError, OSError) as exc:
            return i, None, "", str(exc)


def _collate(items: list[tuple[int, Any, str, str | None]]) -> list[tuple[int, Any, str, str | None]]:
    return items  # keep per-item errors; stacking happens in the main process


def _worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)  # workers decode; the main process owns the cores for the forward pass


def _sha256_or_none(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:  # unreadable now: keep it in the run, where the loader reports it by name instead of crashing
        return None


def already_scored(out: Path, bundle_sha256: str) -> set[str]:
    """sha256 of every image in ``out`` scored by this exact bundle."""
    if not out.exists():
        return set()
    done = set()
    with open(out) as fh:
        for line_no, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s:%d: ignoring a damaged line (an interrupted write?)", out, line_no)
                continue
            if row.get("bundle_sha256") == bundle_sha256:
                done.add(row.get("sha256"))
    return done


def score_folder(
    folder: str | Path,
    out: str | Path,
    predictor: Predictor,
    *,
    model_version: str | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    progress: bool = True,
) -> ScoreSummary:
    """Score every image under ``folder`` (recursively) into the JSON-lines file ``out``."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such folder")
    bundle = predictor.bundle
    bundle_sha = bundle.sha256
    version = model_version or bundle.version
    start = time.perf_counter()
    done = already_scored(out, bundle_sha)
    paths = list(iter_image_files(folder))
    if done:
        # Hashing every file again is cheap next to decoding and inference, and it is what makes skipping exact.
        keep = [p for p in paths if _sha256_or_none(p) not in done]
        skipped, paths = len(paths) - len(keep), keep
    else:
        skipped = 0
    errors_path = out.with_name(out.name + ".errors.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    loader = DataLoader(_ImageFiles(paths, bundle.preprocess), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate, worker_init_fn=_worker_init if num_workers else None)  # fmt: skip
    scored = n_errors = 0
    with open(out, "a") as fh, open(errors_path, "w") as err_fh, \
            tqdm(total=len(paths), desc="scoring", unit="img", disable=not progress or None) as bar:  # fmt: skip
        for items in loader:
            good = [it for it in items if it[3] is None]
            for i, _, _, message in (it for it in items if it[3] is not None):
                err_fh.write(json.dumps({"file": str(paths[i]), "error": message}) + "\n")
                n_errors += 1
            if good:
                logits, _ = predictor.forward(torch.stack([it[1] for it in good]))
                probs = torch.softmax(logits, dim=1).numpy()
                for (i, _, sha, _), p in zip(good, probs, strict=True):
                    k = int(p.argmax())
                    row = {
                        "file": str(paths[i].relative_to(folder)),
                        "sha256": sha,
                        "label": bundle.classes[k],
                        "confidence": float(p[k]),
                        "probabilities": dict(zip(bundle.classes, map(float, p), strict=True)),
                        "model_version": version,
                        "bundle_sha256": bundle_sha,
                    }
                    fh.write(json.dumps(row) + "\n")
                scored += len(good)
                fh.flush()  # a crash loses at most the batch in flight; the next run skips what was written
            bar.update(len(items))
    return ScoreSummary(scored, skipped, n_errors, time.perf_counter() - start, out, errors_path)
