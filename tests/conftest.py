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


# ----------------------------------------------------------------------------------------------------------------
# Registry, serving, scoring and load testing (issue 3)
# ----------------------------------------------------------------------------------------------------------------


# A smaller reference / null pool than the packaging default keeps the profile build to a few seconds.
PROFILE_N_REFERENCE = 400
PROFILE_N_NULL = 800


@pytest.fixture(scope="session")
def profile_bundle(small_training, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's small model packaged WITH a monitoring profile and out-of-distribution detector (the
    ``bundle_dir`` bundle has neither, like a bundle made with plain ``save_bundle``)."""
    from reference_impl import packaging
    from reference_impl.monitoring.profile import package_with_profile

    out = tmp_path_factory.getbasetemp() / "profile-bundle"
    if not (out / packaging.MANIFEST).is_file():
        package_with_profile(small_training, out, seed=0, model_name="weld-test", model_version="1.0-profile",
                             data_manifest=None, n_reference=PROFILE_N_REFERENCE, n_null=PROFILE_N_NULL)  # fmt: skip
    return out


@pytest.fixture(scope="session")
def serving_predictor(bundle_dir):
    """The in-process Predictor for the session bundle: the reference every served answer is compared with."""
    from reference_impl.inference import Predictor

    return Predictor.from_path(bundle_dir, device="cpu")


@pytest.fixture(scope="session")
def weld_images():
    """Unseen images (another seed than training): 12 radiographs of 64x64, uint8."""
    from reference_impl import data

    return data.generate(12, seed=123)


@pytest.fixture(scope="session")
def weld_pngs(weld_images) -> list[bytes]:
    from reference_impl import data

    return [data.encode_png(im) for im in weld_images.images]


@pytest.fixture(scope="session")
def challenger_bundle_dir(bundle_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, *distinct* valid bundle: the session's weights with the class names rotated by one.

    Cheap (no training) and useful: its bundle hash differs from the first bundle's, and its label disagrees with
    the first bundle's on every image, so shadow agreement and re-scoring have something to detect.
    """
    import json
    import shutil

    from reference_impl import packaging

    out = tmp_path_factory.mktemp("bundles") / "challenger"
    shutil.copytree(bundle_dir, out)
    labels = json.loads((out / "labels.json").read_text())
    (out / "labels.json").write_text(json.dumps(labels[1:] + labels[:1]) + "\n")
    meta = json.loads((out / "metadata.json").read_text())
    meta["model_version"] = "2.0-test"
    (out / "metadata.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    packaging.write_manifest(out)
    packaging.verify_bundle(out)
    return out


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite database with its schema already migrated.

    The first use of a new database runs MLflow's migrations (~2 s); copying a migrated one makes a fresh,
    isolated registry per test cheap.
    """
    from reference_impl.registry import Registry
    from reference_impl.settings import Settings

    root = tmp_path_factory.mktemp("mlflow-template")
    db = root / "mlflow.db"
    registry = Registry(Settings(state_dir=root / "state", registry_uri=f"sqlite:///{db}"))
    assert registry.aliases() == {}  # touches the store: creates and migrates the schema
    assert db.is_file()
    return db


@pytest.fixture
def registry(isolated_state: Path, tmp_path: Path, mlflow_db_template: Path):
    """A fresh, empty Registry for this test: the autouse MLFLOW_TRACKING_URI database, pre-migrated."""
    import shutil

    from reference_impl.registry import Registry
    from reference_impl.settings import Settings

    shutil.copyfile(mlflow_db_template, tmp_path / "mlflow.db")
    return Registry(Settings.from_env())


@pytest.fixture
def registry_with_challenger(registry, bundle_dir: Path, challenger_bundle_dir: Path):
    """Version 1 (the session bundle) is the champion, version 2 (the rotated-label bundle) the challenger."""
    registry.register_bundle(bundle_dir, alias="champion")
    registry.register_bundle(challenger_bundle_dir, alias="challenger")
    return registry


@pytest.fixture
def unused_port() -> int:
    """A loopback TCP port that was free a moment ago (for servers started as subprocesses)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def live_server(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real uvicorn server (loopback, OS-chosen port) for the session bundle, in a background thread.

    Yields ``(base_url, app)``. Its state dir is private to the module; it is stopped (lifespan shutdown
    included) at the end of the module.
    """
    import socket
    import threading
    import time

    import uvicorn

    from reference_impl.serving import ServingConfig, create_app
    from reference_impl.settings import Settings

    state = tmp_path_factory.mktemp("live-server-state")
    app = create_app(Settings(state_dir=state), ServingConfig(bundle_path=str(bundle_dir), device="cpu"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="live-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the uvicorn test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
