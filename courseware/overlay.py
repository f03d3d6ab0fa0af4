"""The SME overlay as a whole: organisation names, the four SME slots, and the policy.

``chapters/organization.yaml`` has three parts. ``policy`` is read by the reference implementation
(``reference_impl/policy.py``: the stages need it at run time). ``organization`` and ``sme_slots`` are text that only
the chapter uses, so they are validated here, by the tooling that renders the chapter. Both halves use the same
reader and the same error type (:class:`reference_impl.policy.OverlayError`), so an SME gets one consistent kind of
message: the file, the line, the key path, the expected form and what was found.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reference_impl.policy import (
    MISSING,
    Checker,
    OverlayDocument,
    OverlayError,
    Policy,
    Problem,
    check_top_level,
    overlay_path,
    parse_policy,
    read_overlay,
    show,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
# The first line of every shipped SME slot; while it is there, the slot counts as unfinished.
PLACEHOLDER_MARK = "_To be completed by the program's SMEs._"

ORGANIZATION_KEYS = {  # key -> (maximum length, what it is)
    "name": (120, "the full name of the organisation"),
    "short_name": (60, "the name used inside sentences"),
    "program_name": (120, "the name of the training program"),
}
SME_SLOTS = ("model_registry", "serving_platform", "monitoring_stack", "retraining_policy")
# Where each slot appears in the chapter (the MyST label of the section), so a report can say where to look.
SLOT_SECTIONS = {
    "model_registry": "sec-packaging",
    "serving_platform": "sec-serving",
    "monitoring_stack": "sec-monitoring",
    "retraining_policy": "sec-retraining",
}


@dataclass(frozen=True)
class Overlay:
    """A validated overlay: what the chapter shows and what the reference implementation enforces."""

    path: Path | None
    organization: dict[str, str]
    sme_slots: dict[str, str]
    policy: Policy

    def substitutions(self) -> dict[str, str]:
        """The values of the chapter's ``{{ name }}`` placeholders."""
        subs = {
            "organization_name": self.organization["name"],
            "org_short_name": self.organization["short_name"],
            "program_name": self.organization["program_name"],
        }
        subs.update({f"sme_{slot}": text.strip() for slot, text in self.sme_slots.items()})
        subs.update(policy_substitutions(self.policy))
        return subs

    def unfinished_slots(self) -> list[str]:
        """The SME slots that still carry the placeholder mark."""
        return [slot for slot, text in self.sme_slots.items() if PLACEHOLDER_MARK in text]


def policy_substitutions(policy: Policy) -> dict[str, str]:
    """``policy_<name>`` placeholders: the numbers in force, so the chapter states the organisation's policy."""
    p = policy
    routes = [f"the file {r.path}" if r.sink == "jsonl" else "the program's log" for r in p.alerts.routes]
    approval = (
        f"required, from {' or '.join(p.retraining.approvers)}" if p.retraining.approval_required else "not required"
    )
    return {
        "policy_psi_warn": f"{p.drift.psi_warn:g}",
        "policy_psi_alert": f"{p.drift.psi_alert:g}",
        "policy_window_size": str(p.drift.window_size),
        "policy_false_alarm_rate": f"{p.drift.false_alarm_rate:g}",
        "policy_alert_routes": " and ".join(routes),
        "policy_cooldown_minutes": str(p.alerts.cooldown_minutes),
        "policy_cadence_days": str(p.retraining.cadence_days),
        "policy_min_new_labels": str(p.retraining.min_new_labels),
        "policy_approval": approval,
        "policy_min_accuracy_gain": f"{p.promotion_gate.min_accuracy_gain:g}",
        "policy_max_class_recall_drop": f"{p.promotion_gate.max_class_recall_drop:g}",
        "policy_p99_latency_ms_slo": f"{p.serving.p99_latency_ms_slo:g}",
        "policy_error_rate_slo": f"{p.serving.error_rate_slo:g}",
    }


def load_overlay(path: str | Path | None = None) -> Overlay:
    """Read and validate the whole overlay (default: ``$MLOPS_OVERLAY`` or ``chapters/organization.yaml``).

    Raises :class:`OverlayError` listing every problem in the file, not just the first.
    """
    path = Path(path) if path is not None else overlay_path()
    if path is None:
        missing = Problem("", "chapters/organization.yaml is missing and $MLOPS_OVERLAY is unset")
        raise OverlayError([missing], "overlay")
    doc = read_overlay(path)
    c = check_top_level(doc)
    for key in ("organization", "sme_slots", "policy"):
        if key not in doc.data:
            c.problem(key, "is missing; copy the section from the template in the repository")
    organization = _organization(c, doc.data.get("organization"), "organization" in doc.data)
    slots = _slots(c, doc.data.get("sme_slots"), "sme_slots" in doc.data)
    policy_problems: list[Any] = []
    policy = None
    if "policy" in doc.data:
        try:
            policy = parse_policy(doc.data["policy"], source=str(path), lines=doc.lines)
        except OverlayError as exc:
            policy_problems = exc.problems
    c.problems.extend(policy_problems)
    if policy is not None:
        _course_limits(c, policy)
    c.problems.sort(key=lambda p: p.line or 0)  # in file order, the way an SME reads it
    c.raise_if_any()
    assert policy is not None
    return Overlay(path, organization, slots, policy)


# The most new labels a lab's retraining has: Lab 4 retrains on 300 (Lab 5 collects about 600). A policy asking for
# more is valid for a real line, but under it the labs' retraining decision could never say "retrain", approval
# would refuse ("nothing to approve") and every later cell of Labs 4 and 5 would fail.
LAB_NEW_LABELS = 300


def _course_limits(c: Checker, policy: Policy) -> None:
    """Values the product accepts but under which a lab could not tell its story (checked for the course only)."""
    n = policy.retraining.min_new_labels
    if n > LAB_NEW_LABELS:
        c.problem("policy.retraining.min_new_labels",
                  f"is {n}, more than the {LAB_NEW_LABELS} new labels Lab 4 retrains on (Lab 5 collects about "
                  f"600): the labs could never retrain under it. Use {LAB_NEW_LABELS} or less here, and give your "
                  "production figure in the text of sme_slots.retraining_policy")  # fmt: skip


def _organization(c: Checker, raw: Any, present: bool) -> dict[str, str]:
    if not present:
        return {}
    values = c.section(raw, "organization", tuple(ORGANIZATION_KEYS))
    out: dict[str, str] = {}
    if not isinstance(raw, Mapping):
        return out
    for name, (max_len, what) in ORGANIZATION_KEYS.items():
        key, expected = f"organization.{name}", f"text of 1 to {max_len} characters on one line ({what})"
        value = c.get(values, "organization", name, expected)
        if value is MISSING:
            continue
        if not isinstance(value, str) or not value.strip():
            c.problem(key, f"must be {expected}; got {show(value)}")
        elif len(value.strip()) > max_len:
            c.problem(key, f"must be {expected}; got {len(value.strip())} characters")
        elif "\n" in value.strip():
            c.problem(key, f"must be {expected}; got several lines")
        else:
            _no_braces(c, key, value)
            out[name] = value.strip()
    return out


def _slots(c: Checker, raw: Any, present: bool) -> dict[str, str]:
    if not present:
        return {}
    values = c.section(raw, "sme_slots", SME_SLOTS)
    out: dict[str, str] = {}
    if not isinstance(raw, Mapping):
        return out
    for slot in SME_SLOTS:
        expected = "Markdown text written under '|' and indented by four spaces"
        value = c.get(values, "sme_slots", slot, expected)
        if value is MISSING:
            continue
        if not isinstance(value, str) or not value.strip():
            c.problem(f"sme_slots.{slot}", f"must be {expected}; got {show(value)}")
            continue
        _no_braces(c, f"sme_slots.{slot}", value)
        # The slot sits inside a ``` fenced box in the chapter: a line of backticks would close the box early.
        if re.search(r"^\s*```", value, flags=re.M):
            c.problem(f"sme_slots.{slot}", "must not contain a line starting with ``` (it would end the chapter's box)")
        out[slot] = value
    return out


def _no_braces(c: Checker, key: str, value: str) -> None:
    if "{{" in value or "}}" in value:
        c.problem(key, "must not contain {{ or }} (the chapter uses double braces for its own placeholders)")


def describe(overlay: Overlay) -> str:
    """A short human summary for ``make book`` and ``python -m courseware overlay``."""
    lines = [
        f"overlay: {overlay.path}",
        f"  organisation: {overlay.organization['name']} ({overlay.organization['short_name']})",
        f"  program:      {overlay.organization['program_name']}",
    ]
    unfinished = overlay.unfinished_slots()
    done = len(SME_SLOTS) - len(unfinished)
    lines.append(f"  SME slots:    {done} of {len(SME_SLOTS)} completed")
    lines += [f"    still a placeholder: {slot} (chapter section {SLOT_SECTIONS[slot]})" for slot in unfinished]
    p = overlay.policy
    lines.append(
        f"  policy:       drift PSI warn/alert {p.drift.psi_warn:g}/{p.drift.psi_alert:g}, "
        f"window {p.drift.window_size}; retrain every {p.retraining.cadence_days} d "
        f"(>= {p.retraining.min_new_labels} new labels; drift {p.retraining.drift_windows} windows in a row; "
        f"accuracy < {p.retraining.min_accuracy:g}); "
        f"gate: accuracy gain >= {p.promotion_gate.min_accuracy_gain:g}, "
        f"class recall drop <= {p.promotion_gate.max_class_recall_drop:g}"
    )
    return "\n".join(lines)


__all__ = ["PLACEHOLDER_MARK", "SME_SLOTS", "Overlay", "OverlayDocument", "OverlayError", "describe", "load_overlay"]
