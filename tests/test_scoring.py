"""scoring.py: batch scoring of a folder: counts, per-file errors, provenance, idempotent re-runs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from reference_impl import cli, data
from reference_impl.data import DatasetError, decode_image
from reference_impl.inference import Predictor
from reference_impl.scoring import already_scored, score_folder


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """20 generated images in class subfolders (+ manifest.csv, not an image) and one corrupt PNG."""
    root = tmp_path / "incoming"
    data.write_dataset(data.generate(20, seed=42), root)
    (root / "good" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a PNG")
    return root


def expected_labels(predictor: Predictor, root: Path, rows: list[dict]) -> list[str]:
    return predictor.predict([decode_image(root / r["file"]) for r in rows]).labels


@pytest.mark.parametrize("workers", [0, 2])
def test_score_folder(folder, tmp_path, serving_predictor, workers):
    out = tmp_path / "out" / "scores.jsonl"
    summary = score_folder(folder, out, serving_predictor, batch_size=8, num_workers=workers, progress=False)
    assert (summary.scored, summary.skipped, summary.errors) == (20, 0, 1)
    assert summary.out == out and summary.images_per_second > 0
    errors = rows_of(summary.errors_path)
    assert len(errors) == 1 and errors[0]["file"].endswith("corrupt.png") and errors[0]["error"]
    rows = rows_of(out)
    assert len(rows) == 20 and len({r["file"] for r in rows}) == 20
    bundle = serving_predictor.bundle
    for r in rows:
        assert r["model_version"] == "1.0-test" and r["bundle_sha256"] == bundle.sha256
        assert r["sha256"] == hashlib.sha256((folder / r["file"]).read_bytes()).hexdigest()
        assert set(r["probabilities"]) == set(bundle.classes)
        assert r["confidence"] == pytest.approx(max(r["probabilities"].values()))
        assert not Path(r["file"]).is_absolute()
    assert [r["label"] for r in rows] == expected_labels(serving_predictor, folder, rows)
    probs = np.array([[r["probabilities"][c] for c in bundle.classes] for r in rows])
    expected = serving_predictor.predict([decode_image(folder / r["file"]) for r in rows])
    assert np.allclose(probs, expected.probabilities, atol=1e-5)


def test_reruns_are_idempotent(folder, tmp_path, serving_predictor, challenger_bundle_dir):
    out = tmp_path / "scores.jsonl"
    score = lambda predictor, **kw: score_folder(folder, out, predictor, num_workers=0, progress=False, **kw)  # noqa: E731
    score(serving_predictor)
    again = score(serving_predictor)
    assert (again.scored, again.skipped, again.errors) == (0, 20, 1)  # the corrupt file is reported again
    assert len(rows_of(out)) == 20
    assert len(rows_of(again.errors_path)) == 1  # the errors file describes the latest run

    extra = data.generate(3, seed=43)
    for i, img in enumerate(extra.images):
        (folder / "new").mkdir(exist_ok=True)
        (folder / "new" / f"late_{i}.png").write_bytes(data.encode_png(img))
    third = score(serving_predictor)
    assert (third.scored, third.skipped) == (3, 20)
    rows = rows_of(out)
    assert len(rows) == 23 and sorted(r["file"] for r in rows[20:]) == [f"new/late_{i}.png" for i in range(3)]

    # a different bundle scores everything again; its rows say which bundle and version produced them
    other = Predictor.from_path(challenger_bundle_dir, device="cpu")
    fourth = score(other, model_version="7")
    assert (fourth.scored, fourth.skipped, fourth.errors) == (23, 0, 1)
    new_rows = rows_of(out)[23:]
    assert {r["bundle_sha256"] for r in new_rows} == {other.bundle.sha256} != {serving_predictor.bundle.sha256}
    assert {r["model_version"] for r in new_rows} == {"7"}
    assert [r["label"] for r in new_rows] == expected_labels(other, folder, new_rows)
    assert already_scored(out, other.bundle.sha256) == already_scored(out, serving_predictor.bundle.sha256)
    assert len(already_scored(out, serving_predictor.bundle.sha256)) == 23


def test_an_interrupted_write_does_not_stop_the_next_run(folder, tmp_path, serving_predictor):
    out = tmp_path / "scores.jsonl"
    score_folder(folder, out, serving_predictor, num_workers=0, progress=False)
    with open(out, "a") as fh:
        fh.write('{"file": "good/half-writ')  # a crash mid-line
    again = score_folder(folder, out, serving_predictor, num_workers=0, progress=False)
    assert (again.scored, again.skipped) == (0, 20)


def test_a_file_unreadable_on_a_rerun_is_reported_not_fatal(folder, tmp_path, serving_predictor, monkeypatch):
    out = tmp_path / "scores.jsonl"
    score_folder(folder, out, serving_predictor, num_workers=0, progress=False)
    victim = next(p for p in sorted(folder.rglob("*.png")) if p.name != "corrupt.png")
    original = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self == victim:
            raise PermissionError(13, "Permission denied", str(self))
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    again = score_folder(folder, out, serving_predictor, num_workers=0, progress=False)
    assert (again.scored, again.skipped, again.errors) == (0, 19, 2)
    reported = {Path(e["file"]).name: e["error"] for e in rows_of(again.errors_path)}
    assert set(reported) == {"corrupt.png", victim.name} and "Permission denied" in reported[victim.name]


def test_missing_folder_is_a_clear_error(tmp_path, serving_predictor):
    with pytest.raises(DatasetError, match="no such folder"):
        score_folder(tmp_path / "nope", tmp_path / "o.jsonl", serving_predictor, num_workers=0, progress=False)


def test_score_command(folder, tmp_path, bundle_dir, capsys):
    out = tmp_path / "cli.jsonl"
    args = ["score", str(folder), "--out", str(out), "--bundle", str(bundle_dir), "--workers", "0"]
    assert cli.main(args) == 0
    printed = capsys.readouterr()
    assert "scored 20, skipped 0 already scored, 1 unreadable" in printed.out
    assert "errors.jsonl" in printed.err
    assert len(rows_of(out)) == 20
    assert cli.main(args) == 0
    assert "scored 0, skipped 20" in capsys.readouterr().out
