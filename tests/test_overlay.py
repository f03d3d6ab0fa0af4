"""The SME overlay: defaults, validation messages an SME can act on, and that a change reaches chapter and code."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from courseware.overlay import load_overlay
from reference_impl import policy as policy_mod
from reference_impl.policy import DEFAULT_POLICY, OverlayError, Policy, load_policy
from reference_impl.settings import Settings

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "chapters" / "organization.yaml"
CUSTOMIZING = REPO / "chapters" / "CUSTOMIZING.md"


@pytest.fixture(autouse=True)
def no_overlay_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLOPS_OVERLAY", raising=False)


def edited(tmp_path: Path, *replacements: tuple[str, str], name: str = "organization.yaml") -> Path:
    """A copy of the shipped overlay with exact text replacements (each must match once, so tests can't rot)."""
    text = TEMPLATE.read_text()
    for old, new in replacements:
        assert text.count(old) == 1, f"test fixture out of date: {old!r} occurs {text.count(old)} times"
        text = text.replace(old, new)
    path = tmp_path / name
    path.write_text(text)
    return path


def line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


# --------------------------------------------------------------------------------------------------------------
# Defaults and documentation agree with the code.
# --------------------------------------------------------------------------------------------------------------
def _documented_keys() -> dict[str, str]:
    """``key -> Default column`` from the table in CUSTOMIZING.md."""
    rows = re.findall(r"^\| `([a-z0-9_.]+)` \|.*\| (.+?) \|$", CUSTOMIZING.read_text(), flags=re.M)
    return {key: default.strip() for key, default in rows}


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        path = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out |= _flatten(v, path)
        else:
            out[path] = v
    return out


def test_every_key_is_documented_and_every_documented_key_exists() -> None:
    documented = set(_documented_keys())
    policy_keys = {f"policy.{k}" for k in _flatten(DEFAULT_POLICY.to_dict())}
    overlay = load_overlay(TEMPLATE)
    other_keys = {f"organization.{k}" for k in overlay.organization} | {f"sme_slots.{k}" for k in overlay.sme_slots}
    assert documented == policy_keys | other_keys


def test_built_in_defaults_equal_the_documented_defaults() -> None:
    documented = _documented_keys()
    for key, value in _flatten(DEFAULT_POLICY.to_dict()).items():
        shown = documented[f"policy.{key}"].strip("`")
        if isinstance(value, bool):
            assert shown == ("true" if value else "false"), key
        elif isinstance(value, int | float):
            assert float(shown) == value, key
        elif key == "retraining.approvers":
            assert shown == '["quality-lead"]' and value == ["quality-lead"]
        elif key == "alerts.routes":
            assert value == [{"sink": "log"}, {"sink": "jsonl", "path": "alerts.jsonl"}]
            assert "log" in shown and "alerts.jsonl" in shown


def test_shipped_template_loads_and_is_still_all_placeholders() -> None:
    overlay = load_overlay(TEMPLATE)
    assert overlay.unfinished_slots() == ["model_registry", "serving_platform", "monitoring_stack", "retraining_policy"]
    assert overlay.policy == load_policy(TEMPLATE)


def test_without_any_file_the_built_in_defaults_apply(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(policy_mod, "REPO_OVERLAY", tmp_path / "absent.yaml")
    assert load_policy() is DEFAULT_POLICY
    assert load_policy().source == "built-in defaults"


def test_mlops_overlay_selects_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = edited(tmp_path, ("cadence_days: 30", "cadence_days: 7"))
    monkeypatch.setenv("MLOPS_OVERLAY", str(path))
    assert load_policy().retraining.cadence_days == 7
    monkeypatch.setenv("MLOPS_OVERLAY", str(tmp_path / "typo.yaml"))
    with pytest.raises(OverlayError, match=r"file not found: .*typo\.yaml \(set by \$MLOPS_OVERLAY\)"):
        load_policy()


# --------------------------------------------------------------------------------------------------------------
# Malformed overlays: the message names the key, the expected form, the value found, and the line.
# --------------------------------------------------------------------------------------------------------------
MALFORMED = [
    # (id, replacement, key path in the message, expected form, what was found, text on the reported line)
    ("text-not-number", ("psi_alert: 0.25", "psi_alert: high"), "policy.drift.psi_alert", "must be a number", "'high'",
     "psi_alert:"),
    ("alert-below-warn", ("psi_alert: 0.25", "psi_alert: 0.05"), "policy.drift.psi_alert",
     "greater than policy.drift.psi_warn (0.1)", "got 0.05", "psi_alert:"),
    ("rate-above-one", ("false_alarm_rate: 0.05", "false_alarm_rate: 1.5"), "policy.drift.false_alarm_rate",
     "between 0 and 1", "got 1.5", "false_alarm_rate:"),
    ("quoted-number", ("window_size: 200", 'window_size: "200"'), "policy.drift.window_size", "a whole number",
     "'200'", "window_size:"),
    ("window-too-small", ("window_size: 200", "window_size: 10"), "policy.drift.window_size", "at least 30",
     "got 10", "window_size:"),
    ("ood-rate-too-large", ("ood_false_flag_rate: 0.01", "ood_false_flag_rate: 2"),
     "policy.drift.ood_false_flag_rate", "between 0 and 0.5", "got 2", "ood_false_flag_rate:"),
    ("percent-sign", ("max_class_recall_drop: 0.02", "max_class_recall_drop: 5%"),
     "policy.promotion_gate.max_class_recall_drop", "must be a number between 0 and 1", "'5%'",
     "max_class_recall_drop:"),
    ("boolean-for-number", ("min_accuracy_gain: 0.0", "min_accuracy_gain: true"),
     "policy.promotion_gate.min_accuracy_gain", "must be a number", "got true", "min_accuracy_gain:"),
    ("text-for-boolean", ("approval_required: true", 'approval_required: "yes please"'),
     "policy.retraining.approval_required", "true or false", "'yes please'", "approval_required:"),
    ("typo-in-key", ("psi_warn: 0.1", "psi-warn: 0.1"), "policy.drift.psi-warn",
     "is not a known key (did you mean 'psi_warn'?", "valid keys: psi_warn", "psi-warn:"),
    ("deleted-key", ("    cooldown_minutes: 30\n", ""), "policy.alerts.cooldown_minutes", "is missing",
     "whole number of minutes", "alerts:"),
    ("nobody-may-approve", ('approvers: ["quality-lead"]', "approvers: []"), "policy.retraining.approvers",
     "must name at least one role", "nobody may give the approval", "approvers:"),
    ("jsonl-without-path", ("        path: alerts.jsonl\n", ""), "policy.alerts.routes[1].path",
     "is required for a jsonl route", "got nothing", "- sink: jsonl"),
    ("unknown-sink", ("      - sink: log", "      - sink: email"), "policy.alerts.routes[0].sink",
     "must be one of: log, jsonl", "'email'", "- sink: email"),
    ("empty-name", ('name: "Your Organization"', 'name: ""'), "organization.name", "text of 1 to 120 characters",
     "got ''", "  name:"),
    ("braces-in-slot", ("Describe where approved model bundles", "Describe {{ where }} approved model bundles"),
     "sme_slots.model_registry", "must not contain {{ or }}", "", "model_registry:"),
    ("misspelt-section", ("\npolicy:\n", "\npolcy:\n"), "polcy", "is not a known key (did you mean 'policy'?", "",
     "polcy:"),
]  # fmt: skip


def test_an_overlay_written_before_the_ood_flag_existed_still_loads(tmp_path: Path, monkeypatch) -> None:
    from reference_impl.policy import DriftPolicy, load_policy

    old = tmp_path / "organization.yaml"
    text = (REPO / "chapters" / "organization.yaml").read_text()
    old.write_text("\n".join(line for line in text.splitlines() if "ood_false_flag_rate" not in line) + "\n")
    monkeypatch.setenv("MLOPS_OVERLAY", str(old))
    assert load_policy().drift.ood_false_flag_rate == DriftPolicy.ood_false_flag_rate == 0.01


@pytest.mark.parametrize(("replacement", "key", "expected", "found", "line_text"), [m[1:] for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])  # fmt: skip
def test_malformed_overlay_names_key_form_value_and_line(
    tmp_path: Path, replacement: tuple[str, str], key: str, expected: str, found: str, line_text: str
) -> None:
    path = edited(tmp_path, replacement)
    with pytest.raises(OverlayError) as info:
        load_overlay(path)
    message = str(info.value)
    problem = next((p for p in info.value.problems if p.key == key), None)
    assert problem is not None, f"no problem reported for {key}: {message}"
    assert expected in problem.message and found in problem.message, problem
    assert problem.line == line_of(path, line_text), f"{problem} should point at the line with {line_text!r}"
    assert f"line {problem.line}: {key} " in message and "organization.yaml" in message
    if key.startswith("policy.") or key == "polcy":  # the reference implementation refuses it too
        with pytest.raises(OverlayError, match=re.escape(key)):
            load_policy(path)


def test_a_label_minimum_the_labs_cannot_reach_is_refused_for_the_course_only(tmp_path: Path) -> None:
    """1,000 labels is a fine policy for a real line (the reference implementation accepts it), but Labs 4 and 5
    retrain on 300 and about 600: their retraining could never be approved, and every later cell would fail."""
    path = edited(tmp_path, ("min_new_labels: 100", "min_new_labels: 1000"))
    assert load_policy(path).retraining.min_new_labels == 1000
    with pytest.raises(OverlayError) as info:
        load_overlay(path)
    problem = next(p for p in info.value.problems if p.key == "policy.retraining.min_new_labels")
    assert "is 1000, more than the 300 new labels Lab 4 retrains on" in problem.message
    assert "sme_slots.retraining_policy" in problem.message and problem.line == line_of(path, "min_new_labels:")
    assert load_overlay(edited(tmp_path, ("min_new_labels: 100", "min_new_labels: 300"))).policy


def test_all_problems_are_reported_in_one_go(tmp_path: Path) -> None:
    path = edited(tmp_path, ("psi_alert: 0.25", "psi_alert: high"), ("cadence_days: 30", "cadence_days: 0"))
    with pytest.raises(OverlayError) as info:
        load_policy(path)
    assert [p.key for p in info.value.problems] == ["policy.drift.psi_alert", "policy.retraining.cadence_days"]
    assert "has 2 problems" in str(info.value)


def test_yaml_syntax_error_names_the_line_and_the_tab(tmp_path: Path) -> None:
    path = edited(tmp_path, ("    psi_warn: 0.1", "\tpsi_warn: 0.1"))
    with pytest.raises(OverlayError) as info:
        load_policy(path)
    assert f"line {line_of(path, 'psi_warn')}:" in str(info.value)
    assert "not valid YAML" in str(info.value) and "tab" in str(info.value)


def test_unquoted_colon_in_text_is_a_syntax_error_with_a_hint(tmp_path: Path) -> None:
    path = edited(tmp_path, ('short_name: "your organization"', "short_name: Acme: Welding"))
    with pytest.raises(OverlayError, match=r"line \d+: not valid YAML.*quotes around text that contains a colon"):
        load_overlay(path)


def test_duplicate_keys_are_refused_not_silently_overwritten(tmp_path: Path) -> None:
    path = edited(tmp_path, ("    cooldown_minutes: 30\n", "    cooldown_minutes: 30\n    cooldown_minutes: 5\n"))
    with pytest.raises(OverlayError, match=r"policy\.alerts\.cooldown_minutes appears twice \(lines \d+ and \d+\)"):
        load_policy(path)


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    with pytest.raises(OverlayError, match="the file is empty"):
        load_policy(tmp_path / "empty.yaml")


# --------------------------------------------------------------------------------------------------------------
# One edit reaches both the chapter and the code.
# --------------------------------------------------------------------------------------------------------------
def test_changing_the_overlay_changes_the_chapter_and_the_policy_the_loop_uses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from courseware.book import render_chapter

    before = render_chapter()
    assert Settings.from_env().policy.promotion_gate.max_class_recall_drop == 0.02
    path = edited(
        tmp_path,
        ('program_name: "Data Science Workforce Training Pilot"', 'program_name: "Weld Analytics Academy"'),
        ('short_name: "your organization"', 'short_name: "Acme Welding"'),
        ("  model_registry: |\n    _To be completed by the program's SMEs._\n",
         "  model_registry: |\n    Bundles live in Acme's central MLflow server, retained for 15 years.\n"),
        ("max_class_recall_drop: 0.02", "max_class_recall_drop: 0.05"),
    )  # fmt: skip
    monkeypatch.setenv("MLOPS_OVERLAY", str(path))
    after = render_chapter()
    assert "Weld Analytics Academy" in after and "Weld Analytics Academy" not in before
    assert "At Acme Welding" in after and "Bundles live in Acme's central MLflow server" in after
    assert "no class may lose more than 0.05 of recall" in after
    assert "no class may lose more than 0.02 of recall" in before
    assert "{{" not in after, "every placeholder is filled"
    # The reference implementation (retraining gate, monitoring, alerts) reads the same file through Settings.
    settings = Settings.from_env()
    assert settings.policy.promotion_gate.max_class_recall_drop == 0.05
    assert settings.policy.source == str(path)
    # ... and the retraining loop's evaluation gate decides differently: a challenger that loses 0.04 of crack recall
    # fails under the default 0.02 tolerance and passes under the SME's 0.05.
    from reference_impl.retraining import evaluate_gate

    golden_champion = {
        "accuracy": 0.95,
        "recall": {"good": 0.97, "porosity": 0.95, "crack": 0.94, "lack_of_fusion": 0.94},
    }
    golden_challenger = {
        "accuracy": 0.96,
        "recall": {"good": 0.99, "porosity": 0.97, "crack": 0.90, "lack_of_fusion": 0.98},
    }
    recent = ({"accuracy": 0.60, "recall": {}}, {"accuracy": 0.93, "recall": {}})

    def verdict(policy: Policy) -> str:
        return evaluate_gate(golden_champion, golden_challenger, recent_champion=recent[0],
                             recent_challenger=recent[1], policy=policy).verdict  # fmt: skip

    assert verdict(DEFAULT_POLICY) == "fail"
    assert verdict(settings.policy) == "pass"


def test_settings_import_stays_cheap_and_policy_loads_on_first_use() -> None:
    code = (
        "import sys\nfrom reference_impl.settings import Settings\n"
        "assert 'yaml' not in sys.modules and 'reference_impl.policy' not in sys.modules\n"
        "s = Settings()\nassert 'yaml' not in sys.modules\n"
        "print(s.policy.drift.window_size)\nassert 'yaml' in sys.modules\n"
        "assert not any(m in sys.modules for m in ('torch', 'mlflow', 'evidently'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "200"


def test_a_malformed_overlay_stops_only_the_stages_that_need_the_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLOPS_OVERLAY", str(edited(tmp_path, ("psi_alert: 0.25", "psi_alert: high"))))
    settings = Settings.from_env()  # data generation, training and packaging don't need the policy
    assert settings.state_dir.name == "state"
    with pytest.raises(OverlayError, match=r"policy\.drift\.psi_alert must be a number"):
        _ = settings.policy


def test_override_is_validated_like_the_file() -> None:
    stricter = DEFAULT_POLICY.override({"promotion_gate.max_class_recall_drop": 0.01, "drift.window_size": 500})
    assert stricter.promotion_gate.max_class_recall_drop == 0.01 and stricter.drift.window_size == 500
    assert DEFAULT_POLICY.promotion_gate.max_class_recall_drop == 0.02, "policies are immutable"
    with pytest.raises(OverlayError, match=r"policy\.promotion_gate\.max_class_recall_drop must be a number between"):
        DEFAULT_POLICY.override({"promotion_gate.max_class_recall_drop": 2})
    with pytest.raises(OverlayError, match=r"policy\.promotion_gate\.max_recall_drop is not a policy setting"):
        DEFAULT_POLICY.override({"promotion_gate.max_recall_drop": 0.1})


def test_settings_keep_an_explicit_policy_through_with_() -> None:
    custom = DEFAULT_POLICY.override({"retraining.cadence_days": 3})
    settings = Settings().with_policy(custom)
    assert settings.policy is custom
    assert settings.with_(seed=5).policy is custom
    assert isinstance(Settings().policy, Policy)


def test_alert_route_paths_resolve_against_the_state_dir(tmp_path: Path) -> None:
    routes = {r.sink: r for r in DEFAULT_POLICY.alerts.routes}
    assert routes["jsonl"].resolve(tmp_path) == tmp_path / "alerts.jsonl"
    assert routes["log"].resolve(tmp_path) is None


@pytest.mark.parametrize("make_file", [lambda p: edited(p, ("psi_alert: 0.25", "psi_alert: high"))])
def test_cli_reports_the_problem_and_fails(tmp_path: Path, make_file: Callable[[Path], Path]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "courseware", "overlay", str(make_file(tmp_path))],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 1
    assert "policy.drift.psi_alert must be a number" in out.stderr and "got 'high'" in out.stderr
