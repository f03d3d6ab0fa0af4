"""Alerts: rules over each monitoring window's metrics, deduplicated, sent to people with a runbook step.

Chapter: "Monitoring in production", section *Alerts and human review*. A monitor that nobody hears is a
dashboard; a monitor that pages for every window is switched off within a week. So an alert here

- comes from a **rule** in a YAML file (``alert_rules.yaml`` ships the defaults), whose thresholds may refer to the
  organisation's policy (``threshold: policy.drift.psi_alert``) so the SMEs tune them in the overlay, not in code,
  and may also require the value to pass a threshold the window itself carries (``window_threshold:
  drift.psi_threshold``, the PSI level calibrated for this window size: a policy band alone ignores how noisy a
  small window is);
- carries its **evidence** (metric, value, comparison, threshold, window, context) and a **runbook** step, so the
  on-call person knows what fired and what to do next;
- is **deduplicated** with a cool-down (``policy.alerts.cooldown_minutes``): the same problem pages once per
  cool-down, unless it gets worse (a higher severity goes out at once). The cool-down state lives in the state dir,
  so a restarted monitor does not page again for what it already reported;
- goes to every **sink**: the log, a JSON-lines file, an HTTP webhook. One broken destination never silences the
  others: its failure is logged, counted and recorded in ``alerts_undelivered.jsonl``.

Usage (what the monitoring job does per window)::

    manager = AlertManager(Settings.from_env())
    for alert in manager.evaluate("w0042", {"drift": {"detected": True, "psi_max": 0.31}, "ops": {...}}):
        print(alert.severity, alert.summary)
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import operator
import os
import re
import string
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..policy import AlertRoute, Policy
    from ..settings import Settings

log = logging.getLogger(__name__)

DEFAULT_RULES_FILE = Path(__file__).with_name("alert_rules.yaml")
STATE_FILE = "alerts_state.json"  # in the state dir: last alert per dedup key, so restarts do not re-page
UNDELIVERED_FILE = "alerts_undelivered.jsonl"  # alerts a sink failed to deliver, for a later manual resend

SEVERITIES = ("info", "warning", "critical")
SEVERITY_RANK = {name: i for i, name in enumerate(SEVERITIES)}
LOG_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "critical": logging.CRITICAL}
OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
REQUIRED_RULE_KEYS = ("name", "metric", "op", "threshold", "severity", "summary", "runbook")
RULE_KEYS = (*REQUIRED_RULE_KEYS, "group", "window_threshold")
SINK_KINDS = ("log", "jsonl", "webhook")
SINK_KEYS = {
    "log": ("sink",),
    "jsonl": ("sink", "path"),
    "webhook": ("sink", "url", "timeout_s", "retries", "backoff_s", "headers"),
}
SUMMARY_FIELDS = ("value", "threshold", "metric", "window_id", "window_threshold")
NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
METRIC_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class AlertRuleError(ValueError):
    """The rules file cannot be used. ``problems`` lists every problem; the message shows them one per line."""

    def __init__(self, problems: Sequence[str], source: str) -> None:
        self.problems = list(problems)
        self.source = source
        if len(self.problems) == 1:
            text = f"{source}: {self.problems[0]}"
        else:
            text = f"{source} has {len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(text)


class AlertMetricError(TypeError):
    """A window's metric has a type the rule cannot compare (e.g. text where a number is expected)."""


class SinkError(RuntimeError):
    """A sink could not deliver an alert (after its retries)."""


# --------------------------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """One alert rule: fire when ``metrics[metric] <op> threshold``.

    ``threshold`` is a number, a boolean (``==``/``!=`` only) or a policy reference such as
    ``"policy.drift.psi_alert"``; :meth:`resolve` turns a reference into the number from the overlay.
    ``window_threshold``: optionally, a second metric of the same window that the value must *also* pass with the
    same operator, e.g. the PSI threshold calibrated for the window's size; when the window does not carry it, the
    rule does not fire (no calibrated threshold, no verdict).
    """

    name: str
    metric: str
    op: str
    threshold: float | bool | str
    severity: str
    summary: str
    runbook: str
    group: str | None = None
    window_threshold: str | None = None

    @property
    def dedup_key(self) -> str:
        """Rules about the same problem share a key, hence one cool-down (see the module docstring)."""
        return self.group or self.name

    @property
    def threshold_source(self) -> str:
        """Where the threshold comes from: the policy key, or "rule" for a literal in the rules file."""
        return self.threshold if isinstance(self.threshold, str) else "rule"

    def resolve(self, policy: Policy) -> float | bool:
        """The threshold as a value: literals as written, ``policy.*`` references read from ``policy``."""
        if not isinstance(self.threshold, str):
            return self.threshold
        return _policy_value(policy, self.threshold)


@dataclass(frozen=True)
class SinkSpec:
    """A destination declared in the rules file's ``sinks:`` list (the overlay's routes are added to these)."""

    sink: str
    path: str | None = None
    url: str | None = None
    timeout_s: float = 5.0
    retries: int = 2
    backoff_s: float = 0.5
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class RuleSet:
    """The parsed rules file: the rules, the extra sinks, and where they came from (for messages)."""

    rules: tuple[Rule, ...]
    sinks: tuple[SinkSpec, ...] = ()
    source: str = "rules"


def _policy_value(policy: Any, reference: str) -> float:
    """Walk ``policy.<section>.<key>`` through the policy dataclasses; the result must be a number."""
    node = policy
    for part in reference.split(".")[1:]:
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            raise KeyError(reference)
        node = getattr(node, part)
    if isinstance(node, bool) or not isinstance(node, int | float):
        raise KeyError(reference)
    return float(node)


def _numeric_policy_keys() -> list[str]:
    """Every reference a rule may use, e.g. ``policy.drift.psi_alert`` (for "did you mean" hints)."""
    from ..policy import DEFAULT_POLICY

    keys = []
    for section in dataclasses.fields(DEFAULT_POLICY):
        value = getattr(DEFAULT_POLICY, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if isinstance(v, int | float) and not isinstance(v, bool):
                keys.append(f"policy.{section.name}.{f.name}")
    return keys


def _show(value: Any) -> str:
    """A value as the author wrote it in YAML: the same wording as the overlay's errors."""
    from ..policy import show

    return show(value)


def _unknown_keys(item: Mapping[str, Any], allowed: Sequence[str], where: str, problems: list[str]) -> None:
    for key in item:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            did_you_mean = f"did you mean {hint[0]!r}? " if hint else ""
            problems.append(f"{where}.{key} is not a known key ({did_you_mean}valid keys: {', '.join(allowed)})")


def parse_rules(raw: Any, source: str = "rules") -> RuleSet:
    """Validate the rules mapping (``rules:`` and optional ``sinks:``); all problems are reported at once.

    Each message names the rule (index and name), the field, the expected form and what was found, because the
    person editing the file may not read Python.
    """
    problems: list[str] = []
    if not isinstance(raw, Mapping):
        raise AlertRuleError([f"the file must be a group of keys (rules, sinks); got {_show(raw)}"], source)
    _unknown_keys(raw, ("rules", "sinks"), "(top level)", problems)
    raw_rules = raw.get("rules")
    if not isinstance(raw_rules, list) or not raw_rules:
        problems.append(f"rules must be a list with at least one rule (- name: ...); got {_show(raw_rules)}")
        raw_rules = []
    policy_keys = _numeric_policy_keys()
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw_rules):
        rule = _parse_rule(i, item, policy_keys, problems)
        if rule is None:
            continue
        if rule.name in seen:
            problems.append(
                f"rules[{i}] (name {rule.name!r}).name is already used by rules[{seen[rule.name]}]; "
                "names must be unique"
            )
            continue
        seen[rule.name] = i
        rules.append(rule)
    sinks = _parse_sinks(raw.get("sinks"), problems)
    if problems:
        raise AlertRuleError(problems, source)
    return RuleSet(tuple(rules), sinks, source)


def _parse_rule(i: int, item: Any, policy_keys: list[str], problems: list[str]) -> Rule | None:
    if not isinstance(item, Mapping):
        problems.append(f"rules[{i}] must be a group of keys ({', '.join(REQUIRED_RULE_KEYS)}); got {_show(item)}")
        return None
    name = item.get("name")
    where = f"rules[{i}] (name {name!r})" if isinstance(name, str) else f"rules[{i}]"
    before = len(problems)
    _unknown_keys(item, RULE_KEYS, where, problems)
    for key in REQUIRED_RULE_KEYS:
        if key not in item:
            problems.append(f"{where}.{key} is missing")
    if len(problems) > before:
        return None

    def bad(key: str, expected: str) -> None:
        problems.append(f"{where}.{key} must be {expected}; got {_show(item[key])}")

    if not isinstance(name, str) or not NAME_RE.match(name):
        bad("name", "a name of letters, digits, _ and - (e.g. psi_major_shift)")
    metric = item["metric"]
    if not isinstance(metric, str) or not METRIC_RE.match(metric):
        bad("metric", "a dotted metric key such as drift.psi_max or ops.p99_latency_ms")
    op = item["op"]
    if op not in OPS:
        bad("op", f'one of {" ".join(OPS)} (in quotes, e.g. op: ">=")')
    severity = item["severity"]
    if severity not in SEVERITIES:
        bad("severity", f"one of {', '.join(SEVERITIES)}")
    for key in ("summary", "runbook"):
        if not isinstance(item[key], str) or not item[key].strip():
            bad(key, "a line of text")
    group = item.get("group")
    if group is not None and (not isinstance(group, str) or not NAME_RE.match(group)):
        bad("group", "a name of letters, digits, _ and - shared by rules about the same problem")
    window_threshold = item.get("window_threshold")
    if window_threshold is not None:
        if not isinstance(window_threshold, str) or not METRIC_RE.match(window_threshold):
            bad("window_threshold", "a dotted metric key of the window such as drift.psi_threshold")
        elif op in ("==", "!="):
            bad("window_threshold", f'used with op >, >=, < or <= (a second bound makes no sense with "{op}")')

    threshold = item["threshold"]
    if isinstance(threshold, bool):
        if op not in ("==", "!="):
            bad("threshold", f'a number or a policy reference when op is {op!r} (true/false only with "==" or "!=")')
    elif isinstance(threshold, int | float):
        if not math.isfinite(threshold):
            bad("threshold", "a finite number")
        threshold = float(threshold)
    elif isinstance(threshold, str):
        if threshold not in policy_keys:
            hint = difflib.get_close_matches(threshold, policy_keys, n=1)
            expected = "a number, true/false, or a policy reference"
            expected += f" (did you mean {hint[0]!r}?)" if hint else f" ({', '.join(policy_keys)})"
            bad("threshold", expected)
    else:
        bad("threshold", "a number, true/false, or a policy reference such as policy.drift.psi_alert")

    summary = item["summary"]
    if isinstance(summary, str):
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(summary) if f is not None}
        except ValueError as exc:  # an unmatched { or }
            fields = set()
            bad("summary", f"text whose placeholders are well formed ({exc}; write {{{{ for a literal brace)")
        allowed = set(SUMMARY_FIELDS) if window_threshold is not None else set(SUMMARY_FIELDS) - {"window_threshold"}
        unknown = sorted(fields - allowed)
        if unknown:
            bad(
                "summary",
                f"text using only the placeholders {', '.join('{' + f + '}' for f in sorted(allowed))} "
                f"(found {', '.join('{' + f + '}' for f in unknown)})",
            )
    if len(problems) > before:
        return None
    runbook = " ".join(item["runbook"].split())
    return Rule(name, metric, op, threshold, severity, summary.strip(), runbook, group, window_threshold)


def _parse_sinks(raw: Any, problems: list[str]) -> tuple[SinkSpec, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append(f"sinks must be a list of entries like '- sink: webhook'; got {_show(raw)}")
        return ()
    specs = []
    for i, item in enumerate(raw):
        where = f"sinks[{i}]"
        if not isinstance(item, Mapping) or item.get("sink") not in SINK_KINDS:
            found = _show(item.get("sink")) if isinstance(item, Mapping) else _show(item)
            problems.append(f"{where}.sink must be one of {', '.join(SINK_KINDS)}; got {found}")
            continue
        kind = item["sink"]
        before = len(problems)
        _unknown_keys(item, SINK_KEYS[kind], where, problems)
        if kind == "jsonl" and (not isinstance(item.get("path"), str) or not item["path"].strip()):
            problems.append(
                f"{where}.path is required for a jsonl sink: a file name such as alerts.jsonl; "
                f"got {_show(item.get('path'))}"
            )
        if kind == "webhook":
            url = item.get("url")
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                problems.append(f"{where}.url must be an http:// or https:// address; got {_show(url)}")
            for key, ok, expected in (
                ("timeout_s", lambda v: v > 0, "a number of seconds > 0"),
                ("retries", lambda v: float(v).is_integer() and v >= 0, "a whole number >= 0"),
                ("backoff_s", lambda v: v >= 0, "a number of seconds >= 0"),
            ):
                v = item.get(key)
                if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not ok(v)):
                    problems.append(f"{where}.{key} must be {expected}; got {_show(v)}")
            headers = item.get("headers")
            if headers is not None and (
                not isinstance(headers, Mapping) or not all(isinstance(v, str) for v in headers.values())
            ):
                problems.append(f"{where}.headers must be a group of 'Name: text' entries; got {_show(headers)}")
        if len(problems) > before:
            continue
        specs.append(
            SinkSpec(
                kind,
                path=item.get("path"),
                url=item.get("url"),
                timeout_s=float(item.get("timeout_s", 5.0)),
                retries=int(item.get("retries", 2)),
                backoff_s=float(item.get("backoff_s", 0.5)),
                headers=tuple((str(k), v) for k, v in (item.get("headers") or {}).items()),
            )
        )
    return tuple(specs)


def load_rules(path: str | Path | None = None) -> RuleSet:
    """Read and validate a rules file (default: the ``alert_rules.yaml`` shipped with the package)."""
    import yaml

    path = Path(path) if path is not None else DEFAULT_RULES_FILE
    label = path.name
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AlertRuleError([f"file not found: {path}"], label) from None
    except UnicodeDecodeError as exc:
        raise AlertRuleError([f"not UTF-8 text ({exc.reason} at byte {exc.start})"], label) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise AlertRuleError(
            [
                f"{where}not valid YAML: {exc.problem or exc}. Check the indentation, and put quotes "
                'around operators such as ">=" and text containing a colon.'
            ],
            label,
        ) from None
    if raw is None:
        raise AlertRuleError(
            ["the file is empty; start from the default reference_impl/monitoring/alert_rules.yaml"], label
        )
    return parse_rules(raw, source=label)


# --------------------------------------------------------------------------------------------------------------
# Alerts and sinks
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Alert:
    """What fired, how bad it is, the evidence, and what to do about it."""

    rule: str
    severity: str
    summary: str
    evidence: dict[str, Any]
    runbook: str
    fired_at: float
    dedup_key: str

    def to_dict(self) -> dict[str, Any]:
        """The alert as plain JSON-ready data (what the JSON-lines sink writes and the webhook receives)."""
        return dataclasses.asdict(self)


class Sink(Protocol):
    """A destination for alerts. ``send`` raises :class:`SinkError` (or ``OSError``) when it cannot deliver."""

    name: str

    def send(self, alert: Alert) -> None: ...


class LogSink:
    """Alerts in the program's log, at the level of their severity (info / warning / critical)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger("reference_impl.alerts")
        self.name = "log"

    def send(self, alert: Alert) -> None:
        ev = alert.evidence
        self.logger.log(
            LOG_LEVELS[alert.severity],
            "ALERT %s [%s] %s | %s %s %s %s | runbook: %s",
            alert.rule,
            alert.severity,
            alert.summary,
            ev.get("metric"),
            ev.get("value"),
            ev.get("op"),
            ev.get("threshold"),
            alert.runbook,
        )


class JsonlSink:
    """One JSON object per alert, appended to a file (a log that tools like ``jq`` or a SIEM can read)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.name = f"jsonl:{self.path}"

    def send(self, alert: Alert) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(alert.to_dict(), sort_keys=True, default=str) + "\n"
        # One write() of a whole line in append mode: concurrent writers interleave lines, never halves of them.
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())


class WebhookSink:
    """POST the alert as JSON to a URL (chat tool, pager, incident system), with a timeout and retries.

    Retries cover what may heal within seconds (connection refused during a restart, 5xx, 429); a 4xx means the
    receiver rejects our request and retrying would not help. Backoff doubles each attempt.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 5.0,
        retries: int = 2,
        backoff_s: float = 0.5,
        headers: Mapping[str, str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.headers = dict(headers or {})
        self.sleep = sleep
        self.name = f"webhook:{url}"

    def send(self, alert: Alert) -> None:
        import httpx  # lazy: only monitors with a webhook need it

        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = httpx.post(self.url, json=alert.to_dict(), headers=self.headers, timeout=self.timeout_s)
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code < 300:
                return
            problem = f"HTTP {response.status_code}: {response.text[:200]}"
            if response.status_code < 500 and response.status_code != 429:
                break
        raise SinkError(
            f"webhook {self.url} did not accept alert {alert.rule!r} after {attempt + 1} attempt(s): {problem}"
        )


def sink_from_spec(spec: SinkSpec | AlertRoute, state_dir: Path) -> Sink:
    """Build a sink from an overlay route or a rules-file sink; relative paths are resolved against the state dir."""
    if spec.sink == "log":
        return LogSink()
    if spec.sink == "jsonl":
        p = Path(spec.path or "alerts.jsonl").expanduser()
        return JsonlSink(p if p.is_absolute() else Path(state_dir) / p)
    if spec.sink == "webhook" and isinstance(spec, SinkSpec) and spec.url:
        return WebhookSink(
            spec.url,
            timeout_s=spec.timeout_s,
            retries=spec.retries,
            backoff_s=spec.backoff_s,
            headers=dict(spec.headers),
        )
    raise ValueError(f"cannot build an alert sink from {spec!r}")


# --------------------------------------------------------------------------------------------------------------
# The manager
# --------------------------------------------------------------------------------------------------------------
_MISSING = object()


def _absent(value: Any) -> bool:
    """Not measured in this window: missing, None (e.g. no labels yet) or NaN (the mean of an empty window)."""
    return value is _MISSING or value is None or (isinstance(value, float) and math.isnan(value))


def lookup(metrics: Mapping[str, Any], dotted: str) -> Any:
    """``metrics["drift.psi_max"]`` if the window's metrics are flat, else ``metrics["drift"]["psi_max"]``."""
    if dotted in metrics:
        return metrics[dotted]
    node: Any = metrics
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


class AlertManager:
    """Evaluate the rules on each window's metrics; deduplicate; deliver to every sink.

    ``rules``: a :class:`RuleSet`, a list of :class:`Rule`, a path to a rules file, or ``None`` for the shipped
    defaults. ``sinks``: sink objects to use instead of the configured ones (the overlay's
    ``policy.alerts.routes`` plus the rules file's ``sinks:``). ``clock`` returns seconds since the epoch; tests
    inject a fake one to move time without sleeping.
    """

    def __init__(
        self,
        settings: Settings,
        rules: RuleSet | Sequence[Rule] | str | Path | None = None,
        sinks: Sequence[Sink] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.clock = clock
        if rules is None or isinstance(rules, str | Path):
            rules = load_rules(rules)
        elif not isinstance(rules, RuleSet):
            rules = RuleSet(tuple(rules), (), "rules")
        self.rule_set = rules
        self.rules = rules.rules
        policy = settings.policy
        # Resolved once: the thresholds in force are those of the overlay when the monitor started (and are
        # reported in every alert's evidence, so nobody has to guess which value was used).
        self.thresholds: dict[str, float | bool] = {}
        for rule in self.rules:
            try:
                self.thresholds[rule.name] = rule.resolve(policy)
            except KeyError:
                raise AlertRuleError(
                    [f"rule {rule.name!r}.threshold refers to {rule.threshold!r}, which is not a number in the policy"],
                    rules.source,
                ) from None
        self.cooldown_s = 60.0 * policy.alerts.cooldown_minutes
        if sinks is None:
            specs: list[SinkSpec | AlertRoute] = [*policy.alerts.routes, *rules.sinks]
            built: dict[str, Sink] = {}
            for spec in specs:
                sink = sink_from_spec(spec, settings.state_dir)
                built.setdefault(sink.name, sink)  # the same file named in the overlay and the rules: write it once
            sinks = list(built.values())
        self.sinks = list(sinks)
        self.state_path = settings.state_dir / STATE_FILE
        self.undelivered_path = settings.state_dir / UNDELIVERED_FILE
        self.delivered: Counter[str] = Counter()  # by sink name
        self.failures: Counter[str] = Counter()  # by sink name; export it: a silent alert channel is an incident
        self.suppressed: Counter[str] = Counter()  # by rule: firings held back by the cool-down

    # -- evaluation ------------------------------------------------------------------------------------------
    def check(self, window_id: str, metrics: Mapping[str, Any]) -> list[Alert]:
        """The alerts whose condition holds for this window, before deduplication (nothing is sent)."""
        now = self.clock()
        context = metrics.get("context") or {}
        if not isinstance(context, Mapping):
            raise AlertMetricError(f"metrics['context'] must be a mapping of extra evidence; got {type(context)}")
        out = []
        for rule in self.rules:
            value = lookup(metrics, rule.metric)
            # Not measured in this window (no labels yet, no traffic): nothing to compare, so nothing fires.
            if _absent(value):
                continue
            threshold = self.thresholds[rule.name]
            if isinstance(threshold, bool):
                if not isinstance(value, bool):
                    raise AlertMetricError(
                        f"metric {rule.metric!r} of window {window_id!r} is {value!r} "
                        f"({type(value).__name__}); rule {rule.name!r} expects true or false"
                    )
            elif isinstance(value, bool) or not isinstance(value, int | float):
                raise AlertMetricError(
                    f"metric {rule.metric!r} of window {window_id!r} is {value!r} "
                    f"({type(value).__name__}); rule {rule.name!r} expects a number"
                )
            if not OPS[rule.op](value, threshold):
                continue
            bound = None
            if rule.window_threshold is not None:
                bound = lookup(metrics, rule.window_threshold)
                if _absent(bound):  # e.g. drift skipped on a window too small to test: no calibrated threshold
                    continue
                if isinstance(bound, bool) or not isinstance(bound, int | float):
                    raise AlertMetricError(
                        f"metric {rule.window_threshold!r} of window {window_id!r} is {bound!r} "
                        f"({type(bound).__name__}); rule {rule.name!r} uses it as a threshold, a number"
                    )
                if not OPS[rule.op](value, bound):
                    continue
            # Context first, so a context key can never overwrite the measured facts below.
            evidence = {
                **dict(context),
                "metric": rule.metric,
                "value": value,
                "op": rule.op,
                "threshold": threshold,
                "threshold_source": rule.threshold_source,
                "window_id": window_id,
            }
            if rule.window_threshold is not None:
                evidence.update(window_threshold=bound, window_threshold_metric=rule.window_threshold)
            out.append(
                Alert(
                    rule.name,
                    rule.severity,
                    self._summary(rule, value, threshold, window_id, bound),
                    evidence,
                    rule.runbook,
                    now,
                    rule.dedup_key,
                )
            )
        return out

    def evaluate(self, window_id: str, metrics: Mapping[str, Any]) -> list[Alert]:
        """Check the rules on one window's metrics and send the alerts that pass deduplication; return those.

        Within one cool-down a dedup key (the rule's ``group``, else its name) is sent once, unless the new alert
        is more severe than the last one sent (escalation goes out at once). The most severe alerts of a window are
        considered first, so a warning and a critical about the same problem in one window page once, as critical.
        """
        candidates = sorted(self.check(window_id, metrics), key=lambda a: -SEVERITY_RANK[a.severity])
        if not candidates:
            return []
        state = self._load_state()
        sent = []
        for alert in candidates:
            last = state.get(alert.dedup_key)
            if last is not None:
                within = alert.fired_at - float(last["fired_at"]) < self.cooldown_s
                escalates = SEVERITY_RANK[alert.severity] > SEVERITY_RANK.get(last["severity"], -1)
                if within and not escalates:
                    self.suppressed[alert.rule] += 1
                    log.debug("alert %s suppressed: %s last sent at %s", alert.rule, alert.dedup_key, last["fired_at"])
                    continue
            self.deliver(alert)
            # Saved after delivery: a crash in between re-sends one alert on restart (at least once), which is
            # better than saving first and losing it (at most once) for a paging system.
            state[alert.dedup_key] = {
                "rule": alert.rule,
                "severity": alert.severity,
                "fired_at": alert.fired_at,
                "window_id": window_id,
            }
            self._save_state(state)
            sent.append(alert)
        return sent

    def deliver(self, alert: Alert) -> dict[str, str | None]:
        """Send ``alert`` to every sink; returns ``{sink name: None or the error}``. Never raises for a sink."""
        results: dict[str, str | None] = {}
        for sink in self.sinks:
            try:
                sink.send(alert)
            # A sink is an outside system (disk, network, someone's chat tool). Whatever goes wrong in one must not
            # stop the alert from reaching the others, so the failure is logged with its traceback, counted and the
            # alert kept in the undelivered file: reported, never silently dropped.
            except Exception as exc:
                self.failures[sink.name] += 1
                results[sink.name] = f"{type(exc).__name__}: {exc}"
                log.error("alert %s not delivered to %s: %s", alert.rule, sink.name, exc, exc_info=True)
                self._record_undelivered(alert, sink.name, results[sink.name])
            else:
                self.delivered[sink.name] += 1
                results[sink.name] = None
        return results

    def send_test(self, window_id: str = "test") -> tuple[Alert, dict[str, str | None]]:
        """Send a synthetic info alert through every sink (``python -m reference_impl alerts test``).

        It bypasses the rules and the cool-down and does not touch the dedup state: its only job is to prove
        that each destination receives alerts, before a real incident needs them to.
        """
        alert = Alert(
            rule="synthetic_test",
            severity="info",
            summary=f"Test alert from the weld-defect monitor (window {window_id}); no action needed.",
            evidence={
                "metric": "test",
                "value": 1,
                "op": "==",
                "threshold": 1,
                "threshold_source": "rule",
                "window_id": window_id,
            },
            runbook="Confirm it arrived in every destination; if one is missing, fix that route before relying on it.",
            fired_at=self.clock(),
            dedup_key="synthetic_test",
        )
        return alert, self.deliver(alert)

    # -- internals -------------------------------------------------------------------------------------------
    @staticmethod
    def _summary(rule: Rule, value: Any, threshold: Any, window_id: str, window_threshold: Any = None) -> str:
        try:
            return rule.summary.format(
                value=value,
                threshold=threshold,
                metric=rule.metric,
                window_id=window_id,
                window_threshold=window_threshold,
            )
        except (ValueError, TypeError, IndexError, KeyError) as exc:
            # e.g. "{value:.1%}" given a bool: keep the alert, show the template and the raw value instead.
            log.warning("rule %s: summary could not be formatted (%s)", rule.name, exc)
            return f"{rule.summary} [{rule.metric}={value!r}, threshold {threshold!r}, window {window_id}]"

    def _load_state(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            # A damaged state file must not stop alerting; we may page twice, which is the safe side.
            log.error("alert state %s is unreadable (%s); starting with an empty cool-down state", self.state_path, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def _save_state(self, state: Mapping[str, Any]) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True), encoding="utf-8")
        tmp.replace(self.state_path)  # atomic: a crash leaves the old state or the new one, never half a file

    def _record_undelivered(self, alert: Alert, sink: str, error: str | None) -> None:
        try:
            self.undelivered_path.parent.mkdir(parents=True, exist_ok=True)
            with self.undelivered_path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"sink": sink, "error": error, "alert": alert.to_dict()}, default=str) + "\n")
        except OSError as exc:  # the state dir itself is failing: the log line above is all we can do
            log.error("could not record the undelivered alert in %s: %s", self.undelivered_path, exc)
