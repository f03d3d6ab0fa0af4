"""retraining.py: the policy's decisions, the retraining set (no golden leakage), the evaluation gate, rollout
(shadow, canary, promote + hot reload, watch + automatic rollback) and the append-only audit log.

Chapter: "Retraining". Real registries (MLflow on SQLite), a real server (uvicorn in a thread, or FastAPI's
TestClient) and one tiny real training run; no timing assertions.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import itertools
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from reference_impl import data
from reference_impl.policy import Policy
from reference_impl.retraining import (
    AUTO_APPROVER,
    ApprovalError,
    ApprovalRequiredError,
    AuditError,
    AuditLog,
    RetrainingError,
    RolloutError,
    UnknownLabelError,
    Window,
    approve,
    assemble_training_set,
    canary_fraction_check,
    canary_report,
    check_approval,
    decide,
    evaluate_gate,
    golden_hashes,
    measure,
    promote,
    read_audit,
    record_gate,
    register_challenger,
    rollback,
    shadow_report,
    train_challenger,
    watch,
)
from reference_impl.settings import Settings

CLASSES = data.CLASSES
DAY = 86400.0
NOW = 1_800_000_000.0
ADMIN_KEY = "retraining-test-admin-key"
POLICY = Policy()  # the built-in defaults: cadence 30 days, 100 labels, approval by quality-lead, gate 0.0 / 0.02


def W(window_id: int, drifted: bool = False, moved: tuple[str, ...] = (), **kw: Any) -> dict[str, Any]:
    """A monitoring window as a lab writes it (flat)."""
    return {"window_id": window_id, "drifted": drifted, "moved": list(moved), **kw}


def drift_decision(n_labels: int = 180, **kw: Any):
    windows = [W(13), W(14, True, ("sharpness",)), W(15, True, ("sharpness",))]
    return decide(NOW, NOW - 5 * DAY, windows, n_labels, policy=POLICY, **kw)


# ==============================================================================================================
# 1. Policy decisions
# ==============================================================================================================
def test_drift_triggers_after_k_consecutive_windows_with_enough_labels():
    d = drift_decision()
    assert d.retrain and d.trigger == "drift"
    assert d.explanation == "retrain: drift on sharpness since window 14, 180 new labels"
    assert d.reasons == ["drift on sharpness since window 14"]
    assert d.needs_approval is True
    assert d.evidence["drift_run_since"] == 14 and d.evidence["drifted_features_since"] == {"sharpness": 14}


def test_drift_is_debounced_and_needs_consecutive_windows():
    windows = [W(13), W(14, True, ("sharpness",)), W(15, True, ("sharpness",))]
    stricter = decide(NOW, NOW - 5 * DAY, windows, 180, policy=POLICY, drift_windows=3)
    assert not stricter.retrain and stricter.trigger is None
    assert stricter.explanation.startswith("no retrain: ")
    assert "drift in 2 window(s) since window 14, not yet the 3 consecutive windows" in stricter.explanation
    one = decide(NOW, NOW - 5 * DAY, [W(14), W(15, True, ("sharpness",))], 180, policy=POLICY)
    assert not one.retrain  # one drifted window is a possible false alarm
    broken = [W(13, True, ("sharpness",)), W(14), W(15, True, ("sharpness",))]
    assert not decide(NOW, NOW - 5 * DAY, broken, 180, policy=POLICY).retrain  # not consecutive
    # windows may arrive in any order: they are sorted by id
    assert decide(NOW, NOW - 5 * DAY, list(reversed(windows)), 180, policy=POLICY).trigger == "drift"


def test_drift_explanation_says_since_when_each_feature_moved():
    windows = [W(14, True, ("sharpness",)), W(15, True, ("sharpness", "noise"))]
    d = decide(NOW, NOW - DAY, windows, 120, policy=POLICY)
    assert d.explanation == "retrain: drift on sharpness since window 14 and noise since window 15, 120 new labels"


def test_no_trigger_without_enough_new_labels():
    d = drift_decision(n_labels=40)
    assert not d.retrain and d.trigger is None
    assert d.explanation == (
        "no retrain yet: drift on sharpness since window 14, but only 40 new labels (policy minimum 100): "
        "collect more labels first"
    )
    # the minimum comes from the policy (the SME overlay), not from code
    stricter = Policy().override({"retraining.min_new_labels": 200})
    windows = [W(14, True, ("sharpness",)), W(15, True, ("sharpness",))]
    assert not decide(NOW, NOW - DAY, windows, 180, policy=stricter).retrain
    assert decide(NOW, NOW - DAY, windows, 200, policy=stricter).retrain  # exactly the minimum is enough


def test_drift_run_length_and_accuracy_floor_come_from_the_policy(tmp_path):
    from reference_impl.policy import OverlayError, load_policy

    windows = [W(14, True, ("sharpness",)), W(15, True, ("sharpness",))]
    assert decide(NOW, NOW - DAY, windows, 120, policy=POLICY).retrain  # default: 2 drifted windows in a row
    patient = Policy().override({"retraining.drift_windows": 3})
    assert not decide(NOW, NOW - DAY, windows, 120, policy=patient).retrain
    assert decide(NOW, NOW - DAY, [W(13, True, ("sharpness",)), *windows], 120, policy=patient).retrain
    measured = [{"window_id": 20, "accuracy": 0.93, "n_labelled": 50}]
    assert not decide(NOW, NOW - DAY, measured, 120, policy=POLICY).retrain  # 0.93 >= 0.90
    demanding = Policy().override({"retraining.min_accuracy": 0.95})
    assert decide(NOW, NOW - DAY, measured, 120, policy=demanding).trigger == "performance"
    # an overlay written before these keys existed keeps the defaults; a wrong value names the key
    overlay = Path("chapters/organization.yaml").read_text()
    old = tmp_path / "old.yaml"
    old.write_text("\n".join(line for line in overlay.splitlines() if not line.strip().startswith(("drift_windows:",
                   "min_accuracy:"))))  # fmt: skip
    assert (load_policy(old).retraining.drift_windows, load_policy(old).retraining.min_accuracy) == (2, 0.90)
    bad = tmp_path / "bad.yaml"
    bad.write_text(overlay.replace("min_accuracy: 0.90", "min_accuracy: 90"))
    with pytest.raises(OverlayError, match=r"policy\.retraining\.min_accuracy"):
        load_policy(bad)


def test_scheduled_trigger_follows_the_cadence_and_also_needs_labels():
    quiet = [W(15, accuracy=0.97, n_labelled=40)]
    d = decide(NOW, NOW - 31 * DAY, quiet, 150, policy=POLICY)
    assert d.retrain and d.trigger == "scheduled"
    assert d.explanation == "retrain: scheduled, 31 days since the last training (cadence 30), 150 new labels"
    assert decide(NOW, NOW - 30 * DAY, quiet, 150, policy=POLICY).trigger == "scheduled"  # due on the day
    assert not decide(NOW, NOW - 29 * DAY, quiet, 150, policy=POLICY).retrain
    no_labels = decide(NOW, NOW - 31 * DAY, quiet, 50, policy=POLICY)
    assert not no_labels.retrain and "only 50 new labels" in no_labels.explanation
    # datetimes work as well as epoch seconds; never trained counts as due
    now = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)
    assert decide(now, now - dt.timedelta(days=45), quiet, 150, policy=POLICY).trigger == "scheduled"
    assert decide(now, None, [], 150, policy=POLICY).explanation.startswith("retrain: scheduled, no previous")


def test_performance_trigger_measured_and_estimated():
    measured = decide(NOW, NOW - DAY, [W(15, accuracy=0.72, n_labelled=50, accuracy_estimated=0.95)], 120,
                      policy=POLICY)  # fmt: skip
    assert measured.retrain and measured.trigger == "performance"
    assert measured.explanation == (
        "retrain: accuracy 0.720 measured on 50 labels in window 15 is below 0.900, 120 new labels"
    )
    assert measured.evidence["accuracy"]["kind"] == "measured"

    estimated = decide(NOW, NOW - DAY, [W(15, accuracy_estimated=0.62)], 120, policy=POLICY)
    assert estimated.trigger == "performance" and estimated.evidence["accuracy"]["kind"] == "estimated"
    assert "estimated accuracy 0.620" in estimated.explanation and "weaker evidence" in estimated.explanation

    # measured evidence beats the estimate; too few labels fall back to the estimate
    ok = decide(NOW, NOW - DAY, [W(15, accuracy=0.95, n_labelled=50, accuracy_estimated=0.5)], 120, policy=POLICY)
    assert not ok.retrain
    noisy = decide(NOW, NOW - DAY, [W(15, accuracy=0.2, n_labelled=5, accuracy_estimated=0.97)], 120, policy=POLICY)
    assert not noisy.retrain and "0.970 (estimated)" in noisy.explanation
    # the threshold is configurable
    assert decide(NOW, NOW - DAY, [W(15, accuracy_estimated=0.93)], 120, policy=POLICY, min_accuracy=0.95).retrain


def test_the_strongest_trigger_names_the_decision_and_the_others_are_listed():
    windows = [W(14, True, ("noise",)), W(15, True, ("noise",), accuracy=0.6, n_labelled=30)]
    d = decide(NOW, NOW - 40 * DAY, windows, 150, policy=POLICY)
    assert d.trigger == "performance"
    assert d.reasons[1:] == [
        "drift on noise since window 14",
        "scheduled, 40 days since the last training (cadence 30)",
    ]
    assert "; also drift on noise since window 14; scheduled" in d.explanation


def test_no_retrain_explains_every_rule():
    d = decide(NOW, NOW - 5 * DAY, [W(14), W(15, accuracy=0.97, n_labelled=40)], 45, policy=POLICY)
    assert not d.retrain and d.trigger is None
    assert d.explanation == (
        "no retrain: schedule not due (5 of 30 days), no drift in the last window (window 15), "
        "accuracy 0.970 (measured on 40 labels) not below 0.900; 45 new labels"
    )
    assert len(d.reasons) == 3
    empty = decide(NOW, NOW - DAY, [], 500, policy=POLICY)
    assert not empty.retrain and "no monitoring windows yet" in empty.explanation


def test_windows_from_the_monitor_and_bad_windows():
    from reference_impl.monitoring.job import WindowReport

    nested = {  # the shape MonitoringStore.windows() returns
        "window_id": 7,
        "drift": {"drifted": True, "moved": ["sharpness", "contrast"], "statistics": {"psi": 0.4}},
        "quality": {"accuracy": 0.81, "n_labelled": 25, "accuracy_estimated": 0.93},
        "ops": {"p99_latency_ms": 41.0, "n": 200},
        "integrity": {"failures": 0},
    }
    w = Window.of(nested)
    assert (w.window_id, w.drifted, w.moved, w.accuracy, w.n_labelled) == (7, True, ("sharpness", "contrast"), 0.81, 25)
    assert (w.accuracy_estimated, w.p99_latency_ms, w.error_rate) == (0.93, 41.0, None)
    report = WindowReport(8, 1, 200, 0.0, 1.0, 200, ["1"], nested["drift"], nested["integrity"], nested["quality"],
                          nested["ops"])  # fmt: skip
    assert Window.of(report).window_id == 8 and Window.of(report).drifted
    d = decide(NOW, NOW - DAY, [nested, report], 150, policy=POLICY)
    assert d.trigger == "performance" and "sharpness, contrast since window 7" in d.explanation
    with pytest.raises(RetrainingError, match="unknown keys \\['acuracy'\\]"):
        Window.of({"window_id": 1, "acuracy": 0.5})  # a typo must not silently mean "no evidence"
    with pytest.raises(RetrainingError, match="window_id"):
        Window.of({"drifted": True})
    with pytest.raises(RetrainingError, match="n_new_labels"):
        decide(NOW, NOW, [], -1, policy=POLICY)


def test_decision_is_audited_when_a_log_is_given(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    drift_decision()
    assert log.read() == []  # pure by default
    d = drift_decision(audit=log)
    (event,) = log.read()
    assert (event.event, event.actor, event.summary) == ("decision", "retraining policy", d.explanation)
    assert event.evidence["trigger"] == "drift" and event.evidence["evidence"]["n_new_labels"] == 180


# ----------------------------------------------------------------------------------------------------- approval
def test_approval_required_needs_a_named_approver_with_a_reason(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    d = drift_decision()
    with pytest.raises(ApprovalRequiredError, match="quality-lead"):
        approve(d, policy=POLICY, audit=log)
    with pytest.raises(ApprovalRequiredError):
        approve(d, "Ana Ruiz", "", role="quality-lead", policy=POLICY, audit=log)  # why is part of the record
    with pytest.raises(ApprovalError, match="may not approve"):
        approve(d, "Bob", "looks fine", role="line-operator", policy=POLICY, audit=log)
    with pytest.raises(ApprovalRequiredError):
        check_approval(None, policy=POLICY)
    a = approve(d, "Ana Ruiz", "labels confirm the camera change", role="quality-lead", at=NOW, policy=POLICY,
                audit=log)  # fmt: skip
    assert (a.approved_by, a.role, a.at, a.why, a.mode) == (
        "Ana Ruiz", "quality-lead", NOW, "labels confirm the camera change", "human")  # fmt: skip
    check_approval(a, policy=POLICY)
    (event,) = log.read()  # refusals leave no approval behind
    assert event.event == "approval" and event.actor == "quality-lead: Ana Ruiz"
    assert event.evidence["approval"]["why"] == "labels confirm the camera change"
    assert event.evidence["decision"]["explanation"] == d.explanation
    with pytest.raises(ApprovalError, match="nothing to approve"):
        approve(drift_decision(n_labels=3), "Ana Ruiz", "x", role="quality-lead", policy=POLICY, audit=log)


def test_auto_mode_and_a_policy_without_approval(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    d = drift_decision()
    auto = approve(d, mode="auto", policy=POLICY, audit=log)
    assert auto.approved_by == AUTO_APPROVER == "auto (demo)" and auto.mode == "auto"
    check_approval(auto, policy=POLICY)  # the demo may proceed
    relaxed = Policy().override({"retraining.approval_required": False})
    free = approve(d, policy=relaxed, audit=log)
    assert free.mode == "not_required" and free.approved_by == "not required by policy"
    check_approval(None, policy=relaxed)
    with pytest.raises(ApprovalRequiredError):
        check_approval(free, policy=POLICY)  # "not required" does not satisfy a policy that requires it
    assert [e.actor for e in log.read()] == ["auto (demo)", "not required by policy"]


def test_training_refuses_to_start_without_the_required_approval(tmp_path):
    ts = assemble_training_set(data.generate(8, seed=3), [], set(), classes=CLASSES)
    with pytest.raises(ApprovalRequiredError):
        train_challenger(ts, approval=None, policy=POLICY, audit=AuditLog(tmp_path / "a.jsonl"))
    assert not (tmp_path / "a.jsonl").exists()  # nothing trained, nothing recorded as trained


# ==============================================================================================================
# 2. Retraining data: provenance, duplicates, and no golden leakage
# ==============================================================================================================
def _store(folder: Path, payload: bytes) -> tuple[str, str]:
    sha = data.sha256_bytes(payload)
    path = folder / sha[:2] / f"{sha}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return sha, str(path)


def _row(item_id: int, payload_or_path: tuple[str, str | None], label: str, by: str, at: float,
         reason: str = "low_confidence") -> dict[str, Any]:  # fmt: skip
    sha, path = payload_or_path
    return {"item_id": item_id, "input_sha256": sha, "image_path": path, "label": label, "labelled_by": by,
            "labelled_at": at, "reason": reason, "note": None}  # fmt: skip


def test_training_set_excludes_golden_images_removes_duplicates_and_keeps_provenance(tmp_path):
    base = data.generate(30, seed=11)
    golden = data.generate(10, seed=12)
    new = data.generate(2, seed=13, condition="new_camera", severity=0.6)
    # a golden image that slipped into the "original" data as well
    original = data.WeldImages(np.concatenate([base.images, golden.images[:1]]),
                               np.concatenate([base.labels, golden.labels[:1]]), base.classes, seed=11,
                               indices=np.arange(31))  # fmt: skip
    store = tmp_path / "images"
    reencoded = io.BytesIO()  # the same golden pixels, different PNG bytes: the byte hash alone would miss it
    Image.fromarray(golden.images[3], mode="L").save(reencoded, format="PNG", compress_level=0)
    assert data.sha256_bytes(reencoded.getvalue()) != data.sha256_bytes(data.encode_png(golden.images[3]))
    x = _store(store, data.encode_png(new.images[0]))
    y = _store(store, data.encode_png(new.images[1]))
    label_x, label_y = CLASSES[int(new.labels[0])], CLASSES[int(new.labels[1])]
    original_5 = data.encode_png(base.images[5])
    other_label = next(c for c in CLASSES if c != CLASSES[int(base.labels[5])])
    rows = [
        _row(1, _store(store, data.encode_png(golden.images[2])), "crack", "ana", 50.0),  # golden, via feedback
        _row(2, x, label_x, "ben", 100.0),
        _row(3, x, label_x, "carl", 200.0, "random_audit"),  # the same image labelled twice
        _row(4, _store(store, original_5), other_label, "ana", 300.0),  # already in the original set, relabelled
        _row(5, _store(store, reencoded.getvalue()), "good", "dora", 400.0),  # golden, re-encoded
        _row(6, (data.sha256_bytes(b"never stored"), None), "good", "ben", 500.0),  # server kept no image
        _row(7, y, label_y, "ben", 600.0, "shadow_disagreement"),
    ]
    log = AuditLog(tmp_path / "audit.jsonl")
    ts = assemble_training_set(original, reversed(rows), golden_hashes(golden), classes=CLASSES, audit=log)

    # nothing of the golden set is in the training data: not by hash, not by pixels
    assert len(ts) == len(ts.images) == len(ts.labels) == 30 + 2
    golden_ids = golden_hashes(golden)
    assert not {p.sha256 for p in ts.provenance} & golden_ids
    assert not any(np.array_equal(im, g) for im in ts.images for g in golden.images)
    excluded = {(e["source"], e["matched"], e.get("labelled_by")) for e in ts.excluded_golden}
    assert excluded == {("original", "bytes", None), ("feedback", "bytes", "ana"), ("feedback", "pixels", "dora")}

    # duplicates: the first occurrence is kept (original first, then feedback by labelling time)
    assert len(ts.duplicates) == 2
    dup_x = next(d for d in ts.duplicates if d["sha256"] == x[0])
    assert dup_x["labelled_by"] == "carl" and dup_x["same_label"] and dup_x["kept"] == "review item 2 (low_confidence)"
    (conflict,) = ts.conflicts
    assert conflict["sha256"] == data.sha256_bytes(original_5) and conflict["kept_label"] == CLASSES[base.labels[5]]
    assert [s["labelled_by"] for s in ts.skipped] == ["ben"] and "did not store" in ts.skipped[0]["why"]

    # provenance of every kept item
    by_sha = {p.sha256: p for p in ts.provenance}
    px, py = by_sha[x[0]], by_sha[y[0]]
    assert (px.source, px.label, px.labelled_by, px.labelled_at, px.origin) == (
        "feedback", label_x, "ben", 100.0, "review item 2 (low_confidence)")  # fmt: skip
    assert (py.labelled_by, py.origin) == ("ben", "review item 7 (shadow_disagreement)")
    p5 = by_sha[data.sha256_bytes(original_5)]
    assert p5.source == "original" and p5.labelled_by is None and "seed=11" in p5.origin and "index=5" in p5.origin
    assert [p.source for p in ts.provenance] == ["original"] * 30 + ["feedback"] * 2
    assert all(CLASSES[k] == p.label for k, p in zip(ts.labels, ts.provenance, strict=True))
    assert np.array_equal(ts.images[-1], new.images[1])

    s = ts.summary()
    assert s["by_source"] == {"original": 30, "feedback": 2} and s["labelled_by"] == {"ben": 2}
    assert (s["excluded_golden"], s["duplicates"], s["conflicts"], s["skipped"]) == (3, 2, 1, 1)
    train = ts.as_training_data()
    assert isinstance(train, data.WeldImages) and train.images.shape == (32, 64, 64)
    (event,) = log.read()
    assert event.event == "training_set" and "3 golden image(s) excluded" in event.summary
    assert len(event.evidence["excluded_golden"]) == 3
    # the identity of the set does not depend on the order the rows came in
    again = assemble_training_set(original, rows, golden_ids, classes=CLASSES)
    assert again.sha256 == ts.sha256
    manifest = ts.write_manifest(tmp_path / "manifest.csv").read_text().splitlines()
    assert manifest[0] == "sha256,source,label,labelled_by,labelled_at,origin" and len(manifest) == 33


def test_training_set_rejects_unknown_labels_and_reports_bad_images(tmp_path):
    img = data.generate(2, seed=21)
    ok = _store(tmp_path, data.encode_png(img.images[0]))
    with pytest.raises(UnknownLabelError) as err:
        assemble_training_set(img, [_row(9, ok, "Crack", "eve", 1.0), _row(10, ok, "slag", "eve", 2.0)], set(),
                              classes=CLASSES)  # fmt: skip
    message = str(err.value)
    assert "2 feedback row(s)" in message and "'Crack'" in message and "'slag'" in message and "crack" in message
    with pytest.raises(RetrainingError, match="missing \\['labelled_by'"):
        assemble_training_set(img, [{"input_sha256": ok[0], "image_path": ok[1], "label": "good"}], set(),
                              classes=CLASSES)  # fmt: skip
    # an image file that does not match its recorded hash is skipped (and said so), not trained on
    other = _store(tmp_path, data.encode_png(img.images[1]))
    Path(other[1]).write_bytes(data.encode_png(np.zeros((64, 64), np.uint8)))
    ts = assemble_training_set(data.generate(3, seed=22), [_row(11, other, "good", "eve", 3.0)], set(),
                               classes=CLASSES)  # fmt: skip
    assert len(ts) == 3 and "does not match its recorded sha256" in ts.skipped[0]["why"]


# ==============================================================================================================
# 3. The evaluation gate
# ==============================================================================================================
def golden(acc: float, **recall: float) -> dict[str, Any]:
    recalls = {c: 0.95 for c in CLASSES} | recall
    return {"accuracy": acc, "n": 400, "per_class": {c: {"recall": r, "support": 100} for c, r in recalls.items()}}


def recent(acc: float) -> dict[str, Any]:
    return {"accuracy": acc, "n": 200}


def test_gate_fails_a_challenger_better_overall_that_regresses_crack_recall():
    r = evaluate_gate(golden(0.93), golden(0.96, crack=0.90, good=0.99), recent_champion=recent(0.80),
                      recent_challenger=recent(0.92), policy=POLICY)  # fmt: skip
    assert not r.passed and r.verdict == "fail"
    failed = [c.name for c in r.checks if not c.passed]
    assert failed == ["golden_recall_drop.crack"]
    assert len(r.reasons) == 1 and r.reasons[0].startswith("crack:") and "0.0500" in r.reasons[0]
    assert r.explanation.startswith("FAIL: crack")
    assert r.numbers["golden"]["recall"]["crack"]["drop"] == pytest.approx(0.05)
    # the same challenger passes under a looser tolerance: the numbers come from the policy
    loose = Policy().override({"promotion_gate.max_class_recall_drop": 0.06})
    assert evaluate_gate(golden(0.93), golden(0.96, crack=0.90), recent_champion=recent(0.80),
                         recent_challenger=recent(0.92), policy=loose).passed  # fmt: skip


def test_gate_accuracy_gain_rule():
    args = {"recent_champion": recent(0.90), "recent_challenger": recent(0.90)}
    assert evaluate_gate(golden(0.9), golden(0.9), **args, policy=POLICY).passed  # gain 0 >= min 0
    stricter = Policy().override({"promotion_gate.min_accuracy_gain": 0.01})
    equal = evaluate_gate(golden(0.9), golden(0.9), **args, policy=stricter)
    assert not equal.passed and [c.name for c in equal.checks if not c.passed] == ["recent_accuracy_gain"]
    assert evaluate_gate(
        golden(0.9), golden(0.9), recent_champion=recent(0.30), recent_challenger=recent(0.31), policy=stricter
    ).passed  # exactly the minimum gain (0.31 - 0.30 = 0.01 + rounding)
    worse = evaluate_gate(golden(0.9), golden(0.9), recent_champion=recent(0.9), recent_challenger=recent(0.85),
                          policy=POLICY)  # fmt: skip
    assert not worse.passed and "gain -0.0500" in worse.reasons[0]


def test_gate_tolerance_boundary():
    args = {"recent_champion": recent(0.8), "recent_challenger": recent(0.9), "policy": POLICY}
    # 0.90 - 0.88 is 0.020000000000000018 in floating point: exactly at the limit must still pass
    assert 0.90 - 0.88 > 0.02
    at_limit = evaluate_gate(golden(0.9, crack=0.90), golden(0.9, crack=0.88), **args)
    assert at_limit.passed, at_limit.explanation
    beyond = evaluate_gate(golden(0.9, crack=0.90), golden(0.9, crack=0.879), **args)
    assert not beyond.passed and [c.name for c in beyond.checks if not c.passed] == ["golden_recall_drop.crack"]
    assert evaluate_gate(golden(0.9, porosity=0.5), golden(0.9, porosity=0.8), **args).passed  # gains are fine


def test_gate_cannot_vouch_for_unmeasured_classes_and_rejects_bad_metrics():
    args = {"recent_champion": recent(0.8), "recent_challenger": recent(0.9), "policy": POLICY}
    no_cracks = golden(0.9)
    no_cracks["per_class"]["crack"]["support"] = 0
    r = evaluate_gate(no_cracks, golden(0.95), **args)
    assert not r.passed and "no images of this class in the golden set" in r.reasons[0]
    dropped = golden(0.95)
    del dropped["per_class"]["crack"]
    assert not evaluate_gate(golden(0.9), dropped, **args).passed
    # the simple {"accuracy", "recall"} form (monitoring's measured_quality) is accepted
    simple = evaluate_gate({"accuracy": 0.9, "recall": {"crack": 0.9}}, {"accuracy": 0.9, "recall": {"crack": 0.89}},
                           **args)  # fmt: skip
    assert simple.passed
    with pytest.raises(RetrainingError, match="challenger_metrics must be metrics"):
        evaluate_gate(golden(0.9), {"acc": 0.9}, **args)
    with pytest.raises(RetrainingError, match="per-class recall"):
        evaluate_gate(golden(0.9), {"accuracy": 0.9}, **args)


def test_gate_tags_flatten_every_number():
    r = evaluate_gate(golden(0.93), golden(0.96, crack=0.90), recent_champion=recent(0.80),
                      recent_challenger=recent(0.92), policy=POLICY)  # fmt: skip
    tags = r.to_tags()
    assert tags["gate.verdict"] == "fail"
    assert tags["gate.golden.recall.crack.champion"] == "0.95"
    assert tags["gate.golden.recall.crack.challenger"] == "0.9"
    assert tags["gate.golden.recall.crack.drop"] == "0.05"
    assert tags["gate.recent.accuracy.champion"] == "0.8" and tags["gate.recent.accuracy.challenger"] == "0.92"
    assert tags["gate.recent.accuracy.gain"] == "0.12" and tags["gate.recent.n.challenger"] == "200"
    assert tags["gate.golden.accuracy.challenger"] == "0.96" and tags["gate.golden.n.champion"] == "400"
    assert tags["gate.policy.max_class_recall_drop"] == "0.02" and tags["gate.policy.min_accuracy_gain"] == "0.0"
    assert tags["gate.reasons"].startswith("crack:")
    assert all(f"gate.golden.recall.{c}.drop" in tags for c in CLASSES)
    assert all(isinstance(v, str) for v in tags.values())


def test_failed_gate_is_recorded_on_the_version_and_leaves_the_champion_untouched(
    registry_with_challenger, bundle_dir, challenger_bundle_dir, isolated_state
):
    registry = registry_with_challenger  # v1 champion, v2 challenger (the v1 weights with rotated class names)
    before = registry.aliases()
    gold = data.generate(60, seed=501)
    fresh = data.generate(60, seed=502, condition="new_lighting", severity=0.3)
    champ_g, chall_g = (measure(b, gold.images, gold.labels, CLASSES) for b in (bundle_dir, challenger_bundle_dir))
    champ_r, chall_r = (measure(b, fresh.images, fresh.labels, CLASSES) for b in (bundle_dir, challenger_bundle_dir))
    assert champ_g["accuracy"] > chall_g["accuracy"]  # rotated names: the challenger is wrong about every image
    result = evaluate_gate(champ_g, chall_g, recent_champion=champ_r, recent_challenger=chall_r, policy=POLICY)
    assert not result.passed

    tags = record_gate(registry, "2", result)
    stored = registry.get("2").tags
    assert {k: stored[k] for k in tags} == tags and stored["gate.verdict"] == "fail"
    assert float(stored["gate.golden.recall.crack.champion"]) == pytest.approx(champ_g["per_class"]["crack"]["recall"],
                                                                                abs=1e-6)  # fmt: skip
    assert not any(k.startswith("gate.") for k in registry.get("1").tags)  # only the evaluated version is tagged
    assert registry.aliases() == before == {"champion": "1", "challenger": "2"}
    with pytest.raises(RolloutError, match="gate verdict 'fail'"):
        promote(registry, "2")
    assert registry.aliases() == before
    events = read_audit(Settings.from_env())
    assert [e.event for e in events] == ["gate"] and events[0].evidence["version"] == "2"
    assert events[0].evidence["verdict"] == "fail"


# ==============================================================================================================
# 4. Rollout: canary routing, shadow and canary reports, promote, watch, rollback
# ==============================================================================================================
def test_canary_routing_is_deterministic_and_close_to_the_fraction():
    from reference_impl.serving.service import in_canary

    ids = [f"req-{i:05d}" for i in range(4000)]
    check = canary_fraction_check(ids, 0.1)
    assert check.deterministic and check.within_tolerance and check.n == 4000
    assert 0.08 < check.observed_fraction < 0.12
    assert check.canary_ids == [r for r in ids if in_canary(r, 0.1)] and len(check.canary_ids) == check.n_canary
    assert canary_fraction_check(ids, 0.0).n_canary == 0 and canary_fraction_check(ids, 1.0).n_canary == 4000
    # a larger fraction keeps every id of a smaller one in the canary (a growing canary never flips requests back)
    assert set(check.canary_ids) <= set(canary_fraction_check(ids, 0.25).canary_ids)
    with pytest.raises(RetrainingError):
        canary_fraction_check(ids, 1.5)


def _record(rid: str, item: int, role: str, version: str, sha: str, label: str, conf: float = 0.9,
            agrees: bool | None = None):  # fmt: skip
    from reference_impl.serving.predlog import PredictionRecord

    return PredictionRecord(time.time(), rid, item, role, "weld-defect", version, "/v1/predict", sha, "png", 64, 64,
                            "L", 8, 0.5, 0.1, label, conf, {label: conf}, agrees, 5.0)  # fmt: skip


def test_shadow_and_canary_reports_from_a_prediction_log(tmp_path):
    from reference_impl.serving.predlog import PredictionLog

    db = tmp_path / "predictions.db"
    log = PredictionLog(db)
    sha = [f"{i:064x}" for i in range(8)]
    truth = {sha[0]: "good", sha[1]: "crack", sha[2]: "good"}  # inspector labels for three images
    # requests 0-3: champion v1 answered, shadow v2 mirrored; v2 disagrees on r1 and r2, and is right on both
    champion_labels = ["good", "good", "crack", "porosity"]
    shadow_labels = ["good", "crack", "good", "porosity"]
    for i in range(4):
        log.append(_record(f"r{i}", 0, "champion", "1", sha[i], champion_labels[i]))
        log.append(_record(f"r{i}", 0, "shadow", "2", sha[i], shadow_labels[i],
                           agrees=champion_labels[i] == shadow_labels[i]))  # fmt: skip
    # an older shadow (v9) must not count for v2
    log.append(_record("old", 0, "shadow", "9", sha[7], "good", agrees=True))
    # requests 4-7: canary v2 answered two of them
    for i in range(4, 8):
        role = "canary" if i in (5, 6) else "champion"
        log.append(_record(f"r{i}", 0, role, "2" if role == "canary" else "1", sha[i], "good", conf=0.6))
    log.close()

    audit = AuditLog(tmp_path / "audit.jsonl")
    s = shadow_report(db, "2", labels=truth, min_requests=5, audit=audit)
    assert (s.n_requests, s.n_shadow, s.n_agree, s.agreement_rate) == (4, 4, 2, 0.5)
    assert s.champion_versions == ["1"]
    assert s.n_labelled == 3
    assert s.champion_accuracy == pytest.approx(1 / 3) and s.challenger_accuracy == 1.0
    assert not s.enough and "keep shadowing" in s.summary()
    assert shadow_report(db, "2", labels=truth, min_requests=4).enough
    assert shadow_report(db, "2", labels={}).n_labelled == 0

    truth_c = {sha[5]: "good", sha[6]: "crack", sha[4]: "good"}
    c = canary_report(db, "2", labels=truth_c, audit=audit)
    assert (c.n_requests, c.n_canary_requests, c.observed_fraction) == (8, 2, 0.25)
    assert (c.canary_accuracy, c.n_labelled_canary) == (0.5, 2)
    assert c.n_labelled_champion == 1 and c.champion_accuracy == 1.0
    assert [e.event for e in audit.read()] == ["shadow", "canary"]
    with pytest.raises(RetrainingError, match="no prediction log"):
        shadow_report(tmp_path / "missing.db", "2")


def _pass_gate(registry, version: str) -> None:
    result = evaluate_gate(golden(0.9), golden(0.95), recent_champion=recent(0.6), recent_challenger=recent(0.9),
                           policy=POLICY)  # fmt: skip
    assert result.passed
    record_gate(registry, version, result)


@contextlib.contextmanager
def uvicorn_server(app: Any) -> Iterator[str]:
    """A real server on a loopback port in a background thread (stopped, lifespan included, on exit)."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


def test_promote_reloads_a_live_server_and_watch_rolls_back_a_bad_window(
    registry_with_challenger, isolated_state, weld_images, weld_pngs, serving_predictor
):
    from reference_impl.serving import ServingConfig, create_app

    registry = registry_with_challenger
    app = create_app(Settings.from_env(), ServingConfig(model_ref="champion", admin_key=ADMIN_KEY, device="cpu"))
    with uvicorn_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/v1/model").json()["challenger"]["version"] == "2"
        # shadow: v2 sees a copy of the traffic; its rotated class names never agree with v1
        for i, png in enumerate(weld_pngs[:6]):
            answer = client.post("/v1/predict", content=png, headers={"content-type": "image/png",
                                                                      "x-request-id": f"shadow-{i}"})  # fmt: skip
            assert answer.status_code == 200 and answer.json()["model"]["version"] == "1"
        truth = {data.sha256_bytes(p): CLASSES[int(k)] for p, k in zip(weld_pngs, weld_images.labels, strict=False)}
        s = wait_for(lambda: (r := shadow_report(isolated_state / "predictions.db", "2", labels=truth)).n_shadow == 6
                     and r, "6 shadow predictions")  # fmt: skip
        expected = serving_predictor.predict(weld_images.images[:6]).labels
        assert s.agreement_rate == 0.0 and s.n_labelled == 6
        assert s.champion_accuracy == pytest.approx(
            np.mean([e == truth[data.sha256_bytes(p)] for e, p in zip(expected, weld_pngs, strict=False)])
        )

        _pass_gate(registry, "2")
        result = promote(registry, "2", server_url=url, admin_key=ADMIN_KEY, decided_by="release manager")
        assert (result.version, result.previous) == ("2", "1")
        assert result.reload == {"previous_champion": "1", "champion": "2", "challenger": None}
        assert registry.aliases() == {"champion": "2", "previous_champion": "1"}
        assert client.get("/v1/model").json()["champion"]["version"] == "2"

        bad = [W(1, error_rate=0.0, accuracy_estimated=0.97), W(2, error_rate=0.08, accuracy_estimated=0.96)]
        verdict = watch(registry, bad, promoted_version="2", policy=POLICY, server_url=url, admin_key=ADMIN_KEY)
        assert verdict.verdict == "rolled_back" and verdict.breach_window == 2 and verdict.windows_checked == [1, 2]
        assert "error rate 8.00% above the SLO 1.00%" in verdict.breaches[0]
        assert verdict.rollback is not None and verdict.rollback.to_version == "1"
        assert registry.aliases()["champion"] == "1"
        assert client.get("/v1/model").json()["champion"]["version"] == "1"  # the server serves v1 again
        after = client.post("/v1/predict", content=weld_pngs[0], headers={"content-type": "image/png"})
        assert after.status_code == 200 and after.json()["model"]["version"] == "1"

    events = read_audit(Settings.from_env())
    assert [e.event for e in events] == ["gate", "promote", "rollback", "watch"]
    promote_e, rollback_e, watch_e = events[1:]
    assert promote_e.actor == "release manager" and promote_e.evidence["reload"]["champion"] == "2"
    assert promote_e.evidence["gate"]["gate.verdict"] == "pass"
    assert rollback_e.actor == "watch (automatic)" and rollback_e.evidence["reload"]["champion"] == "1"
    assert "window 2" in rollback_e.evidence["reason"]
    assert watch_e.evidence["verdict"] == "rolled_back"


def test_watch_verdicts_without_a_server(registry_with_challenger):
    registry = registry_with_challenger
    _pass_gate(registry, "2")
    promote(registry, "2")
    good = [W(i, error_rate=0.001, accuracy=0.97, n_labelled=30, p99_latency_ms=50.0) for i in (1, 2, 3, 4)]
    assert watch(registry, good[:1], promoted_version="2", policy=POLICY).verdict == "watching"
    healthy = watch(registry, good, promoted_version="2", policy=POLICY, max_windows=3)
    assert healthy.verdict == "healthy" and healthy.windows_checked == [1, 2, 3]
    assert registry.aliases()["champion"] == "2"
    # a breach after the watch period is not this watch's business
    late = [*good[:3], W(4, error_rate=0.5)]
    assert watch(registry, late, promoted_version="2", policy=POLICY, max_windows=3).verdict == "healthy"
    slow = watch(registry, [W(1, p99_latency_ms=900.0)], promoted_version="2", policy=POLICY, server_url=None)
    assert slow.verdict == "rolled_back" and "p99 latency 900 ms" in slow.breaches[0]
    assert registry.aliases()["champion"] == "1"
    # someone promoted another version meanwhile: a late bad window of v2 must not roll *that* back
    _pass_gate(registry, "1")
    promote(registry, "2")
    promote(registry, "1")
    stale = watch(registry, [W(1, accuracy=0.5, n_labelled=50)], promoted_version="2", policy=POLICY)
    assert stale.verdict == "superseded" and stale.rollback is None and registry.aliases()["champion"] == "1"


def test_estimated_accuracy_breach_rolls_back(registry_with_challenger):
    registry = registry_with_challenger
    _pass_gate(registry, "2")
    promote(registry, "2")
    r = watch(registry, [W(1, accuracy_estimated=0.55)], promoted_version="2", policy=POLICY)
    assert r.verdict == "rolled_back" and "estimated accuracy 0.550" in r.breaches[0]
    assert registry.aliases()["champion"] == "1"


def test_promote_restores_the_aliases_when_the_server_refuses(registry_with_challenger, monkeypatch):
    registry = registry_with_challenger
    _pass_gate(registry, "2")
    seen: list[httpx.Request] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(409, json={"error": "reload refused, still serving version 1: tampered bundle"})

    with httpx.Client(transport=httpx.MockTransport(refuse)) as http, pytest.raises(RolloutError, match="tampered"):
        promote(registry, "2", server_url="http://server:8000", admin_key=ADMIN_KEY, http=http)
    assert seen[0].method == "POST" and seen[0].url.path == "/v1/admin/reload"
    assert seen[0].headers["x-api-key"] == ADMIN_KEY
    assert registry.aliases()["champion"] == "1" and registry.aliases()["challenger"] == "2"
    assert [e.event for e in read_audit(Settings.from_env())][-1] == "promote_failed"

    monkeypatch.delenv("MLOPS_ADMIN_KEY", raising=False)
    with pytest.raises(RolloutError, match="admin key"):
        promote(registry, "2", server_url="http://server:8000")
    assert registry.aliases()["champion"] == "1"  # checked before anything moved

    def accept(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"previous_champion": "1", "champion": "2", "challenger": None})

    with httpx.Client(transport=httpx.MockTransport(accept)) as http:
        ok = promote(registry, "2", server_url="http://server:8000", admin_key=ADMIN_KEY, http=http)
    assert ok.reload["champion"] == "2" and registry.aliases()["champion"] == "2"


def test_rollback_by_hand_is_audited(registry_with_challenger):
    registry = registry_with_challenger
    _pass_gate(registry, "2")
    promote(registry, "2")
    with pytest.raises(RetrainingError, match="reason"):
        rollback(registry, reason=" ")
    r = rollback(registry, reason="inspectors report missed porosity", decided_by="Ana Ruiz")
    assert (r.from_version, r.to_version) == ("2", "1") and registry.aliases()["champion"] == "1"
    last = read_audit(Settings.from_env())[-1]
    assert (last.event, last.actor) == ("rollback", "Ana Ruiz") and last.evidence["reason"].startswith("inspectors")


# ==============================================================================================================
# 5. The audit log
# ==============================================================================================================
def test_audit_log_is_append_only_and_tamper_evident(tmp_path):
    clock = iter(range(1000, 2000))
    log = AuditLog(tmp_path / "audit.jsonl", clock=lambda: float(next(clock)))
    first = log.append("decision", actor="retraining policy", summary="retrain", evidence={"n": np.int64(3),
                       "acc": np.float64("nan"), "path": tmp_path, "ids": {2, 1}})  # fmt: skip
    assert first.evidence == {"n": 3, "acc": None, "path": str(tmp_path), "ids": [1, 2]} and first.prev_sha256 is None
    snapshot = log.path.read_bytes()
    log.append("promote", actor="release manager", summary="v2 champion")
    assert log.path.read_bytes().startswith(snapshot)  # earlier events are never rewritten
    assert [e.seq for e in log.read()] == [1, 2] and log.verify() == 2
    assert log.read()[1].at == "1970-01-01T00:16:41.000+00:00"
    with pytest.raises(AuditError, match="actor"):
        log.append("promote", actor=" ", summary="nobody")
    with pytest.raises(AuditError, match="event names"):
        log.append("Promote!", actor="x", summary="bad name")

    tampered = log.path.read_text().replace('"summary": "retrain"', '"summary": "no retrain"')
    log.path.write_text(tampered)
    with pytest.raises(AuditError, match="chain breaks at line 2"):
        log.verify()
    log.path.write_text(tampered + "not json\n")
    with pytest.raises(AuditError, match="line 3 is not an audit event"):
        log.read()


def test_audit_appends_from_many_threads_keep_the_chain(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")

    def writer(name: str) -> None:
        for i in range(40):
            AuditLog(log.path).append("watch", actor=name, summary=f"{name} {i}")

    threads = [threading.Thread(target=writer, args=(f"w{k}",)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert log.verify() == 120
    assert sorted(e.seq for e in log.read()) == list(range(1, 121))


def test_scripted_mini_loop_writes_every_step_to_the_audit_log_in_order(
    registry, bundle_dir, tmp_path, isolated_state, weld_pngs
):
    """decide -> approve -> assemble -> train -> register -> gate -> shadow -> canary -> promote -> watch/rollback."""
    from fastapi.testclient import TestClient

    from reference_impl.serving import ServingConfig, create_app
    from reference_impl.training import TrainConfig

    settings = Settings.from_env()
    audit = AuditLog(settings)
    lax = Policy().override({"promotion_gate.min_accuracy_gain": -1.0, "promotion_gate.max_class_recall_drop": 1.0})
    registry.register_bundle(bundle_dir, alias="champion")  # v1

    windows = [W(14, True, ("sharpness",), accuracy_estimated=0.97), W(15, True, ("sharpness",))]
    decision = decide(NOW, NOW - 3 * DAY, windows, 120, policy=lax, audit=audit)
    approval = approve(decision, mode="auto", policy=lax, audit=audit)

    golden_set = data.generate(40, seed=601)
    shifted = data.generate(120, seed=602, condition="new_camera", severity=0.6)
    store = tmp_path / "review-images"
    rows = [_row(i, _store(store, data.encode_png(im)), CLASSES[int(k)], "inspector-1", 1000.0 + i)
            for i, (im, k) in enumerate(zip(shifted.images, shifted.labels, strict=True))]  # fmt: skip
    rows.append(_row(999, _store(store, data.encode_png(golden_set.images[0])), "good", "inspector-2", 5000.0))
    training_set = assemble_training_set(data.generate(160, seed=603), rows, golden_hashes(golden_set),
                                         classes=CLASSES, audit=audit)  # fmt: skip
    assert len(training_set) == 280 and len(training_set.excluded_golden) == 1
    result = train_challenger(training_set, approval=approval, policy=lax, audit=audit,
                              config=TrainConfig(epochs=1, batch_size=32, width=8, seed=0, device="cpu"))  # fmt: skip
    info = register_challenger(registry, result, training_set, decision=decision, approval=approval, audit=audit,
                               n_reference=200, n_null=400)  # fmt: skip
    assert info.version == "2" and registry.aliases() == {"champion": "1", "challenger": "2"}
    assert info.tags["retraining.n_excluded_golden"] == "1" and info.tags["retraining.approved_by"] == AUTO_APPROVER
    assert info.tags["retraining.training_set_sha256"] == training_set.sha256

    challenger_dir = registry.bundle_dir("2")
    recent_set = data.generate(40, seed=604, condition="new_camera", severity=0.6)
    gate = evaluate_gate(measure(bundle_dir, golden_set.images, golden_set.labels, CLASSES),
                         measure(challenger_dir, golden_set.images, golden_set.labels, CLASSES),
                         recent_champion=measure(bundle_dir, recent_set.images, recent_set.labels, CLASSES),
                         recent_challenger=measure(challenger_dir, recent_set.images, recent_set.labels, CLASSES),
                         policy=lax)  # fmt: skip
    assert gate.passed
    record_gate(registry, "2", gate, audit=audit)
    snapshot = audit.path.read_bytes()

    app = create_app(settings, ServingConfig(model_ref="champion", admin_key=ADMIN_KEY, device="cpu"))
    with TestClient(app, base_url="http://mini-loop") as client:
        for i, png in enumerate(weld_pngs[:4]):
            client.post("/v1/predict", content=png, headers={"content-type": "image/png", "x-request-id": f"m{i}"})
        wait_for(lambda: shadow_report(isolated_state / "predictions.db", "2", labels={}).n_shadow == 4, "shadow rows")
        shadow = shadow_report(isolated_state / "predictions.db", "2", labels={}, min_requests=4, audit=audit)
        assert shadow.enough and shadow.n_shadow == 4
        canary_fraction_check([f"m{i}" for i in range(200)], 0.05, audit=audit)
        promote(registry, "2", server_url="http://mini-loop", admin_key=ADMIN_KEY, approval=approval, audit=audit,
                http=client)  # fmt: skip
        assert client.get("/v1/model").json()["champion"]["version"] == "2"
        verdict = watch(registry, [W(1, error_rate=0.3)], promoted_version="2", policy=lax,
                        server_url="http://mini-loop", admin_key=ADMIN_KEY, audit=audit, http=client)  # fmt: skip
        assert verdict.verdict == "rolled_back"
        assert client.get("/v1/model").json()["champion"]["version"] == "1"

    events = read_audit(settings)
    assert [e.event for e in events] == ["decision", "approval", "training_set", "training", "challenger_registered",
                                         "gate", "shadow", "canary", "promote", "rollback", "watch"]  # fmt: skip
    assert [e.seq for e in events] == list(range(1, 12)) and audit.verify() == 11
    assert audit.path.read_bytes().startswith(snapshot)  # append-only: nothing before the gate changed
    assert all(e.actor and e.summary and e.evidence for e in events)
    assert all(a.ts <= b.ts for a, b in itertools.pairwise(events))
    by_name = {e.event: e for e in events}
    assert by_name["approval"].actor == AUTO_APPROVER
    assert by_name["training"].evidence["training_set"]["excluded_golden"] == 1
    assert by_name["promote"].evidence["approval"]["approved_by"] == AUTO_APPROVER
    assert by_name["rollback"].actor == "watch (automatic)"
    assert json.loads(audit.path.read_text().splitlines()[-1])["event"] == "watch"


def test_cli_promote_is_gated_and_rollback_is_audited(bundle_dir: Path, tmp_path: Path) -> None:
    """The command line goes through the same safety checks as the pipeline: no gate, no promotion."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MLOPS_STATE_DIR": str(tmp_path), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "reference_impl", *args], env=env, capture_output=True,
                              text=True, timeout=180)  # fmt: skip

    assert cli("register", str(bundle_dir), "--alias", "champion").returncode == 0
    assert cli("register", str(bundle_dir)).returncode == 0
    refused = cli("promote", "2")
    assert refused.returncode == 2 and "gate" in refused.stderr and "Traceback" not in refused.stderr
    assert cli("promote", "2", "--skip-gate", "--by", "release manager").returncode == 0
    assert cli("rollback").returncode == 2, "a rollback needs a reason"
    rolled = cli("rollback", "--reason", "inspectors report missed cracks", "--by", "Ana")
    assert rolled.returncode == 0 and "to 1" in rolled.stdout
    events = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(e["event"], e["actor"]) for e in events][-2:] == [("promote", "release manager"), ("rollback", "Ana")]
    assert events[-2]["evidence"]["gate_required"] is False
