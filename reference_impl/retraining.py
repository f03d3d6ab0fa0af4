"""Retraining and safe rollout: when to retrain, on which data, whether the new model is better, how to ship it.

Chapter: "Retraining". Retraining is a controlled change to a production system, so every step here produces a
record a quality lead can read later:

1. *When to retrain* -> :func:`decide` turns the policy (``Settings.policy.retraining``) and the monitoring windows
   into a :class:`Decision` that explains itself ("retrain: drift on sharpness since window 14, 180 new labels");
   :func:`approve` records who signed it off, when and why.
2. *The labelled feedback loop* and *The golden test set* -> :func:`assemble_training_set` merges the original
   training data with the inspectors' labels, removes duplicates, keeps the provenance of every image, and
   EXCLUDES any image of the frozen golden test set (a leaked golden image makes every later score optimistic).
3. *The evaluation gate* -> :func:`evaluate_gate` compares challenger and champion (recent labelled data, per-class
   recall on the golden set) and :func:`record_gate` stores every number as registry tags. A failed gate changes
   no alias, and :func:`promote` refuses a version without a passing gate.
4. *Rolling out safely* -> :func:`shadow_report`, :func:`canary_report`, :func:`canary_fraction_check`,
   :func:`promote` (alias switch + server hot reload), :func:`watch` (automatic rollback when a post-promotion window
   breaches an SLO) and :func:`rollback` (by hand).
5. Every step appends an event to the append-only audit log ``<state_dir>/audit.jsonl`` (:class:`AuditLog`,
   :func:`read_audit`): "which model inspected this weld, and who approved it?" must have an answer.

Pure computations (:func:`decide`, :func:`evaluate_gate`, the reports) write to the audit log only when given one,
so a lab can call them freely; actions that change the world (approval, training, registration, gate tags,
promotion, rollback, watch) always write one. Heavy libraries (torch, mlflow, httpx, fastapi) are imported inside
the functions that need them.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .data import FolderDataset, WeldImages, decode_image, encode_png, sha256_bytes
from .policy import Policy, PromotionGate, RetrainingPolicy, ServingPolicy
from .settings import Settings

if TYPE_CHECKING:
    import httpx

    from .inference import Predictor
    from .packaging import Bundle
    from .registry import ModelVersionInfo, Registry
    from .training import TrainConfig, TrainResult

AUDIT_FILE = "audit.jsonl"
TRIGGERS = ("performance", "drift", "scheduled")  # in order of strength of evidence: the first that fires names it
AUTO_APPROVER = "auto (demo)"
DEFAULT_MIN_LABELLED = 20  # fewer labels than this in a window: its measured accuracy is too noisy to act on
# Recalls and accuracies are ratios of counts, and 0.90 - 0.88 is 0.020000000000000018 in binary floating point.
# Without a tolerance a challenger exactly at the policy's limit would fail for a rounding artefact.
EPS = 1e-9
GATE_PREFIX = "gate."


class RetrainingError(ValueError):
    """Input the retraining stage cannot use; the message says what was wrong and what to do."""


class UnknownLabelError(RetrainingError):
    """A feedback label is not one of the model's classes."""


class ApprovalError(RetrainingError):
    """An approval that cannot be given (nothing to approve, or the person may not approve)."""


class ApprovalRequiredError(ApprovalError):
    """The policy requires a recorded human approval and there is none."""


class RolloutError(RuntimeError):
    """A promotion or rollback could not be completed; the message says what state things were left in."""


class AuditError(RuntimeError):
    """The audit log is unreadable or was altered (its hash chain does not verify)."""


# ==============================================================================================================
# The audit log: append-only, one JSON object per line, hash-chained.
# ==============================================================================================================
def _jsonable(value: Any) -> Any:
    """Turn evidence into plain JSON: numpy scalars, paths, dataclasses, sets and tuples included."""
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value) if isinstance(value, set | frozenset) else value
        return [_jsonable(v) for v in items]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; "unknown" is what it means here
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class AuditEvent:
    """One step of the loop: what happened (``event``), when, who or what decided (``actor``), and the evidence."""

    seq: int
    ts: float
    at: str  # ISO 8601, UTC: readable by people and sortable
    event: str
    actor: str
    summary: str
    evidence: dict[str, Any]
    prev_sha256: str | None  # sha256 of the previous line: editing or deleting any earlier event breaks the chain

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AuditLog:
    """The append-only audit log in ``<state_dir>/audit.jsonl`` (chapter: "Retraining", *Rolling out safely*).

    Why a hash chain? "Append-only" is a promise; the chain makes breaking it visible. Each event stores the
    sha256 of the line before it, so :meth:`verify` detects an edited, removed or reordered event. Appends take
    an exclusive file lock (several processes, e.g. the demo and a trainee's notebook, may write) and are fsynced:
    an approval or a rollback is a record, not a log message that may be lost in a crash.
    """

    def __init__(self, where: Settings | str | Path | None = None, *, clock: Any = time.time) -> None:
        if where is None:
            where = Settings.from_env()
        self.path = where.state_dir / AUDIT_FILE if isinstance(where, Settings) else Path(where)
        self.clock = clock

    def append(self, event: str, *, actor: str, summary: str, evidence: Mapping[str, Any] | None = None) -> AuditEvent:
        """Append one event and return it. Earlier events are never touched."""
        if not re.fullmatch(r"[a-z][a-z0-9_]*", event or ""):
            raise AuditError(f"event names are lower-case words like 'promote'; got {event!r}")
        if not isinstance(actor, str) or not actor.strip():
            raise AuditError("every audit event needs an actor: who or what decided (e.g. 'quality-lead: Ana')")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as fh:
            _lock(fh)
            try:
                fh.seek(0)
                lines = fh.read().splitlines()
                prev = hashlib.sha256(lines[-1]).hexdigest() if lines else None
                ts = float(self.clock())
                record = AuditEvent(
                    len(lines) + 1, ts, _iso(ts), event, actor.strip(), summary, _jsonable(dict(evidence or {})), prev
                )
                fh.seek(0, os.SEEK_END)  # "a" mode appends anyway; the seek makes the intent explicit
                fh.write(json.dumps(record.to_dict(), sort_keys=True).encode() + b"\n")
                fh.flush()
                os.fsync(fh.fileno())
            finally:
                _unlock(fh)
        return record

    def read(self) -> list[AuditEvent]:
        """All events, oldest first. A line that is not a valid event is an error naming the line, never skipped."""
        if not self.path.is_file():
            return []
        events = []
        for n, line in enumerate(self.path.read_bytes().splitlines(), start=1):
            try:
                events.append(AuditEvent(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as exc:
                raise AuditError(f"{self.path}: line {n} is not an audit event ({exc})") from None
        return events

    def verify(self) -> int:
        """Check the hash chain and the sequence numbers; returns the number of events, raises AuditError if altered."""
        if not self.path.is_file():
            return 0
        prev = None
        lines = self.path.read_bytes().splitlines()
        for n, (line, event) in enumerate(zip(lines, self.read(), strict=True), start=1):
            if event.seq != n or event.prev_sha256 != prev:
                raise AuditError(
                    f"{self.path}: the chain breaks at line {n} ({event.event} at {event.at}): an "
                    "earlier event was edited, removed or reordered"
                )
            prev = hashlib.sha256(line).hexdigest()
        return len(lines)


def _lock(fh: Any) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: single-writer use only (the course runs on Linux and Binder)
        return
    fcntl.flock(fh.fileno(), fcntl.LOCK_EX)


def _unlock(fh: Any) -> None:
    try:
        import fcntl
    except ImportError:
        return
    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def read_audit(where: Settings | str | Path | None = None) -> list[AuditEvent]:
    """The audit log's events, oldest first (``where``: settings, a file, or the environment's state dir)."""
    return AuditLog(where).read()


def _audit_for(audit: AuditLog | None, registry: Registry | None = None) -> AuditLog:
    """Actions always leave a record: the given log, else the registry's state dir, else the environment's."""
    if audit is not None:
        return audit
    return AuditLog(registry.settings if registry is not None else None)


# ==============================================================================================================
# 1. When to retrain: monitoring windows -> a decision that explains itself
# ==============================================================================================================
@dataclass(frozen=True)
class Window:
    """What the retraining stage needs from one monitoring window.

    ``Window.of`` accepts the monitor's own records (``MonitoringStore.windows()`` dicts or ``WindowReport``
    objects) and flat dicts such as ``{"window_id": 14, "drifted": True, "moved": ["sharpness"]}``, which is how
    the labs write scenarios.
    """

    window_id: int
    drifted: bool = False
    moved: tuple[str, ...] = ()  # features whose distribution moved, most important first
    accuracy: float | None = None  # measured on inspector labels
    n_labelled: int = 0
    accuracy_estimated: float | None = None  # from calibrated confidence: available always, weaker evidence
    error_rate: float | None = None  # share of failed requests (from the server or the load client)
    p99_latency_ms: float | None = None

    @classmethod
    def of(cls, w: Any) -> Window:
        if isinstance(w, Window):
            return w
        if not isinstance(w, Mapping):
            if not hasattr(w, "window_id"):
                raise RetrainingError(f"a window must be a Window, a mapping or a WindowReport; got {type(w).__name__}")
            w = vars(w)
        if "window_id" not in w:
            raise RetrainingError(f"a window needs a 'window_id'; got keys {sorted(w)}")
        if isinstance(w.get("drift"), Mapping):  # the monitor's nested record
            drift, quality, ops = w["drift"], w.get("quality") or {}, w.get("ops") or {}
            flat = {
                "drifted": drift.get("drifted", False),
                "moved": drift.get("moved") or (),
                "accuracy": quality.get("accuracy"),
                "n_labelled": quality.get("n_labelled") or 0,
                "accuracy_estimated": quality.get("accuracy_estimated"),
                "error_rate": w.get("error_rate", ops.get("error_rate")),
                "p99_latency_ms": ops.get("p99_latency_ms"),
            }
        else:
            known = set(cls.__dataclass_fields__)
            unknown = sorted(set(w) - known)
            if unknown:  # a typo ("acuracy") would otherwise silently mean "no evidence"
                raise RetrainingError(f"window {w['window_id']}: unknown keys {unknown}; known: {sorted(known)}")
            flat = {k: v for k, v in w.items() if k != "window_id"}
        try:
            return cls(
                window_id=int(w["window_id"]),
                drifted=bool(flat.get("drifted", False)),
                moved=tuple(str(f) for f in flat.get("moved") or ()),
                accuracy=_opt_float(flat.get("accuracy")),
                n_labelled=int(flat.get("n_labelled") or 0),
                accuracy_estimated=_opt_float(flat.get("accuracy_estimated")),
                error_rate=_opt_float(flat.get("error_rate")),
                p99_latency_ms=_opt_float(flat.get("p99_latency_ms")),
            )
        except (TypeError, ValueError) as exc:
            raise RetrainingError(f"window {w.get('window_id')!r}: a value has the wrong type ({exc})") from None


def _opt_float(v: Any) -> float | None:
    if v is None:
        return None
    f = float(v)
    return None if math.isnan(f) else f


def _windows(windows: Iterable[Any]) -> list[Window]:
    return sorted((Window.of(w) for w in windows), key=lambda w: w.window_id)


def _timestamp(value: dt.datetime | float | int | None, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise RetrainingError(f"{name} must be a datetime or seconds since the epoch; got {value!r}")


def _days(x: float) -> str:
    return f"{x:.0f}" if abs(x - round(x)) < 0.05 else f"{x:.1f}"


def _retraining_policy(policy: Policy | RetrainingPolicy | None) -> RetrainingPolicy:
    if policy is None:
        return Settings.from_env().policy.retraining  # the SME overlay's numbers
    if isinstance(policy, Policy):
        return policy.retraining
    if isinstance(policy, RetrainingPolicy):
        return policy
    raise RetrainingError(f"policy must be a Policy or RetrainingPolicy; got {type(policy).__name__}")


@dataclass
class Decision:
    """The outcome of :func:`decide`: whether to retrain, which trigger fired, and why, in words and numbers."""

    retrain: bool
    trigger: str | None  # "performance" | "drift" | "scheduled" | None
    reasons: list[str]
    explanation: str
    needs_approval: bool = True
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


def decide(
    now: dt.datetime | float,
    last_trained_at: dt.datetime | float | None,
    windows: Iterable[Any],
    n_new_labels: int,
    *,
    policy: Policy | RetrainingPolicy | None = None,
    drift_windows: int | None = None,
    min_accuracy: float | None = None,
    min_labelled: int = DEFAULT_MIN_LABELLED,
    audit: AuditLog | None = None,
) -> Decision:
    """Decide whether to retrain now (chapter: "Retraining", *When to retrain*).

    Three triggers, most direct evidence first:

    - **performance**: the latest window's accuracy is below ``min_accuracy``. Measured accuracy (at least
      ``min_labelled`` inspector labels in the window) is used when it exists; otherwise the estimate from
      calibrated confidence, flagged as weaker evidence (a model can be confidently wrong under drift);
    - **drift**: drift detected in each of the last ``drift_windows`` consecutive windows. One drifted window is
      not enough: drift tests raise false alarms at a calibrated rate, and requiring k in a row debounces them;
    - **scheduled**: ``policy.cadence_days`` have passed since ``last_trained_at`` (``None``: never trained).

    The data condition applies to EVERY trigger: at least ``policy.min_new_labels`` new labelled images. Without
    new labels a retrain reproduces the old model on the old data; for a scheduled run it would be busywork, and
    for a drift or performance alarm the action is "collect labels", which the explanation says.
    """
    p = _retraining_policy(policy)
    # The policy's numbers unless the caller overrides them (labs ask "what if we waited for 3 windows?").
    drift_windows = p.drift_windows if drift_windows is None else drift_windows
    min_accuracy = p.min_accuracy if min_accuracy is None else min_accuracy
    now_ts = _timestamp(now, "now")
    last_ts = _timestamp(last_trained_at, "last_trained_at")
    if isinstance(n_new_labels, bool) or not isinstance(n_new_labels, int | np.integer) or n_new_labels < 0:
        raise RetrainingError(f"n_new_labels must be a whole number >= 0; got {n_new_labels!r}")
    if drift_windows < 1:
        raise RetrainingError(f"drift_windows must be at least 1; got {drift_windows}")
    if not 0 < min_accuracy <= 1:
        raise RetrainingError(f"min_accuracy must be in (0, 1]; got {min_accuracy}")
    ws = _windows(windows)
    n_new_labels = int(n_new_labels)
    fired: dict[str, str] = {}  # trigger -> its phrase in the explanation
    quiet: list[str] = []  # why each trigger did not fire

    # Scheduled.
    age_days = None if last_ts is None else (now_ts - last_ts) / 86400  # type: ignore[operator]
    if age_days is None:
        fired["scheduled"] = "scheduled, no previous training recorded"
    elif age_days >= p.cadence_days:
        fired["scheduled"] = f"scheduled, {_days(age_days)} days since the last training (cadence {p.cadence_days})"
    else:
        quiet.append(f"schedule not due ({_days(age_days)} of {p.cadence_days} days)")

    # Drift: the current unbroken run of drifted windows, and since when each moved feature has been moving.
    run: list[Window] = []
    for w in reversed(ws):
        if not w.drifted:
            break
        run.insert(0, w)
    since: dict[str, int] = {}
    if run:
        for f in run[-1].moved:
            first = run[-1].window_id
            for w in reversed(run):
                if f not in w.moved:
                    break
                first = w.window_id
            since[f] = first
    if len(run) >= drift_windows:
        fired["drift"] = _drift_phrase(since, run[0].window_id)
    elif run:
        quiet.append(
            f"drift in {len(run)} window(s) since window {run[0].window_id}, not yet the "
            f"{drift_windows} consecutive windows the rule needs"
        )
    elif ws:
        quiet.append(f"no drift in the last window (window {ws[-1].window_id})")
    else:
        quiet.append("no monitoring windows yet")

    # Performance: about *now*, so only the latest window counts.
    accuracy: dict[str, Any] | None = None
    if ws:
        last = ws[-1]
        if last.accuracy is not None and last.n_labelled >= min_labelled:
            accuracy = {"value": last.accuracy, "kind": "measured", "window": last.window_id, "n": last.n_labelled}
        elif last.accuracy_estimated is not None:
            accuracy = {"value": last.accuracy_estimated, "kind": "estimated", "window": last.window_id}
    if accuracy is None:
        quiet.append("no accuracy evidence in the last window")
    elif accuracy["value"] < min_accuracy:
        if accuracy["kind"] == "measured":
            fired["performance"] = (
                f"accuracy {accuracy['value']:.3f} measured on {accuracy['n']} labels in window "
                f"{accuracy['window']} is below {min_accuracy:.3f}"
            )
        else:
            fired["performance"] = (
                f"estimated accuracy {accuracy['value']:.3f} in window {accuracy['window']} is "
                f"below {min_accuracy:.3f} (an estimate from calibrated confidence: weaker "
                "evidence, confirm with inspector labels)"
            )
    else:
        how = f"measured on {accuracy['n']} labels" if accuracy["kind"] == "measured" else "estimated"
        quiet.append(f"accuracy {accuracy['value']:.3f} ({how}) not below {min_accuracy:.3f}")

    enough = n_new_labels >= p.min_new_labels
    labels_phrase = f"{n_new_labels} new labels"
    order = [t for t in TRIGGERS if t in fired]
    reasons = [fired[t] for t in order]
    if order and enough:
        trigger: str | None = order[0]
        explanation = f"retrain: {fired[order[0]]}, {labels_phrase}"
        if len(order) > 1:
            explanation += "; also " + "; ".join(fired[t] for t in order[1:])
    elif order:
        trigger = None
        reasons.append(f"only {labels_phrase}, the policy needs at least {p.min_new_labels}")
        explanation = (
            f"no retrain yet: {'; '.join(fired[t] for t in order)}, but only {labels_phrase} "
            f"(policy minimum {p.min_new_labels}): collect more labels first"
        )
    else:
        trigger = None
        reasons = quiet
        explanation = f"no retrain: {', '.join(quiet)}; {labels_phrase}"
    decision = Decision(
        retrain=trigger is not None,
        trigger=trigger,
        reasons=reasons,
        explanation=explanation,
        needs_approval=p.approval_required,
        evidence={
            "now": _iso(now_ts),  # type: ignore[arg-type]
            "last_trained_at": None if last_ts is None else _iso(last_ts),
            "days_since_training": None if age_days is None else round(age_days, 2),
            "fired": order,
            "n_new_labels": n_new_labels,
            "drift_run_since": run[0].window_id if run else None,
            "drifted_features_since": since,
            "accuracy": accuracy,
            "windows": [w.window_id for w in ws],
            "rules": {
                "cadence_days": p.cadence_days,
                "min_new_labels": p.min_new_labels,
                "drift_windows": drift_windows,
                "min_accuracy": min_accuracy,
                "min_labelled": min_labelled,
            },
        },
    )
    if audit is not None:
        audit.append("decision", actor="retraining policy", summary=explanation, evidence=decision.to_dict())
    return decision


def _drift_phrase(since: dict[str, int], run_start: int) -> str:
    """'drift on sharpness since window 14' (features grouped by the window since which they have moved)."""
    if not since:
        return f"drift since window {run_start}"
    groups: dict[int, list[str]] = {}
    for f, first in list(since.items())[:4]:  # the most important few; all are in the evidence
        groups.setdefault(first, []).append(f)
    parts = [f"{', '.join(fs)} since window {w}" for w, fs in sorted(groups.items())]
    return "drift on " + " and ".join(parts)


# ----------------------------------------------------------------------------------------------------- approval
@dataclass(frozen=True)
class Approval:
    """A recorded sign-off: who, when (seconds since the epoch), why; ``mode`` is human, auto or not_required."""

    approved_by: str
    at: float
    why: str
    role: str | None = None
    mode: str = "human"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "at_iso": _iso(self.at)}


def approve(
    decision: Decision,
    approved_by: str | None = None,
    why: str | None = None,
    *,
    role: str | None = None,
    mode: str = "human",
    policy: Policy | RetrainingPolicy | None = None,
    at: float | None = None,
    audit: AuditLog | None = None,
) -> Approval:
    """Record the sign-off a retraining decision needs (chapter: "Retraining", *Rolling out safely*).

    - ``mode="auto"``: the demo's automatic approval, recorded as approver ``"auto (demo)"`` so nobody later
      mistakes it for a person's decision;
    - policy ``approval_required``: a person (``approved_by``), acting in one of the policy's ``approvers`` roles
      (``role``, or ``approved_by`` itself when it is a role name), must give a reason (``why``);
    - approval not required and nobody named: recorded as ``"not required by policy"``.

    Always written to the audit log (``audit``, else the state dir's).
    """
    p = _retraining_policy(policy)
    if not decision.retrain:
        raise ApprovalError(f"nothing to approve: the decision was {decision.explanation!r}")
    at = time.time() if at is None else float(at)
    if mode == "auto":
        approval = Approval(
            AUTO_APPROVER, at, why or f"automatic approval (demo mode) of: {decision.explanation}", None, "auto"
        )
    elif mode != "human":
        raise ApprovalError(f"mode must be 'human' or 'auto'; got {mode!r}")
    elif approved_by is None and not p.approval_required:
        approval = Approval(
            "not required by policy", at, why or "policy.retraining.approval_required is false", None, "not_required"
        )
    else:
        who = (approved_by or "").strip()
        reason = (why or "").strip()
        if not who or not reason:
            roles = ", ".join(p.approvers) or "(none named)"
            raise ApprovalRequiredError(
                "this retraining needs a recorded human approval: who approves (approved_by=...), in which role "
                f"(role=..., one of: {roles}) and why (why=...); only the demo may use mode='auto'"
            )
        acting = role or (who if who in p.approvers else None)
        if p.approval_required and acting not in p.approvers:
            raise ApprovalError(
                f"{who!r} (role {acting!r}) may not approve retraining; the policy's approvers are: "
                f"{', '.join(p.approvers)}"
            )
        approval = Approval(who, at, reason, acting, "human")
    _audit_for(audit).append(
        "approval",
        actor=approval.approved_by if approval.role is None else f"{approval.role}: {approval.approved_by}",
        summary=f"approved ({approval.mode}): {decision.explanation}; why: {approval.why}",
        evidence={"approval": approval.to_dict(), "decision": decision.to_dict()},
    )
    return approval


def check_approval(approval: Approval | None, *, policy: Policy | RetrainingPolicy | None = None) -> None:
    """Raise :class:`ApprovalRequiredError` unless ``approval`` satisfies the policy (human, or the demo's auto)."""
    p = _retraining_policy(policy)
    if not p.approval_required:
        return
    if approval is None or approval.mode not in ("human", "auto"):
        raise ApprovalRequiredError(
            f"the policy requires approval by one of {', '.join(p.approvers)} before a "
            "challenger is trained: call approve(decision, approved_by=..., role=..., why=...)"
        )
    if approval.mode == "human" and approval.role not in p.approvers:
        raise ApprovalError(
            f"approval by {approval.approved_by!r} (role {approval.role!r}) does not satisfy the "
            f"policy's approvers: {', '.join(p.approvers)}"
        )


# ==============================================================================================================
# 2. Retraining data: original + feedback, de-duplicated, with provenance, golden set excluded
# ==============================================================================================================
def pixel_sha256(image: np.ndarray) -> str:
    """Hash of the decoded pixels (shape, dtype and values): the same image re-encoded (another PNG compressor, a
    lossless TIFF) gets the same pixel hash although its file bytes, and so its byte hash, differ."""
    a = np.ascontiguousarray(image)
    return sha256_bytes(f"pixels:{a.dtype.str}:{a.shape}:".encode() + a.tobytes())


def golden_hashes(golden: WeldImages | FolderDataset | Sequence[np.ndarray]) -> set[str]:
    """The identities of a golden test set to keep out of training: the sha256 of each image's PNG bytes (what the
    server logs for a PNG upload of it) and of its pixels (catches re-encoded copies)."""
    images = golden.images if isinstance(golden, WeldImages | FolderDataset) else golden
    out: set[str] = set()
    for img in images:
        out.add(sha256_bytes(encode_png(img)))
        out.add(pixel_sha256(img))
    return out


@dataclass(frozen=True)
class Provenance:
    """Where one training image came from (chapter: *The labelled feedback loop*)."""

    sha256: str  # of the encoded image bytes: the id the prediction log and review queue use
    source: str  # "original" | "feedback"
    label: str
    labelled_by: str | None  # the inspector; None for the original set (its labelling is in its manifest)
    labelled_at: float | None
    origin: str  # "generated seed=0 condition=baseline index=17", a file path, or "review item 12 (low_confidence)"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RetrainingSet:
    """The challenger's training data with the provenance of every image and a report of what was left out."""

    images: list[np.ndarray]
    labels: np.ndarray
    classes: tuple[str, ...]
    provenance: list[Provenance]
    excluded_golden: list[dict[str, Any]] = field(default_factory=list)  # golden images found: never trained on
    duplicates: list[dict[str, Any]] = field(default_factory=list)  # dropped copies (``same_label`` False = conflict)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # feedback whose image could not be used

    def __len__(self) -> int:
        return len(self.provenance)

    @property
    def conflicts(self) -> list[dict[str, Any]]:
        """Duplicates whose labels disagree: a question for the quality lead, reported rather than settled silently."""
        return [d for d in self.duplicates if not d["same_label"]]

    @property
    def sha256(self) -> str:
        """Identity of the set: same images with the same labels -> same hash, whatever the order."""
        rows = sorted(f"{p.sha256}:{p.label}" for p in self.provenance)
        return sha256_bytes("\n".join(rows).encode())

    def summary(self) -> dict[str, Any]:
        by_source: dict[str, int] = {}
        by_class: dict[str, int] = dict.fromkeys(self.classes, 0)
        labellers: dict[str, int] = {}
        for p in self.provenance:
            by_source[p.source] = by_source.get(p.source, 0) + 1
            by_class[p.label] += 1
            if p.labelled_by:
                labellers[p.labelled_by] = labellers.get(p.labelled_by, 0) + 1
        return {
            "n": len(self),
            "sha256": self.sha256,
            "by_source": by_source,
            "by_class": by_class,
            "labelled_by": labellers,
            "excluded_golden": len(self.excluded_golden),
            "duplicates": len(self.duplicates),
            "conflicts": len(self.conflicts),
            "skipped": len(self.skipped),
        }

    def as_training_data(self) -> WeldImages | FolderDataset:
        """What :func:`training.train_model` takes: a stacked ``WeldImages`` when all images share size and bit depth
        (generated data), else a ``FolderDataset`` (real radiographs of mixed sizes are resized by preprocessing)."""
        if not self.images:
            raise RetrainingError("the retraining set is empty: nothing to train on")
        first = self.images[0]
        if all(im.shape == first.shape and im.dtype == first.dtype for im in self.images):
            return WeldImages(np.stack(self.images), self.labels.copy(), self.classes)
        return FolderDataset(
            [Path(p.origin) for p in self.provenance], list(self.images), self.labels.copy(), self.classes
        )

    def write_manifest(self, path: str | Path) -> Path:
        """One CSV row per training image (sha256, source, label, who, when, origin): which data trained the model."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(Provenance.__dataclass_fields__))
            writer.writeheader()
            writer.writerows(p.to_dict() for p in self.provenance)
        return path


_FEEDBACK_KEYS = ("input_sha256", "image_path", "label", "labelled_by", "labelled_at")


def _original_items(original: Any, classes: tuple[str, ...]) -> Iterable[tuple[np.ndarray, str, str, str]]:
    """(pixels, label, byte sha256, origin) for each image of the original training data."""
    from .data import load_folder, sha256_file

    if isinstance(original, str | Path):
        original = load_folder(original, classes)
    if isinstance(original, WeldImages):
        unknown = sorted({original.classes[int(k)] for k in np.unique(original.labels)} - set(classes))
        if unknown:
            raise UnknownLabelError(f"the original data has classes {unknown} that are not among {list(classes)}")
        indices = original.indices if original.indices is not None else np.arange(len(original))
        cond = original.condition
        for img, k, index in zip(original.images, original.labels, indices, strict=True):
            origin = f"generated seed={original.seed} condition={cond.name} severity={cond.severity:g} index={index}"
            # The PNG bytes are what a client uploads, so this is the hash the prediction log and review queue use.
            yield img, original.classes[int(k)], sha256_bytes(encode_png(img)), origin
    elif isinstance(original, FolderDataset):
        for path, img, k in zip(original.paths, original.images, original.labels, strict=True):
            label = original.classes[int(k)]
            if label not in classes:
                raise UnknownLabelError(f"{path}: class {label!r} is not among {list(classes)}")
            yield img, label, sha256_file(path), str(path)
    else:
        raise RetrainingError(
            f"original must be WeldImages, a FolderDataset or a folder path; got {type(original).__name__}"
        )


def assemble_training_set(
    original: WeldImages | FolderDataset | str | Path,
    feedback_rows: Iterable[Mapping[str, Any]],
    golden_hashes: Iterable[str],
    *,
    classes: Sequence[str],
    audit: AuditLog | None = None,
) -> RetrainingSet:
    """The challenger's training set (chapter: "Retraining", *The labelled feedback loop*, *The golden test set*).

    ``original``: the champion's training data. ``feedback_rows``: inspector labels as returned by
    ``ReviewQueue.feedback()`` (``input_sha256``, ``image_path``, ``label``, ``labelled_by``, ``labelled_at``);
    their images are loaded from ``image_path``. ``golden_hashes``: identities of the frozen golden test set
    (:func:`golden_hashes` gives byte and pixel hashes).

    - Any image of the golden set is EXCLUDED, whether it comes from the original data or from feedback, and listed
      in ``excluded_golden``: once a golden image is trained on, every later score on the set is optimistic.
    - Duplicates (same byte hash or same pixels) are dropped; the first occurrence is kept: the original data
      first, then feedback in labelling order. A duplicate with a different label is kept in the report as a
      conflict for the quality lead, not settled silently.
    - A feedback label that is not one of ``classes`` is an error (all bad rows named at once): a typo must not
      become a class, nor be dropped unnoticed.
    - Feedback whose image is missing, unreadable or does not match its recorded hash is listed in ``skipped``.
    """
    classes = tuple(classes)
    if not classes or len(set(classes)) != len(classes):
        raise RetrainingError(f"classes must be a non-empty list of distinct class names; got {list(classes)}")
    golden = {str(h).lower() for h in golden_hashes}
    rows = [dict(r) for r in feedback_rows]
    problems = []
    for i, r in enumerate(rows):
        missing = [k for k in _FEEDBACK_KEYS if k not in r]
        if missing:
            problems.append(f"row {i}: missing {missing}")
        elif r["label"] not in classes:
            problems.append(
                f"row {i} (review item {r.get('item_id', '?')}, by {r['labelled_by']}): label {r['label']!r}"
            )
    if problems:
        raise UnknownLabelError(
            f"{len(problems)} feedback row(s) cannot be used; labels must be one of "
            f"{', '.join(classes)}:\n  " + "\n  ".join(problems)
        )

    images: list[np.ndarray] = []
    provenance: list[Provenance] = []
    seen: dict[str, Provenance] = {}  # byte or pixel hash -> the item kept
    excluded: list[dict[str, Any]] = []
    duplicates: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []

    def add(img: np.ndarray, prov: Provenance) -> None:
        pix = pixel_sha256(img)
        if prov.sha256 in golden or pix in golden:
            excluded.append({**prov.to_dict(), "matched": "bytes" if prov.sha256 in golden else "pixels"})
            return
        kept = seen.get(prov.sha256) or seen.get(pix)
        if kept is not None:
            duplicates.append(
                {
                    **prov.to_dict(),
                    "kept": kept.origin,
                    "kept_label": kept.label,
                    "same_label": kept.label == prov.label,
                }
            )
            return
        seen[prov.sha256] = seen[pix] = prov
        images.append(img)
        provenance.append(prov)

    for img, label, sha, origin in _original_items(original, classes):
        add(img, Provenance(sha, "original", label, None, None, origin))

    for r in sorted(rows, key=lambda r: (r["labelled_at"] is None, r["labelled_at"] or 0.0)):
        sha = str(r["input_sha256"]).lower()
        where = f"review item {r['item_id']}" if r.get("item_id") is not None else "feedback"
        origin = f"{where} ({r['reason']})" if r.get("reason") else where
        prov = Provenance(sha, "feedback", r["label"], r["labelled_by"], r["labelled_at"], origin)
        if sha in golden:  # no need to open the file to know it must stay out
            excluded.append({**prov.to_dict(), "matched": "bytes"})
            continue
        if not r["image_path"]:
            skipped.append({**prov.to_dict(), "why": "the server did not store this image (image_path is empty)"})
            continue
        try:
            payload = Path(r["image_path"]).read_bytes()
        except OSError as exc:
            skipped.append({**prov.to_dict(), "why": f"cannot read {r['image_path']}: {exc.strerror or exc}"})
            continue
        if sha256_bytes(payload) != sha:  # content-addressed storage: a mismatch means a damaged or wrong file
            skipped.append({**prov.to_dict(), "why": f"{r['image_path']} does not match its recorded sha256"})
            continue
        try:
            img = decode_image(payload, name=str(r["image_path"]))
        except ValueError as exc:  # DatasetError
            skipped.append({**prov.to_dict(), "why": str(exc)})
            continue
        add(img, prov)

    result = RetrainingSet(
        images,
        np.array([classes.index(p.label) for p in provenance], dtype=np.int64),
        classes,
        provenance,
        excluded,
        duplicates,
        skipped,
    )
    if audit is not None:
        s = result.summary()
        audit.append(
            "training_set",
            actor="assemble_training_set",
            summary=f"{s['n']} images ({s['by_source']}); {s['excluded_golden']} golden image(s) excluded, "
            f"{s['duplicates']} duplicate(s) dropped ({s['conflicts']} with conflicting labels), "
            f"{s['skipped']} feedback item(s) skipped",
            evidence={"summary": s, "excluded_golden": excluded, "conflicts": result.conflicts, "skipped": skipped},
        )
    return result


# ----------------------------------------------------------------------------------------- training a challenger
def train_challenger(
    training_set: RetrainingSet,
    *,
    approval: Approval | None,
    policy: Policy | RetrainingPolicy | None = None,
    champion: Bundle | TrainResult | None = None,
    config: TrainConfig | None = None,
    audit: AuditLog | None = None,
) -> TrainResult:
    """Train a challenger on ``training_set`` with the same code that trained the champion (chapter: "Retraining").

    ``champion`` given (a loaded bundle or a training result): fine-tune it with :func:`training.fine_tune_config`
    (or ``config``): the challenger starts from the champion's weights, keeps its preprocessing (the weights were
    trained on exactly that normalisation), and is distilled towards the champion's answers on the images of the
    original data (``source == "original"``) so it learns the new condition without forgetting the old one.
    Without ``champion``: trained from scratch with ``config`` (default ``TrainConfig()``).

    Refuses to start without the approval the policy requires: training is cheap, but a challenger nobody signed
    off tends to get promoted anyway.
    """
    from .training import TrainConfig, fine_tune_config, train_model

    check_approval(approval, policy=policy)
    if champion is None:
        result = train_model(training_set.as_training_data(), config or TrainConfig())
    else:
        result = train_model(
            training_set.as_training_data(),
            config or fine_tune_config(),
            init_state=champion.model.state_dict(),
            preprocess=champion.preprocess,
            rehearsal=[p.source == "original" for p in training_set.provenance],
        )
    m = result.metrics
    _audit_for(audit).append(
        "training",
        actor="train_challenger",
        summary=f"challenger {'fine-tuned' if champion is not None else 'trained'} on {len(training_set)} images in "
        f"{result.seconds:.1f} s: held-out accuracy {m['accuracy']:.3f} on {m['n']} images",
        evidence={
            "training_set": training_set.summary(),
            "config": asdict(result.config),
            "metrics": {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "n": m["n"]},
            "approval": approval.to_dict() if approval else None,
            "fine_tuned": champion is not None,
        },
    )
    return result


def register_challenger(
    registry: Registry,
    result: TrainResult,
    training_set: RetrainingSet,
    *,
    decision: Decision | None = None,
    approval: Approval | None = None,
    audit: AuditLog | None = None,
    n_reference: int = 800,
    n_null: int = 1600,
    condition: str = "baseline",
    severity: float = 0.0,
) -> ModelVersionInfo:
    """Package the challenger (with its monitoring profile) and register it under the ``challenger`` alias.

    ``condition`` / ``severity``: the line condition the challenger is meant for, from which its monitoring
    reference is drawn. A challenger retrained for a new camera must be monitored against new-camera images; with
    the old baseline reference, the recovered line would look "drifted" forever after the promotion.
    The bundle's training-data manifest is the retraining set's provenance CSV, so the registry version says
    exactly which images, from where and labelled by whom, trained it. The champion alias is not touched.
    """
    from .monitoring.profile import package_with_profile  # lazy: it pulls in the model and monitoring code
    from .registry import CHALLENGER

    settings = registry.settings
    stamp = time.strftime("%Y%m%d-%H%M%S")
    bundle_dir = settings.bundles_dir / f"{settings.model_name}-challenger-{stamp}"
    n = 1
    while bundle_dir.exists():  # bundles are immutable: never write into an existing one
        bundle_dir = settings.bundles_dir / f"{settings.model_name}-challenger-{stamp}-{n}"
        n += 1
    manifest = training_set.write_manifest(settings.runs_dir / bundle_dir.name / "retraining-manifest.csv")
    package_with_profile(
        result,
        bundle_dir,
        seed=settings.seed,
        model_name=settings.model_name,
        model_version=f"challenger-{stamp}",
        data_manifest=manifest,
        n_reference=n_reference,
        n_null=n_null,
        ood_false_flag_rate=settings.policy.drift.ood_false_flag_rate,
        condition=condition,
        severity=severity,
    )
    info = registry.register_bundle(bundle_dir, alias=CHALLENGER)
    summary = training_set.summary()
    tags = {
        "retraining.training_set_sha256": training_set.sha256,
        "retraining.n_images": str(summary["n"]),
        "retraining.n_feedback": str(summary["by_source"].get("feedback", 0)),
        "retraining.n_excluded_golden": str(summary["excluded_golden"]),
        "retraining.trigger": (decision.trigger or "none") if decision else "unknown",
        "retraining.approved_by": approval.approved_by if approval else "none",
    }
    for key, value in tags.items():
        registry.client.set_model_version_tag(registry.name, info.version, key, value)
    _audit_for(audit, registry).append(
        "challenger_registered",
        actor="register_challenger",
        summary=f"challenger registered as version {info.version} of {registry.name!r} (alias {CHALLENGER})",
        evidence={
            "version": info.version,
            "bundle": bundle_dir,
            "manifest": manifest,
            "tags": tags,
            "bundle_sha256": info.tags.get("bundle_sha256"),
        },
    )
    return registry.get(info.version)


# ==============================================================================================================
# 3. The evaluation gate
# ==============================================================================================================
def measure(
    model: Bundle | Predictor | str | Path,
    images: np.ndarray | Sequence[np.ndarray],
    labels: Sequence[int] | Sequence[str] | np.ndarray,
    classes: Sequence[str],
) -> dict[str, Any]:
    """Accuracy and per-class recall of ``model`` on labelled images, matched by class NAME.

    Names, not indices: two model versions need not list their classes in the same order, and comparing index 2
    of one with index 2 of the other would compare different defects.
    """
    from .inference import Predictor
    from .packaging import Bundle, load_bundle
    from .training import classification_metrics

    if isinstance(model, str | Path):
        model = load_bundle(model)
    predictor = Predictor(model, device="cpu") if isinstance(model, Bundle) else model
    classes = tuple(classes)
    unknown = sorted(set(predictor.classes) - set(classes))
    if unknown:
        raise RetrainingError(f"the model predicts classes {unknown} that are not among {list(classes)}")
    truth = [classes.index(y) if isinstance(y, str) else int(y) for y in labels]
    predicted = [classes.index(name) for name in predictor.predict(images).labels]
    return classification_metrics(np.asarray(truth), np.asarray(predicted), classes)


@dataclass(frozen=True)
class GateCheck:
    """One rule of the gate applied to one number."""

    name: str  # "recent_accuracy_gain" or "golden_recall_drop.<class>"
    value: float | None
    limit: float
    passed: bool
    detail: str


@dataclass
class GateResult:
    """Every number the gate looked at, each rule's outcome, and the verdict (chapter: *The evaluation gate*)."""

    passed: bool
    checks: list[GateCheck]
    numbers: dict[str, Any]  # golden accuracy / recall and recent accuracy, champion and challenger
    policy: dict[str, float]
    reasons: list[str]  # the failed rules, in words
    explanation: str
    evaluated_at: float = field(default_factory=time.time)

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "fail"

    def to_dict(self) -> dict[str, Any]:
        return _jsonable({**asdict(self), "verdict": self.verdict})

    def to_tags(self) -> dict[str, str]:
        """Flat MLflow tags: ``gate.verdict``, ``gate.golden.recall.crack.champion``, ... (all values strings)."""
        tags = {
            "gate.verdict": self.verdict,
            "gate.evaluated_at": _iso(self.evaluated_at),
            "gate.reasons": "; ".join(self.reasons)[:4000] or "all rules passed",  # MLflow caps tag values
        }
        for key, value in self.policy.items():
            tags[f"gate.policy.{key}"] = _num(value)
        n = self.numbers
        for who in ("champion", "challenger"):
            tags[f"gate.recent.accuracy.{who}"] = _num(n["recent"][who]["accuracy"])
            tags[f"gate.recent.n.{who}"] = _num(n["recent"][who]["n"])
            tags[f"gate.golden.accuracy.{who}"] = _num(n["golden"][who]["accuracy"])
            tags[f"gate.golden.n.{who}"] = _num(n["golden"][who]["n"])
        tags["gate.recent.accuracy.gain"] = _num(n["recent"]["gain"])
        for cls, r in n["golden"]["recall"].items():
            safe = re.sub(r"[^A-Za-z0-9_\-. /]", "_", cls)
            for key in ("champion", "challenger", "drop"):
                tags[f"gate.golden.recall.{safe}.{key}"] = _num(r[key])
        return tags


def _num(v: Any) -> str:
    if v is None:
        return "n/a"
    return str(round(float(v), 6)) if isinstance(v, float) else str(v)


def _gate_policy(policy: Policy | PromotionGate | None) -> PromotionGate:
    if policy is None:
        return Settings.from_env().policy.promotion_gate
    if isinstance(policy, Policy):
        return policy.promotion_gate
    if isinstance(policy, PromotionGate):
        return policy
    raise RetrainingError(f"policy must be a Policy or PromotionGate; got {type(policy).__name__}")


def _metrics(m: Any, name: str, *, per_class: bool) -> tuple[float, int | None, dict[str, tuple[float, int | None]]]:
    """(accuracy, n, {class: (recall, support)}) from ``classification_metrics`` or ``{"accuracy", "recall"}``."""
    if not isinstance(m, Mapping) or not isinstance(m.get("accuracy"), int | float) or isinstance(m["accuracy"], bool):
        shown = repr(m)[:200]
        raise RetrainingError(
            f"{name} must be metrics with an 'accuracy' number (e.g. from measure() or "
            f"training.classification_metrics); got {shown}"
        )
    recalls: dict[str, tuple[float, int | None]] = {}
    if per_class:
        if isinstance(m.get("per_class"), Mapping):
            for cls, v in m["per_class"].items():
                recalls[cls] = (float(v["recall"]), None if v.get("support") is None else int(v["support"]))
        elif isinstance(m.get("recall"), Mapping):
            recalls = {cls: (float(r), None) for cls, r in m["recall"].items()}
        else:
            raise RetrainingError(
                f"{name} needs per-class recall: 'per_class' (from classification_metrics) or 'recall' {{class: value}}"
            )
    n = m.get("n", m.get("n_labelled"))
    return float(m["accuracy"]), None if n is None else int(n), recalls


def evaluate_gate(
    champion_metrics: Mapping[str, Any],
    challenger_metrics: Mapping[str, Any],
    *,
    recent_champion: Mapping[str, Any],
    recent_challenger: Mapping[str, Any],
    policy: Policy | PromotionGate | None = None,
    audit: AuditLog | None = None,
) -> GateResult:
    """The evaluation gate (chapter: "Retraining", *The evaluation gate*).

    ``champion_metrics`` / ``challenger_metrics``: both models on the frozen golden test set; ``recent_*``: both on
    recent inspector-labelled data (the conditions the line has now). Metrics come from :func:`measure` or
    ``training.classification_metrics`` (a plain ``{"accuracy": .., "recall": {class: ..}}`` works too).

    Rules, from the policy's ``promotion_gate``:

    1. on recent data, challenger accuracy - champion accuracy >= ``min_accuracy_gain`` (equal passes only when the
       minimum gain is 0);
    2. on the golden set, for EVERY class the champion was measured on: champion recall - challenger recall <=
       ``max_class_recall_drop`` (exactly at the limit passes). Overall accuracy can rise while crack recall falls;
       a missed crack is the most expensive error on the line, so no class may pay for the average.

    A class with no golden images cannot be vouched for and fails the gate. Pure: changes nothing.
    """
    g = _gate_policy(policy)
    c_acc, c_n, c_rec = _metrics(champion_metrics, "champion_metrics", per_class=True)
    h_acc, h_n, h_rec = _metrics(challenger_metrics, "challenger_metrics", per_class=True)
    rc_acc, rc_n, _ = _metrics(recent_champion, "recent_champion", per_class=False)
    rh_acc, rh_n, _ = _metrics(recent_challenger, "recent_challenger", per_class=False)

    checks = []
    gain = rh_acc - rc_acc
    ok = gain >= g.min_accuracy_gain - EPS
    checks.append(
        GateCheck(
            "recent_accuracy_gain",
            gain,
            g.min_accuracy_gain,
            ok,
            f"recent accuracy {rc_acc:.4f} -> {rh_acc:.4f}: gain {gain:+.4f} "
            f"{'>=' if ok else '<'} required {g.min_accuracy_gain:+.4f}",
        )
    )
    recall_numbers: dict[str, dict[str, Any]] = {}
    for cls, (champ_r, support) in c_rec.items():
        if support == 0:
            checks.append(
                GateCheck(
                    f"golden_recall_drop.{cls}",
                    None,
                    g.max_class_recall_drop,
                    False,
                    f"{cls}: no images of this class in the golden set, so its recall cannot be "
                    "checked; add some to the golden set (as a new version)",
                )
            )
            recall_numbers[cls] = {"champion": None, "challenger": h_rec.get(cls, (None,))[0], "drop": None}
            continue
        if cls not in h_rec:
            checks.append(
                GateCheck(
                    f"golden_recall_drop.{cls}",
                    None,
                    g.max_class_recall_drop,
                    False,
                    f"{cls}: the challenger has no recall for this class (a class was dropped?)",
                )
            )
            recall_numbers[cls] = {"champion": champ_r, "challenger": None, "drop": None}
            continue
        chall_r = h_rec[cls][0]
        drop = champ_r - chall_r
        ok = drop <= g.max_class_recall_drop + EPS
        checks.append(
            GateCheck(
                f"golden_recall_drop.{cls}",
                drop,
                g.max_class_recall_drop,
                ok,
                f"{cls}: golden recall {champ_r:.4f} -> {chall_r:.4f}: drop {drop:+.4f} "
                f"{'<=' if ok else '>'} allowed {g.max_class_recall_drop:.4f}",
            )
        )
        recall_numbers[cls] = {"champion": champ_r, "challenger": chall_r, "drop": drop}
    for cls in h_rec.keys() - c_rec.keys():  # a class only the challenger knows: nothing to regress from
        recall_numbers[cls] = {"champion": None, "challenger": h_rec[cls][0], "drop": None}

    failed = [c.detail for c in checks if not c.passed]
    passed = not failed
    if passed:
        worst = max(
            (c for c in checks if c.name.startswith("golden") and c.value is not None),
            key=lambda c: c.value,
            default=None,
        )  # type: ignore[arg-type, return-value]
        explanation = f"PASS: recent accuracy {rc_acc:.4f} -> {rh_acc:.4f} (gain {gain:+.4f}); " + (
            f"largest golden recall drop {worst.detail}" if worst else "no golden recall to compare"
        )
    else:
        explanation = "FAIL: " + "; ".join(failed)
    result = GateResult(
        passed=passed,
        checks=checks,
        numbers={
            "golden": {
                "champion": {"accuracy": c_acc, "n": c_n},
                "challenger": {"accuracy": h_acc, "n": h_n},
                "recall": recall_numbers,
            },
            "recent": {
                "champion": {"accuracy": rc_acc, "n": rc_n},
                "challenger": {"accuracy": rh_acc, "n": rh_n},
                "gain": gain,
            },
        },
        policy={"min_accuracy_gain": g.min_accuracy_gain, "max_class_recall_drop": g.max_class_recall_drop},
        reasons=failed,
        explanation=explanation,
    )
    if audit is not None:
        audit.append("gate", actor="evaluation gate", summary=explanation, evidence=result.to_dict())
    return result


def record_gate(
    registry: Registry, version: str, result: GateResult, *, audit: AuditLog | None = None
) -> dict[str, str]:
    """Store the gate's numbers and verdict as tags of model ``version`` and in the audit log; returns the tags.

    Moves no alias, whatever the verdict: a failed gate leaves the champion exactly as it was, and :func:`promote`
    reads ``gate.verdict`` before it will move the champion alias.
    """
    registry.get(version)  # a clear RegistryError for an unknown version, before anything is written
    tags = result.to_tags()
    for key, value in tags.items():
        registry.client.set_model_version_tag(registry.name, version, key, value)
    _audit_for(audit, registry).append(
        "gate",
        actor="evaluation gate",
        summary=f"version {version}: {result.explanation}",
        evidence={"version": version, **result.to_dict()},
    )
    return tags


# ==============================================================================================================
# 4. Rolling out safely: shadow, canary, promote, watch, rollback
# ==============================================================================================================
def _labels_near(predlog: Path) -> dict[str, str]:
    """Inspector labels by image hash from the review queue next to the prediction log (the server's layout)."""
    db = predlog.parent / "review.db"
    if not db.is_file():
        return {}
    from .monitoring.review import ReviewQueue

    queue = ReviewQueue(Settings(state_dir=predlog.parent), db_path=db)
    return {f["input_sha256"]: f["label"] for f in queue.feedback()}


def _read_log(path: str | Path, where: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
    from .serving.predlog import read_predictions

    path = Path(path)
    if not path.is_file():
        raise RetrainingError(f"no prediction log at {path}: the server writes <state_dir>/predictions.db")
    return read_predictions(path, where, params)


def _accuracy(pairs: list[tuple[str, str]]) -> float | None:
    return sum(p == t for p, t in pairs) / len(pairs) if pairs else None


@dataclass
class ShadowReport:
    """How the challenger did on mirrored live traffic (chapter: *Rolling out safely*, shadow deployment)."""

    challenger_version: str
    champion_versions: list[str]
    n_requests: int
    n_shadow: int  # shadow predictions (one per image)
    n_agree: int
    agreement_rate: float | None
    n_labelled: int  # shadow predictions whose image an inspector has labelled
    champion_accuracy: float | None  # on those labelled images
    challenger_accuracy: float | None
    min_requests: int
    enough: bool  # saw at least min_requests mirrored requests

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        rate = "n/a" if self.agreement_rate is None else f"{self.agreement_rate:.1%}"
        text = (
            f"shadow v{self.challenger_version}: {self.n_shadow} predictions on {self.n_requests} requests, "
            f"agreement with the champion {rate}"
        )
        if self.n_labelled:
            text += (
                f"; on {self.n_labelled} labelled images accuracy champion {self.champion_accuracy:.3f}, "
                f"challenger {self.challenger_accuracy:.3f}"
            )
        if not self.enough:
            text += f" (fewer than the {self.min_requests} requests required: keep shadowing)"
        return text


def shadow_report(
    prediction_log_path: str | Path,
    challenger_version: str,
    *,
    labels: Mapping[str, str] | None = None,
    min_requests: int = 0,
    audit: AuditLog | None = None,
) -> ShadowReport:
    """Agreement of the shadow (challenger) with the champion on the same live images, and where inspectors labelled
    the image, both models' accuracy (chapter: "Retraining", *Rolling out safely*).

    Agreement alone cannot say which model is right; it says how much would change. Disagreements are exactly the
    images the review queue prioritises (``shadow_disagreement``), so labels accumulate where they matter most.
    ``labels``: image sha256 -> true label; by default the review queue next to the prediction log.
    """
    version = str(challenger_version)
    shadow = _read_log(prediction_log_path, "role = 'shadow' AND model_version = ?", (version,))
    served = _read_log(
        prediction_log_path,
        "role = 'champion' AND request_id IN (SELECT request_id FROM predictions "
        "WHERE role = 'shadow' AND model_version = ?)",
        (version,),
    )
    champion = {(r["request_id"], r["item"]): r for r in served}
    truth = dict(labels) if labels is not None else _labels_near(Path(prediction_log_path))
    agree = sum(1 for r in shadow if r["agrees_with_champion"])
    paired = [(r, champion.get((r["request_id"], r["item"]))) for r in shadow if r["input_sha256"] in truth]
    champ_pairs = [(c["label"], truth[r["input_sha256"]]) for r, c in paired if c is not None]
    chall_pairs = [(r["label"], truth[r["input_sha256"]]) for r, c in paired if c is not None]
    n_requests = len({r["request_id"] for r in shadow})
    report = ShadowReport(
        challenger_version=version,
        champion_versions=sorted({r["model_version"] for r in served}),
        n_requests=n_requests,
        n_shadow=len(shadow),
        n_agree=agree,
        agreement_rate=agree / len(shadow) if shadow else None,
        n_labelled=len(chall_pairs),
        champion_accuracy=_accuracy(champ_pairs),
        challenger_accuracy=_accuracy(chall_pairs),
        min_requests=min_requests,
        enough=n_requests >= min_requests,
    )
    if audit is not None:
        audit.append("shadow", actor="shadow_report", summary=report.summary(), evidence=report.to_dict())
    return report


@dataclass
class CanaryReport:
    """The canary's own numbers: how many requests it answered and, where labelled, how well (vs the champion)."""

    challenger_version: str
    n_requests: int  # answered requests, champion + canary
    n_canary_requests: int
    observed_fraction: float | None
    canary_accuracy: float | None
    champion_accuracy: float | None
    n_labelled_canary: int
    n_labelled_champion: int
    canary_mean_confidence: float | None
    champion_mean_confidence: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        frac = "n/a" if self.observed_fraction is None else f"{self.observed_fraction:.1%}"
        acc = ""
        if self.canary_accuracy is not None and self.champion_accuracy is not None:
            acc = f"; labelled accuracy canary {self.canary_accuracy:.3f} vs champion {self.champion_accuracy:.3f}"
        return (
            f"canary v{self.challenger_version}: {self.n_canary_requests} of {self.n_requests} requests ({frac}){acc}"
        )


def canary_report(
    prediction_log_path: str | Path,
    challenger_version: str,
    *,
    labels: Mapping[str, str] | None = None,
    since_id: int = 0,
    audit: AuditLog | None = None,
) -> CanaryReport:
    """The canary's share of live requests and its metrics next to the champion's, from the prediction log."""
    version = str(challenger_version)
    rows = _read_log(prediction_log_path, "id > ? AND role IN ('champion', 'canary')", (int(since_id),))
    truth = dict(labels) if labels is not None else _labels_near(Path(prediction_log_path))
    canary = [r for r in rows if r["role"] == "canary" and r["model_version"] == version]
    champ = [r for r in rows if r["role"] == "champion"]
    requests = {r["request_id"] for r in rows}
    canary_requests = {r["request_id"] for r in canary}

    def labelled(rs: list[dict[str, Any]]) -> list[tuple[str, str]]:
        return [(r["label"], truth[r["input_sha256"]]) for r in rs if r["input_sha256"] in truth]

    def mean_conf(rs: list[dict[str, Any]]) -> float | None:
        return float(np.mean([r["confidence"] for r in rs])) if rs else None

    report = CanaryReport(
        version,
        len(requests),
        len(canary_requests),
        len(canary_requests) / len(requests) if requests else None,
        _accuracy(labelled(canary)),
        _accuracy(labelled(champ)),
        len(labelled(canary)),
        len(labelled(champ)),
        mean_conf(canary),
        mean_conf(champ),
    )
    if audit is not None:
        audit.append("canary", actor="canary_report", summary=report.summary(), evidence=report.to_dict())
    return report


@dataclass
class CanaryCheck:
    """Which request ids the server would route to the canary, and whether the share matches the configuration."""

    fraction: float
    n: int
    n_canary: int
    observed_fraction: float
    deterministic: bool  # a second pass routes every id the same way
    within_tolerance: bool  # |observed - fraction| within 4 standard errors of a binomial share
    canary_ids: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "canary_ids": self.canary_ids[:50]}  # the evidence, not the whole traffic


def canary_fraction_check(request_ids: Sequence[str], fraction: float, *, audit: AuditLog | None = None) -> CanaryCheck:
    """Route ``request_ids`` the way the server does (``serving.service.in_canary``: a hash of the id).

    Routing by a hash of the request id, not by a random draw, makes the canary reproducible: a retried request
    gets the same model, and an incident can be replayed. The observed share is binomial around ``fraction``.
    """
    from .serving.service import in_canary

    if not 0.0 <= fraction <= 1.0:
        raise RetrainingError(f"fraction must be in [0, 1]; got {fraction}")
    ids = [str(r) for r in request_ids]
    if not ids:
        raise RetrainingError("request_ids is empty: nothing to route")
    first = [in_canary(r, fraction) for r in ids]
    again = [in_canary(r, fraction) for r in ids]
    n_canary = sum(first)
    observed = n_canary / len(ids)
    tolerance = 4 * math.sqrt(fraction * (1 - fraction) / len(ids)) + 1 / len(ids)
    check = CanaryCheck(
        fraction,
        len(ids),
        n_canary,
        observed,
        first == again,
        abs(observed - fraction) <= tolerance,
        [r for r, c in zip(ids, first, strict=True) if c],
    )
    if audit is not None:
        audit.append(
            "canary",
            actor="canary_fraction_check",
            summary=f"{n_canary} of {len(ids)} request ids ({observed:.1%}) route to the canary at fraction "
            f"{fraction:g}; deterministic: {check.deterministic}",
            evidence=check.to_dict(),
        )
    return check


# ------------------------------------------------------------------------------------------------ promote/rollback
def _admin_post(
    server_url: str,
    path: str,
    admin_key: str | None,
    http: httpx.Client | None,
    timeout: float,
    payload: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """POST to one of the server's admin routes with its API key; a refusal becomes a RolloutError naming why."""
    import httpx

    if not admin_key:
        raise RolloutError(f"{path} needs the server's admin key: pass admin_key=... or set MLOPS_ADMIN_KEY")
    client = http or httpx.Client(timeout=timeout)
    try:
        response = client.post(f"{server_url.rstrip('/')}{path}", headers={"X-API-Key": admin_key}, json=payload)
    except httpx.HTTPError as exc:
        raise RolloutError(f"could not reach the server at {server_url}: {exc}") from exc
    finally:
        if http is None:
            client.close()
    try:
        body = response.json()
    except ValueError:
        body = {"error": response.text[:200]}
    if response.status_code != 200:
        raise RolloutError(
            f"the server at {server_url} refused {path} (HTTP {response.status_code}): {body.get('error', body)}"
        )
    return body


def _reload(server_url: str, admin_key: str | None, http: httpx.Client | None, timeout: float) -> dict[str, Any]:
    """POST /v1/admin/reload: the server re-reads the aliases, warms the new model, then swaps (no failed requests)."""
    return _admin_post(server_url, "/v1/admin/reload", admin_key, http, timeout)


def reload_server(server_url: str, *, admin_key: str | None, timeout: float = 120.0) -> dict[str, Any]:
    """Make a running server re-read the registry aliases (e.g. to start shadowing a new ``challenger``)."""
    return _reload(server_url, admin_key, None, timeout)


def set_rollout(
    server_url: str,
    *,
    admin_key: str | None,
    canary_fraction: float | None = None,
    shadow: bool | None = None,
    decided_by: str = "retraining pipeline",
    audit: AuditLog | None = None,
    http: httpx.Client | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """Switch the running server's rollout stage: shadow on/off and the canary fraction (``/v1/admin/rollout``).

    Shadow first (the challenger sees traffic, answers nobody), then a small canary (it answers a deterministic
    share of requests), then promotion. Each switch is an audit event, because "who sent 25% of the line to an
    unproven model, and when" is exactly what an incident review asks.
    """
    payload = {k: v for k, v in (("canary_fraction", canary_fraction), ("shadow", shadow)) if v is not None}
    if not payload:
        raise RolloutError("set_rollout needs canary_fraction and/or shadow")
    body = _admin_post(server_url, "/v1/admin/rollout", admin_key, http, timeout, payload)
    _audit_for(audit).append(
        "rollout_changed",
        actor=decided_by,
        summary=f"rollout at {server_url}: shadow {body.get('shadow')}, canary fraction "
        f"{body.get('canary_fraction')} (challenger {body.get('challenger')})",
        evidence={"request": payload, "server": body},
    )
    return body


@dataclass
class PromotionResult:
    version: str
    previous: str | None
    reload: dict[str, Any] | None  # the server's answer, when a server was reloaded


def promote(
    registry: Registry,
    version: str,
    *,
    server_url: str | None = None,
    admin_key: str | None = None,
    audit: AuditLog | None = None,
    approval: Approval | None = None,
    decided_by: str = "retraining pipeline",
    require_gate: bool = True,
    http: httpx.Client | None = None,
    timeout: float = 120.0,
) -> PromotionResult:
    """Make ``version`` the champion and hot-reload the server (chapter: "Retraining", *Rolling out safely*).

    Refuses a version whose ``gate.verdict`` tag is not ``pass`` (``require_gate=False`` overrides it and the audit
    log says so). If the server refuses or cannot be reached, the alias is moved back, so the registry never names
    a champion the server is not serving. ``admin_key`` defaults to ``$MLOPS_ADMIN_KEY``; ``http`` lets a test pass
    its own client (e.g. FastAPI's ``TestClient``).
    """
    version = str(version)
    log = _audit_for(audit, registry)
    info = registry.get(version)
    verdict = info.tags.get("gate.verdict")
    if require_gate and verdict != "pass":
        raise RolloutError(
            f"version {version} has gate verdict {verdict or 'none recorded'!r}; only a version that "
            "passed the evaluation gate (record_gate) may become champion"
        )
    admin_key = admin_key or os.environ.get("MLOPS_ADMIN_KEY")
    if server_url and not admin_key:  # check before moving anything
        raise RolloutError("reloading the server needs its admin key: pass admin_key=... or set MLOPS_ADMIN_KEY")
    from .registry import CHALLENGER

    was_challenger = registry.aliases().get(CHALLENGER) == version
    previous = registry.promote(version)
    reloaded = None
    if server_url:
        try:
            reloaded = _reload(server_url, admin_key, http, timeout)
            if str(reloaded.get("champion")) != version:
                raise RolloutError(
                    f"the server reloaded but serves version {reloaded.get('champion')}, not {version} "
                    "(does it serve another alias or a bundle path?)"
                )
        except RolloutError as exc:
            restored = None
            if previous is not None and previous != version:
                restored = registry.rollback()  # undo our own alias move: registry and server must agree
                if was_challenger:  # registry.promote cleared it; the version is still the challenger under test
                    registry.set_alias(CHALLENGER, version)
            log.append(
                "promote_failed",
                actor=decided_by,
                summary=f"promotion of version {version} failed: {exc}; "
                f"champion alias {'restored to ' + restored if restored else 'unchanged'}",
                evidence={"version": version, "previous": previous, "error": str(exc), "server_url": server_url},
            )
            raise
    log.append(
        "promote",
        actor=decided_by,
        summary=f"version {version} is champion (was {previous})" + (" and the server reloaded" if reloaded else ""),
        evidence={
            "version": version,
            "previous": previous,
            "gate_verdict": verdict,
            "gate_required": require_gate,
            "gate": {k: v for k, v in info.tags.items() if k.startswith(GATE_PREFIX)},
            "approval": approval.to_dict() if approval else None,
            "server_url": server_url,
            "reload": reloaded,
        },
    )
    return PromotionResult(version, previous, reloaded)


@dataclass
class RollbackResult:
    from_version: str | None
    to_version: str
    reason: str
    reload: dict[str, Any] | None


def rollback(
    registry: Registry,
    *,
    reason: str,
    decided_by: str | None = None,
    server_url: str | None = None,
    admin_key: str | None = None,
    audit: AuditLog | None = None,
    http: httpx.Client | None = None,
    timeout: float = 120.0,
) -> RollbackResult:
    """Point the champion alias back at the previous champion and reload the server (by hand, or from :func:`watch`).

    If the reload fails the registry stays rolled back (the safe direction) and the error says to retry the reload.
    """
    import getpass

    if not reason or not reason.strip():
        raise RetrainingError("a rollback needs a reason (it goes into the audit log)")
    actor = decided_by or getpass.getuser()
    admin_key = admin_key or os.environ.get("MLOPS_ADMIN_KEY")
    if server_url and not admin_key:
        raise RolloutError("reloading the server needs its admin key: pass admin_key=... or set MLOPS_ADMIN_KEY")
    from .registry import CHAMPION

    log = _audit_for(audit, registry)
    current = registry.aliases().get(CHAMPION)
    target = registry.rollback()
    reloaded, error = None, None
    if server_url:
        try:
            reloaded = _reload(server_url, admin_key, http, timeout)
        except RolloutError as exc:
            error = str(exc)
    log.append(
        "rollback",
        actor=actor,
        summary=f"champion rolled back from version {current} to {target}: {reason}"
        + (f"; SERVER RELOAD FAILED: {error}" if error else ""),
        evidence={
            "from": current,
            "to": target,
            "reason": reason,
            "server_url": server_url,
            "reload": reloaded,
            "reload_error": error,
        },
    )
    if error:
        raise RolloutError(
            f"the registry champion is back at version {target}, but the server did not reload: "
            f"{error}; retry POST {server_url}/v1/admin/reload"
        )
    return RollbackResult(current, target, reason, reloaded)


@dataclass
class WatchResult:
    """``verdict``: healthy (N windows without a breach), watching (fewer so far), rolled_back, or superseded (the
    champion changed meanwhile, so nothing was rolled back)."""

    verdict: str
    promoted_version: str
    windows_checked: list[int]
    breach_window: int | None
    breaches: list[str]
    rollback: RollbackResult | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _breaches(w: Window, slo: ServingPolicy, min_accuracy: float, min_labelled: int) -> list[str]:
    out = []
    if w.error_rate is not None and w.error_rate > slo.error_rate_slo:
        out.append(f"error rate {w.error_rate:.2%} above the SLO {slo.error_rate_slo:.2%}")
    if w.p99_latency_ms is not None and w.p99_latency_ms > slo.p99_latency_ms_slo:
        out.append(f"p99 latency {w.p99_latency_ms:.0f} ms above the SLO {slo.p99_latency_ms_slo:.0f} ms")
    if w.accuracy is not None and w.n_labelled >= min_labelled:
        if w.accuracy < min_accuracy:
            out.append(f"accuracy {w.accuracy:.3f} measured on {w.n_labelled} labels below {min_accuracy:.3f}")
    elif w.accuracy_estimated is not None and w.accuracy_estimated < min_accuracy:
        # Rolling back on an estimate is deliberate: it is cheap and reversible, while waiting for labels leaves a
        # possibly broken model deciding on real welds.
        out.append(f"estimated accuracy {w.accuracy_estimated:.3f} below {min_accuracy:.3f}")
    return out


def watch(
    registry: Registry,
    windows: Iterable[Any],
    *,
    promoted_version: str,
    policy: Policy | None = None,
    max_windows: int = 3,
    min_accuracy: float | None = None,
    min_labelled: int = DEFAULT_MIN_LABELLED,
    server_url: str | None = None,
    admin_key: str | None = None,
    audit: AuditLog | None = None,
    http: httpx.Client | None = None,
) -> WatchResult:
    """After a promotion, check the first ``max_windows`` windows against the SLOs; roll back on the first breach.

    SLOs: ``policy.serving.error_rate_slo`` and ``p99_latency_ms_slo``, and accuracy >= ``min_accuracy`` (default
    ``policy.retraining.min_accuracy``; measured when the window has ``min_labelled`` labels, else estimated). Only
    a champion that is still ``promoted_version`` is rolled back: if someone promoted another version meanwhile,
    rolling back would undo their change, not ours.
    """
    from .registry import CHAMPION

    policy = policy or Settings.from_env().policy
    slo = policy.serving
    min_accuracy = policy.retraining.min_accuracy if min_accuracy is None else min_accuracy
    version = str(promoted_version)
    log = _audit_for(audit, registry)
    checked: list[int] = []
    result = None
    for w in _windows(windows)[:max_windows]:
        checked.append(w.window_id)
        found = _breaches(w, slo, min_accuracy, min_labelled)
        if not found:
            continue
        if registry.aliases().get(CHAMPION) != version:
            result = WatchResult("superseded", version, checked, w.window_id, found, None)
        else:
            reason = f"automatic rollback of version {version}: window {w.window_id}: " + "; ".join(found)
            rb = rollback(
                registry,
                reason=reason,
                decided_by="watch (automatic)",
                server_url=server_url,
                admin_key=admin_key,
                audit=log,
                http=http,
            )
            result = WatchResult("rolled_back", version, checked, w.window_id, found, rb)
        break
    if result is None:
        verdict = "healthy" if len(checked) >= max_windows else "watching"
        result = WatchResult(verdict, version, checked, None, [], None)
    summary = {
        "healthy": f"version {version} healthy over windows {checked}",
        "watching": f"version {version} fine so far ({len(checked)} of {max_windows} windows)",
        "rolled_back": f"version {version} breached its SLOs in window {result.breach_window}: "
        f"{'; '.join(result.breaches)}; rolled back",
        "superseded": f"window {result.breach_window} breached ({'; '.join(result.breaches)}) but version {version} "
        "is no longer champion: nothing rolled back",
    }[result.verdict]
    log.append(
        "watch",
        actor="watch (automatic)",
        summary=summary,
        evidence={**result.to_dict(), "slo": asdict(slo), "min_accuracy": min_accuracy, "max_windows": max_windows},
    )
    return result
