"""registry.py (and pyfunc_model.py, services.py): versions, tags, aliases, promotion, rollback, verified loading."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reference_impl.data import decode_image, sha256_file
from reference_impl.registry import CHALLENGER, CHAMPION, PREVIOUS, Registry, RegistryError
from reference_impl.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def test_register_bundle_creates_versions_with_tags(registry, bundle_dir, challenger_bundle_dir, data_manifest):
    v1 = registry.register_bundle(bundle_dir, alias=CHAMPION)
    v2 = registry.register_bundle(challenger_bundle_dir, alias=CHALLENGER)
    assert (v1.version, v2.version) == ("1", "2")
    assert v1.uri == "models:/weld-defect/1"
    assert v1.aliases == (CHAMPION,) and v2.aliases == (CHALLENGER,)
    assert registry.aliases() == {CHAMPION: "1", CHALLENGER: "2"}
    assert [v.version for v in registry.versions()] == ["1", "2"]

    meta = json.loads((bundle_dir / "metadata.json").read_text())
    tags = v1.tags
    assert tags["bundle_sha256"] == sha256_file(bundle_dir / "MANIFEST.json")
    assert tags["accuracy"] == f"{meta['metrics']['accuracy']:.4f}"
    assert float(tags["accuracy"]) > 0.5  # the real metric, not a placeholder
    assert tags["training_data_manifest_sha256"] == sha256_file(data_manifest)
    assert tags["validation_status"] == "bundle-verified"
    assert tags["onnx_export"].startswith("verified: max difference") and "128 held-out images" in tags["onnx_export"]
    assert tags["bundle_model_version"] == "1.0-test"
    # each version carries its own bundle's identity
    assert v2.tags["bundle_sha256"] == sha256_file(challenger_bundle_dir / "MANIFEST.json") != tags["bundle_sha256"]
    assert v2.tags["bundle_model_version"] == "2.0-test"
    # the run that logged it is recorded too
    run = registry.client.get_run(v1.run_id)
    assert run.data.params["bundle_sha256"] == tags["bundle_sha256"]
    assert run.data.metrics["accuracy"] == pytest.approx(meta["metrics"]["accuracy"])
    # the same answers from a second client on the same store (nothing lives only in memory)
    again = Registry(Settings.from_env())
    assert again.get(CHAMPION) == registry.get("1")


def test_register_refuses_an_unverifiable_bundle(registry, bundle_dir, tmp_path):
    from reference_impl.packaging import BundleError

    broken = tmp_path / "broken"
    shutil.copytree(bundle_dir, broken)
    (broken / "labels.json").write_text('["a", "b", "c", "d"]\n')
    with pytest.raises(BundleError, match=r"labels\.json"):
        registry.register_bundle(broken)
    assert registry.versions() == []


def test_promote_records_previous_champion_and_rollback_returns_to_it(registry, bundle_dir, challenger_bundle_dir):
    registry.register_bundle(bundle_dir, alias=CHAMPION)
    registry.register_bundle(challenger_bundle_dir, alias=CHALLENGER)
    assert registry.promote("2") == "1"
    aliases = registry.aliases()
    assert aliases[CHAMPION] == "2" and aliases[PREVIOUS] == "1"
    assert CHALLENGER not in aliases  # a promoted challenger is no longer a challenger
    assert registry.rollback() == "1"
    assert registry.aliases()[CHAMPION] == "1"
    with pytest.raises(RegistryError, match="no earlier champion"):
        registry.rollback()
    assert registry.aliases()[CHAMPION] == "1"  # a refused rollback changes nothing


def test_rollback_walks_back_through_several_promotions(registry, bundle_dir):
    for _ in range(3):
        registry.register_bundle(bundle_dir)
    assert registry.promote("1") is None  # nothing was champion before
    assert registry.promote("2") == "1"
    assert registry.promote("3") == "2"
    assert registry.aliases()[PREVIOUS] == "2"
    assert registry.rollback() == "2"
    assert registry.aliases()[CHAMPION] == "2" and registry.aliases()[PREVIOUS] == "1"
    assert registry.rollback() == "1"
    assert registry.aliases()[CHAMPION] == "1" and PREVIOUS not in registry.aliases()
    with pytest.raises(RegistryError):
        registry.rollback()
    # promoting after a rollback starts a new history from the current champion
    assert registry.promote("3") == "1"
    assert registry.rollback() == "1"


def test_rollback_after_alias_set_by_hand(registry, bundle_dir):
    """The champion was first set with an alias (not promote): the first promotion still remembers it."""
    registry.register_bundle(bundle_dir, alias=CHAMPION)
    registry.register_bundle(bundle_dir)
    registry.register_bundle(bundle_dir)
    assert registry.promote("2") == "1"
    assert registry.promote("3") == "2"
    assert [registry.rollback(), registry.rollback()] == ["2", "1"]
    with pytest.raises(RegistryError):
        registry.rollback()


def test_unknown_versions_and_aliases_are_clear_errors(registry, bundle_dir):
    assert registry.aliases() == {} and registry.versions() == []
    with pytest.raises(RegistryError, match=r"'weld-defect' has no version or alias 'champion'"):
        registry.get(CHAMPION)
    with pytest.raises(RegistryError, match="no earlier champion"):
        registry.rollback()
    registry.register_bundle(bundle_dir)
    with pytest.raises(RegistryError, match=r"no version or alias '7'"):
        registry.get("7")
    with pytest.raises(RegistryError, match=r"no version or alias 'challenger'"):
        registry.load(CHALLENGER)
    with pytest.raises(RegistryError, match=r"'42'"):
        registry.promote("42")
    with pytest.raises(RegistryError, match=r"'9'"):
        registry.set_alias(CHALLENGER, "9")
    assert registry.aliases() == {}


def test_load_returns_the_verified_bundle(registry, bundle_dir, isolated_state):
    registry.register_bundle(bundle_dir, alias=CHAMPION)
    bundle, info = registry.load()
    assert info.version == "1" and CHAMPION in info.aliases
    assert bundle.sha256 == info.tags["bundle_sha256"]
    # downloaded once into the state dir's cache, identical to what was registered
    assert bundle.path == isolated_state / "registry-cache" / "weld-defect" / "1"
    assert (bundle.path / "weights.pt").read_bytes() == (bundle_dir / "weights.pt").read_bytes()


def test_pyfunc_predicts_raw_images_like_the_predictor(registry, bundle_dir, weld_images, weld_pngs, serving_predictor):
    import mlflow

    registry.register_bundle(bundle_dir, alias=CHAMPION)
    model = mlflow.pyfunc.load_model("models:/weld-defect@champion")
    expected = serving_predictor.predict(weld_images.images)
    out = model.predict(pd.DataFrame({"image": weld_pngs}))
    assert list(out["label"]) == expected.labels
    probs = out[[f"p_{c}" for c in serving_predictor.classes]].to_numpy()
    assert np.allclose(probs, expected.probabilities, atol=1e-5)
    assert np.allclose(out["confidence"], expected.confidence, atol=1e-5)
    # base64 text, as `mlflow models serve` JSON carries it
    b64 = [base64.b64encode(p).decode() for p in weld_pngs[:3]]
    assert list(model.predict(pd.DataFrame({"image": b64}))["label"]) == expected.labels[:3]
    with pytest.raises(ValueError, match="base64"):
        model.predict(pd.DataFrame({"image": ["not base64!"]}))


def _tamper(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _artifact_store_bundle(state: Path) -> Path:
    manifests = list((state / "mlartifacts").rglob("MANIFEST.json"))
    assert len(manifests) == 1, manifests
    return manifests[0].parent


def test_tampered_cache_is_refused(registry, bundle_dir, isolated_state):
    registry.register_bundle(bundle_dir, alias=CHAMPION)
    bundle, _ = registry.load(CHAMPION)
    _tamper(bundle.path / "weights.pt")
    with pytest.raises(RegistryError, match="verification") as err:
        registry.load(CHAMPION)
    assert "weights.pt" in str(err.value)


def test_tampered_artifact_store_is_refused(registry, bundle_dir, isolated_state):
    registry.register_bundle(bundle_dir, alias=CHAMPION)
    stored = _artifact_store_bundle(isolated_state)
    _tamper(stored / "weights.pt")
    shutil.rmtree(isolated_state / "registry-cache", ignore_errors=True)
    with pytest.raises(RegistryError, match="verification"):
        registry.load(CHAMPION)


def test_tampered_artifacts_with_a_rewritten_manifest_are_refused(registry, bundle_dir, isolated_state):
    """A careful forger re-hashes the manifest: the bundle verifies, but it is not the bundle that was registered."""
    from reference_impl.packaging import verify_bundle, write_manifest

    registry.register_bundle(bundle_dir, alias=CHAMPION)
    stored = _artifact_store_bundle(isolated_state)
    (stored / "labels.json").write_text('["crack", "good", "porosity", "lack_of_fusion"]\n')
    write_manifest(stored)
    verify_bundle(stored)  # self-consistent...
    shutil.rmtree(isolated_state / "registry-cache", ignore_errors=True)
    with pytest.raises(RegistryError, match="differs from the one registered"):
        registry.load(CHAMPION)  # ...but refused


def test_nothing_is_written_to_the_cwd_or_the_repo(tmp_path, isolated_state, monkeypatch, bundle_dir, weld_pngs):
    """With no MLFLOW_TRACKING_URI, the default store is SQLite under the state dir and artifacts live there too."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = {name: (REPO / name).exists() for name in ("mlruns", "mlflow.db", "mlartifacts", ".mlops")}
    registry = Registry(Settings.from_env())
    assert registry.uri == f"sqlite:///{isolated_state / 'mlflow.db'}"
    registry.register_bundle(bundle_dir, alias=CHAMPION)
    registry.load(CHAMPION)
    model = mlflow.pyfunc.load_model("models:/weld-defect@champion")
    assert len(model.predict(pd.DataFrame({"image": weld_pngs[:2]}))) == 2
    assert sorted(os.listdir(cwd)) == []
    assert (isolated_state / "mlflow.db").is_file() and (isolated_state / "mlartifacts").is_dir()
    assert {name: (REPO / name).exists() for name in before} == before


def test_describe_lists_versions_aliases_and_tags(registry_with_challenger):
    described = registry_with_challenger.describe()
    assert described["model"] == "weld-defect"
    assert described["aliases"] == {CHAMPION: "1", CHALLENGER: "2"}
    assert [v["version"] for v in described["versions"]] == ["1", "2"]
    assert described["versions"][0]["aliases"] == [CHAMPION]
    assert described["versions"][1]["validation_status"] == "bundle-verified"


def test_decode_image_used_by_the_pyfunc_reads_png(weld_pngs, weld_images):
    # The pyfunc decodes with data.decode_image: check the round trip it relies on.
    assert np.array_equal(decode_image(weld_pngs[0]), weld_images.images[0])


def test_mlflow_server_command_uses_the_same_store(isolated_state):
    from reference_impl.services import mlflow_server_command

    settings = Settings.from_env()
    cmd = mlflow_server_command(settings, "127.0.0.1", 5123)
    assert Path(cmd[0]).name == "mlflow" and cmd[1] == "server"
    assert cmd[cmd.index("--backend-store-uri") + 1] == settings.tracking_uri
    assert cmd[cmd.index("--default-artifact-root") + 1] == (isolated_state / "mlartifacts").resolve().as_uri()
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "5123"


@pytest.mark.slow
def test_services_runs_an_mlflow_server_and_stops_cleanly(registry_with_challenger, tmp_path, unused_port):
    """`python -m reference_impl services`: a real MLflow server on loopback that shows our registry, and that
    stops (children included) on SIGTERM."""
    from reference_impl.services import wait_for_http

    port = unused_port
    proc = subprocess.Popen(
        [sys.executable, "-m", "reference_impl", "services", "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the test can check that no child outlives it
    )
    try:
        assert wait_for_http(f"http://127.0.0.1:{port}/health", timeout_s=90), "MLflow server did not start"
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/registered-models/get?name=weld-defect"
        with urllib.request.urlopen(url, timeout=10) as response:
            model = json.load(response)["registered_model"]
        assert {a["alias"]: a["version"] for a in model["aliases"]} == {CHAMPION: "1", CHALLENGER: "2"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not wait_for_http(f"http://127.0.0.1:{port}/health", timeout_s=2), "the MLflow server outlived us"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with contextlib.suppress(ProcessLookupError):  # an orphaned child of the group (there should be none)
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stdout.close()


def test_a_registry_whose_state_folder_was_wiped_starts_afresh_in_the_same_process(tmp_path, bundle_dir):
    """A lab re-running its setup cell deletes its state folder (SQLite database included) and registers again in
    the same kernel. MLflow's cached engine for that URI still points at the deleted file; without dropping it the
    second registration fails with "attempt to write a readonly database"."""
    settings = Settings(state_dir=tmp_path / "lab")
    first = Registry(settings)
    assert first.register_bundle(bundle_dir, alias=CHAMPION).version == "1"
    shutil.rmtree(settings.state_dir)
    second = Registry(settings)
    assert second.register_bundle(bundle_dir, alias=CHAMPION).version == "1", "a new, empty registry"
    assert second.aliases() == {CHAMPION: "1"}
