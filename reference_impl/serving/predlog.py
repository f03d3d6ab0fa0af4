"""The prediction log: every answer the server gives, kept for monitoring, review and retraining.

Chapter: "Monitoring in production". You cannot monitor what you did not record. Each prediction (champion, shadow
and canary) becomes a row in SQLite, in WAL mode so the monitoring job can read while the server writes. Rows are
written by a background thread, off the request path, in small transactions; received images go to a
content-addressed folder (``images/ab/abcdef....png``) so inspectors can review exactly what the model saw.

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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
    latency_ms REAL
);
CREATE INDEX IF NOT EXISTS predictions_ts ON predictions (ts);
CREATE INDEX IF NOT EXISTS predictions_sha ON predictions (input_sha256);
"""


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


def connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")  # readers (the monitor) never block the writer (the server)
    conn.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; a power cut may lose the last transaction only
    conn.executescript(SCHEMA)
    return conn


class PredictionLog:
    """Queue + writer thread. ``append`` never blocks on disk; ``close`` flushes everything."""

    def __init__(self, db_path: Path, image_dir: Path | None = None, flush_every: float = 0.2) -> None:
        self.db_path = Path(db_path)
        self.image_dir = image_dir
        self.flush_every = flush_every
        self._queue: queue.Queue[tuple[PredictionRecord, bytes | None] | None] = queue.Queue()
        self._conn = connect(self.db_path)
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._closed = False
        self.written = 0
        self._thread.start()

    def append(self, record: PredictionRecord, image_bytes: bytes | None = None) -> None:
        if self._closed:
            raise RuntimeError("prediction log is closed")
        self._queue.put((record, image_bytes))

    def _store_image(self, sha: str, fmt: str | None, payload: bytes) -> None:
        assert self.image_dir is not None
        target = self.image_dir / sha[:2] / f"{sha}.{(fmt or 'bin').lower()}"
        if target.exists():
            return  # content-addressed: the same bytes are already stored
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_bytes(payload)
        tmp.replace(target)  # atomic: a reader never sees half an image

    def _write(self, batch: list[tuple[PredictionRecord, bytes | None]]) -> None:
        rows = []
        for record, payload in batch:
            if payload is not None and self.image_dir is not None:
                self._store_image(record.input_sha256, record.input_format, payload)
            row = asdict(record)
            row["probabilities"] = json.dumps(row["probabilities"])
            if row["agrees_with_champion"] is not None:
                row["agrees_with_champion"] = int(row["agrees_with_champion"])
            rows.append(row)
        cols = list(rows[0])
        with self._conn:
            self._conn.executemany(
                f"INSERT INTO predictions ({', '.join(cols)}) VALUES ({', '.join(':' + c for c in cols)})", rows
            )
        self.written += len(rows)

    def _run(self) -> None:
        stop = False
        while not stop:
            batch: list[tuple[PredictionRecord, bytes | None]] = []
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


def read_predictions(db_path: Path, where: str = "1=1", params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """Rows of the prediction log as dicts (probabilities decoded), oldest first."""
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
        out.append(d)
    return out
