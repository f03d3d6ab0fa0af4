"""The prediction log: every answer the server gives, kept for monitoring, review and retraining.

Chapter: "Monitoring in production". You cannot monitor what you did not record. Each prediction (champion, shadow
and canary) becomes a row in SQLite, in WAL mode so the monitoring job can read while the server writes. Rows are
written by a background thread, off the request path, in small transactions; received images go to a
content-addressed folder (``images/ab/abcdef....png``) so inspectors can review exactly what the model saw.

Requests the server *refuses* are recorded too, in a ``rejections`` table (when, which route, the status, the short
reason sent to the client, the content type and declared size; never the body, which may be huge or hostile): an
upload that is not an image, a truncated file or a 16-bit TIFF that is too big never becomes a prediction, yet it
is exactly the integrity failure the monitor must count, and a 503 is a failed request for the error-rate SLO.

Durability: ``close()`` drains the queue before returning, and the server calls it on shutdown (SIGTERM included),
so nothing accepted is lost on a clean stop.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..monitoring.features import DRIFT_FEATURES, image_features

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    request_id TEXT NOT NULL,
    item INTEGER NOT NULL,            -- position of the image within its request
    role TEXT NOT NULL,               -- champion | shadow | canary
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    route TEXT NOT NULL,
    input_sha256 TEXT NOT NULL,
    input_format TEXT,
    width INTEGER, height INTEGER, mode TEXT, bit_depth INTEGER,
    mean REAL, std REAL,              -- of the decoded pixels scaled to [0, 1]
    label TEXT NOT NULL,
    confidence REAL NOT NULL,
    probabilities TEXT NOT NULL,      -- JSON {class: p}
    agrees_with_champion INTEGER,     -- shadow rows: 1/0; NULL otherwise
    latency_ms REAL,
    bundle_sha256 TEXT,               -- the bundle that answered (its embedding space)
    features TEXT,                    -- JSON {name: value}: the monitor's image statistics (monitoring/features.py)
    embedding BLOB,                   -- the model's embedding, float32 little-endian
    ood_score REAL                    -- out-of-distribution score; above 1.0 = flagged (monitoring/ood.py)
);
CREATE INDEX IF NOT EXISTS predictions_ts ON predictions (ts);
CREATE INDEX IF NOT EXISTS predictions_sha ON predictions (input_sha256);
CREATE TABLE IF NOT EXISTS rejections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    route TEXT NOT NULL,
    status INTEGER NOT NULL,          -- the HTTP status the client got (4xx: its request; 503: our capacity)
    reason TEXT NOT NULL,             -- the error message sent back, cut to REASON_MAX characters
    content_type TEXT,
    body_bytes INTEGER                -- the declared Content-Length; NULL if the client sent none
);
CREATE INDEX IF NOT EXISTS rejections_ts ON rejections (ts);
"""
REASON_MAX = 200
# Columns added after the first release: a log written by an older server gets them (empty) when it is opened, and
# the monitor recomputes what they would hold from the stored images.
LATER_COLUMNS = {"bundle_sha256": "TEXT", "features": "TEXT", "embedding": "BLOB", "ood_score": "REAL"}


@dataclass
class PredictionRecord:
    ts: float
    request_id: str
    item: int
    role: str
    model_name: str
    model_version: str
    route: str
    input_sha256: str
    input_format: str | None
    width: int
    height: int
    mode: str
    bit_depth: int
    mean: float
    std: float
    label: str
    confidence: float
    probabilities: dict[str, float]
    agrees_with_champion: bool | None = None
    latency_ms: float | None = None
    bundle_sha256: str | None = None
    embedding: np.ndarray | None = None  # float32; stored as bytes
    features: dict[str, float] | None = None  # filled by the writer thread from the pixels given to ``append``
    ood_score: float | None = None


@dataclass
class RejectionRecord:
    """A predict request the server refused: what the monitor needs, never the body."""

    ts: float
    route: str
    status: int
    reason: str
    content_type: str | None
    body_bytes: int | None


def connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")  # readers (the monitor) never block the writer (the server)
    conn.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; a power cut may lose the last transaction only
    conn.executescript(SCHEMA)
    have = {row[1] for row in conn.execute("PRAGMA table_info(predictions)")}
    for column, kind in LATER_COLUMNS.items():
        if column not in have:
            conn.execute(f"ALTER TABLE predictions ADD COLUMN {column} {kind}")
    return conn


def _as_row(record: PredictionRecord) -> dict[str, Any]:
    # A shallow dict: dataclasses.asdict deep-copies every field (the probabilities dict too), which made it the
    # most expensive step of writing a row (27 of ~100 us, measured).
    return {name: getattr(record, name) for name in _PREDICTION_FIELDS}


_PREDICTION_FIELDS = tuple(f.name for f in fields(PredictionRecord))
_Entry = tuple[PredictionRecord, bytes | None, np.ndarray | None]  # a row, the image file to store, its pixels


class PredictionLog:
    """Queue + writer thread. ``append`` never blocks on disk; ``close`` flushes everything."""

    def __init__(self, db_path: Path, image_dir: Path | None = None, flush_every: float = 0.2) -> None:
        self.db_path = Path(db_path)
        self.image_dir = image_dir
        self.flush_every = flush_every
        self._queue: queue.Queue[_Entry | RejectionRecord | None] = queue.Queue()
        self._conn = connect(self.db_path)
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._closed = False
        self.written = 0
        self.rejections_written = 0
        self._thread.start()

    def append(
        self, record: PredictionRecord, image_bytes: bytes | None = None, pixels: np.ndarray | None = None
    ) -> None:
        """Queue a row. ``pixels`` (the decoded image): the writer thread computes the monitor's image statistics
        from them, so the monitoring job need not decode the stored file again (off the request path, and one
        vectorised call per group of same-sized images)."""
        if self._closed:
            raise RuntimeError("prediction log is closed")
        self._queue.put((record, image_bytes, pixels))

    def log_rejection(
        self,
        route: str,
        status: int,
        reason: str,
        content_type: str | None = None,
        body_bytes: int | str | None = None,
        ts: float | None = None,
    ) -> None:
        """Record a refused predict request (off the request path, like ``append``).

        Never raises: it is called while the server answers a client's mistake, and that answer (a 4xx saying what
        was wrong) matters more than our bookkeeping. ``body_bytes`` may be the raw Content-Length header;
        ``ts`` defaults to now.
        """
        if self._closed:  # shutting down: the request is refused anyway, and there is no writer left
            log.warning("prediction log closed; rejection on %s (%s) not recorded", route, status)
            return
        size = int(body_bytes) if isinstance(body_bytes, int) or (body_bytes or "").isdigit() else None
        ctype = content_type.split(";")[0].strip().lower()[:100] if content_type else None
        when = time.time() if ts is None else ts
        self._queue.put(RejectionRecord(when, route, int(status), reason[:REASON_MAX], ctype, size))

    def _store_image(self, sha: str, fmt: str | None, payload: bytes) -> None:
        assert self.image_dir is not None
        target = self.image_dir / sha[:2] / f"{sha}.{(fmt or 'bin').lower()}"
        if target.exists():
            return  # content-addressed: the same bytes are already stored
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_bytes(payload)
        tmp.replace(target)  # atomic: a reader never sees half an image

    def _write(self, batch: list[_Entry | RejectionRecord]) -> None:
        rows, rejections = [], []
        entries = [item for item in batch if not isinstance(item, RejectionRecord)]
        _fill_features(entries)
        for item in batch:
            if isinstance(item, RejectionRecord):
                rejections.append(asdict(item))
                continue
            record, payload, _ = item
            if payload is not None and self.image_dir is not None:
                self._store_image(record.input_sha256, record.input_format, payload)
            row = _as_row(record)
            row["probabilities"] = json.dumps(row["probabilities"])
            if row["agrees_with_champion"] is not None:
                row["agrees_with_champion"] = int(row["agrees_with_champion"])
            if row["features"] is not None:
                row["features"] = json.dumps(row["features"])
            if row["embedding"] is not None:
                row["embedding"] = np.ascontiguousarray(row["embedding"], dtype="<f4").tobytes()
            rows.append(row)
        with self._conn:
            for table, records in (("predictions", rows), ("rejections", rejections)):
                if records:
                    cols = list(records[0])
                    sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join(':' + c for c in cols)})"
                    self._conn.executemany(sql, records)
        self.written += len(rows)
        self.rejections_written += len(rejections)

    def _run(self) -> None:
        stop = False
        while not stop:
            batch: list[_Entry | RejectionRecord] = []
            try:
                first = self._queue.get(timeout=self.flush_every)
            except queue.Empty:
                continue
            if first is None:
                stop = True
            else:
                batch.append(first)
            while True:  # drain whatever else is waiting into the same transaction
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    continue
                batch.append(nxt)
            if batch:
                try:
                    self._write(batch)
                except (sqlite3.Error, OSError):
                    log.exception("could not write %d prediction records; retrying once", len(batch))
                    time.sleep(0.5)
                    self._write(batch)

    def close(self) -> None:
        """Flush every queued record, then close the database."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        self._conn.close()


def _fill_features(entries: list[_Entry]) -> None:
    """The monitor's image statistics for every entry that came with its pixels, one call per image size."""
    groups: dict[tuple[tuple[int, ...], str], list[int]] = {}
    for k, (record, _, pixels) in enumerate(entries):
        if pixels is not None and record.features is None and pixels.ndim == 2:
            groups.setdefault((pixels.shape, pixels.dtype.str), []).append(k)
    for idx in groups.values():
        values = image_features(np.stack([entries[k][2] for k in idx]))
        for j, k in enumerate(idx):
            entries[k][0].features = {name: float(values[name][j]) for name in DRIFT_FEATURES}


def read_predictions(db_path: Path, where: str = "1=1", params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """Rows of the prediction log as dicts, oldest first: probabilities and features decoded from JSON, the
    embedding as a float32 array (None for rows written by an older server, or without one)."""
    conn = sqlite3.connect(db_path, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute(f"SELECT * FROM predictions WHERE {where} ORDER BY id", params).fetchall()
    finally:
        conn.close()
    out = []
    for row in rows:
        d = dict(row)
        d["probabilities"] = json.loads(d["probabilities"])
        d["features"] = json.loads(d["features"]) if d.get("features") else None
        d["embedding"] = np.frombuffer(d["embedding"], dtype="<f4") if d.get("embedding") else None
        out.append(d)
    return out


def read_rejections(db_path: Path, after_ts: float | None, until_ts: float) -> list[dict[str, Any]]:
    """Rejected requests with ``after_ts < ts <= until_ts`` (``after_ts`` None: from the start), oldest first.

    A log written by a server older than the rejections table simply has none.
    """
    conn = sqlite3.connect(db_path, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute(
            "SELECT * FROM rejections WHERE ts > ? AND ts <= ? ORDER BY id",
            (float("-inf") if after_ts is None else after_ts, until_ts),
        ).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
        return []
    finally:
        conn.close()
    return [dict(r) for r in rows]
