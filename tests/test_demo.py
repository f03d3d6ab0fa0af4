"""``python -m reference_impl demo``: the whole production loop, end to end, as a user runs it.

The fast run is seeded, so what it does is reproducible: baseline traffic, a switch to ``new_camera``, drift alarms
and an accuracy drop, inspector labels, a retraining decision, a challenger that passes the gate, shadow, canary,
promotion and a watched recovery. The second test interrupts a second run in the same state dir with Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from reference_impl.retraining import AuditLog
from reference_impl.settings import Settings

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
DEMO_TIMEOUT_S = 1800


def demo_command(state: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "reference_impl", "--state-dir", str(state), "demo", "--fast", "--device", "cpu",
            *extra]  # fmt: skip


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo-state")


@pytest.fixture(scope="module")
def env(state: Path) -> dict[str, str]:
    """The organisation's overlay with a looser recall tolerance: the fast run's golden set has only ~100 images
    per class, where one image is 1% of recall, so the default 2% tolerance would make the gate's verdict a coin
    toss. The full demo keeps the organisation's 2% on a golden set of 1,000."""
    overlay = yaml.safe_load((REPO / "chapters" / "organization.yaml").read_text())
    overlay["policy"]["promotion_gate"]["max_class_recall_drop"] = 0.06
    path = state / "overlay.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return {**os.environ, "PYTHONPATH": str(REPO), "MLOPS_OVERLAY": str(path)}


@pytest.fixture(scope="module")
def first_run(state: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], Path]:
    # A guard against a hung demo, not a speed target: on an old CPU (emulated: the SSE4.1 profile) with the machine
    # busy, the fast demo has taken more than 10 minutes.
    proc = subprocess.run(demo_command(state), capture_output=True, text=True, timeout=DEMO_TIMEOUT_S, env=env,
                          cwd=state)  # fmt: skip
    runs = sorted(p for p in (state / "demo").iterdir() if p.is_dir())
    return proc, runs[0]


def _story(run_dir: Path) -> dict:
    """What the registry, the audit log and the timeline of one run say happened."""
    from reference_impl.registry import Registry

    registry = Registry(Settings(state_dir=run_dir))
    audit = AuditLog(Settings(state_dir=run_dir)).read()
    gates = [e for e in audit if e.event == "gate" and "version" in e.evidence]  # recorded on a version
    return {
        "registry": registry,
        "aliases": registry.aliases(),
        "events": [e.event for e in audit],
        "gates": gates,
        "registered": [e.evidence["version"] for e in audit if e.event == "challenger_registered"],
        "promoted": [e.evidence["version"] for e in audit if e.event == "promote"],
        "windows": json.loads((run_dir / "timeline.json").read_text()),
    }


def test_fast_demo_runs_the_closed_loop(first_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    """The required end state, whatever this CPU's kernels made of the fine-tune: the line recovers within the
    demo's windows (after one or two recorded attempts), and registry, audit log and timeline tell one story."""
    proc, run_dir = first_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Production loop summary" in proc.stdout and "run folder:" in proc.stdout
    # everything lives in the run folder: no MLflow database or state dir appears in the working directory
    assert not (run_dir.parents[1] / "mlflow.db").exists() and not (run_dir.parents[1] / ".mlops").exists()
    story = _story(run_dir)
    windows = story["windows"]
    phases = [w["phase"] for w in windows]
    assert phases[:2] == ["baseline", "baseline"]
    assert phases[2:][:1] == ["drift"] and phases[-3:] == ["shadow", "canary", "watch"], phases

    # Every attempt is a registered version with its verdict on it; only the last passed, and only it was promoted.
    gates, registered = story["gates"], story["registered"]
    assert 1 <= len(gates) == len(registered) <= 2 and story["events"].count("training") == len(gates)
    assert [g.evidence["passed"] for g in gates] == [False] * (len(gates) - 1) + [True]
    assert [g.evidence["version"] for g in gates] == registered
    for version, gate in zip(registered, gates, strict=True):
        assert story["registry"].get(version).tags["gate.verdict"] == ("pass" if gate.evidence["passed"] else "fail")
    version = registered[-1]
    assert story["promoted"] == [version] and "challenger" not in story["aliases"]
    if len(gates) > 1:  # a failed gate: the line kept running on v1 for one more window of labels
        assert phases.count("drift") >= 2 and "gate FAIL" in proc.stdout

    by_phase: dict[str, list[dict]] = {}
    for w in windows:
        by_phase.setdefault(w["phase"], []).append(w)
    baseline = min(w["acc_true"] for w in by_phase["baseline"])
    drifted = max(w["acc_true"] for w in by_phase["drift"])
    # the new camera hurts, the monitor sees it, and the promoted challenger brings accuracy back
    assert drifted < baseline - 0.2
    assert all(w["drift"] for w in by_phase["drift"])
    assert by_phase["watch"][0]["acc_true"] > drifted + 0.15
    # who answered: v1 alone until the canary, both during it, the new version alone after the promotion
    assert all(set(w["served"]) == {"champion v1"} for w in by_phase["drift"])
    assert set(by_phase["canary"][0]["served"]) == {"champion v1", f"canary v{version}"}
    assert set(by_phase["watch"][0]["served"]) == {f"champion v{version}"}
    assert all(w["errors"] == 0 for w in windows), "no request may fail, not even across the hot reload"
    # The watch either kept the new version or rolled it back (the fast run's small challenger can miss the 90%
    # SLO): either way the registry, the audit log and the timeline must tell the same story.
    rolled_back = any("rolled back" in e for e in by_phase["watch"][-1]["events"])
    assert story["aliases"]["champion"] == ("1" if rolled_back else version)
    assert ("rollback" in story["events"]) == rolled_back

    report = (run_dir / "report.html").read_text()
    assert "data:image/png;base64," in report and "Evaluation gate" in report and "PASS" in report
    assert all(f"Attempt {i + 1} (version {v})" in report for i, v in enumerate(registered))
    assert (run_dir / "timeline.png").stat().st_size > 10_000


def test_every_step_of_the_loop_is_in_the_audit_log(first_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, run_dir = first_run
    audit = AuditLog(Settings(state_dir=run_dir))
    assert audit.verify() > 0  # the hash chain is intact
    events = [e.event for e in audit.read()]
    expected = ["initial_champion", "decision", "approval", "training_set", "training", "challenger_registered",
                "gate", "shadow", "rollout_changed", "canary", "promote", "rollout_changed", "watch"]  # fmt: skip
    it = iter(events)
    assert all(e in it for e in expected), f"missing or out of order: {events}"


# Every gate of this run is made to fail, whatever its numbers. It runs in a child process: the demo's server
# handling must not change the signal dispositions of the pytest process (the Ctrl-C test below inherits them).
FAILING_GATE_DEMO = """
import dataclasses, sys
from pathlib import Path
from reference_impl import retraining
from reference_impl.loop import DemoConfig, run_demo
from reference_impl.settings import Settings

real_gate = retraining.evaluate_gate

def failing_gate(*args, **kwargs):
    result = real_gate(*args, **kwargs)
    forced = "FAIL: forced by the test (the real verdict was " + result.explanation[:4].strip() + ")"
    return dataclasses.replace(result, passed=False, reasons=[forced], explanation=forced)

retraining.evaluate_gate = failing_gate
config = DemoConfig(fast=True, n_images=600, max_retrain_attempts=2, seed=3)
result = run_demo(Settings(state_dir=Path(sys.argv[1]), device="cpu"), config, echo=False)
print(result.run_dir)
print(result.summary())
"""


def test_a_failed_gate_keeps_the_champion_and_the_demo_tries_again(tmp_path: Path, env: dict[str, str]) -> None:
    """The champion stays, each failure is on record, the line keeps running and collecting labels, a bounded
    number of new attempts is made, and the timeline, the registry and the report say so."""
    proc = subprocess.run([sys.executable, "-c", FAILING_GATE_DEMO, str(tmp_path / "state")], capture_output=True,
                          text=True, timeout=DEMO_TIMEOUT_S, env=env, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir, summary = Path(proc.stdout.splitlines()[0]), proc.stdout
    story = _story(run_dir)
    phases = [w["phase"] for w in story["windows"]]
    assert "shadow" not in phases and "canary" not in phases and "watch" not in phases, phases
    assert phases[-2:] == ["drift", "drift"], "after each failed attempt the line runs one more window on v1"
    assert len(story["gates"]) == len(story["registered"]) == 2 and story["promoted"] == []
    assert story["aliases"] == {"champion": "1"}, "a failed challenger is not even shadowed"
    assert all(story["registry"].get(v).tags["gate.verdict"] == "fail" for v in story["registered"])
    assert all(set(w["served"]) == {"champion v1"} for w in story["windows"])
    events = [e for w in story["windows"] for e in w["events"]]
    assert sum("collecting one more window" in e for e in events) == 1
    assert sum("no attempts left" in e for e in events) == 1
    # the second attempt trained on more labels than the first (the inspectors kept labelling)
    n_feedback = [int(story["registry"].get(v).tags["retraining.n_feedback"]) for v in story["registered"]]
    assert n_feedback[1] > n_feedback[0], n_feedback
    assert "(no new model was rolled out)" in summary and "gate, attempt 2 (v3): FAIL" in summary
    report = (run_dir / "report.html").read_text()
    assert "Attempt 1 (version 2)" in report and "Attempt 2 (version 3)" in report


def test_ctrl_c_stops_the_server_and_a_second_run_gets_its_own_folder(
    state: Path, env: dict[str, str], first_run: tuple[subprocess.CompletedProcess[str], Path]
) -> None:
    # A shell starts background commands with Ctrl-C ignored, and children inherit that: under `make test &` the
    # demo would then rightly ignore SIGINT (and this test failed). Give it a terminal's foreground disposition.
    # A small champion (600 images): this run is interrupted at its first window, its training is not the point.
    proc = subprocess.Popen(demo_command(state, "--images", "600"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=state,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    url = None
    deadline = time.monotonic() + 300
    assert proc.stdout is not None
    for line in proc.stdout:  # interrupt once the server is up and traffic flows
        if "inference server ready at " in line:
            url = line.split("ready at ")[1].split()[0]
        if line.startswith("[window 1]") or time.monotonic() > deadline:
            break
    assert url, "the second run never started its server"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "server was stopped" in err
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"{url}/v2/health/live", timeout=2)
    runs = sorted(p for p in (state / "demo").iterdir() if p.is_dir())
    assert len(runs) == 2 and runs[0] == first_run[1]
    assert (runs[1] / "report.html").is_file(), "the partial report is written on Ctrl-C"
    assert "INTERRUPTED" in (runs[1] / "report.html").read_text()
