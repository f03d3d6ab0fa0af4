"""The human-in-the-loop review queue and its widget (chapter: human-in-the-loop review of flagged predictions)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reference_impl.monitoring.review import (
    AlreadyLabelledError,
    ClaimError,
    ReviewError,
    ReviewQueue,
    UnknownItemError,
    UnknownLabelError,
    audit_pick,
)
from reference_impl.serving.predlog import PredictionLog, PredictionRecord
from reference_impl.settings import Settings

CLASSES = ("good", "porosity", "crack", "lack_of_fusion")
REPO = Path(__file__).resolve().parent.parent


class FakeClock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def record(
    image: str,
    *,
    role: str = "champion",
    label: str = "good",
    confidence: float = 0.95,
    request_id: str = "req-1",
    item: int = 0,
    agrees: bool | None = None,
    version: str = "1",
) -> PredictionRecord:
    rest = (1.0 - confidence) / (len(CLASSES) - 1)
    probs = {c: (confidence if c == label else rest) for c in CLASSES}
    return PredictionRecord(
        ts=time.time(),
        request_id=request_id,
        item=item,
        role=role,
        model_name="weld-defect",
        model_version=version,
        route="/v1/predict",
        input_sha256=sha(image),
        input_format="PNG",
        width=8,
        height=8,
        mode="L",
        bit_depth=8,
        mean=0.5,
        std=0.1,
        label=label,
        confidence=confidence,
        probabilities=probs,
        agrees_with_champion=agrees,
    )


def write_log(state: Path, entries: list[tuple[PredictionRecord, bytes | None]]) -> Path:
    log = PredictionLog(state / "predictions.db", state / "images")
    for rec, payload in entries:
        log.append(rec, payload)
    log.close()
    return state / "predictions.db"


def make_queue(n: int, **kwargs: object) -> ReviewQueue:
    queue = ReviewQueue(Settings.from_env(), CLASSES, **kwargs)  # type: ignore[arg-type]
    for i in range(n):
        assert (
            queue.enqueue(sha(f"img{i}"), reason="low_confidence", predicted_label="good", confidence=0.5) is not None
        )
    return queue


# ----------------------------------------------------------------------------------------------------------------
# Enqueueing from the prediction log
# ----------------------------------------------------------------------------------------------------------------
def test_enqueue_rules_from_a_prediction_log(isolated_state: Path) -> None:
    confident = [f"ok{i}" for i in range(300)]
    entries = [
        (record("unsure", confidence=0.3, label="crack"), png(10)),  # low confidence, image stored
        (record("unsure", confidence=0.35, request_id="req-2"), None),  # the same image again: queued once
        (record("canary-unsure", role="canary", confidence=0.5, version="2", request_id="req-3"), None),
        (record("disputed", label="crack", request_id="req-4"), png(20)),
        (record("disputed", role="shadow", label="good", agrees=False, version="2", request_id="req-4"), None),
        (record("agreed", request_id="req-5"), None),
        (record("agreed", role="shadow", agrees=True, version="2", request_id="req-5"), None),
        # Both low confidence and disputed: the disagreement takes precedence.
        (record("both", confidence=0.4, request_id="req-6"), None),
        (record("both", role="shadow", label="crack", agrees=False, version="2", request_id="req-6"), None),
        (record("drifted-a", request_id="req-drift", item=0), None),
        (record("drifted-b", request_id="req-drift", item=1), None),
        *[(record(name, request_id=f"c-{i}"), None) for i, name in enumerate(confident)],
    ]
    predlog = write_log(isolated_state, entries)
    queue = ReviewQueue(Settings.from_env())
    assert queue.classes is None  # no class source yet
    added = queue.enqueue_from_predictions(predlog, window_request_ids=["req-drift"], audit_fraction=0.1)
    items = {it["input_sha256"]: it for it in _all(queue)}
    expected_audit = {sha(n) for n in confident if audit_pick(sha(n), 0.1, seed=0)}
    assert 10 < len(expected_audit) < 60  # the sample is a fraction, not all or nothing
    assert added == len(items) == 6 + len(expected_audit)

    assert items[sha("unsure")]["reason"] == "low_confidence"
    assert items[sha("unsure")]["predicted_label"] == "crack"
    stored = Path(items[sha("unsure")]["image_path"])
    assert stored == isolated_state / "images" / sha("unsure")[:2] / f"{sha('unsure')}.png"
    assert stored.read_bytes() == png(10)
    assert items[sha("canary-unsure")]["reason"] == "low_confidence"
    assert items[sha("canary-unsure")]["model_version"] == "2"
    assert items[sha("canary-unsure")]["image_path"] is None  # the server did not store this one
    disputed = items[sha("disputed")]
    # The reviewer sees the answer the line acted on: the champion's, not the shadow's.
    assert (disputed["reason"], disputed["predicted_label"], disputed["model_version"]) == (
        "shadow_disagreement",
        "crack",
        "1",
    )
    assert items[sha("both")]["reason"] == "shadow_disagreement"
    assert items[sha("drifted-a")]["reason"] == items[sha("drifted-b")]["reason"] == "drifted_window"
    assert sha("agreed") not in items
    assert {h for h, it in items.items() if it["reason"] == "random_audit"} == expected_audit
    # Disagreements first, then the least confident.
    order = [it.input_sha256 for it in queue.claim("ana", n=4)]
    assert order[:2] == [sha("both"), sha("disputed")] and order[2:] == [sha("unsure"), sha("canary-unsure")]
    assert queue.classes == CLASSES  # learnt from the model's probabilities in the log

    # Idempotent: a second scan adds nothing; since_id limits the scan to new rows.
    assert queue.enqueue_from_predictions(predlog, window_request_ids=["req-drift"], audit_fraction=0.1) == 0
    log = PredictionLog(predlog, isolated_state / "images")
    log.append(record("late", confidence=0.2, request_id="req-late"))
    log.append(record("unsure", confidence=0.2, request_id="req-late", item=1))
    log.close()
    assert queue.enqueue_from_predictions(predlog, since_id=len(entries)) == 1
    assert queue.enqueue_from_predictions(predlog, include_shadow_disagreements=False, confidence_below=0.0) == 0


def test_without_shadow_or_audit_only_low_confidence_is_queued(isolated_state: Path) -> None:
    predlog = write_log(
        isolated_state,
        [
            (record("a", confidence=0.5), None),
            (record("a", role="shadow", agrees=False), None),
            (record("b", confidence=0.59, request_id="r2"), None),
            (record("c", confidence=0.6, request_id="r3"), None),
        ],
    )
    queue = ReviewQueue(Settings.from_env())
    assert queue.enqueue_from_predictions(predlog, include_shadow_disagreements=False) == 2
    assert {it["reason"] for it in _all(queue)} == {"low_confidence"}
    with pytest.raises(ReviewError, match="no prediction log"):
        queue.enqueue_from_predictions(isolated_state / "nope.db")
    with pytest.raises(ReviewError, match="audit_fraction"):
        queue.enqueue_from_predictions(predlog, audit_fraction=1.5)


def test_the_same_image_is_never_queued_twice() -> None:
    queue = make_queue(1)
    assert queue.enqueue(sha("img0"), reason="drifted_window") is None
    [item] = queue.claim("ana")
    queue.label(item.id, "ana", "crack")
    assert queue.enqueue(sha("img0"), reason="random_audit") is None  # labelled: still the one item for this image
    other = queue.enqueue(sha("other"), reason="low_confidence")
    assert other is not None
    queue.claim("ana")
    queue.skip(other, "ana", note="blurred")
    # A skipped image may be queued again on purpose...
    assert queue.enqueue(sha("other"), reason="drifted_window") is not None
    assert queue.stats()["total"] == 3
    with pytest.raises(ReviewError, match="reason must be one of"):
        queue.enqueue(sha("x"), reason="because")
    with pytest.raises(ReviewError, match="64-character"):
        queue.enqueue("abc", reason="low_confidence")


def test_a_periodic_scan_does_not_resurrect_skipped_items(isolated_state: Path) -> None:
    predlog = write_log(isolated_state, [(record("blurred", confidence=0.1), None)])
    queue = ReviewQueue(Settings.from_env())
    assert queue.enqueue_from_predictions(predlog) == 1
    [item] = queue.claim("ana")
    queue.skip(item.id, "ana")
    assert queue.enqueue_from_predictions(predlog) == 0


# ----------------------------------------------------------------------------------------------------------------
# Claims, leases, labels
# ----------------------------------------------------------------------------------------------------------------
WORKER = """
import json, sys, time
from pathlib import Path
from reference_impl.monitoring.review import ReviewQueue
from reference_impl.settings import Settings

state, name, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
queue = ReviewQueue(Settings(state_dir=state))
Path(f"{go}.{name}.ready").touch()
deadline = time.monotonic() + 60
while not go.exists():
    if time.monotonic() > deadline:
        sys.exit("never told to start")
    time.sleep(0.002)
got = []
while items := queue.claim(name, n=1):
    got += [it.id for it in items]
    time.sleep(0.003)  # a reviewer's think time; without it SQLite's busy handler lets one worker win every race
print(json.dumps(got))
"""


def test_concurrent_claims_from_threads_and_processes_never_share_an_item(tmp_path: Path) -> None:
    queue = make_queue(100)
    state = str(queue.settings.state_dir)
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, state, f"proc{i}", str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ},
        )
        for i in range(2)
    ]
    claimed: dict[str, list[int]] = {}
    start = threading.Event()

    def thread_worker(name: str) -> None:
        q = ReviewQueue(queue.settings, CLASSES)  # a reviewer's own queue object, as in a separate notebook
        start.wait(60)
        got = []
        while items := q.claim(name, n=1):
            got += [it.id for it in items]
            time.sleep(0.003)  # as in WORKER
        claimed[name] = got

    threads = [threading.Thread(target=thread_worker, args=(f"thread{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while not all(Path(f"{go}.proc{i}.ready").exists() for i in range(2)):  # both processes imported and waiting
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "worker processes did not start"
        time.sleep(0.01)
    go.touch()
    start.set()
    for t in threads:
        t.join(60)
    for i, p in enumerate(procs):
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        claimed[f"proc{i}"] = json.loads(out)

    assert len(claimed) == 6  # every worker finished: none died on "database is locked" (a non-atomic claim)
    every = [i for ids in claimed.values() for i in ids]
    assert len(every) == len(set(every)) == 100  # each item exactly once
    assert set(every) == {it["id"] for it in _all(queue)}
    assert sum(len(claimed[f"proc{i}"]) for i in range(2)) > 0  # the processes really competed
    stats = queue.stats()
    assert (stats["claimed"], stats["pending"]) == (100, 0)


def test_lease_expiry_returns_items_to_the_pool() -> None:
    clock = FakeClock()
    queue = make_queue(1, clock=clock)
    [item] = queue.claim("ana", lease_s=60)
    assert queue.claim("ben") == []  # held by ana
    assert queue.my_claims("ana") == [queue.get(item.id)]
    clock.t += 59
    assert queue.claim("ben") == []
    clock.t += 2  # ana's lease has expired
    assert queue.stats()["pending"] == 1
    assert queue.my_claims("ana") == []
    [again] = queue.claim("ben", lease_s=60)
    assert again.id == item.id and again.claimed_by == "ben"
    with pytest.raises(ClaimError, match="claimed by ben, not ana"):
        queue.label(item.id, "ana", "crack")  # too late: ben has it now
    queue.label(item.id, "ben", "porosity")
    assert queue.get(item.id).labelled_by == "ben"


def test_an_expired_claim_can_still_be_labelled_while_nobody_else_took_it() -> None:
    clock = FakeClock()
    queue = make_queue(1, clock=clock)
    [item] = queue.claim("ana", lease_s=60)
    clock.t += 3600
    assert queue.label(item.id, "ana", "good").status == "labelled"


def test_a_label_is_applied_exactly_once_and_only_by_the_claimant() -> None:
    queue = make_queue(2)
    first, second = (it.id for it in _claim_all(queue, "ana"))
    with pytest.raises(ClaimError, match="claimed by ana, not ben"):
        queue.label(first, "ben", "crack")
    with pytest.raises(UnknownLabelError, match=r"'cracked' is not a class.*good, porosity, crack, lack_of_fusion"):
        queue.label(first, "ana", "cracked")
    labelled = queue.label(first, "ana", "crack", note="hairline at the toe")
    assert (labelled.status, labelled.label, labelled.labelled_by, labelled.note) == (
        "labelled",
        "crack",
        "ana",
        "hairline at the toe",
    )
    with pytest.raises(AlreadyLabelledError, match=f"item {first} was already labelled 'crack' by ana"):
        queue.label(first, "ana", "porosity")
    assert queue.get(first).label == "crack"  # the refused second label changed nothing
    with pytest.raises(UnknownItemError):
        queue.label(999, "ana", "good")
    queue.release(second, "ana")
    with pytest.raises(ClaimError, match="is pending, not claimed by ana"):
        queue.label(second, "ana", "good")
    with pytest.raises(ReviewError, match="reviewer must be a name"):
        queue.claim(" ")


def _label_race(settings: Settings, item_id: int, attempts: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """Run every (reviewer, label) attempt in its own thread, released together; return each one's outcome."""
    barrier = threading.Barrier(len(attempts))
    outcome: dict[tuple[str, str], str] = {}

    def attempt(reviewer: str, label: str) -> None:
        q = ReviewQueue(settings, CLASSES)  # each attempt has its own connection, as separate sessions would
        barrier.wait(30)
        try:
            q.label(item_id, reviewer, label)
            outcome[(reviewer, label)] = "won"
        except (AlreadyLabelledError, ClaimError) as exc:
            outcome[(reviewer, label)] = type(exc).__name__

    threads = [threading.Thread(target=attempt, args=a) for a in attempts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return outcome


def test_concurrent_label_attempts_exactly_one_wins() -> None:
    queue = make_queue(0)
    for round_ in range(5):  # a few rounds: the race has several possible interleavings
        item_id = queue.enqueue(sha(f"race{round_}"), reason="low_confidence")
        assert item_id is not None
        queue.claim("ana")
        # Two browser tabs of ana's (the claimant) and ben, who does not hold the claim.
        outcome = _label_race(queue.settings, item_id, [("ana", "crack"), ("ana", "porosity"), ("ben", "good")])
        winners = [k for k, v in outcome.items() if v == "won"]
        assert len(outcome) == 3 and len(winners) == 1
        assert winners[0][0] == "ana"
        assert outcome[("ben", "good")] in ("ClaimError", "AlreadyLabelledError")  # depends on who ran first
        loser = next(k for k in outcome if k[0] == "ana" and k != winners[0])
        assert outcome[loser] == "AlreadyLabelledError"
        assert queue.get(item_id).label == winners[0][1]


def test_feedback_stats_and_durability_across_restarts() -> None:
    clock = FakeClock()
    queue = make_queue(4, clock=clock)
    a, b, c, d = (it.id for it in _claim_all(queue, "ana"))
    queue.label(a, "ana", "good")  # agrees with the model's "good"
    clock.t += 10
    queue.label(b, "ana", "crack", note="missed by the model")
    t_b = clock.t
    clock.t += 10
    queue.skip(c, "ana")
    queue.release(d, "ana")
    [d_again] = queue.claim("ben")
    queue.label(d_again.id, "ben", "porosity")

    restarted = ReviewQueue(Settings.from_env(), CLASSES, clock=clock)  # a new process reading the same file
    rows = restarted.feedback()
    assert [(r["item_id"], r["label"], r["labelled_by"]) for r in rows] == [
        (a, "good", "ana"),
        (b, "crack", "ana"),
        (d, "porosity", "ben"),
    ]
    assert rows[1]["note"] == "missed by the model" and rows[1]["labelled_at"] == t_b
    assert rows[0]["predicted_label"] == "good" and rows[0]["input_sha256"] == sha("img0")
    assert [r["item_id"] for r in restarted.feedback(since=t_b)] == [d]
    stats = restarted.stats()
    assert {k: stats[k] for k in ("pending", "claimed", "labelled", "skipped", "total")} == {
        "pending": 0,
        "claimed": 0,
        "labelled": 3,
        "skipped": 1,
        "total": 4,
    }
    assert stats["labelled_by"] == {"ana": 2, "ben": 1}
    assert stats["model_agreement"]["low_confidence"] == {"labelled": 3, "agree": 1, "rate": 1 / 3}


def test_classes_come_from_the_argument_or_the_bundle(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "labels.json").write_text(json.dumps(["good", "crack"]))
    queue = ReviewQueue(Settings.from_env(), bundle=bundle)
    assert queue.classes == ("good", "crack")
    queue.enqueue(sha("x"), reason="random_audit")
    [item] = queue.claim("ana")
    with pytest.raises(UnknownLabelError):
        queue.label(item.id, "ana", "porosity")
    nothing = ReviewQueue(Settings.from_env(), db_path=tmp_path / "other.db")
    nothing.enqueue(sha("y"), reason="random_audit")
    [item] = nothing.claim("ana")
    with pytest.raises(ReviewError, match="does not know the model's classes"):
        nothing.label(item.id, "ana", "good")
    with pytest.raises(ReviewError, match="cannot read the class names"):
        ReviewQueue(Settings.from_env(), bundle=tmp_path / "missing")


# ----------------------------------------------------------------------------------------------------------------
# The widget, driven headlessly through its button handlers
# ----------------------------------------------------------------------------------------------------------------
def test_review_panel_labels_skips_and_reports(isolated_state: Path) -> None:
    from reference_impl.monitoring.review_widget import ReviewPanel

    predlog = write_log(
        isolated_state,
        [
            (record("p1", confidence=0.2, label="porosity"), png(50)),
            (record("p2", confidence=0.3, request_id="r2"), None),
            (record("p3", confidence=0.4, request_id="r3"), png(90)),
        ],
    )
    queue = ReviewQueue(Settings.from_env())
    assert queue.enqueue_from_predictions(predlog) == 3
    panel = ReviewPanel(queue, "ana")
    assert list(panel.buttons) == list(CLASSES)  # from the model's classes
    first = panel.current
    assert first is not None and first.input_sha256 == sha("p1")  # least confident first
    assert panel.image.value == png(50) and panel.image.format == "png"
    assert "porosity" in panel.info.value and "20.0%" in panel.info.value
    assert panel.status.value == "0 labelled, 2 pending"  # the third item is claimed by the panel

    panel.buttons["crack"].click()
    assert queue.get(first.id).label == "crack" and queue.get(first.id).labelled_by == "ana"
    second = panel.current
    assert second is not None and second.input_sha256 == sha("p2")
    assert panel.image.value == b"" and "not stored" in panel.no_image.value
    assert panel.status.value == "1 labelled, 1 pending"

    panel.skip_button.click()
    assert queue.get(second.id).status == "skipped"
    third = panel.current
    assert third is not None and panel.image.value == png(90)

    # Another inspector's CLI session took the item after ana's lease was lost: the panel says so and moves on.
    with queue._write() as conn:
        conn.execute("UPDATE items SET claimed_by = 'ben' WHERE id = ?", (third.id,))
    panel.buttons["good"].click()
    assert "claimed by ben" in panel.message.value
    assert queue.get(third.id).status == "claimed"
    assert panel.current is None and all(b.disabled for b in panel.buttons.values())
    assert "empty" in panel.info.value
    assert panel.status.value == "1 labelled, 0 pending"
    assert panel.labelled_here == 1


def test_panel_shows_non_browser_formats(tmp_path: Path) -> None:
    from reference_impl.monitoring.review_widget import image_bytes

    tiff = tmp_path / "x.tiff"
    Image.fromarray(np.array([[0, 1000], [2000, 4000]], np.uint16)).save(tiff)
    data, fmt = image_bytes(tiff)
    shown = np.asarray(Image.open(io.BytesIO(data)))
    assert fmt == "png" and shown.dtype == np.uint8
    assert shown.min() == 0 and shown.max() == 255  # 16-bit range stretched, not clipped to black


# ----------------------------------------------------------------------------------------------------------------
def _all(queue: ReviewQueue) -> list[dict]:
    with queue._read() as conn:
        return [dict(r) for r in conn.execute("SELECT * FROM items ORDER BY id")]


def _claim_all(queue: ReviewQueue, reviewer: str) -> list:
    items = queue.claim(reviewer, n=1000)
    return sorted(items, key=lambda it: it.id)


def test_review_cli(isolated_state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from reference_impl.cli import main

    write_log(
        isolated_state,
        [
            (record("c1", confidence=0.2), None),
            (record("c2", confidence=0.3, request_id="r2"), None),
            (record("c3", request_id="r3"), None),
        ],
    )
    assert main(["review", "enqueue"]) == 0
    assert json.loads(capsys.readouterr().out) == {"added": 2, "pending": 2, "labelled": 0}
    assert main(["review", "claim", "--reviewer", "ana", "-n", "5"]) == 0
    items = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [it["input_sha256"] for it in items] == [sha("c1"), sha("c2")]
    first, second = items[0]["id"], items[1]["id"]
    assert main(["review", "label", str(first), "crack", "--reviewer", "ana", "--note", "toe"]) == 0
    assert json.loads(capsys.readouterr().out)["label"] == "crack"
    assert main(["review", "label", str(first), "good", "--reviewer", "ana"]) == 2
    assert "already labelled 'crack' by ana" in capsys.readouterr().err
    assert main(["review", "label", str(second), "crak", "--reviewer", "ana"]) == 2
    assert "'crak' is not a class" in capsys.readouterr().err
    assert main(["review", "label", str(second), "good", "--reviewer", "ben"]) == 2
    assert "claimed by ana, not ben" in capsys.readouterr().err
    assert main(["review", "release", str(second), "--reviewer", "ana"]) == 0
    capsys.readouterr()
    assert main(["review", "stats"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["labelled"], stats["pending"], stats["labelled_by"]) == (1, 1, {"ana": 1})


def test_the_panel_says_only_what_is_known_of_a_hand_queued_item(isolated_state: Path) -> None:
    """An item queued without a model version, prediction or confidence (e.g. an image a supervisor sends for
    review) shows no "model None predicted None"."""
    pytest.importorskip("ipywidgets")
    from reference_impl.monitoring.review_widget import ReviewPanel

    queue = ReviewQueue(Settings.from_env(), CLASSES)
    queue.enqueue(sha("by hand"), reason="random_audit")
    queue.enqueue(sha("versioned"), reason="low_confidence", model_version="3", predicted_label="crack",
                  confidence=0.41)  # fmt: skip
    panel = ReviewPanel(queue, "ana")  # the low-confidence item comes first
    assert "model 3 predicted <b>crack</b> with confidence 41.0%" in panel.info.value
    panel.buttons["good"].click()
    assert "None" not in panel.info.value and "no model prediction recorded" in panel.info.value


def test_a_queue_made_before_out_of_distribution_existed_accepts_it(tmp_path: Path) -> None:
    """SQLite cannot alter the old CHECK on `reason`: the table is rebuilt, every item and id kept."""
    import sqlite3

    from reference_impl.monitoring import review

    db = tmp_path / "review.db"
    old_schema = review.SCHEMA.replace(",\n                                           'out_of_distribution')", ")")
    assert "out_of_distribution" not in old_schema
    conn = sqlite3.connect(db)
    conn.executescript(old_schema)
    conn.execute("INSERT INTO items (input_sha256, reason, created_at) VALUES ('a' , 'low_confidence', 1.0)")
    conn.commit()
    with pytest.raises(sqlite3.IntegrityError):  # what a new server would have hit
        conn.execute("INSERT INTO items (input_sha256, reason, created_at) VALUES ('b', 'out_of_distribution', 1.0)")
    conn.close()
    queue = ReviewQueue(Settings(state_dir=tmp_path), classes=("good", "crack"))
    new_id = queue.enqueue("b" * 64, reason="out_of_distribution", confidence=0.99)
    assert new_id == 2 and queue.get(1).reason == "low_confidence" and queue.get(2).reason == "out_of_distribution"
    queue.enqueue("c" * 64, reason="low_confidence", confidence=0.4)
    assert [i.reason for i in queue.claim("ann", n=3)] == ["low_confidence", "out_of_distribution", "low_confidence"]
    ReviewQueue(Settings(state_dir=tmp_path), classes=("good", "crack"))  # opening again: nothing to rebuild
