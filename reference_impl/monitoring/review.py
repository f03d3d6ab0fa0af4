"""The human-in-the-loop review queue: flagged predictions go to inspectors; their labels come back as feedback.

Chapter: "Monitoring in production", section *human-in-the-loop review of flagged predictions*. Drift tests say
that the inputs changed; only a person who looks at the radiograph can say whether the model is still right. The
queue collects the predictions worth a look:

- ``low_confidence``: the model was unsure;
- ``shadow_disagreement``: the challenger (shadow) and the champion gave different answers;
- ``drifted_window``: the image belongs to a window the drift tests flagged;
- ``random_audit``: a random sample of *confident* predictions (why: see :meth:`ReviewQueue.enqueue_from_predictions`).

Inspectors claim items, label them, and the labels become training data (:meth:`ReviewQueue.feedback`). Human
labels are expensive, so the queue guarantees:

- the same image is never queued twice (one open item per ``input_sha256``);
- two reviewers never get the same item: a claim is a lease taken in one ``BEGIN IMMEDIATE`` transaction; a lease
  that expires (the reviewer went home) returns the item to the pool;
- a label is applied exactly once, only by the reviewer holding the claim, and only if it is a known class;
- labels are durable: SQLite in WAL mode with ``synchronous=FULL``, committed before ``label`` returns.

Works from any number of threads and processes (one short-lived connection per operation).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..settings import Settings

# Reasons in order of precedence: an image flagged for several reasons is queued once, under the first one.
REASONS = ("shadow_disagreement", "low_confidence", "drifted_window", "random_audit", "out_of_distribution")
STATUSES = ("pending", "claimed", "labelled", "skipped")
# Higher is reviewed first. A disagreement between two models is the most informative label we can buy (one of
# them is wrong); then uncertain predictions; audit items rank above drifted-window items so that a large drifted
# window cannot starve the audit sample the accuracy estimate depends on. Within a reason, less confident first.
# Images the server flagged as out of distribution (a photograph answered "crack" at 0.99) are queued when no other
# reason applies, after the audit (so they cannot starve the unbiased sample either) and before the rest of a
# drifted window: only a person can say what they are and whether the line should send such images.
# (1.05: with the up to 0.4 that low confidence adds within a reason, an OOD item never outranks an audit item.)
BASE_PRIORITY = {"shadow_disagreement": 3.0, "low_confidence": 2.0, "random_audit": 1.5, "out_of_distribution": 1.05,
                 "drifted_window": 1.0}  # fmt: skip

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    input_sha256 TEXT NOT NULL,
    image_path TEXT,                      -- the prediction log's content-addressed copy; NULL if not stored
    reason TEXT NOT NULL CHECK (reason IN ('low_confidence', 'shadow_disagreement', 'drifted_window', 'random_audit',
                                           'out_of_distribution')),
    model_version TEXT,
    predicted_label TEXT,
    confidence REAL,
    priority REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'claimed', 'labelled', 'skipped')),
    claimed_by TEXT,
    claim_expires_at REAL,
    label TEXT,
    labelled_by TEXT,
    labelled_at REAL,
    note TEXT,
    prediction_id INTEGER,                -- row id in the prediction log, for tracing back
    request_id TEXT
);
-- One open or finished item per image. Skipped items do not count, so an explicit enqueue() may bring one back.
CREATE UNIQUE INDEX IF NOT EXISTS items_one_per_image ON items (input_sha256) WHERE status != 'skipped';
CREATE INDEX IF NOT EXISTS items_pool ON items (status, priority DESC, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
COLUMNS = (
    "id",
    "input_sha256",
    "image_path",
    "reason",
    "model_version",
    "predicted_label",
    "confidence",
    "priority",
    "created_at",
    "status",
    "claimed_by",
    "claim_expires_at",
    "label",
    "labelled_by",
    "labelled_at",
    "note",
    "prediction_id",
    "request_id",
)


class ReviewError(ValueError):
    """A review operation that cannot be done; the message says why and what to do instead."""


class UnknownItemError(ReviewError):
    """No item has this id."""


class ClaimError(ReviewError):
    """The item is not claimed by this reviewer (never claimed, released, expired and taken, or someone else's)."""


class AlreadyLabelledError(ReviewError):
    """The item already has its label; a label is applied exactly once."""


class UnknownLabelError(ReviewError):
    """The label is not one of the model's classes."""


@dataclass(frozen=True)
class Item:
    """One image waiting for (or having received) an inspector's label."""

    id: int
    input_sha256: str
    image_path: str | None
    reason: str
    model_version: str | None
    predicted_label: str | None
    confidence: float | None
    priority: float
    created_at: float
    status: str
    claimed_by: str | None
    claim_expires_at: float | None
    label: str | None
    labelled_by: str | None
    labelled_at: float | None
    note: str | None
    prediction_id: int | None
    request_id: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def audit_pick(input_sha256: str, fraction: float, seed: int = 0) -> bool:
    """Deterministic "random" choice of an image for the audit sample, decided by a hash of its content.

    The same image always gets the same answer (re-running the enqueue job is idempotent), and the choice is
    independent of anything the model said about the image, which is what makes the sample unbiased.
    """
    digest = hashlib.sha256(f"review-audit:{seed}:{input_sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


class ReviewQueue:
    """The review queue in ``<state_dir>/review.db`` (chapter: human-in-the-loop review).

    ``classes``: the labels inspectors may give. If not given, read from ``bundle``'s ``labels.json``, else from
    the class names the model reported in the prediction log (recorded by :meth:`enqueue_from_predictions`).
    ``clock`` returns seconds since the epoch; tests inject a fake one to expire leases without sleeping.
    """

    def __init__(
        self,
        settings: Settings,
        classes: Sequence[str] | None = None,
        *,
        bundle: str | Path | None = None,
        db_path: str | Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.db_path = Path(db_path) if db_path is not None else settings.state_dir / "review.db"
        self.clock = clock
        if classes is None and bundle is not None:
            labels_file = Path(bundle) / "labels.json"
            try:
                classes = json.loads(labels_file.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise ReviewError(f"cannot read the class names from {labels_file}: {exc}") from None
        self._classes = tuple(classes) if classes is not None else None
        if self._classes is not None and (not self._classes or not all(isinstance(c, str) and c for c in classes)):
            raise ReviewError(f"classes must be a non-empty list of class names; got {classes!r}")
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect()
        try:
            conn.execute("PRAGMA journal_mode=WAL")  # readers (stats, the widget) never block a reviewer's commit
            _upgrade_reasons(conn)
            conn.executescript(SCHEMA)
        finally:
            conn.close()

    # -- connections ----------------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        # One connection per operation: safe across threads and forked processes, and cheap next to a human's
        # seconds per label. timeout = how long to wait for another writer's lock before giving up.
        conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA synchronous=FULL")  # a label is minutes of an expert's time: fsync every commit
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the database's write lock at BEGIN.

        With a plain BEGIN two reviewers could both read "item 7 is pending" and both claim it; BEGIN IMMEDIATE
        makes the read-check-update sequence atomic because only one writer may hold the lock at a time.
        """
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        conn = self._connect()
        try:
            yield conn
        finally:
            conn.close()

    # -- classes --------------------------------------------------------------------------------------------
    @property
    def classes(self) -> tuple[str, ...] | None:
        """The labels a reviewer may give, or ``None`` if no source of class names is known yet."""
        if self._classes is not None:
            return self._classes
        with self._read() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'classes'").fetchone()
        return tuple(json.loads(row["value"])) if row else None

    def _record_classes(self, conn: sqlite3.Connection, names: Iterable[str]) -> None:
        row = conn.execute("SELECT value FROM meta WHERE key = 'classes'").fetchone()
        known = json.loads(row["value"]) if row else []
        merged = known + [n for n in dict.fromkeys(names) if n not in known]  # keep the model's output order
        if merged != known:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('classes', ?)", (json.dumps(merged),))

    # -- adding items ---------------------------------------------------------------------------------------
    def enqueue(
        self,
        input_sha256: str,
        *,
        reason: str,
        image_path: str | Path | None = None,
        model_version: str | None = None,
        predicted_label: str | None = None,
        confidence: float | None = None,
        priority: float | None = None,
        prediction_id: int | None = None,
        request_id: str | None = None,
    ) -> int | None:
        """Queue one image for review; returns its item id, or ``None`` if the image is already queued or labelled."""
        with self._write() as conn:
            return self._insert(
                conn,
                input_sha256,
                reason,
                image_path,
                model_version,
                predicted_label,
                confidence,
                priority,
                prediction_id,
                request_id,
            )

    def _insert(
        self,
        conn: sqlite3.Connection,
        sha: str,
        reason: str,
        image_path: str | Path | None,
        model_version: str | None,
        predicted_label: str | None,
        confidence: float | None,
        priority: float | None,
        prediction_id: int | None,
        request_id: str | None,
    ) -> int | None:
        if reason not in REASONS:
            raise ReviewError(f"reason must be one of {', '.join(REASONS)}; got {reason!r}")
        if not isinstance(sha, str) or len(sha) != 64:
            raise ReviewError(f"input_sha256 must be the 64-character hex digest of the image; got {sha!r}")
        if priority is None:
            priority = BASE_PRIORITY[reason] + (1.0 - confidence if confidence is not None else 0.0)
        # INSERT OR IGNORE against the partial unique index: a concurrent enqueue of the same image is a no-op.
        cur = conn.execute(
            "INSERT OR IGNORE INTO items (input_sha256, image_path, reason, model_version, predicted_label, "
            "confidence, priority, created_at, prediction_id, request_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                sha,
                str(image_path) if image_path is not None else None,
                reason,
                model_version,
                predicted_label,
                confidence,
                priority,
                self.clock(),
                prediction_id,
                request_id,
            ),
        )
        return cur.lastrowid if cur.rowcount == 1 else None

    def enqueue_from_predictions(
        self,
        predlog_path: str | Path | None = None,
        *,
        confidence_below: float = 0.6,
        include_shadow_disagreements: bool = True,
        since_id: int | None = None,
        window_request_ids: Iterable[str] | None = None,
        audit_fraction: float = 0.0,
        image_dir: str | Path | None = None,
    ) -> int:
        """Scan the prediction log and queue what deserves a human look; returns the number of items added.

        - served answers (champion or canary rows) with confidence below ``confidence_below`` -> ``low_confidence``;
        - shadow rows that disagree with the champion -> ``shadow_disagreement`` (the item shows the champion's
          answer, the one the line acted on);
        - served answers whose ``request_id`` is in ``window_request_ids`` (a window the drift tests flagged)
          -> ``drifted_window``;
        - a deterministic sample of ``audit_fraction`` of the remaining, *confident* answers -> ``random_audit``;
        - the remaining answers the server flagged as out of distribution (``ood_score`` above 1)
          -> ``out_of_distribution``.

        Why the audit? Reviewing only what the model flags gives a biased picture of its accuracy. Low-confidence
        items are the hard cases, so accuracy measured on them understates the model's accuracy; worse, the errors
        that hurt most under drift are *confident* mistakes (a new camera makes a crack look like clean weld), and a
        queue fed only by low confidence never shows them. A random sample of the confident predictions, chosen
        independently of what the model said, measures accuracy on that stratum without bias; weighting each
        stratum's accuracy by its share of traffic then gives an unbiased estimate of the overall accuracy.

        ``since_id`` skips prediction-log rows with ``id <= since_id`` (the monitoring job passes the last id it
        scanned). Images already in the queue, including skipped ones, are not queued again.
        ``image_dir`` defaults to the ``images`` folder next to the prediction log (the server's layout).
        """
        from ..serving.predlog import read_predictions

        if not 0.0 <= audit_fraction <= 1.0:
            raise ReviewError(f"audit_fraction must be between 0 and 1; got {audit_fraction}")
        predlog = Path(predlog_path) if predlog_path is not None else self.settings.state_dir / "predictions.db"
        if not predlog.is_file():
            raise ReviewError(f"no prediction log at {predlog}: start the server (it writes one) or pass its path")
        images = Path(image_dir) if image_dir is not None else predlog.parent / "images"
        rows = read_predictions(predlog, "id > ?", (int(since_id or 0),))
        window = set(window_request_ids or ())
        served = {(r["request_id"], r["item"]): r for r in rows if r["role"] != "shadow"}

        chosen: dict[str, tuple[str, dict[str, Any]]] = {}  # sha -> (reason, the row to show the reviewer)
        for r in rows:
            if r["role"] == "shadow":
                if not (include_shadow_disagreements and r["agrees_with_champion"] == 0):
                    continue
                reason, row = "shadow_disagreement", served.get((r["request_id"], r["item"]), r)
            elif r["confidence"] < confidence_below:
                reason, row = "low_confidence", r
            elif r["request_id"] in window:
                reason, row = "drifted_window", r
            elif audit_fraction > 0 and audit_pick(r["input_sha256"], audit_fraction, self.settings.seed):
                reason, row = "random_audit", r
            elif (r.get("ood_score") or 0.0) > 1.0:
                reason, row = "out_of_distribution", r
            else:
                continue
            sha = r["input_sha256"]
            if sha not in chosen or REASONS.index(reason) < REASONS.index(chosen[sha][0]):
                chosen[sha] = (reason, row)

        added = 0
        with self._write() as conn:
            self._record_classes(conn, (name for r in rows for name in r["probabilities"]))
            known = {
                row["input_sha256"]
                for row in conn.execute(
                    "SELECT input_sha256 FROM items WHERE input_sha256 IN (SELECT value FROM json_each(?))",
                    (json.dumps(list(chosen)),),
                )
            }
            for sha, (reason, row) in chosen.items():
                if sha in known:  # includes skipped items: a periodic scan must not resurrect what a reviewer skipped
                    continue
                item_id = self._insert(
                    conn,
                    sha,
                    reason,
                    _stored_image(images, sha, row.get("input_format")),
                    row["model_version"],
                    row["label"],
                    float(row["confidence"]),
                    None,
                    row["id"],
                    row["request_id"],
                )
                added += item_id is not None
        return added

    # -- reviewing ------------------------------------------------------------------------------------------
    def claim(self, reviewer: str, n: int = 1, lease_s: float = 600.0) -> list[Item]:
        """Take up to ``n`` pending items (highest priority first) for ``reviewer`` for ``lease_s`` seconds.

        Atomic: concurrent reviewers, in threads or processes, never receive the same item. Claims whose lease has
        expired return to the pool here, so an abandoned session does not hide items forever.
        """
        _check_reviewer(reviewer)
        if n < 1 or lease_s <= 0:
            raise ReviewError(f"claim needs n >= 1 and lease_s > 0; got n={n}, lease_s={lease_s}")
        now = self.clock()
        with self._write() as conn:
            conn.execute(
                "UPDATE items SET status = 'pending', claimed_by = NULL, claim_expires_at = NULL "
                "WHERE status = 'claimed' AND claim_expires_at <= ?",
                (now,),
            )
            ids = [
                r["id"]
                for r in conn.execute(
                    "SELECT id FROM items WHERE status = 'pending' ORDER BY priority DESC, id LIMIT ?", (n,)
                )
            ]
            conn.executemany(
                "UPDATE items SET status = 'claimed', claimed_by = ?, claim_expires_at = ? WHERE id = ?",
                [(reviewer, now + lease_s, i) for i in ids],
            )
            rows = (
                conn.execute(
                    f"SELECT * FROM items WHERE id IN ({','.join('?' * len(ids))}) ORDER BY priority DESC, id", ids
                ).fetchall()
                if ids
                else []
            )
        return [_item(r) for r in rows]

    def my_claims(self, reviewer: str) -> list[Item]:
        """Items ``reviewer`` holds with a live lease (e.g. to resume after reopening the notebook)."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT * FROM items WHERE status = 'claimed' AND claimed_by = ? AND "
                "claim_expires_at > ? ORDER BY priority DESC, id",
                (reviewer, self.clock()),
            ).fetchall()
        return [_item(r) for r in rows]

    def label(self, item_id: int, reviewer: str, label: str, note: str | None = None) -> Item:
        """Record ``reviewer``'s label for a claimed item. Exactly once, only by the claimant, only a known class."""
        _check_reviewer(reviewer)
        classes = self.classes
        if classes is None:
            raise ReviewError(
                "the queue does not know the model's classes yet: pass classes=[...] or bundle=... to "
                "ReviewQueue, or enqueue from a prediction log first"
            )
        if label not in classes:
            raise UnknownLabelError(f"{label!r} is not a class of this model; expected one of: {', '.join(classes)}")
        now = self.clock()
        with self._write() as conn:
            row = _fetch(conn, item_id)
            if row["status"] == "labelled":
                raise AlreadyLabelledError(
                    f"item {item_id} was already labelled {row['label']!r} by {row['labelled_by']} at "
                    f"{_when(row['labelled_at'])}; a label is applied exactly once (add a note to the feedback "
                    "instead of labelling again)"
                )
            if row["status"] != "claimed" or row["claimed_by"] != reviewer:
                raise ClaimError(_not_yours(item_id, reviewer, row))
            # A claimant whose lease ran out may still label while nobody else has taken the item: the work is
            # done and nobody else is doing it, so refusing it would only waste an inspector's minutes.
            conn.execute(
                "UPDATE items SET status = 'labelled', label = ?, labelled_by = ?, labelled_at = ?, note = ?, "
                "claim_expires_at = NULL WHERE id = ?",
                (label, reviewer, now, note, item_id),
            )
            return _item(_fetch(conn, item_id))

    def release(self, item_id: int, reviewer: str) -> Item:
        """Give a claimed item back to the pool (e.g. "I am not the right person for this one")."""
        return self._finish_claim(item_id, reviewer, "pending", None)

    def skip(self, item_id: int, reviewer: str, note: str | None = None) -> Item:
        """Take the item out of the queue without a label (unreadable image, not a weld); kept in the statistics."""
        return self._finish_claim(item_id, reviewer, "skipped", note)

    def _finish_claim(self, item_id: int, reviewer: str, status: str, note: str | None) -> Item:
        _check_reviewer(reviewer)
        with self._write() as conn:
            row = _fetch(conn, item_id)
            if row["status"] != "claimed" or row["claimed_by"] != reviewer:
                raise ClaimError(_not_yours(item_id, reviewer, row))
            conn.execute(
                "UPDATE items SET status = ?, claimed_by = CASE WHEN ? = 'pending' THEN NULL ELSE claimed_by "
                "END, claim_expires_at = NULL, note = COALESCE(?, note) WHERE id = ?",
                (status, status, note, item_id),
            )
            return _item(_fetch(conn, item_id))

    # -- reading --------------------------------------------------------------------------------------------
    def get(self, item_id: int) -> Item:
        with self._read() as conn:
            return _item(_fetch(conn, item_id))

    def stats(self) -> dict[str, Any]:
        """Counts by status and reason, labels per reviewer, and how often reviewers agreed with the model.

        An expired claim counts as pending (it is back in the pool at the next claim). ``model_agreement`` by
        reason is the model's accuracy on the reviewed items of that reason: only ``random_audit`` estimates the
        accuracy of confident predictions without bias (see :meth:`enqueue_from_predictions`).
        """
        now = self.clock()
        with self._read() as conn:
            rows = conn.execute(
                "SELECT CASE WHEN status = 'claimed' AND claim_expires_at <= ? THEN 'pending' ELSE status END AS s, "
                "reason, labelled_by, label = predicted_label AS agree, COUNT(*) AS n FROM items "
                "GROUP BY s, reason, labelled_by, agree",
                (now,),
            ).fetchall()
        out: dict[str, Any] = {s: 0 for s in STATUSES}
        by_reason: dict[str, dict[str, int]] = {}
        by_reviewer: dict[str, int] = {}
        agreement: dict[str, dict[str, float]] = {}
        for r in rows:
            out[r["s"]] += r["n"]
            by_reason.setdefault(r["reason"], dict.fromkeys(STATUSES, 0))[r["s"]] += r["n"]
            if r["s"] == "labelled":
                by_reviewer[r["labelled_by"]] = by_reviewer.get(r["labelled_by"], 0) + r["n"]
                a = agreement.setdefault(r["reason"], {"labelled": 0, "agree": 0})
                a["labelled"] += r["n"]
                a["agree"] += r["n"] if r["agree"] else 0
        for a in agreement.values():
            a["rate"] = a["agree"] / a["labelled"]
        out.update(
            total=sum(out[s] for s in STATUSES), by_reason=by_reason, labelled_by=by_reviewer, model_agreement=agreement
        )
        return out

    def feedback(self, since: float | None = None) -> list[dict[str, Any]]:
        """Labelled items (oldest label first), with who labelled them and when: training data for retraining.

        ``since``: only labels given after this time (seconds since the epoch), for incremental exports.
        """
        with self._read() as conn:
            rows = conn.execute(
                "SELECT * FROM items WHERE status = 'labelled' AND labelled_at > ? ORDER BY labelled_at, id",
                (float("-inf") if since is None else since,),
            ).fetchall()
        keys = (
            "id",
            "input_sha256",
            "image_path",
            "label",
            "labelled_by",
            "labelled_at",
            "note",
            "reason",
            "predicted_label",
            "confidence",
            "model_version",
            "prediction_id",
            "request_id",
        )
        return [{("item_id" if k == "id" else k): r[k] for k in keys} for r in rows]


# -- helpers --------------------------------------------------------------------------------------------------
def _check_reviewer(reviewer: str) -> None:
    if not isinstance(reviewer, str) or not reviewer.strip():
        raise ReviewError(f"reviewer must be a name (who labelled what is part of the record); got {reviewer!r}")


def _fetch(conn: sqlite3.Connection, item_id: int) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
    if row is None:
        raise UnknownItemError(f"no review item with id {item_id}")
    return row


def _item(row: sqlite3.Row) -> Item:
    return Item(**{k: row[k] for k in COLUMNS})


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts is not None else "an unknown time"


def _not_yours(item_id: int, reviewer: str, row: sqlite3.Row) -> str:
    if row["status"] == "claimed":
        return (
            f"item {item_id} is claimed by {row['claimed_by']}, not {reviewer} (if you claimed it before, "
            "your lease expired and it was given to someone else); claim another item"
        )
    return f"item {item_id} is {row['status']}, not claimed by {reviewer}; claim it first (review claim)"


def _stored_image(images: Path, sha: str, fmt: str | None) -> str | None:
    """The prediction log's content-addressed copy: ``images/<sha[:2]>/<sha>.<format>``, if the server stored it."""
    exact = images / sha[:2] / f"{sha}.{(fmt or 'bin').lower()}"
    if exact.is_file():
        return str(exact)
    others = [p for p in (images / sha[:2]).glob(f"{sha}.*") if not p.name.endswith(".tmp")]
    return str(others[0]) if others else None


def _upgrade_reasons(conn: sqlite3.Connection) -> None:
    """A queue created before ``out_of_distribution`` existed has a CHECK constraint that refuses it. SQLite cannot
    alter a constraint, so the table is rebuilt with the current schema, every item and id kept, in one
    transaction (a crash leaves the old table as it was)."""
    row = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'items'").fetchone()
    if row is None or "out_of_distribution" in row[0]:
        return
    table = SCHEMA.split("CREATE UNIQUE INDEX")[0].replace("CREATE TABLE IF NOT EXISTS items", "CREATE TABLE items_new")
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(table)
        conn.execute(f"INSERT INTO items_new ({', '.join(COLUMNS)}) SELECT {', '.join(COLUMNS)} FROM items")
        conn.execute("DROP TABLE items")  # its indexes go with it; SCHEMA creates them again
        conn.execute("ALTER TABLE items_new RENAME TO items")
        conn.execute("COMMIT")
    except sqlite3.Error:
        conn.execute("ROLLBACK")
        raise
