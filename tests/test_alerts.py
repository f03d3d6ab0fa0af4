"""Alert rules, policy-referenced thresholds, dedup/cool-down, persistence and sinks (chapter: alerting)."""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from reference_impl.monitoring.alerts import (
    DEFAULT_RULES_FILE,
    AlertManager,
    AlertMetricError,
    AlertRuleError,
    JsonlSink,
    LogSink,
    WebhookSink,
    load_rules,
    parse_rules,
)
from reference_impl.policy import DEFAULT_POLICY
from reference_impl.settings import Settings

COOLDOWN_S = DEFAULT_POLICY.alerts.cooldown_minutes * 60


class FakeClock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def rule(
    name: str = "r",
    metric: str = "m.x",
    op: str = ">",
    threshold: object = 1.0,
    severity: str = "warning",
    group: str | None = None,
) -> dict:
    out = {
        "name": name,
        "metric": metric,
        "op": op,
        "threshold": threshold,
        "severity": severity,
        "summary": f"{name}: {{metric}}={{value}} vs {{threshold}} in {{window_id}}",
        "runbook": "do the thing",
    }
    if group:
        out["group"] = group
    return out


def jsonl_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ----------------------------------------------------------------------------------------------------------------
# Rules and thresholds
# ----------------------------------------------------------------------------------------------------------------
def test_default_rules_cover_the_issue_and_take_thresholds_from_the_policy() -> None:
    rules = {r.name: r for r in load_rules().rules}
    assert {
        "drift_detected",
        "psi_major_shift",
        "accuracy_measured_low",
        "accuracy_estimated_low",
        "p99_latency_slo",
        "error_rate_slo",
        "integrity_failures",
        "volume_low",
        "volume_high",
    } <= set(rules)
    assert rules["drift_detected"].severity == "warning"
    assert rules["psi_major_shift"].severity == "critical"
    assert rules["integrity_failures"].severity == "critical"
    assert rules["integrity_failures"].group != rules["drift_detected"].group  # integrity is not statistical drift
    assert rules["psi_major_shift"].threshold == "policy.drift.psi_alert"
    assert rules["psi_major_shift"].window_threshold == "drift.psi_threshold"  # also the calibrated PSI threshold
    assert rules["psi_major_shift"].group == rules["drift_detected"].group  # an escalation of the same problem
    manager = AlertManager(Settings.from_env())
    assert manager.thresholds["psi_major_shift"] == DEFAULT_POLICY.drift.psi_alert
    assert manager.thresholds["p99_latency_slo"] == DEFAULT_POLICY.serving.p99_latency_ms_slo
    assert manager.thresholds["error_rate_slo"] == DEFAULT_POLICY.serving.error_rate_slo
    assert (manager.thresholds["volume_low"], manager.thresholds["volume_high"]) == (0.5, 2.0)
    assert all(r.runbook.strip() for r in rules.values())


def test_the_default_rules_file_is_package_data() -> None:
    import tomllib

    pyproject = tomllib.loads(Path(__file__).resolve().parent.parent.joinpath("pyproject.toml").read_text())
    assert DEFAULT_RULES_FILE.is_file()
    # Shipped in the wheel, not only in the source tree.
    assert "monitoring/*.yaml" in pyproject["tool"]["setuptools"]["package-data"]["reference_impl"]


def test_threshold_follows_the_overlay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    policy = DEFAULT_POLICY.to_dict()
    policy["drift"]["psi_alert"] = 0.4
    policy["serving"]["p99_latency_ms_slo"] = 350
    overlay = tmp_path / "organization.yaml"
    overlay.write_text(yaml.safe_dump({"policy": policy}))
    monkeypatch.setenv("MLOPS_OVERLAY", str(overlay))

    manager = AlertManager(Settings.from_env(), clock=FakeClock())
    assert manager.thresholds["psi_major_shift"] == 0.4
    assert manager.thresholds["p99_latency_slo"] == 350
    calibrated = 0.12  # a large window: the calibrated PSI threshold is below the policy band
    assert manager.check("w1", {"drift": {"psi_max": 0.3, "psi_threshold": calibrated}}) == []  # fires at 0.25
    [alert] = manager.check("w2", {"drift": {"psi_max": 0.45, "psi_threshold": calibrated}})
    assert alert.rule == "psi_major_shift"
    assert alert.evidence["threshold"] == 0.4
    assert alert.evidence["threshold_source"] == "policy.drift.psi_alert"
    assert alert.evidence["window_threshold"] == calibrated
    assert alert.evidence["window_threshold_metric"] == "drift.psi_threshold"
    assert "0.4" in alert.summary and "0.120" in alert.summary


def test_psi_major_shift_needs_the_calibrated_threshold_of_the_window_size() -> None:
    manager = AlertManager(Settings.from_env(), clock=FakeClock(), sinks=[])

    def psi_alerts(psi_max: float, psi_threshold: float | None) -> list[str]:
        metrics = {"drift": {"psi_max": psi_max, "psi_threshold": psi_threshold}}
        return [a.rule for a in manager.check("w", metrics) if a.rule == "psi_major_shift"]

    # A normal window of 50 images: max PSI 0.35 is above the 0.25 band but well inside what noise gives at this
    # size (calibrated threshold ~1.2); it used to page as a critical "major shift".
    assert psi_alerts(0.35, 1.2) == []
    assert psi_alerts(1.5, 1.2) == ["psi_major_shift"]  # beyond both
    # A window of 500: the calibrated threshold is below the band, so the band decides.
    assert psi_alerts(0.2, 0.14) == []
    assert psi_alerts(0.3, 0.14) == ["psi_major_shift"]
    # No calibrated threshold (drift skipped on a window too small to test): no verdict, no page.
    assert psi_alerts(3.0, None) == []
    assert psi_alerts(3.0, float("nan")) == []
    with pytest.raises(AlertMetricError, match=r"'drift\.psi_threshold'.*uses it as a threshold"):
        manager.check("w", {"drift": {"psi_max": 3.0, "psi_threshold": "high"}})


def test_window_threshold_is_validated() -> None:
    ok = parse_rules({"rules": [{**rule(op=">=", threshold=1), "window_threshold": "m.limit"}]})
    assert ok.rules[0].window_threshold == "m.limit"
    manager = AlertManager(Settings.from_env(), ok, sinks=[])
    assert manager.check("w", {"m": {"x": 2.0, "limit": 3.0}}) == []
    assert [a.rule for a in manager.check("w", {"m": {"x": 2.0, "limit": 1.5}})] == ["r"]
    with pytest.raises(AlertRuleError, match=r"window_threshold must be a dotted metric key"):
        parse_rules({"rules": [{**rule(), "window_threshold": "not a metric"}]})
    with pytest.raises(AlertRuleError, match=r"window_threshold must be used with op >, >=, < or <="):
        parse_rules({"rules": [{**rule(op="==", threshold=True), "window_threshold": "m.limit"}]})
    # {window_threshold} in a summary only makes sense for a rule that has one.
    with pytest.raises(AlertRuleError, match=r"found \{window_threshold\}"):
        parse_rules({"rules": [{**rule(), "summary": "x {window_threshold}"}]})


@pytest.mark.parametrize(
    ("op", "value", "fires"),
    [
        (">", 2.0, True),
        (">", 1.0, False),
        (">=", 1.0, True),
        (">=", 0.5, False),
        ("<", 0.5, True),
        ("<", 1.0, False),
        ("<=", 1.0, True),
        ("<=", 1.5, False),
        ("==", 1.0, True),
        ("==", 1.5, False),
        ("!=", 1.5, True),
        ("!=", 1.0, False),
    ],
)
def test_each_operator(op: str, value: float, fires: bool) -> None:
    manager = AlertManager(Settings.from_env(), parse_rules({"rules": [rule(op=op, threshold=1)]}), sinks=[])
    assert bool(manager.check("w", {"m": {"x": value}})) is fires
    assert bool(manager.check("w", {"m.x": value})) is fires  # flat keys work too


def test_boolean_rules_missing_metrics_and_context() -> None:
    rules = parse_rules(
        {"rules": [rule("on", "d.flag", "==", True), rule("off", "d.flag", "!=", True), rule("num", "d.n", ">", 0)]}
    )
    manager = AlertManager(Settings.from_env(), rules, sinks=[])
    assert [a.rule for a in manager.check("w", {"d": {"flag": True}})] == ["on"]
    assert [a.rule for a in manager.check("w", {"d": {"flag": False}})] == ["off"]
    # Not measured in this window: nothing fires (None = "no labels yet"; NaN = an empty window's mean).
    assert manager.check("w", {}) == []
    assert manager.check("w", {"d": {"n": None}}) == []
    assert manager.check("w", {"d": {"n": float("nan")}}) == []
    context = {"features": ["brightness"], "since": "w5", "window_id": "not me", "value": -1}
    [alert] = manager.check("w7", {"d": {"n": 3}, "context": context})
    assert alert.evidence == {
        "metric": "d.n",
        "value": 3,
        "op": ">",
        "threshold": 0.0,
        "threshold_source": "rule",
        "window_id": "w7",
        "features": ["brightness"],
        "since": "w5",
    }
    assert alert.summary == "num: d.n=3 vs 0.0 in w7"
    assert alert.runbook == "do the thing"


def test_a_metric_of_the_wrong_type_is_an_error_naming_it() -> None:
    manager = AlertManager(Settings.from_env(), sinks=[])
    with pytest.raises(AlertMetricError, match=r"'drift\.psi_max'.*'high'.*expects a number"):
        manager.evaluate("w1", {"drift": {"psi_max": "high"}})
    with pytest.raises(AlertMetricError, match=r"'drift\.detected'.*expects true or false"):
        manager.evaluate("w1", {"drift": {"detected": 1}})
    with pytest.raises(AlertMetricError, match=r"'integrity\.failures'.*expects a number"):
        manager.evaluate("w1", {"integrity": {"failures": True}})


# ----------------------------------------------------------------------------------------------------------------
# Dedup, cool-down, escalation, persistence
# ----------------------------------------------------------------------------------------------------------------
def test_cooldown_suppresses_repeats_and_escalation_fires_at_once() -> None:
    clock = FakeClock()
    settings = Settings.from_env()
    manager = AlertManager(settings, clock=clock)
    drifting = {"drift": {"detected": True, "psi_max": 0.12, "psi_threshold": 0.1}}

    assert [a.rule for a in manager.evaluate("w1", drifting)] == ["drift_detected"]
    clock.t += 60
    assert manager.evaluate("w2", drifting) == []  # same problem, within the cool-down
    assert manager.suppressed["drift_detected"] == 1
    clock.t += 60
    worse = {"drift": {"detected": True, "psi_max": 0.5, "psi_threshold": 0.1}}
    # Escalation: the critical PSI rule shares the "drift" group, is more severe, so it goes out at once; the
    # warning of the same window is held back by the critical it just sent.
    [alert] = manager.evaluate("w3", worse)
    assert (alert.rule, alert.severity, alert.dedup_key) == ("psi_major_shift", "critical", "drift")
    clock.t += 60
    assert manager.evaluate("w4", worse) == []
    clock.t += COOLDOWN_S  # cool-down over: it pages again
    assert [a.rule for a in manager.evaluate("w5", worse)] == ["psi_major_shift"]
    # Other problems have their own keys and are not held back by the drift cool-down.
    assert [a.rule for a in manager.evaluate("w6", {"integrity": {"failures": 2}, **worse})] == ["integrity_failures"]
    lines = jsonl_lines(settings.state_dir / "alerts.jsonl")
    assert [(d["rule"], d["evidence"]["window_id"]) for d in lines] == [
        ("drift_detected", "w1"),
        ("psi_major_shift", "w3"),
        ("psi_major_shift", "w5"),
        ("integrity_failures", "w6"),
    ]


def test_zero_cooldown_sends_every_repeat() -> None:
    settings = Settings.from_env()
    settings = settings.with_policy(settings.policy.override({"alerts.cooldown_minutes": 0}))
    manager = AlertManager(settings, clock=FakeClock(), sinks=[])
    assert len(manager.evaluate("w1", {"ops": {"error_rate": 0.5}})) == 1
    assert len(manager.evaluate("w2", {"ops": {"error_rate": 0.5}})) == 1


def test_cooldown_state_survives_a_restart() -> None:
    clock = FakeClock()
    settings = Settings.from_env()
    metrics = {"ops": {"p99_latency_ms": 900.0}}
    assert len(AlertManager(settings, clock=clock).evaluate("w1", metrics)) == 1
    clock.t += 300
    restarted = AlertManager(settings, clock=clock)  # a new process would read the same state file
    assert restarted.evaluate("w2", metrics) == []
    clock.t += COOLDOWN_S
    assert len(AlertManager(settings, clock=clock).evaluate("w3", metrics)) == 1
    state = json.loads((settings.state_dir / "alerts_state.json").read_text())
    assert state["latency"]["window_id"] == "w3"


# ----------------------------------------------------------------------------------------------------------------
# Sinks
# ----------------------------------------------------------------------------------------------------------------
def test_log_and_jsonl_sinks(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings.from_env()
    manager = AlertManager(settings, clock=FakeClock())
    assert {s.name for s in manager.sinks} == {"log", f"jsonl:{settings.state_dir / 'alerts.jsonl'}"}
    with caplog.at_level(logging.INFO, logger="reference_impl.alerts"):
        alerts = manager.evaluate(
            "w9", {"integrity": {"failures": 3, "volume_ratio": 0.2}, "context": {"formats": {"tiff": 3}}}
        )
    assert [a.rule for a in alerts] == ["integrity_failures", "volume_low"]  # most severe first
    levels = {r.getMessage().split()[1]: r.levelno for r in caplog.records if r.getMessage().startswith("ALERT")}
    assert levels == {"integrity_failures": logging.CRITICAL, "volume_low": logging.WARNING}
    lines = jsonl_lines(settings.state_dir / "alerts.jsonl")
    assert lines == [a.to_dict() for a in alerts]
    assert lines[0]["evidence"]["formats"] == {"tiff": 3}
    assert lines[0]["evidence"]["value"] == 3 and lines[0]["evidence"]["op"] == ">"
    assert "integrity report" in lines[0]["runbook"]
    assert manager.delivered[f"jsonl:{settings.state_dir / 'alerts.jsonl'}"] == 2


class _Receiver(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        server = self.server
        server.received.append((self.headers["Content-Type"], json.loads(body)))  # type: ignore[attr-defined]
        status = server.statuses.pop(0) if server.statuses else 200  # type: ignore[attr-defined]
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass


@pytest.fixture
def receiver() -> Iterator[HTTPServer]:
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    server.received = []  # type: ignore[attr-defined]
    server.statuses = []  # type: ignore[attr-defined]
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_webhook_from_the_rules_file_receives_the_alert(receiver: HTTPServer, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    raw = yaml.safe_load(DEFAULT_RULES_FILE.read_text())
    raw["sinks"] = [{"sink": "webhook", "url": url, "timeout_s": 5, "retries": 0}]
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(raw))
    manager = AlertManager(Settings.from_env(), rules_file, clock=FakeClock())
    assert f"webhook:{url}" in {s.name for s in manager.sinks}
    [alert] = manager.evaluate("w1", {"ops": {"error_rate": 0.2}})
    assert receiver.received == [("application/json", alert.to_dict())]  # type: ignore[attr-defined]
    body = receiver.received[0][1]  # type: ignore[attr-defined]
    assert body["rule"] == "error_rate_slo" and body["severity"] == "critical"
    assert body["evidence"]["threshold"] == DEFAULT_POLICY.serving.error_rate_slo
    assert manager.failures == {}


def test_webhook_retries_a_server_error(receiver: HTTPServer) -> None:
    receiver.statuses = [503]  # type: ignore[attr-defined]
    sleeps: list[float] = []
    url = f"http://127.0.0.1:{receiver.server_address[1]}/"
    sink = WebhookSink(url, retries=2, backoff_s=0.25, sleep=sleeps.append)
    manager = AlertManager(Settings.from_env(), sinks=[sink], clock=FakeClock())
    assert len(manager.evaluate("w1", {"integrity": {"failures": 1}})) == 1
    assert len(receiver.received) == 2  # type: ignore[attr-defined]
    assert sleeps == [0.25]
    assert manager.delivered[sink.name] == 1 and manager.failures == {}


def test_a_dead_webhook_is_counted_and_never_loses_the_alert() -> None:
    with socket.socket() as s:  # a port nobody listens on: bound, then closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = Settings.from_env()
    sleeps: list[float] = []
    webhook = WebhookSink(f"http://127.0.0.1:{port}/", timeout_s=2, retries=2, backoff_s=0.5, sleep=sleeps.append)
    jsonl = JsonlSink(settings.state_dir / "alerts.jsonl")
    manager = AlertManager(settings, sinks=[webhook, jsonl, LogSink()], clock=FakeClock())

    [alert] = manager.evaluate("w1", {"ops": {"error_rate": 0.2}})  # no exception
    assert sleeps == [0.5, 1.0]  # two retries with doubling backoff
    assert manager.failures == {webhook.name: 1}
    assert manager.delivered[jsonl.name] == 1 and manager.delivered["log"] == 1
    assert jsonl_lines(settings.state_dir / "alerts.jsonl") == [alert.to_dict()]
    [undelivered] = jsonl_lines(settings.state_dir / "alerts_undelivered.jsonl")
    assert undelivered["sink"] == webhook.name and undelivered["alert"] == alert.to_dict()
    assert "3 attempt(s)" in undelivered["error"]


def test_send_test_goes_through_every_sink_without_touching_the_cooldown() -> None:
    settings = Settings.from_env()
    manager = AlertManager(settings, clock=FakeClock())
    alert, results = manager.send_test()
    assert results == {s.name: None for s in manager.sinks}
    assert jsonl_lines(settings.state_dir / "alerts.jsonl")[0]["rule"] == "synthetic_test"
    assert not (settings.state_dir / "alerts_state.json").exists()
    assert alert.severity == "info"


# ----------------------------------------------------------------------------------------------------------------
# Bad rules files
# ----------------------------------------------------------------------------------------------------------------
def test_bad_rules_report_index_name_field_and_expected_form(tmp_path: Path) -> None:
    bad = tmp_path / "rules.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "rules": [
                    rule("ok"),
                    {**rule("wrong_op"), "op": "=>"},
                    {**rule("typo_ref"), "threshold": "policy.drift.psi_alrt"},
                    {k: v for k, v in rule("no_runbook").items() if k != "runbook"},
                    {**rule("bool_order"), "threshold": True},
                    {**rule("extra"), "treshold": 1},
                    {**rule("sev"), "severity": "page"},
                    {**rule("placeholder"), "summary": "{value} {colour}"},
                    rule("ok"),
                ],
                "sinks": [{"sink": "webhook", "url": "ftp://x"}, {"sink": "pager"}],
            },
            sort_keys=False,
        )
    )
    with pytest.raises(AlertRuleError) as info:
        load_rules(bad)
    text = str(info.value)
    assert text.startswith("rules.yaml has 10 problems")
    for expected in [
        "rules[1] (name 'wrong_op').op must be one of > >= < <= == !=",
        "rules[2] (name 'typo_ref').threshold must be a number, true/false, or a policy reference "
        "(did you mean 'policy.drift.psi_alert'?)",
        "rules[3] (name 'no_runbook').runbook is missing",
        "rules[4] (name 'bool_order').threshold must be a number or a policy reference when op is '>'",
        "rules[5] (name 'extra').treshold is not a known key (did you mean 'threshold'?",
        "rules[6] (name 'sev').severity must be one of info, warning, critical; got 'page'",
        "rules[7] (name 'placeholder').summary must be text using only the placeholders",
        "rules[8] (name 'ok').name is already used by rules[0]",
        "sinks[0].url must be an http:// or https:// address; got 'ftp://x'",
        "sinks[1].sink must be one of log, jsonl, webhook; got 'pager'",
    ]:
        assert expected in text, expected
    assert "rules[0]" not in text.replace("rules[0]; names", "")  # the valid rule is not blamed


def test_unreadable_rules_files_are_clear(tmp_path: Path) -> None:
    with pytest.raises(AlertRuleError, match="file not found"):
        load_rules(tmp_path / "missing.yaml")
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    with pytest.raises(AlertRuleError, match="empty"):
        load_rules(tmp_path / "empty.yaml")
    (tmp_path / "syntax.yaml").write_text("rules:\n  - name: a\n    op: >=\n   metric: x\n")
    with pytest.raises(AlertRuleError, match=r"line \d+, column \d+: not valid YAML"):
        load_rules(tmp_path / "syntax.yaml")
    (tmp_path / "norules.yaml").write_text("sinks: []\n")
    with pytest.raises(AlertRuleError, match="rules must be a list with at least one rule"):
        load_rules(tmp_path / "norules.yaml")


def test_alerts_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from reference_impl.cli import main

    settings = Settings.from_env()
    assert main(["alerts", "test"]) == 0
    out = capsys.readouterr().out
    assert "ok      log" in out and f"ok      jsonl:{settings.state_dir / 'alerts.jsonl'}" in out
    assert jsonl_lines(settings.state_dir / "alerts.jsonl")[0]["rule"] == "synthetic_test"

    assert main(["alerts", "rules"]) == 0
    out = capsys.readouterr().out
    assert f"drift.psi_max >= {DEFAULT_POLICY.drift.psi_alert}  (policy.drift.psi_alert)" in out

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = tmp_path / "dead.yaml"
    dead.write_text(
        yaml.safe_dump(
            {"rules": [rule()], "sinks": [{"sink": "webhook", "url": f"http://127.0.0.1:{port}", "retries": 0}]}
        )
    )
    assert main(["alerts", "test", "--rules", str(dead)]) == 1
    assert f"FAILED  webhook:http://127.0.0.1:{port}" in capsys.readouterr().out

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"rules": [{**rule(), "op": "=>"}]}))
    assert main(["alerts", "test", "--rules", str(bad)]) == 2
    assert "rules[0] (name 'r').op must be one of" in capsys.readouterr().err
