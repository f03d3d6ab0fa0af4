"""The monitoring job: ``python -m reference_impl monitor``. Chapter: "Monitoring in production".

It reads the server's prediction log in windows (by count, or by time), and for each complete window:

1. takes the image statistics and the model's embedding the server logged with each prediction (checking that the
   stored image is still there and unchanged, by its sha256); for rows of an older server, or of another model,
   it decodes the stored image and recomputes both with the champion bundle;
2. runs every drift test against the bundle's reference profile, with calibrated thresholds;
3. runs the integrity checks, counting the uploads the server refused during the window (the prediction log's
   ``rejections`` table) as integrity failures and computing the error rate; measures accuracy where inspector
   labels exist and estimates it everywhere else;
4. stores the results (SQLite ``monitoring.db``), exports gauges in Prometheus text format (``monitoring.prom``,
   for a node-exporter textfile collector), evaluates the alert rules, and writes an Evidently report (HTML + JSON)
   plus our own compact summary (which features moved, by how much, since which window).

It remembers the last row it processed, so running it on a schedule (cron, a Kubernetes CronJob) picks up where
it stopped; ``--from-start`` recomputes everything.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data import DatasetError, decode_image, sha256_file
from ..settings import Settings
from .drift import Sample
from .features import feature_matrix, image_features
from .integrity import check_window
from .profile import ReferenceProfile
from .quality import estimated_accuracy, labelled_quality

log = logging.getLogger(__name__)

# Refusals that mean "this input is not what the line should send": malformed or undecodable (400), too large (413),
# not an image type (415). They are integrity failures. 401/403 (credentials), 404 (unknown model) and 503 (our
# capacity) are refused requests too, but say nothing about the images.
BAD_INPUT_STATUSES = (400, 413, 415)

SCHEMA = """
CREATE TABLE IF NOT EXISTS windows (
    window_id INTEGER PRIMARY KEY,
    first_row INTEGER NOT NULL, last_row INTEGER NOT NULL,
    ts_start REAL, ts_end REAL, n INTEGER NOT NULL,
    model_versions TEXT, drifted INTEGER NOT NULL,
    accuracy_estimated REAL, accuracy_measured REAL, n_labelled INTEGER,
    integrity_failures INTEGER NOT NULL,
    result TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class WindowReport:
    window_id: int
    first_row: int
    last_row: int
    ts_start: float
    ts_end: float
    n: int
    model_versions: list[str]
    drift: dict[str, Any]
    integrity: dict[str, Any]
    quality: dict[str, Any]
    ops: dict[str, Any]
    alerts: list[dict[str, Any]] = field(default_factory=list)
    report_paths: dict[str, str] = field(default_factory=dict)
    # The window's image statistics (rows x profile features), kept for its Evidently report; not stored.
    features: np.ndarray | None = field(default=None, repr=False, compare=False)

    def metrics(self) -> dict[str, Any]:
        """The flat metrics the alert rules refer to (e.g. ``drift.psi_max``)."""
        return {
            "drift": {
                "detected": self.drift["drifted"],
                "psi_max": self.drift["statistics"]["psi"],
                # The PSI threshold calibrated for this window's size (None when the window was too small to test):
                # psi_major_shift needs it, because the fixed 0.25 band fires on most normal windows of 50 images.
                "psi_threshold": self.drift.get("thresholds", {}).get("psi"),
                "features_drifted": len(self.drift.get("moved", [])),
            },
            "quality": {
                "accuracy_estimated": self.quality["accuracy_estimated"],
                "accuracy_measured": self.quality["accuracy"],
                "n_labelled": self.quality["n_labelled"],
            },
            "integrity": {
                "failures": self.integrity["failures"],
                "volume_ratio": self.integrity["volume_ratio"],
                "ood_share": self.integrity.get("ood_share"),
            },
            "ops": self.ops,
            "context": {"window_id": self.window_id, "moved_features": self.drift.get("moved", [])},
        }

    def row(self) -> dict[str, Any]:
        """One line of the timeline table."""
        return {
            "window": self.window_id,
            "n": self.n,
            "drift": self.drift["drifted"],
            "moved": ",".join(self.drift.get("moved", [])[:3]),
            "psi_max": round(self.drift["statistics"]["psi"], 3),
            "acc_est": round(self.quality["accuracy_estimated"], 3),
            "acc_true": None if self.quality["accuracy"] is None else round(self.quality["accuracy"], 3),
            "integrity": self.integrity["failures"],
            "alerts": len(self.alerts),
        }


def image_path(state_dir: Path, sha: str, fmt: str | None) -> Path:
    """Where the server stored an input image (content-addressed, see serving/predlog.py)."""
    return state_dir / "images" / sha[:2] / f"{sha}.{(fmt or 'bin').lower()}"


class MonitoringStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(path, timeout=30)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.executescript(SCHEMA)

    def get(self, key: str, default: str | None = None) -> str | None:
        row = self.conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def put(self, key: str, value: str) -> None:
        with self.conn:
            self.conn.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, value))

    def save(self, w: WindowReport) -> None:
        with self.conn:
            self.conn.execute(
                "INSERT OR REPLACE INTO windows VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    w.window_id,
                    w.first_row,
                    w.last_row,
                    w.ts_start,
                    w.ts_end,
                    w.n,
                    ",".join(w.model_versions),
                    int(w.drift["drifted"]),
                    w.quality["accuracy_estimated"],
                    w.quality["accuracy"],
                    w.quality["n_labelled"],
                    w.integrity["failures"],
                    json.dumps(w.__dict__, default=str),
                    time.time(),
                ),
            )

    def windows(self) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT result FROM windows ORDER BY window_id").fetchall()
        return [json.loads(r[0]) for r in rows]

    def clear(self) -> None:
        with self.conn:
            self.conn.execute("DELETE FROM windows")
            self.conn.execute("DELETE FROM state")

    def close(self) -> None:
        self.conn.close()


def _read_rows(db: Path, after_id: int) -> list[dict[str, Any]]:
    """Champion and canary rows after ``after_id`` (shadow rows describe the challenger, not what was served)."""
    from ..serving.predlog import read_predictions

    if not db.exists():
        return []
    return read_predictions(db, "id > ? AND role IN ('champion', 'canary')", (after_id,))


def split_windows(rows: list[dict[str, Any]], size: int | None, minutes: float | None) -> list[list[dict[str, Any]]]:
    """Complete windows only: by count (``size`` rows) or by time (calendar buckets of ``minutes``).
    The last, incomplete window waits for the next run."""
    if minutes:
        buckets: dict[int, list[dict[str, Any]]] = {}
        for r in rows:
            buckets.setdefault(int(r["ts"] // (minutes * 60)), []).append(r)
        keys = sorted(buckets)
        return [buckets[k] for k in keys[:-1]]  # the current bucket may still be filling
    assert size and size > 0
    return [rows[i : i + size] for i in range(0, len(rows) - size + 1, size)]


class Monitor:
    """Holds what every window needs: the champion bundle's predictor and profile, the detector, the stores."""

    def __init__(
        self,
        settings: Settings,
        bundle_dir: str | Path | None = None,
        model_ref: str = "champion",
        *,
        reports: bool = True,
    ) -> None:
        from ..inference import Predictor
        from ..packaging import load_bundle

        self.settings = settings
        if bundle_dir is None:
            from ..registry import Registry

            bundle, _ = Registry(settings).load(model_ref)
        else:
            bundle = load_bundle(bundle_dir)
        self.predictor = Predictor(bundle, device="cpu", runtime=settings.runtime)
        self.bundle_sha256 = bundle.sha256  # rows answered by this bundle carry embeddings in its space
        self.profile = ReferenceProfile.load(bundle.path)
        self.policy = settings.policy
        self.detector = self.profile.detector(alpha=self.policy.drift.false_alarm_rate)
        self.store = MonitoringStore(settings.state_dir / "monitoring.db")
        self.reports = reports
        self.report_dir = settings.state_dir / "reports"

    def _labels(self) -> dict[str, tuple[str, str]]:
        """Inspector labels by image hash -> (label, why it was reviewed), from the review queue."""
        from .review import ReviewQueue

        try:
            feedback = ReviewQueue(self.settings).feedback()
        except (sqlite3.Error, FileNotFoundError):
            return {}
        return {f["input_sha256"]: (f["label"], f.get("reason") or "") for f in feedback}

    def process_window(
        self,
        window_id: int,
        rows: list[dict[str, Any]],
        labels: dict[str, str],
        previous_rate: float | None,
        rejections: Sequence[dict[str, Any]] = (),
    ) -> WindowReport:
        """One window's report. ``rejections``: requests the server refused in the window's time span (rows of
        the prediction log's ``rejections`` table, see ``run``)."""
        kept, logged, decoded, unreadable = [], [], [], 0
        for r in rows:
            path = image_path(self.settings.state_dir, r["input_sha256"], r["input_format"])
            if not r["input_format"] and not path.exists():
                # A tensor input (v2 protocol) is never stored: nothing to decode, and not a failure either
                # (check_window counts it as a tensor input). Counting it as unreadable alerted on every tensor.
                continue
            if self._has_logged_outputs(r):
                # What the server computed: only check that the stored image is the one it saw (content-addressed,
                # so its sha256 must be the name), far cheaper than decoding it and running the model again.
                if path.is_file() and sha256_file(path) == r["input_sha256"]:
                    logged.append(len(kept))
                    kept.append(r)
                else:
                    unreadable += 1
                continue
            try:
                decoded.append((len(kept), decode_image(path)))
                kept.append(r)
            except (DatasetError, OSError):
                unreadable += 1  # missing or damaged stored image: an integrity failure, not a drift signal
        classes = self.profile.class_names
        probs = (
            np.array([[r["probabilities"].get(c, 0.0) for c in classes] for r in kept])
            if kept
            else np.zeros((0, len(classes)))
        )
        bad_input = [r for r in rejections if r["status"] in BAD_INPUT_STATUSES]
        integrity = check_window(
            rows,
            self.profile.expected,
            unreadable=unreadable,
            rejected=len(bad_input),
            previous_rate_per_min=previous_rate,
        )
        # What was refused and why, so the on-call person sees "cannot identify image file" at once.
        integrity["rejections_by_status"] = dict(Counter(str(r["status"]) for r in rejections))
        integrity["rejected_reasons"] = Counter(r["reason"] for r in bad_input).most_common(5)
        # Images the server flagged one by one as unlike the reference (monitoring/ood.py); a share well above the
        # calibrated false-flag rate means the line sends something new, even when no window statistic moved.
        scored = [r["ood_score"] for r in rows if r.get("ood_score") is not None]
        integrity["out_of_distribution"] = sum(1 for v in scored if v > 1.0)
        integrity["ood_share"] = integrity["out_of_distribution"] / len(scored) if scored else None
        features = None
        if len(kept) >= 20:
            features, emb = self._features_and_embeddings(kept, logged, decoded)
            result = self.detector.check(Sample(features, probs, self.profile.pca.transform(emb)))
            drift = result.to_dict()
            drift["moved"] = result.moved_features()
            drift["calibration"] = self.detector.calibration.get(len(kept))
        else:
            drift = {"drifted": False, "statistics": {"psi": 0.0}, "moved": [], "skipped": "fewer than 20 images"}
        quality = labelled_quality(rows, labels, classes)  # prefers the unbiased random-audit labels
        quality["accuracy_estimated"] = estimated_accuracy(probs, self.profile.temperature)
        latencies = [r["latency_ms"] for r in rows if r.get("latency_ms") is not None]
        # Error rate = failed requests / all predict requests in the window's time span, where
        #   all    = accepted requests (distinct request ids among the window's rows: a batch is one request)
        #            + refused requests (any status);
        #   failed = answered with a 5xx: the service's own failure, what its SLO is about (today the 503s of a
        #            server not ready or saturated; a crash answered by the generic 500 handler is not recorded in
        #            the log). 4xx are the client's mistakes: not failures of the service, but the bad inputs
        #            among them are counted as integrity failures above.
        accepted = len({r["request_id"] for r in rows})
        failed = sum(1 for r in rejections if r["status"] >= 500)
        total = accepted + len(rejections)
        ops = {
            "p99_latency_ms": float(np.percentile(latencies, 99)) if latencies else None,
            "n": len(rows),
            "requests": total,
            "failed_requests": failed,
            "rejected_requests": len(rejections),
            "error_rate": failed / total if total else None,
        }
        return WindowReport(
            window_id,
            rows[0]["id"],
            rows[-1]["id"],
            rows[0]["ts"],
            rows[-1]["ts"],
            len(rows),
            sorted({r["model_version"] for r in rows}),
            drift,
            integrity,
            quality,
            ops,
            features=features,
        )

    def _has_logged_outputs(self, row: dict[str, Any]) -> bool:
        """Did the server log this row's statistics and embedding, computed by the bundle this job monitors with?"""
        feats = row.get("features")
        return (
            row.get("embedding") is not None
            and row.get("bundle_sha256") == self.bundle_sha256
            and feats is not None
            and all(name in feats for name in self.profile.feature_names)
        )

    def _features_and_embeddings(
        self, kept: list[dict[str, Any]], logged: list[int], decoded: list[tuple[int, np.ndarray]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Feature matrix and raw embeddings for the kept rows, in order: logged values where the server gave
        them, computed from the decoded image (statistics + one batched forward pass) for the others."""
        names = self.profile.feature_names
        features = np.zeros((len(kept), len(names)))
        emb = np.zeros((len(kept), self.predictor.bundle.model_spec.embedding_dim), dtype=np.float32)
        for k in logged:
            features[k] = [kept[k]["features"][name] for name in names]
            emb[k] = kept[k]["embedding"]
        if decoded:
            idx = [k for k, _ in decoded]
            images = [im for _, im in decoded]
            features[idx] = feature_matrix(image_features(images), names)
            emb[idx] = self.predictor.predict(images, with_embeddings=True).embeddings
        return features, emb

    def write_reports(self, w: WindowReport, rows: list[dict[str, Any]]) -> dict[str, str]:
        """Evidently's DataDriftPreset on the image features (HTML + JSON) and our compact summary (JSON)."""
        import pandas as pd
        from evidently import Report
        from evidently.presets import DataDriftPreset

        self.report_dir.mkdir(parents=True, exist_ok=True)
        names = list(self.profile.feature_names)
        ref = pd.DataFrame(self.profile.reference.features, columns=names)
        if w.features is None:  # a window too small for the drift tests: its statistics were not needed yet
            images = []
            for r in rows:
                try:
                    path = image_path(self.settings.state_dir, r["input_sha256"], r["input_format"])
                    images.append(decode_image(path))
                except (DatasetError, OSError):
                    continue
            w.features = feature_matrix(image_features(images), names)
        cur = pd.DataFrame(w.features, columns=names)
        snapshot = Report([DataDriftPreset()]).run(current_data=cur, reference_data=ref)
        base = self.report_dir / f"window-{w.window_id:05d}"
        snapshot.save_html(str(base.with_suffix(".html")))
        base.with_suffix(".evidently.json").write_text(json.dumps(snapshot.dict(), indent=1, default=str))
        summary = {
            "window": w.window_id,
            "rows": [w.first_row, w.last_row],
            "drifted": w.drift["drifted"],
            "moved_features": {
                f: {
                    "psi": w.drift.get("psi", {}).get(f),
                    "median_change": w.drift.get("feature_shift", {}).get(f),
                    "since_window": self.first_drift_window(f, w.window_id),
                }
                for f in w.drift.get("moved", [])
            },
            "families": w.drift.get("families"),
            "integrity_failures": w.integrity["failures"],
            "accuracy_estimated": w.quality["accuracy_estimated"],
            "accuracy_measured": w.quality["accuracy"],
        }
        base.with_suffix(".summary.json").write_text(json.dumps(summary, indent=1, default=str))
        return {
            "html": str(base.with_suffix(".html")),
            "evidently_json": str(base.with_suffix(".evidently.json")),
            "summary": str(base.with_suffix(".summary.json")),
        }

    def first_drift_window(self, feature: str, current: int) -> int:
        """The first window of the current unbroken run in which ``feature`` has moved."""
        first = current
        for past in reversed([w for w in self.store.windows() if w["window_id"] < current]):
            if feature in past["drift"].get("moved", []):
                first = past["window_id"]
            else:
                break
        return first

    def export_gauges(self, w: WindowReport) -> Path:
        """Latest window's numbers as Prometheus gauges in a textfile (scraped via node-exporter's collector)."""
        from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

        reg = CollectorRegistry()
        Gauge("weld_drift_detected", "1 if the latest window drifted", registry=reg).set(int(w.drift["drifted"]))
        g = Gauge("weld_drift_psi", "PSI per feature, latest window", ["feature"], registry=reg)
        for f, v in w.drift.get("psi", {}).items():
            g.labels(feature=f).set(v)
        Gauge("weld_accuracy_estimated", "Estimated accuracy, latest window", registry=reg).set(
            w.quality["accuracy_estimated"]
        )
        if w.quality["accuracy"] is not None:
            Gauge("weld_accuracy_measured", "Accuracy on labelled items", registry=reg).set(w.quality["accuracy"])
        Gauge("weld_integrity_failures", "Integrity violations, latest window", registry=reg).set(
            w.integrity["failures"]
        )
        Gauge("weld_monitor_window", "Id of the latest monitored window", registry=reg).set(w.window_id)
        path = self.settings.state_dir / "monitoring.prom"
        write_to_textfile(str(path), reg)
        return path

    def run(
        self,
        *,
        window_size: int | None = None,
        window_minutes: float | None = None,
        from_start: bool = False,
        alerts: bool = True,
    ) -> list[WindowReport]:
        """Process every complete window not processed yet; returns their reports."""
        if from_start:
            self.store.clear()
        size = window_size or self.policy.drift.window_size
        last = int(self.store.get("last_row", "0") or 0)
        next_id = int(self.store.get("next_window", "1") or 1)
        from ..serving.predlog import read_rejections

        db = self.settings.state_dir / "predictions.db"
        rows = _read_rows(db, last)
        # Refused requests are matched to windows by time: each window takes those after the previous window's
        # last row, up to its own last row, so none falls between two windows.
        last_ts = float(self.store.get("last_ts")) if self.store.get("last_ts") else None
        labels = self._labels()
        manager = None
        if alerts:
            from .alerts import AlertManager

            manager = AlertManager(self.settings)
        previous_rate = float(self.store.get("last_rate")) if self.store.get("last_rate") else None
        reports = []
        for rows_w in split_windows(rows, None if window_minutes else size, window_minutes):
            rejections = read_rejections(db, last_ts, rows_w[-1]["ts"]) if db.exists() else []
            w = self.process_window(next_id, rows_w, labels, previous_rate, rejections)
            if manager is not None:
                w.alerts = [
                    a.to_dict() if hasattr(a, "to_dict") else dict(a.__dict__)
                    for a in manager.evaluate(w.window_id, w.metrics())
                ]
            if self.reports:
                w.report_paths = self.write_reports(w, rows_w)
            self.store.save(w)
            self.export_gauges(w)
            self.store.put("last_row", str(w.last_row))
            last_ts = w.ts_end
            self.store.put("last_ts", repr(last_ts))
            self.store.put("next_window", str(next_id + 1))
            if w.integrity["rate_per_min"]:
                previous_rate = w.integrity["rate_per_min"]
                self.store.put("last_rate", str(previous_rate))
            next_id += 1
            reports.append(w)
        return reports

    def close(self) -> None:
        self.store.close()


def timeline(reports: list[WindowReport] | list[dict[str, Any]]) -> str:
    """A plain-text table of windows: what a trainee or an on-call engineer reads first."""
    rows = [
        r.row()
        if isinstance(r, WindowReport)
        else WindowReport(**{k: r[k] for k in WindowReport.__dataclass_fields__ if k in r}).row()
        for r in reports
    ]
    header = (
        f"{'window':>6} {'n':>5} {'drift':>6} {'psi_max':>8} {'acc_est':>8} {'acc_true':>8} {'integ':>6} "
        f"{'alerts':>6}  moved"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        acc_true = "" if r["acc_true"] is None else f"{r['acc_true']:.3f}"
        lines.append(
            f"{r['window']:>6} {r['n']:>5} {'YES' if r['drift'] else 'no':>6} {r['psi_max']:>8.3f} "
            f"{r['acc_est']:>8.3f} {acc_true:>8} {r['integrity']:>6} {r['alerts']:>6}  {r['moved']}"
        )
    return "\n".join(lines)
