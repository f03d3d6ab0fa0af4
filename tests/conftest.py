"""Shared fixtures: an isolated state dir per test, and ONE small trained model + bundle per session.

Training is the expensive part of the loop, so the unit tests share a single small run; tests that need to
change a bundle copy it first (bundles are immutable).
"""

from __future__ import annotations

from pathlib import Path

import pytest

# Enough data and steps to be clearly better than chance (about 0.85 test accuracy) in a few seconds on 2 cores.
SMALL_N_IMAGES = 1000
SMALL_EPOCHS = 3
SMALL_BATCH_SIZE = 32
BUNDLE_VERSION = "1.0-test"


@pytest.fixture(autouse=True)
def isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the state dir and MLflow at a per-test temp dir so no test writes into the repository."""
    state = tmp_path / "state"
    monkeypatch.setenv("MLOPS_STATE_DIR", str(state))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLOPS_SEED", raising=False)
    monkeypatch.delenv("MLOPS_DEVICE", raising=False)
    return state


@pytest.fixture(scope="session")
def small_data():
    from reference_impl import data

    return data.generate(SMALL_N_IMAGES, seed=0)


@pytest.fixture(scope="session")
def small_training(small_data):
    """One small model trained once for the whole session (CPU, deterministic)."""
    from reference_impl import training

    config = training.TrainConfig(epochs=SMALL_EPOCHS, batch_size=SMALL_BATCH_SIZE, seed=0, device="cpu")
    return training.train_model(small_data, config)


@pytest.fixture(scope="session")
def data_manifest(small_data, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from reference_impl import data

    return data.write_dataset(small_data, tmp_path_factory.mktemp("small-data"))


@pytest.fixture(scope="session")
def bundle_version() -> str:
    return BUNDLE_VERSION


@pytest.fixture(scope="session")
def bundle_dir(small_training, data_manifest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's model saved as a bundle. Read-only: copy it (shutil.copytree) before changing anything."""
    from reference_impl import packaging

    out = tmp_path_factory.mktemp("bundles") / "small"
    return packaging.save_bundle(small_training, out, model_version=BUNDLE_VERSION, data_manifest=data_manifest)
