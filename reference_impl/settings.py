"""One Settings object for the whole production loop.

Chapter: all sections. Every stage reads where its state lives (the *state dir*), which model registry to use
and which device to run on from here, so a lab, the CLI and the server agree without passing paths around.

Values come from, in increasing priority: the defaults below, environment variables (``MLOPS_*``,
``MLFLOW_TRACKING_URI``), and keyword arguments. Nothing here imports a heavy library.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the policy module (and pyyaml) load only when a stage first reads settings.policy
    from .policy import Policy

DEVICES = ("auto", "cpu", "cuda")
RUNTIMES = ("auto", "onnxruntime", "torch")  # see inference.Predictor


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message names the setting and the expected form."""


@dataclass(frozen=True)
class Settings:
    """Where the loop keeps its state and how it runs.

    ``state_dir`` holds generated data, bundles, the MLflow database, logs and reports. It defaults to
    ``./.mlops`` (git-ignored) so a trainee can delete it to start over.
    """

    state_dir: Path = field(default_factory=lambda: Path(".mlops"))
    registry_uri: str | None = None
    model_name: str = "weld-defect"
    device: str = "auto"
    runtime: str = "auto"  # ONNX Runtime when the bundle has a verified export, else torch
    seed: int = 0
    # The organisation's policy numbers, loaded on first use of ``.policy`` (see the property below).
    _policy: Policy | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "state_dir", Path(self.state_dir).expanduser().resolve())
        if self.device not in DEVICES:
            raise SettingsError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.runtime not in RUNTIMES:
            raise SettingsError(f"runtime (MLOPS_RUNTIME) must be one of {RUNTIMES}, got {self.runtime!r}")

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Build settings from ``MLOPS_STATE_DIR``, ``MLFLOW_TRACKING_URI``, ``MLOPS_DEVICE``, ``MLOPS_RUNTIME``,
        ``MLOPS_SEED``."""
        values: dict[str, object] = {}
        if "MLOPS_STATE_DIR" in os.environ:
            values["state_dir"] = Path(os.environ["MLOPS_STATE_DIR"])
        if os.environ.get("MLFLOW_TRACKING_URI"):
            values["registry_uri"] = os.environ["MLFLOW_TRACKING_URI"]
        if "MLOPS_DEVICE" in os.environ:
            values["device"] = os.environ["MLOPS_DEVICE"]
        if "MLOPS_RUNTIME" in os.environ:
            values["runtime"] = os.environ["MLOPS_RUNTIME"]
        if "MLOPS_SEED" in os.environ:
            raw = os.environ["MLOPS_SEED"]
            try:
                values["seed"] = int(raw)
            except ValueError:
                raise SettingsError(f"MLOPS_SEED must be an integer, got {raw!r}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    def with_(self, **changes: object) -> Settings:
        """A copy with some fields changed (settings are immutable so stages can't surprise each other)."""
        copy = replace(self, **changes)  # type: ignore[arg-type]
        object.__setattr__(copy, "_policy", self._policy)  # replace() resets init=False fields: keep the policy
        return copy

    @property
    def policy(self) -> Policy:
        """The organisation's policy: drift thresholds, alert routes, retraining cadence, promotion gate, SLOs.

        Read from the SME overlay on first use (``$MLOPS_OVERLAY``, else ``chapters/organization.yaml``, else
        built-in defaults; see ``reference_impl/policy.py``), so a malformed overlay stops only the stages that
        need the policy, each with a message naming the key to fix.
        """
        if self._policy is None:
            from .policy import load_policy

            object.__setattr__(self, "_policy", load_policy())  # frozen dataclass: cache without a public setter
        return self._policy  # type: ignore[return-value]

    def with_policy(self, policy: Policy) -> Settings:
        """A copy that uses ``policy`` instead of the overlay's, e.g. ``s.with_policy(s.policy.override({...}))``."""
        copy = replace(self)  # type: ignore[arg-type]
        object.__setattr__(copy, "_policy", policy)
        return copy

    # Derived locations: one place decides the layout of the state dir.
    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    @property
    def bundles_dir(self) -> Path:
        return self.state_dir / "bundles"

    @property
    def runs_dir(self) -> Path:
        return self.state_dir / "runs"

    @property
    def tracking_uri(self) -> str:
        """MLflow tracking/registry URI: an explicit one, else SQLite in the state dir.

        MLflow 3 refuses the old ``file:`` store for the registry, and without a URI it would write
        ``mlflow.db`` into whatever directory you happen to be in, so we always give it an absolute path.
        """
        if self.registry_uri:
            return self.registry_uri
        return f"sqlite:///{self.state_dir / 'mlflow.db'}"
