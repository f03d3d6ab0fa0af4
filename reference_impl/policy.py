"""The organisation's policy: the numbers that steer the production loop, read from the SME overlay.

Chapter: "The production loop" (the numbers live in the overlay, not in code) and every section that enforces one:
drift thresholds and alert routes (*Monitoring in production*), the retraining cadence, approval and promotion gate
(*Retraining*), the service-level objectives (*Serving predictions*).

A subject-matter expert edits ``chapters/organization.yaml`` (explained in ``chapters/CUSTOMIZING.md``); its
``policy`` section becomes a :class:`Policy`, a tree of frozen dataclasses that every stage reads through
``Settings.policy``::

    settings = Settings.from_env()
    if recall_drop > settings.policy.promotion_gate.max_class_recall_drop:
        ...

Why so strict? The overlay is written by people who do not read Python, and a silently ignored typo
(``psi-alert`` instead of ``psi_alert``) would leave the organisation believing a threshold is enforced when the
built-in default is. So every problem is an error, all problems are reported at once, and each message names the
key path, the expected form, the value found and the line of the file.

Which file? ``$MLOPS_OVERLAY`` if set, else ``chapters/organization.yaml`` of the repository if it exists, else the
built-in defaults below (which equal the placeholders shipped in that file). Only ``pyyaml`` is needed, and it is
imported when a file is actually read.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_OVERLAY = Path(__file__).resolve().parent.parent / "chapters" / "organization.yaml"
OVERLAY_ENV = "MLOPS_OVERLAY"
TOP_LEVEL_KEYS = ("organization", "sme_slots", "policy")
ALERT_SINKS = ("log", "jsonl")


# --------------------------------------------------------------------------------------------------------------
# The policy as typed, immutable values. Defaults = the placeholders in chapters/organization.yaml.
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DriftPolicy:
    """When a shift in the production inputs is reported (chapter: *Testing for drift*, *Calibrating thresholds*)."""

    psi_warn: float = 0.1  # PSI at or above this: moderate shift, a warning
    psi_alert: float = 0.25  # PSI at or above this: major shift, an alert
    false_alarm_rate: float = 0.05  # share of drift-free windows allowed to alarm; KS/MMD thresholds calibrate to it
    window_size: int = 200  # production images per drift test
    # share of normal images the per-image out-of-distribution flag may flag (calibrated at packaging); optional in
    # the overlay so files written before it existed keep working
    ood_false_flag_rate: float = 0.01


@dataclass(frozen=True)
class AlertRoute:
    """One destination for alerts: ``log`` (the program's log) or ``jsonl`` (append one JSON object per line)."""

    sink: str
    path: str | None = None  # jsonl only; relative paths are resolved against the state dir

    def resolve(self, state_dir: Path) -> Path | None:
        """The file this route writes to, or ``None`` for sinks without a file."""
        if self.path is None:
            return None
        p = Path(self.path).expanduser()
        return p if p.is_absolute() else Path(state_dir) / p


@dataclass(frozen=True)
class AlertPolicy:
    """Where alerts go and how often the same one may repeat (chapter: *Alerts and human review*)."""

    routes: tuple[AlertRoute, ...] = (AlertRoute("log"), AlertRoute("jsonl", "alerts.jsonl"))
    cooldown_minutes: int = 30


@dataclass(frozen=True)
class RetrainingPolicy:
    """When retraining may start and who signs off a new model (chapter: *When to retrain*)."""

    cadence_days: int = 30
    min_new_labels: int = 100
    approval_required: bool = True
    approvers: tuple[str, ...] = ("quality-lead",)
    drift_windows: int = 2  # consecutive drifted windows before drift alone triggers retraining (debounces alarms)
    min_accuracy: float = 0.90  # below this (measured, else estimated) retraining is due and a new champion rolls back


@dataclass(frozen=True)
class PromotionGate:
    """What a challenger must achieve against the champion on the golden set (chapter: *The evaluation gate*)."""

    min_accuracy_gain: float = 0.0
    max_class_recall_drop: float = 0.02


@dataclass(frozen=True)
class ServingPolicy:
    """Service-level objectives of the prediction service (chapter: *Latency percentiles and throughput*)."""

    p99_latency_ms_slo: float = 200.0
    error_rate_slo: float = 0.01


@dataclass(frozen=True)
class Policy:
    """Everything in the overlay's ``policy`` section. Immutable: change it with :meth:`override`."""

    drift: DriftPolicy = field(default_factory=DriftPolicy)
    alerts: AlertPolicy = field(default_factory=AlertPolicy)
    retraining: RetrainingPolicy = field(default_factory=RetrainingPolicy)
    promotion_gate: PromotionGate = field(default_factory=PromotionGate)
    serving: ServingPolicy = field(default_factory=ServingPolicy)
    source: str = field(default="built-in defaults", compare=False)  # where the numbers came from, for reports

    def to_dict(self) -> dict[str, Any]:
        """The policy as the plain mapping the overlay's ``policy`` section holds (lists, not tuples)."""
        out = asdict(self)
        out.pop("source")
        out["alerts"]["routes"] = [{k: v for k, v in r.items() if v is not None} for r in out["alerts"]["routes"]]
        out["retraining"]["approvers"] = list(out["retraining"]["approvers"])
        return out

    def override(self, changes: Mapping[str, Any]) -> Policy:
        """A copy with some values changed, validated exactly like the overlay file.

        Keys are dotted paths inside ``policy``, e.g. ``{"promotion_gate.max_class_recall_drop": 0.05}``. Labs use
        it to ask "what if the gate were stricter?" without editing the organisation's file.
        """
        raw = self.to_dict()
        for dotted, value in changes.items():
            *parents, leaf = dotted.split(".")
            node: Any = raw
            for part in parents:
                if not isinstance(node, dict) or part not in node:
                    raise OverlayError([Problem(f"policy.{dotted}", "is not a policy setting")], "override")
                node = node[part]
            if not isinstance(node, dict) or leaf not in node:
                raise OverlayError([Problem(f"policy.{dotted}", "is not a policy setting")], "override")
            node[leaf] = value
        return parse_policy(raw, source=f"{self.source} + override")


DEFAULT_POLICY = Policy()


# --------------------------------------------------------------------------------------------------------------
# Errors that name the key, the expected form, what was found and where.
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """One thing wrong with the overlay: ``key`` (dotted path) ``message`` (what was expected and found)."""

    key: str
    message: str
    line: int | None = None  # 1-based line in the file, when known

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return f"{where}{self.key} {self.message}" if self.key else f"{where}{self.message}"


class OverlayError(ValueError):
    """The overlay cannot be used. ``problems`` lists every problem; the message shows them one per line."""

    def __init__(self, problems: list[Problem], source: str) -> None:
        self.problems = problems
        self.source = source
        if len(problems) == 1:
            text = f"{source}: {problems[0]}"
        else:
            text = f"{source} has {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)
        super().__init__(text + "\n(See chapters/CUSTOMIZING.md for the form of every key.)")


def show(value: Any) -> str:
    """A value as the SME wrote it (YAML spelling for booleans and empty values)."""
    if value is None:
        return "nothing (an empty value)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, Mapping):
        return "a group of keys"
    if isinstance(value, list):
        return f"a list of {len(value)} entries"
    return str(value)


class Checker:
    """Collects problems while reading a mapping, so the SME sees all of them in one run.

    ``lines`` maps dotted key paths to line numbers (from :func:`read_overlay`) so messages can say where to look.
    """

    def __init__(self, source: str, lines: Mapping[str, int] | None = None) -> None:
        self.source = source
        self.lines = dict(lines or {})
        self.problems: list[Problem] = []

    def problem(self, key: str, message: str) -> None:
        line = self.lines.get(key)
        if line is None:  # a missing key: point at its parent
            parent = key.rpartition(".")[0]
            while parent and parent not in self.lines:
                parent = parent.rpartition(".")[0]
            line = self.lines.get(parent)
        self.problems.append(Problem(key, message, line))

    def raise_if_any(self) -> None:
        if self.problems:
            raise OverlayError(self.problems, self.source)

    def section(self, raw: Any, key: str, expected: tuple[str, ...]) -> dict[str, Any]:
        """The known keys of mapping ``raw``; unknown keys (typos) are problems. Missing ones are found by ``get``."""
        if not isinstance(raw, Mapping):
            self.problem(key, f"must be a group of keys ({', '.join(expected)}); got {show(raw)}")
            return {}
        for name in raw:
            if name not in expected:
                hint = difflib.get_close_matches(str(name), expected, n=1)
                did_you_mean = f"did you mean {hint[0]!r}? " if hint else ""
                self.problem(f"{key}.{name}", f"is not a known key ({did_you_mean}valid keys: {', '.join(expected)})")
        return {name: raw[name] for name in expected if name in raw}

    def get(self, values: Mapping[str, Any], key: str, name: str, expected: str) -> Any:
        """``values[name]``, or a "missing" problem (returning the ``MISSING`` marker)."""
        if name not in values:
            self.problem(f"{key}.{name}", f"is missing; expected {expected}")
            return MISSING
        return values[name]

    def number(self, values: Mapping[str, Any], key: str, name: str, expected: str, ok: Any) -> float | None:
        """A real number (not a boolean, not text) for which ``ok(value)`` holds."""
        value = self.get(values, key, name, expected)
        if value is MISSING:
            return None
        # bool is a subclass of int in Python, so `true` would otherwise pass as 1.
        is_number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not is_number or not ok(value):
            self.problem(f"{key}.{name}", f"must be {expected}; got {show(value)}")
            return None
        return float(value)

    def whole(self, values: Mapping[str, Any], key: str, name: str, expected: str, minimum: int) -> int | None:
        """A whole number >= ``minimum`` (``200.0`` is accepted as 200; ``200.5`` and ``"200"`` are not)."""
        value = self.get(values, key, name, expected)
        if value is MISSING:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.problem(f"{key}.{name}", f"must be {expected}; got {show(value)}")
            return None
        return value

    def boolean(self, values: Mapping[str, Any], key: str, name: str) -> bool | None:
        value = self.get(values, key, name, "true or false")
        if value is MISSING:
            return None
        if not isinstance(value, bool):
            self.problem(f"{key}.{name}", f"must be true or false; got {show(value)}")
            return None
        return value


MISSING = object()


# --------------------------------------------------------------------------------------------------------------
# Reading the file: YAML with line numbers, duplicate keys caught.
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OverlayDocument:
    """The overlay file as parsed YAML plus the line number of every key path (for error messages)."""

    path: Path
    data: dict[str, Any]
    lines: dict[str, int]

    @property
    def label(self) -> str:
        return self.path.name


def read_overlay(path: str | Path) -> OverlayDocument:
    """Parse the overlay file; YAML syntax errors and duplicate keys become :class:`OverlayError` with a line."""
    import yaml

    path = Path(path)
    label = path.name
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OverlayError([Problem("", f"file not found: {path}")], label) from None
    except UnicodeDecodeError as exc:
        raise OverlayError([Problem("", f"not UTF-8 text ({exc.reason} at byte {exc.start})")], label) from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        bad_line = text.splitlines()[mark.line] if mark and mark.line < len(text.splitlines()) else ""
        hint = " The line is indented with a tab: use spaces." if "\t" in bad_line else ""
        hint = hint or " Check the indentation, and put quotes around text that contains a colon."
        where = f"column {mark.column + 1}: " if mark else ""
        problem = Problem("", f"not valid YAML: {where}{exc.problem or exc}.{hint}", line)
        raise OverlayError([problem], label) from None
    if data is None:
        raise OverlayError([Problem("", "the file is empty; start from the template in the repository")], label)
    if not isinstance(data, dict):
        raise OverlayError([Problem("", f"the file must be a group of keys ({', '.join(TOP_LEVEL_KEYS)})")], label)
    lines: dict[str, int] = {}
    duplicates: list[Problem] = []
    _index(root, "", lines, duplicates)
    if duplicates:
        raise OverlayError(duplicates, label)
    return OverlayDocument(path, data, lines)


def _index(node: Any, prefix: str, lines: dict[str, int], duplicates: list[Problem]) -> None:
    """Record the line of every key path; PyYAML silently keeps the LAST of two equal keys, so we refuse them."""
    import yaml

    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            name = str(key_node.value)
            path = f"{prefix}.{name}" if prefix else name
            line = key_node.start_mark.line + 1
            if name in seen:
                duplicates.append(Problem(path, f"appears twice (lines {seen[name]} and {line}); keep one", line))
            seen[name] = line
            lines[path] = line
            _index(value_node, path, lines, duplicates)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = f"{prefix}[{i}]"
            lines[path] = item.start_mark.line + 1
            _index(item, path, lines, duplicates)


# --------------------------------------------------------------------------------------------------------------
# Validation of the policy section.
# --------------------------------------------------------------------------------------------------------------
def parse_policy(raw: Any, *, source: str = "policy", lines: Mapping[str, int] | None = None) -> Policy:
    """Validate the ``policy`` mapping and build a :class:`Policy`, or raise :class:`OverlayError` listing all problems.

    The expected forms in the messages are the ones documented in ``chapters/CUSTOMIZING.md``.
    """
    c = Checker(source, lines)
    if not isinstance(raw, Mapping):
        c.problem("policy", f"must be a group of keys ({', '.join(_SECTIONS)}); got {show(raw)}")
        c.raise_if_any()
    top = c.section(raw, "policy", tuple(_SECTIONS))
    parts: dict[str, Any] = {}
    for name, parse in _SECTIONS.items():
        if name not in top:
            c.problem(f"policy.{name}", "is missing; expected a group of keys (copy it from the template)")
            continue
        values = c.section(top[name], f"policy.{name}", _SECTION_KEYS[name])
        if isinstance(top[name], Mapping):
            parts[name] = parse(c, values, f"policy.{name}")
    c.raise_if_any()  # after this, every part parsed without a problem
    return Policy(**parts, source=source)


def _drift(c: Checker, d: Mapping[str, Any], key: str) -> DriftPolicy:
    psi_warn = c.number(d, key, "psi_warn", "a number >= 0 (customary 0.1)", lambda v: v >= 0)
    psi_alert = c.number(d, key, "psi_alert", "a number > 0 (customary 0.25)", lambda v: v > 0)
    if psi_warn is not None and psi_alert is not None and not psi_alert > psi_warn:
        c.problem(f"{key}.psi_alert", f"must be a number greater than {key}.psi_warn ({psi_warn:g}); got {psi_alert:g}")
    far = c.number(
        d, key, "false_alarm_rate", "a number between 0 and 1, exclusive (e.g. 0.05 = 5 %)", lambda v: 0 < v < 1
    )
    window = c.whole(d, key, "window_size", "a whole number of images, at least 30", 30)
    ood = DriftPolicy.ood_false_flag_rate
    if "ood_false_flag_rate" in d:
        ood = c.number(d, key, "ood_false_flag_rate", "a number between 0 and 0.5 (e.g. 0.01 = 1 %)",
                       lambda v: 0 < v <= 0.5)  # fmt: skip
    return DriftPolicy(psi_warn, psi_alert, far, window, ood)  # type: ignore[arg-type]


def _alerts(c: Checker, a: Mapping[str, Any], key: str) -> AlertPolicy:
    routes = _routes(c, a, key)
    cooldown = c.whole(a, key, "cooldown_minutes", "a whole number of minutes, 0 or more", 0)
    return AlertPolicy(routes, cooldown)  # type: ignore[arg-type]


def _retraining(c: Checker, r: Mapping[str, Any], key: str) -> RetrainingPolicy:
    cadence = c.whole(r, key, "cadence_days", "a whole number of days, at least 1", 1)
    min_labels = c.whole(r, key, "min_new_labels", "a whole number of images, 0 or more", 0)
    approval = c.boolean(r, key, "approval_required")
    approvers = _approvers(c, r, key, approval)
    # Optional (added after the first overlays were written): a file without them keeps the defaults.
    windows = (
        c.whole(r, key, "drift_windows", "a whole number of windows, at least 1", 1) if "drift_windows" in r else 2
    )
    min_acc = (
        c.number(r, key, "min_accuracy", "a number above 0 and at most 1 (0.9 = 90 %)", lambda v: 0 < v <= 1)
        if "min_accuracy" in r
        else 0.90
    )
    return RetrainingPolicy(cadence, min_labels, approval, approvers, windows, min_acc)  # type: ignore[arg-type]


def _promotion_gate(c: Checker, g: Mapping[str, Any], key: str) -> PromotionGate:
    gain = c.number(g, key, "min_accuracy_gain", "a number between -1 and 1", lambda v: -1 <= v <= 1)
    drop = c.number(
        g, key, "max_class_recall_drop", "a number between 0 and 1 (0.02 = two points)", lambda v: 0 <= v <= 1
    )
    return PromotionGate(gain, drop)  # type: ignore[arg-type]


def _serving(c: Checker, s: Mapping[str, Any], key: str) -> ServingPolicy:
    p99 = c.number(s, key, "p99_latency_ms_slo", "a number of milliseconds greater than 0", lambda v: v > 0)
    err = c.number(
        s, key, "error_rate_slo", "a number from 0 up to (not including) 1 (0.01 = 1 %)", lambda v: 0 <= v < 1
    )
    return ServingPolicy(p99, err)  # type: ignore[arg-type]


_SECTIONS = {
    "drift": _drift,
    "alerts": _alerts,
    "retraining": _retraining,
    "promotion_gate": _promotion_gate,
    "serving": _serving,
}
_SECTION_KEYS = {
    "drift": ("psi_warn", "psi_alert", "false_alarm_rate", "window_size", "ood_false_flag_rate"),
    "alerts": ("routes", "cooldown_minutes"),
    "retraining": ("cadence_days", "min_new_labels", "approval_required", "approvers", "drift_windows", "min_accuracy"),
    "promotion_gate": ("min_accuracy_gain", "max_class_recall_drop"),
    "serving": ("p99_latency_ms_slo", "error_rate_slo"),
}


def _routes(c: Checker, a: Mapping[str, Any], parent: str) -> tuple[AlertRoute, ...]:
    key = f"{parent}.routes"
    raw = c.get(a, parent, "routes", "a list with at least one entry like '- sink: log'")
    if raw is MISSING:
        return ()
    if not isinstance(raw, list) or not raw:
        c.problem(key, f"must be a list with at least one entry like '- sink: log'; got {show(raw)}")
        return ()
    routes = []
    for i, item in enumerate(raw):
        here = f"{key}[{i}]"
        entry = c.section(item, here, ("sink", "path"))
        if not isinstance(item, Mapping):
            continue
        sink = entry.get("sink", MISSING)
        if sink is MISSING:
            c.problem(f"{here}.sink", f"is missing; expected one of: {', '.join(ALERT_SINKS)}")
            continue
        if sink not in ALERT_SINKS:
            c.problem(f"{here}.sink", f"must be one of: {', '.join(ALERT_SINKS)}; got {show(sink)}")
            continue
        path = entry.get("path")
        if sink == "jsonl" and (not isinstance(path, str) or not path.strip()):
            c.problem(
                f"{here}.path", f"is required for a jsonl route: a file name such as alerts.jsonl; got {show(path)}"
            )
            continue
        if sink == "log" and path is not None:
            c.problem(f"{here}.path", "is only used by jsonl routes; remove it from the log route")
            continue
        routes.append(AlertRoute(sink, path))
    return tuple(routes)


def _approvers(c: Checker, r: Mapping[str, Any], parent: str, approval: bool | None) -> tuple[str, ...]:
    key = f"{parent}.approvers"
    raw = c.get(r, parent, "approvers", 'a list of roles, e.g. ["quality-lead"]')
    if raw is MISSING:
        return ()
    if raw is None:
        raw = []
    if not isinstance(raw, list) or not all(isinstance(x, str) and x.strip() for x in raw):
        c.problem(key, f'must be a list of roles written as text, e.g. ["quality-lead"]; got {show(raw)}')
        return ()
    if approval and not raw:
        c.problem(key, "must name at least one role: approval_required is true, but nobody may give the approval")
    return tuple(x.strip() for x in raw)


# --------------------------------------------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------------------------------------------
def overlay_path() -> Path | None:
    """The overlay file in use: ``$MLOPS_OVERLAY``, else the repository's ``chapters/organization.yaml``, else none."""
    env = os.environ.get(OVERLAY_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():  # an explicit choice that does not exist is a mistake, not a reason to use defaults
            raise OverlayError([Problem("", f"file not found: {path} (set by ${OVERLAY_ENV})")], path.name)
        return path
    return REPO_OVERLAY if REPO_OVERLAY.is_file() else None


def check_top_level(doc: OverlayDocument) -> Checker:
    """A checker for ``doc`` with unknown top-level keys already reported (typos like ``polcy:``)."""
    c = Checker(doc.label, doc.lines)
    c.section(doc.data, "(top level)", TOP_LEVEL_KEYS)
    # A top-level problem's key reads better without the "(top level)." prefix.
    c.problems = [
        Problem(key, p.message, doc.lines.get(key)) for p in c.problems for key in [p.key.removeprefix("(top level).")]
    ]
    return c


def load_policy(path: str | Path | None = None) -> Policy:
    """The policy from ``path`` (default: :func:`overlay_path`), or the built-in defaults when there is no file."""
    path = Path(path) if path is not None else overlay_path()
    if path is None:
        return DEFAULT_POLICY
    doc = read_overlay(path)
    c = check_top_level(doc)
    if "policy" not in doc.data:
        c.problem("policy", "is missing; expected the policy section of the template")
    c.raise_if_any()
    return parse_policy(doc.data["policy"], source=str(path), lines=doc.lines)
