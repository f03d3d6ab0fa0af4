"""The model registry on MLflow: register bundles as versions, move aliases, promote and roll back.

Chapter: "Packaging a model" (model registry / artifact storage) and "Retraining" (promotion and rollback).
A registry answers "which model is in production, where did it come from, and what was there before?". We use
MLflow's registry with **aliases** (``champion``, ``challenger``): stages are deprecated in MLflow 3, and an
alias is just a movable name for a version, which makes promotion and rollback one atomic call each.

Default back end: SQLite under the state dir (no server needed). Any MLflow tracking server works through
``MLFLOW_TRACKING_URI``. ``mlflow`` is imported inside the methods: it costs seconds to import.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .packaging import Bundle, BundleError, load_bundle, verify_bundle
from .settings import Settings

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous_champion"
HISTORY_TAG = "champion_history"  # comma-separated versions, most recent last: what rollback walks back through
EXPERIMENT = "weld-defect-training"


class RegistryError(RuntimeError):
    """The registry cannot do what was asked (unknown alias or version, nothing to roll back to, bad artifacts)."""


@dataclass(frozen=True)
class ModelVersionInfo:
    name: str
    version: str
    aliases: tuple[str, ...]
    tags: dict[str, str]
    run_id: str | None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def _forget_engines_of_a_deleted_database(uri: str) -> None:
    """Drop MLflow's cached database engines for ``uri`` if its SQLite file no longer exists.

    MLflow keeps, for the life of the process, one store object and one SQLAlchemy engine per database URI (caches
    in its tracking and registry modules). When the file is deleted, e.g. a lab re-running its setup cell wipes its
    state folder, the pooled connections still point at the deleted file and every write fails with "attempt to
    write a readonly database". Fresh ones create the new file and its tables. MLflow has no public API for this,
    so its private caches are used defensively: if they move in a later MLflow version this does nothing.
    """
    path = uri.removeprefix("sqlite:///")
    if not uri.startswith("sqlite:///") or "?" in path or ":memory:" in path or Path(path).exists():
        return  # not a plain SQLite file, or it is still there
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingStore
    from mlflow.tracking._model_registry.registry import ModelRegistryStoreRegistry
    from mlflow.tracking._tracking_service.registry import TrackingStoreRegistry

    for store in (TrackingStore, RegistryStore):
        engines = getattr(store, "_engine_map", None)
        if not isinstance(engines, dict):
            continue
        with getattr(store, "_engine_map_lock", contextlib.nullcontext()):  # MLflow's own lock for this cache
            engine = engines.pop(uri, None)
        if engine is not None:
            engine.dispose()
    for registry in (TrackingStoreRegistry, ModelRegistryStoreRegistry):
        # lru_cache keyed by URI; clearing it only makes other URIs' stores be rebuilt (their engines stay cached)
        cache_clear = getattr(getattr(registry, "_get_store_with_resolved_uri", None), "cache_clear", None)
        if cache_clear is not None:
            cache_clear()


class Registry:
    """Thin, explicit wrapper over ``mlflow.MlflowClient`` for one registered model name."""

    def __init__(self, settings: Settings | None = None) -> None:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep logs and notebooks readable
        # MLflow logs each one-off migration of a new SQLite registry at INFO ("Creating initial MLflow database
        # tables..."): on stderr, in red in a notebook, for something that is not a problem. Warnings still show.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        import mlflow
        from mlflow import MlflowClient

        self.settings = settings or Settings.from_env()
        self.name = self.settings.model_name
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        self.uri = self.settings.tracking_uri
        _forget_engines_of_a_deleted_database(self.uri)
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self._mlflow = mlflow

    # ---------------------------------------------------------------------------------------------- registering
    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        if exp is not None:
            return exp.experiment_id
        # An explicit artifact location: with a SQLite store MLflow would otherwise write ./mlruns in the CWD.
        artifacts = (self.settings.state_dir / "mlartifacts").resolve()
        return self.client.create_experiment(EXPERIMENT, artifact_location=artifacts.as_uri())

    def register_bundle(self, bundle_dir: str | Path, *, alias: str | None = None) -> ModelVersionInfo:
        """Log a verified bundle as an MLflow pyfunc model and register it as a new version.

        Tags record what a reviewer needs without opening the artifact: metrics, the training-data manifest hash,
        the bundle's own hash and its verification status.
        """
        from mlflow.exceptions import MlflowException

        bundle_dir = Path(bundle_dir)
        verify_bundle(bundle_dir)  # never register something we could not load later
        meta = json.loads((bundle_dir / "metadata.json").read_text())
        requirements = (bundle_dir / "requirements.txt").read_text().split()
        from .data import sha256_file

        bundle_sha = sha256_file(bundle_dir / "MANIFEST.json")
        metrics = meta.get("metrics", {})
        mlflow = self._mlflow
        with mlflow.start_run(experiment_id=self._experiment_id(), run_name=f"bundle-{meta.get('model_version')}"):
            mlflow.log_params({"bundle_model_version": meta.get("model_version"), "bundle_sha256": bundle_sha})
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, int | float)})
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(__file__).with_name("pyfunc_model.py")),
                artifacts={"bundle": str(bundle_dir)},
                pip_requirements=requirements,
            )
        # The client, not log_model(registered_model_name=...): the fluent path prints "Successfully registered
        # model" / "Created version" to stderr on every registration.
        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            self.client.create_registered_model(self.name)
        mv = self.client.create_model_version(self.name, info.model_uri, run_id=info.run_id, model_id=info.model_id)
        version = str(mv.version)
        tags = {
            "bundle_sha256": bundle_sha,
            "bundle_model_version": str(meta.get("model_version")),
            "training_data_manifest_sha256": str(meta.get("training_data_manifest_sha256")),
            "accuracy": f"{metrics.get('accuracy', float('nan')):.4f}",
            "macro_f1": f"{metrics.get('macro_f1', float('nan')):.4f}",
            "validation_status": "bundle-verified",
            "onnx_export": _onnx_tag(meta),
        }
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, version, key, value)
        if alias:
            self.set_alias(alias, version)
        return self.get(version)

    # ------------------------------------------------------------------------------------------------ looking up
    def get(self, ref: str) -> ModelVersionInfo:
        """A version by number ("3") or alias ("champion")."""
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version(self.name, ref) if ref.isdigit() else \
                self.client.get_model_version_by_alias(self.name, ref)  # fmt: skip
        except MlflowException as exc:
            raise RegistryError(f"model {self.name!r} has no version or alias {ref!r} in {self.uri}") from exc
        return ModelVersionInfo(self.name, str(mv.version), tuple(mv.aliases or ()), dict(mv.tags or {}), mv.run_id)

    def aliases(self) -> dict[str, str]:
        """alias -> version for the registered model (empty if nothing is registered yet)."""
        from mlflow.exceptions import MlflowException

        try:
            aliases = self.client.get_registered_model(self.name).aliases or {}
        except MlflowException:
            return {}
        return {alias: str(version) for alias, version in aliases.items()}

    def versions(self) -> list[ModelVersionInfo]:
        found = self.client.search_model_versions(f"name='{self.name}'")
        return sorted((self.get(str(mv.version)) for mv in found), key=lambda v: int(v.version))

    # ----------------------------------------------------------------------------------------- moving aliases
    def set_alias(self, alias: str, version: str) -> None:
        self.get(version)  # fail clearly on an unknown version
        self.client.set_registered_model_alias(self.name, alias, version)

    def clear_alias(self, alias: str) -> None:
        if alias in self.aliases():
            self.client.delete_registered_model_alias(self.name, alias)

    def _history(self) -> list[str]:
        from mlflow.exceptions import MlflowException

        try:
            raw = self.client.get_registered_model(self.name).tags.get(HISTORY_TAG, "")
        except MlflowException:
            return []
        return [v for v in raw.split(",") if v]

    def promote(self, version: str) -> str | None:
        """Make ``version`` the champion; returns the previous champion (kept for rollback)."""
        previous = self.aliases().get(CHAMPION)
        if previous == version:
            return previous
        self.set_alias(CHAMPION, version)
        history = self._history() or ([previous] if previous else [])
        self.client.set_registered_model_tag(self.name, HISTORY_TAG, ",".join([*history, version]))
        if previous:
            self.client.set_registered_model_alias(self.name, PREVIOUS, previous)
        if self.aliases().get(CHALLENGER) == version:
            self.clear_alias(CHALLENGER)  # a promoted challenger is no longer a challenger
        return previous

    def rollback(self) -> str:
        """Point ``champion`` back at the version that held it before; returns that version."""
        history = self._history()
        current = self.aliases().get(CHAMPION)
        if current and history and history[-1] == current:
            history = history[:-1]
        if not history:
            raise RegistryError(f"model {self.name!r} has no earlier champion to roll back to")
        target = history[-1]
        self.set_alias(CHAMPION, target)
        self.client.set_registered_model_tag(self.name, HISTORY_TAG, ",".join(history))
        if len(history) > 1:
            self.client.set_registered_model_alias(self.name, PREVIOUS, history[-2])
        else:
            self.clear_alias(PREVIOUS)
        return target

    # -------------------------------------------------------------------------------------------------- loading
    def bundle_dir(self, ref: str) -> Path:
        """Download (once) the bundle of a version/alias into the state dir cache and verify it."""
        info = self.get(ref)
        cache = self.settings.state_dir / "registry-cache" / self.name / info.version
        if not (cache / "MANIFEST.json").is_file():
            staging = cache.with_name(cache.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            self._mlflow.artifacts.download_artifacts(artifact_uri=f"{info.uri}", dst_path=str(staging))
            manifests = list(staging.rglob("MANIFEST.json"))
            if not manifests:
                raise RegistryError(f"version {info.version} of {self.name!r} has no bundle in its artifacts")
            shutil.rmtree(cache, ignore_errors=True)
            manifests[0].parent.rename(cache)
            shutil.rmtree(staging, ignore_errors=True)
        return cache

    def load(self, ref: str = CHAMPION) -> tuple[Bundle, ModelVersionInfo]:
        """Load and verify the bundle behind a version/alias. Tampered artifacts are refused, never served."""
        from .data import sha256_file

        info = self.get(ref)
        path = self.bundle_dir(info.version)
        try:
            bundle = load_bundle(path)
        except BundleError as exc:
            raise RegistryError(f"{info.uri} ({ref}) failed bundle verification and will not be loaded: {exc}") from exc
        expected = info.tags.get("bundle_sha256")
        if expected and sha256_file(path / "MANIFEST.json") != expected:
            raise RegistryError(f"{info.uri} ({ref}): the bundle's manifest differs from the one registered "
                                f"(bundle_sha256 tag {expected[:12]}...); refusing to load it")  # fmt: skip
        return bundle, info

    def describe(self) -> dict[str, Any]:
        versions = [{"version": v.version, "aliases": list(v.aliases), **v.tags} for v in self.versions()]
        return {"tracking_uri": self.uri, "model": self.name, "aliases": self.aliases(), "versions": versions}


def _onnx_tag(meta: dict[str, Any]) -> str:
    """The registry's one-line record of the bundle's ONNX check (what ``inference.Predictor`` will serve with)."""
    check = (meta.get("runtimes") or {}).get("onnxruntime")
    if not check:
        return "none: packaged without an ONNX export"
    if check.get("verified"):
        return (f"verified: max difference {check['max_abs_diff']:.1e}, argmax agreement "
                f"{check['argmax_agreement']:.4f} on {check['images']} held-out images")  # fmt: skip
    return f"not verified: {check.get('reason', 'unknown')}"[:500]
