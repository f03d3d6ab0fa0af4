"""cli.py: ``python -m reference_impl <command>`` as a user runs it."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reference_impl import cli, data
from reference_impl.packaging import REQUIRED_FILES

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_cli(*args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "reference_impl", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)  # fmt: skip


def test_help_lists_every_command():
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("demo", "generate", "train", "verify", "export", "predict"):
        assert command in proc.stdout


def test_parser_does_not_import_torch():
    code = "import sys; from reference_impl import cli; cli.build_parser(); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_missing_command_is_a_usage_error():
    proc = run_cli()
    assert proc.returncode == 2
    assert "command" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_with_too_few_images_says_so_before_doing_anything(tmp_path):
    proc = run_cli("--state-dir", str(tmp_path / "state"), "demo", "--fast", "--images", "50", cwd=tmp_path)
    assert proc.returncode == 2 and "n_images must be at least 200" in proc.stderr and "got 50" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "state" / "demo").exists()


def test_generate_writes_manifest_and_grid(tmp_path):
    out, grid = tmp_path / "ds", tmp_path / "grid.png"
    proc = run_cli("--seed", "4", "generate", "--out", str(out), "-n", "12", "--condition", "new_lighting",
                   "--severity", "0.5", "--grid", str(grid))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with open(out / data.MANIFEST_NAME, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12
    assert {r["condition"] for r in rows} == {"new_lighting"} and {r["seed"] for r in rows} == {"4"}
    assert all((out / r["file"]).is_file() for r in rows)
    assert grid.read_bytes()[:8] == PNG_SIGNATURE
    assert str(out / data.MANIFEST_NAME) in proc.stdout
    # the files are exactly what the library generates for that seed and condition
    expected = data.generate(12, seed=4, condition="new_lighting", severity=0.5)
    first = rows[0]
    assert np.array_equal(data.decode_image(out / first["file"]), expected.images[int(first["index"])])


def test_generate_seed_defaults_to_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("MLOPS_SEED", "3")
    assert cli.main(["generate", "--out", str(tmp_path / "ds"), "-n", "3", "--bit-depth", "16", "--novel"]) == 0
    rows = data.read_manifest(tmp_path / "ds" / data.MANIFEST_NAME)
    assert {r["seed"] for r in rows} == {"3"}
    assert data.decode_image(tmp_path / "ds" / rows[0]["file"]).dtype == np.uint16


@pytest.mark.parametrize(
    "args, message",
    [
        (["--condition", "new_camera", "--severity", "2"], "severity must be in [0, 1]"),
        (["--severity", "2"], "severity must be in [0, 1]"),
        (["--severity", "0.5"], "baseline condition has severity 0"),
        (["--class-mix", "good=lots"], "--class-mix expects name=weight"),
        (["--class-mix", "slag=1"], "slag"),
    ],
)
def test_bad_generate_arguments_exit_2_with_a_clear_message(tmp_path, args, message):
    proc = run_cli("generate", "--out", str(tmp_path / "ds"), "-n", "3", *args)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ")
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "ds" / data.MANIFEST_NAME).exists()


def test_argparse_rejects_unknown_condition(tmp_path):
    proc = run_cli("generate", "--out", str(tmp_path / "ds"), "--condition", "fog")
    assert proc.returncode == 2 and "invalid choice: 'fog'" in proc.stderr and "Traceback" not in proc.stderr


def test_verify_good_bundle(bundle_dir, bundle_version, capsys):
    assert cli.main(["verify", str(bundle_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK: {bundle_dir} version {bundle_version}")
    assert f"{len(REQUIRED_FILES) + 1} files verified" in out  # and model.onnx


def test_verify_tampered_bundle_exits_2_naming_the_file(bundle_dir, tmp_path):
    copy = Path(shutil.copytree(bundle_dir, tmp_path / "copy"))
    (copy / "labels.json").write_text('["good", "crack", "porosity", "lack_of_fusion"]\n')  # swapped labels
    proc = run_cli("verify", str(copy))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "labels.json" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_predict_prints_one_json_line_per_image(bundle_dir, tmp_path, capsys):
    d = data.generate(3, seed=8)
    data.write_dataset(d, tmp_path / "ds")
    paths = sorted(str(p) for p in (tmp_path / "ds").rglob("*.png"))
    assert cli.main(["predict", str(bundle_dir), *paths, "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    assert [r["file"] for r in records] == paths
    for r in records:
        assert r["label"] in data.CLASSES
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_predict_unreadable_image_is_a_clean_error(bundle_dir, tmp_path, capsys):
    bad = tmp_path / "scan.png"
    bad.write_bytes(b"not a png")
    assert cli.main(["predict", str(bundle_dir), str(bad), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "scan.png" in err
