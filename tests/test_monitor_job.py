"""The monitoring job (issue 4, section 4): prediction log -> windows -> every check -> store, gauges, reports,
alerts; resuming, recomputing, time windows, integrity failures, and the ``monitor`` CLI command.

The prediction log is written with the server's own writer (``PredictionLog``), row by row as the server fills it
(see ``serving/service.py``), with the PNG bytes stored in the content-addressed image folder the job reads.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from reference_impl.monitoring.drift import DriftDetector
from reference_impl.settings import Settings

WINDOW = 100


@pytest.fixture(scope="module")
def shared_detector(profile_bundle: Path) -> DriftDetector:
    """One detector for the whole module, so the thresholds for a window size are calibrated once.

    Every Monitor builds its own detector from the profile; the tests below hand it this one instead (the same
    profile, alpha = the policy's 5 %), which keeps them fast without changing what is checked.
    """
    from reference_impl.monitoring.profile import ReferenceProfile

    return ReferenceProfile.load(profile_bundle).detector(alpha=0.05)


@pytest.fixture(autouse=True)
def reuse_detector(monkeypatch: pytest.MonkeyPatch, shared_detector: DriftDetector) -> None:
    from reference_impl.monitoring.profile import ReferenceProfile

    monkeypatch.setattr(ReferenceProfile, "detector", lambda self, alpha=0.05: shared_detector)


class Item:
    """One image as a client sent it, with the model's answer as the server logged it."""

    def __init__(self, pixels: np.ndarray, payload: bytes, fmt: str | None, probs: np.ndarray,
                 classes: tuple[str, ...], embedding: np.ndarray | None = None) -> None:  # fmt: skip
        self.pixels, self.payload, self.fmt, self.embedding = pixels, payload, fmt, embedding
        self.sha = hashlib.sha256(payload).hexdigest()
        self.probabilities = {c: float(p) for c, p in zip(classes, probs, strict=True)}
        k = int(np.argmax(probs))
        self.label, self.confidence = classes[k], float(probs[k])


def _items(predictor: Any, images: np.ndarray) -> list[Item]:
    from reference_impl import data

    pred = predictor.predict(images, with_embeddings=True)
    return [
        Item(im, data.encode_png(im), "png", p, tuple(predictor.classes), e)
        for im, p, e in zip(images, pred.probabilities, pred.embeddings, strict=True)
    ]


def _tiff16(item: Item) -> Item:
    """The same radiograph as a 16-bit TIFF, as a new camera would send it (same model answer, for simplicity)."""
    import io

    from PIL import Image

    pixels = item.pixels.astype(np.uint16) * 257  # full 16-bit range
    buf = io.BytesIO()
    height, width = pixels.shape
    Image.frombytes("I;16", (width, height), pixels.astype("<u2").tobytes()).save(buf, format="TIFF")
    probs = np.array(list(item.probabilities.values()))
    return Item(pixels, buf.getvalue(), "tiff", probs, tuple(item.probabilities))


@pytest.fixture(scope="module")
def stream(profile_bundle: Path) -> dict[str, list[Item]]:
    """Baseline images, then images from a new camera (severity 0.8), with the model's probabilities."""
    from reference_impl import data
    from reference_impl.inference import Predictor

    predictor = Predictor.from_path(profile_bundle, device="cpu")
    baseline = data.generate(3 * WINDOW, seed=51)
    camera = data.generate(3 * WINDOW, seed=52, condition="new_camera", severity=0.8)
    return {"baseline": _items(predictor, baseline.images), "camera": _items(predictor, camera.images)}


def write_log(settings: Settings, items: list[Item], *, t0: float = 1_800_000_000.0, step_s: float = 1.0,
              store_images: bool = True, role: str = "champion", logged_by: str | None = None,
              ood_scores: list[float] | None = None) -> None:  # fmt: skip
    """Append rows exactly as the server's InferenceService does (one image per request).

    ``logged_by``: a bundle sha256; the rows then carry the image statistics and the embedding the way today's
    server logs them (answered by that bundle). Without it they look like rows of an older server."""
    from reference_impl.serving.predlog import PredictionLog, PredictionRecord

    state = settings.state_dir
    log = PredictionLog(state / "predictions.db", state / "images" if store_images else None)
    try:
        for i, it in enumerate(items):
            scaled = it.pixels.astype(np.float32) / (65535.0 if it.pixels.dtype == np.uint16 else 255.0)
            bit_depth = 16 if it.pixels.dtype == np.uint16 else 8
            record = PredictionRecord(
                t0 + i * step_s,
                f"req-{t0:.0f}-{i}",
                0,
                role,
                "weld-test",
                "1.0-profile",
                "/v1/predict",
                it.sha,
                it.fmt,
                int(it.pixels.shape[1]),
                int(it.pixels.shape[0]),
                "I;16" if bit_depth == 16 else "L",
                bit_depth,
                float(scaled.mean()),
                float(scaled.std()),
                it.label,
                it.confidence,
                it.probabilities,
                latency_ms=12.5,
                bundle_sha256=logged_by,
                embedding=it.embedding if logged_by else None,
                ood_score=ood_scores[i] if ood_scores is not None else None,
            )
            log.append(record, it.payload, it.pixels if logged_by else None)
    finally:
        log.close()


def _db_windows(settings: Settings) -> list[tuple[int, int, int, int]]:
    conn = sqlite3.connect(settings.state_dir / "monitoring.db")
    try:
        return conn.execute(
            "SELECT window_id, n, drifted, integrity_failures FROM windows ORDER BY window_id"
        ).fetchall()
    finally:
        conn.close()


def _monitor(profile_bundle: Path, *, reports: bool = False):
    from reference_impl.monitoring.job import Monitor

    return Monitor(Settings.from_env(), bundle_dir=profile_bundle, reports=reports)


# ----------------------------------------------------------------------------------------------------------------
# The full job: baseline windows, then a new camera
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_monitor_detects_a_new_camera_end_to_end(profile_bundle: Path, stream) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    settings = Settings.from_env()
    write_log(settings, stream["baseline"][: 2 * WINDOW] + stream["camera"][: 2 * WINDOW])
    monitor = _monitor(profile_bundle, reports=True)
    try:
        reports = monitor.run(window_size=WINDOW)
    finally:
        monitor.close()

    assert [w.window_id for w in reports] == [1, 2, 3, 4]
    assert [(w.first_row, w.last_row) for w in reports] == [(1, 100), (101, 200), (201, 300), (301, 400)]
    assert [w.drift["drifted"] for w in reports] == [False, False, True, True]
    for w in reports[2:]:
        assert {"noise", "sharpness"} <= set(w.drift["moved"])
        assert w.integrity["failures"] == 0  # same size, depth and format: statistical drift, not integrity
    assert all(w.model_versions == ["1.0-profile"] for w in reports)
    assert all(w.ops["p99_latency_ms"] == pytest.approx(12.5) for w in reports)

    # The monitoring store: one row per window, verdicts included.
    assert _db_windows(settings) == [(1, 100, 0, 0), (2, 100, 0, 0), (3, 100, 1, 0), (4, 100, 1, 0)]

    # Prometheus textfile: parses, and carries the latest window's verdict.
    text = (settings.state_dir / "monitoring.prom").read_text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["weld_drift_detected"].samples[0].value == 1.0
    assert families["weld_monitor_window"].samples[0].value == 4.0
    psi_by_feature = {s.labels["feature"]: s.value for s in families["weld_drift_psi"].samples}
    assert set(psi_by_feature) == {"brightness", "contrast", "sharpness", "noise", "entropy"}
    assert psi_by_feature["noise"] == pytest.approx(reports[-1].drift["psi"]["noise"])
    assert families["weld_integrity_failures"].samples[0].value == 0.0

    # Reports per window: Evidently HTML + JSON and our compact summary.
    for w in reports:
        html, ev_json = Path(w.report_paths["html"]), Path(w.report_paths["evidently_json"])
        assert html.is_file() and html.stat().st_size > 1000
        evidently = json.loads(ev_json.read_text())
        assert any("DriftedColumnsCount" in m["metric_name"] for m in evidently["metrics"])
    first = json.loads(Path(reports[0].report_paths["summary"]).read_text())
    assert first["drifted"] is False and first["moved_features"] == {}
    last = json.loads(Path(reports[-1].report_paths["summary"]).read_text())
    assert last["window"] == 4 and last["drifted"] is True
    assert {"noise", "sharpness"} <= set(last["moved_features"])
    for feature in ("noise", "sharpness"):
        moved = last["moved_features"][feature]
        assert moved["since_window"] == 3  # the first drifted window, not the latest one
        assert moved["psi"] > 0.25
        assert moved["median_change"] == pytest.approx(reports[-1].drift["feature_shift"][feature])

    # Alerts: the drift group fires on window 3 and goes to the JSON-lines sink with its evidence.
    alerts_file = settings.state_dir / "alerts.jsonl"
    assert alerts_file.is_file()
    sent = [json.loads(line) for line in alerts_file.read_text().splitlines()]
    drift_alerts = [a for a in sent if a["rule"] in ("drift_detected", "psi_major_shift")]
    assert drift_alerts, sent
    assert drift_alerts[0]["evidence"]["window_id"] == 3
    assert {"noise", "sharpness"} <= set(drift_alerts[0]["evidence"]["moved_features"])
    assert drift_alerts[0]["runbook"]
    assert any(a["rule"] in ("drift_detected", "psi_major_shift") for a in reports[2].alerts)


def test_second_run_processes_nothing_new_then_resumes(profile_bundle: Path, stream) -> None:
    settings = Settings.from_env()
    write_log(settings, stream["baseline"][: 2 * WINDOW] + stream["camera"][:50])
    monitor = _monitor(profile_bundle)
    try:
        first = monitor.run(window_size=WINDOW, alerts=False)
        again = monitor.run(window_size=WINDOW, alerts=False)
    finally:
        monitor.close()
    assert [w.window_id for w in first] == [1, 2]
    assert again == []  # the 50 rows of the partial third window wait for the next run
    assert len(_db_windows(settings)) == 2

    write_log(settings, stream["camera"][50:WINDOW], t0=1_800_001_000.0)  # the third window completes
    monitor = _monitor(profile_bundle)  # a new process on the next cron tick: state comes from the store
    try:
        resumed = monitor.run(window_size=WINDOW, alerts=False)
    finally:
        monitor.close()
    assert [(w.window_id, w.first_row, w.last_row) for w in resumed] == [(3, 201, 300)]
    assert resumed[0].drift["drifted"]  # half baseline, half new camera: still clearly drifted
    assert [r[0] for r in _db_windows(settings)] == [1, 2, 3]


def test_from_start_recomputes(profile_bundle: Path, stream) -> None:
    settings = Settings.from_env()
    write_log(settings, stream["baseline"][:WINDOW])
    # A challenger's shadow answers are logged too, but only what the clients received is monitored.
    write_log(settings, stream["camera"][:WINDOW], t0=1_800_000_100.0, role="shadow")
    write_log(settings, stream["baseline"][WINDOW : 2 * WINDOW], t0=1_800_000_200.0)
    monitor = _monitor(profile_bundle)
    try:
        first = monitor.run(window_size=WINDOW, alerts=False)
        again = monitor.run(window_size=WINDOW, alerts=False, from_start=True)  # without the flag: nothing new
    finally:
        monitor.close()
    assert [w.window_id for w in again] == [w.window_id for w in first] == [1, 2]
    assert [(w.first_row, w.last_row) for w in again] == [(1, 100), (201, 300)]  # rows 101-200: shadow
    assert not any(w.drift["drifted"] for w in again)  # the shadow rows (new camera) were not mixed in
    assert [w.drift["statistics"] for w in again] == [w.drift["statistics"] for w in first]  # deterministic
    assert [r[0] for r in _db_windows(settings)] == [1, 2]  # replaced, not appended


# ----------------------------------------------------------------------------------------------------------------
# Windows by time
# ----------------------------------------------------------------------------------------------------------------
def test_split_windows_by_count_and_by_time() -> None:
    from reference_impl.monitoring.job import split_windows

    rows = [{"id": i + 1, "ts": 600.0 * 10 + 20.0 * i} for i in range(100)]  # 3 rows a minute from 10:00
    by_count = split_windows(rows, 30, None)
    assert [len(w) for w in by_count] == [30, 30, 30]  # the last 10 rows wait
    by_time = split_windows(rows, None, 10)  # 10-minute buckets: 30 rows each, the 4th (10 rows) is still filling
    assert [len(w) for w in by_time] == [30, 30, 30]
    assert [w[0]["id"] for w in by_time] == [1, 31, 61]
    assert all(int(r["ts"] // 600) == int(w[0]["ts"] // 600) for w in by_time for r in w)
    assert split_windows(rows[:5], None, 10) == []  # a single bucket may still be filling


def test_monitor_by_time_leaves_the_last_bucket(profile_bundle: Path, stream) -> None:
    settings = Settings.from_env()
    t0 = 1_800_000_000.0 - 1_800_000_000.0 % 300  # a bucket boundary of 5-minute windows
    # 3 s apart: 100 rows per 5-minute bucket; 250 rows = two complete buckets and a half-filled third.
    write_log(settings, stream["baseline"][:250], t0=t0, step_s=3.0)
    monitor = _monitor(profile_bundle)
    try:
        reports = monitor.run(window_minutes=5, alerts=False)
        assert [(w.window_id, w.n, w.first_row, w.last_row) for w in reports] == [(1, 100, 1, 100), (2, 100, 101, 200)]
        assert reports[0].integrity["rate_per_min"] == pytest.approx(100 / (99 * 3 / 60))
        assert reports[1].integrity["volume_ratio"] == pytest.approx(1.0)
        # The third bucket fills up later; the next run picks up its rows, including those already logged.
        write_log(settings, stream["baseline"][250:300], t0=t0 + 250 * 3.0, step_s=3.0)
        write_log(settings, stream["camera"][:10], t0=t0 + 900.0, step_s=3.0)  # opens a fourth bucket
        later = monitor.run(window_minutes=5, alerts=False)
    finally:
        monitor.close()
    assert [(w.window_id, w.n, w.first_row, w.last_row) for w in later] == [(3, 100, 201, 300)]


# ----------------------------------------------------------------------------------------------------------------
# Integrity failures inside the job
# ----------------------------------------------------------------------------------------------------------------
def test_missing_image_is_an_integrity_failure_not_a_crash(profile_bundle: Path, stream, shared_detector) -> None:
    from reference_impl.monitoring.job import image_path

    settings = Settings.from_env()
    items = stream["baseline"][:WINDOW]
    write_log(settings, items)
    image_path(settings.state_dir, items[7].sha, "png").unlink()  # e.g. a cleanup job removed it
    image_path(settings.state_dir, items[8].sha, "png").write_bytes(b"\x89PNG truncated")  # a damaged file
    # The window has 98 readable images; reuse the 100-image thresholds rather than calibrating again.
    shared_detector.set_thresholds(WINDOW - 2, shared_detector.calibrate(WINDOW))
    monitor = _monitor(profile_bundle)
    try:
        (w,) = monitor.run(window_size=WINDOW)
    finally:
        monitor.close()
    assert w.integrity["unreadable"] == 2
    assert w.integrity["failures"] == 2
    assert w.n == WINDOW and w.drift["n"] == WINDOW - 2  # the drift tests ran on what could be read
    assert not w.drift["drifted"]
    assert _db_windows(settings)[0][3] == 2
    sent = [json.loads(line) for line in (settings.state_dir / "alerts.jsonl").read_text().splitlines()]
    integrity = [a for a in sent if a["rule"] == "integrity_failures"]
    assert len(integrity) == 1 and integrity[0]["evidence"]["value"] == 2


def _decode_counter(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from reference_impl.monitoring import job

    calls: list[int] = []
    real = job.decode_image
    monkeypatch.setattr(job, "decode_image", lambda path: calls.append(1) or real(path))
    return calls


def test_logged_statistics_and_embeddings_replace_decoding_with_the_same_verdicts(
    profile_bundle: Path, stream, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The server logs what the monitor needs; the job then decodes nothing and reaches the same numbers as when it
    recomputes everything from the stored images (a log of an older server)."""
    from reference_impl.packaging import load_bundle

    items = stream["baseline"][:WINDOW] + stream["camera"][:WINDOW]
    verdicts = {}
    for kind in ("older server", "logged"):
        monkeypatch.setenv("MLOPS_STATE_DIR", str(tmp_path / kind.replace(" ", "-")))
        settings = Settings.from_env()
        write_log(settings, items, logged_by=load_bundle(profile_bundle).sha256 if kind == "logged" else None)
        decodes = _decode_counter(monkeypatch)
        monitor = _monitor(profile_bundle)
        try:
            verdicts[kind] = monitor.run(window_size=WINDOW, alerts=False)
        finally:
            monitor.close()
        assert len(decodes) == (0 if kind == "logged" else 2 * WINDOW), kind
    for old, new in zip(verdicts["older server"], verdicts["logged"], strict=True):
        assert old.drift["drifted"] == new.drift["drifted"] and old.drift["moved"] == new.drift["moved"]
        assert new.drift["n"] == WINDOW and new.integrity["unreadable"] == 0
        for feature, psi in old.drift["psi"].items():
            assert new.drift["psi"][feature] == pytest.approx(psi, abs=1e-9), feature
        for family, value in old.drift["statistics"].items():
            assert new.drift["statistics"][family] == pytest.approx(value, rel=1e-3, abs=1e-6), family
    assert [w.drift["drifted"] for w in verdicts["logged"]] == [False, True]


def test_logged_rows_still_prove_their_stored_image(profile_bundle: Path, stream, monkeypatch, shared_detector) -> None:
    """A stored image that changed after the server logged it is an integrity failure, as with decoding; rows
    answered by another bundle (a canary) are recomputed with the bundle the job monitors with."""
    from reference_impl.monitoring.job import image_path
    from reference_impl.packaging import load_bundle

    settings = Settings.from_env()
    items = stream["baseline"][:WINDOW]
    write_log(settings, items[:60], logged_by=load_bundle(profile_bundle).sha256)
    write_log(settings, items[60:], t0=1_800_000_100.0, logged_by="0" * 64)  # another model's embedding space
    image_path(settings.state_dir, items[3].sha, "png").write_bytes(b"\x89PNG overwritten")
    image_path(settings.state_dir, items[4].sha, "png").unlink()
    shared_detector.set_thresholds(WINDOW - 2, shared_detector.calibrate(WINDOW))
    decodes = _decode_counter(monkeypatch)
    monitor = _monitor(profile_bundle)
    try:
        (w,) = monitor.run(window_size=WINDOW, alerts=False)
    finally:
        monitor.close()
    assert w.integrity["unreadable"] == 2 and w.drift["n"] == WINDOW - 2
    assert len(decodes) == WINDOW - 60, "only the rows of the other bundle were decoded"
    assert not w.drift["drifted"]


def test_the_share_of_flagged_images_is_reported_and_alerted(profile_bundle: Path, stream, shared_detector) -> None:
    """Ten photographs among 90 radiographs move no window statistic; the per-image flags the server logged do."""
    settings = Settings.from_env()
    scores = [0.4] * 90 + [3.0] * 10  # what the server logged: ten images above the threshold (1.0)
    write_log(settings, stream["baseline"][:WINDOW], ood_scores=scores)
    monitor = _monitor(profile_bundle)
    try:
        (w,) = monitor.run(window_size=WINDOW)
    finally:
        monitor.close()
    assert w.integrity["out_of_distribution"] == 10 and w.integrity["ood_share"] == pytest.approx(0.1)
    assert w.metrics()["integrity"]["ood_share"] == pytest.approx(0.1)
    assert "out_of_distribution_share" in {a["rule"] for a in w.alerts}


def test_new_16_bit_tiff_camera_is_flagged_by_integrity(profile_bundle: Path, stream) -> None:
    from reference_impl import data

    settings = Settings.from_env()
    sixteen = [_tiff16(it) for it in stream["baseline"][70:WINDOW]]
    assert data.decode_image(sixteen[0].payload).dtype == np.uint16
    write_log(settings, stream["baseline"][:70] + sixteen)
    monitor = _monitor(profile_bundle)
    try:
        (w,) = monitor.run(window_size=WINDOW, alerts=False)
    finally:
        monitor.close()
    assert w.integrity["format_mismatch"] == 30
    assert w.integrity["bit_depth_mismatch"] == 30
    assert w.integrity["unreadable"] == 0
    assert w.integrity["formats_seen"] == {"png": 70, "tiff": 30}
    assert w.integrity["failures"] == 30, "30 images failed (each breaks two rules)"


def test_tensor_inputs_are_not_unreadable(profile_bundle: Path, stream, shared_detector) -> None:
    """v2 tensor inputs are never stored as files: the job must not count them as unreadable images."""
    settings = Settings.from_env()
    tensors = [Item(it.pixels, it.pixels.tobytes(), None, np.array(list(it.probabilities.values())),
                    tuple(it.probabilities)) for it in stream["baseline"][:5]]  # fmt: skip
    write_log(settings, stream["baseline"][5:WINDOW], t0=1_800_000_000.0)
    write_log(settings, tensors, t0=1_800_000_100.0, store_images=False)
    shared_detector.set_thresholds(WINDOW - 5, shared_detector.calibrate(WINDOW))
    monitor = _monitor(profile_bundle)
    try:
        (w,) = monitor.run(window_size=WINDOW, alerts=False)
    finally:
        monitor.close()
    assert w.integrity["unreadable"] == 0
    assert w.integrity["tensor_inputs"] == 5
    assert w.integrity["failures"] == 0
    assert w.drift["n"] == WINDOW - 5


def _log_rejections(settings: Settings, rejections: list[tuple[float, int, str]]) -> None:
    """Refused requests as the server's ClientError handler records them: (ts, status, reason)."""
    from reference_impl.serving.predlog import PredictionLog

    log = PredictionLog(settings.state_dir / "predictions.db")
    try:
        for ts, status, reason in rejections:
            log.log_rejection("/v1/predict", status, reason, "image/png", "5", ts=ts)
    finally:
        log.close()


def test_rejected_uploads_are_integrity_failures_of_the_next_window(profile_bundle: Path, stream) -> None:
    settings = Settings.from_env()
    t0 = 1_800_000_000.0  # rows every second: window 1 spans t0 .. t0+99, window 2 t0+100 .. t0+199
    write_log(settings, stream["baseline"][:WINDOW], t0=t0)
    # A wrong API key during window 1: refused, but it says nothing about the images.
    _log_rejections(settings, [(t0 + 10.5, 401, "missing or wrong X-API-Key header")])
    monitor = _monitor(profile_bundle)
    try:
        (first,) = monitor.run(window_size=WINDOW)
    finally:
        monitor.close()
    assert first.integrity["rejected"] == 0 and first.integrity["failures"] == 0
    assert first.integrity["rejections_by_status"] == {"401": 1}
    assert first.ops["requests"] == WINDOW + 1 and first.ops["error_rate"] == 0.0

    # After that run, the station starts sending broken files (refused: they never become predictions), and the
    # server is briefly saturated. The refusals before window 2's rows (t0+99.5) must not fall between windows.
    broken = "body: cannot decode the image (not a PNG, JPEG or TIFF file)"
    saturated = "the request queue is full; the server is saturated, retry after a short pause"
    refused = [
        (t0 + 99.5, 400, broken),
        (t0 + 120.5, 400, broken),
        (t0 + 130.5, 415, "unsupported Content-Type 'text/plain'"),
        (t0 + 140.5, 503, saturated),
        (t0 + 141.5, 503, saturated),
        (t0 + 250.0, 400, "after window 2: belongs to window 3"),
    ]
    _log_rejections(settings, refused)
    write_log(settings, stream["baseline"][WINDOW : 2 * WINDOW], t0=t0 + 100)
    monitor = _monitor(profile_bundle)  # the next cron tick
    try:
        (second,) = monitor.run(window_size=WINDOW)
    finally:
        monitor.close()
    assert second.window_id == 2
    assert second.integrity["rejected"] == 3  # the two undecodable files and the text upload
    assert second.integrity["unreadable"] == 0  # every stored image decoded: the report says which kind failed
    assert second.integrity["failures"] == 3
    assert second.integrity["rejections_by_status"] == {"400": 2, "415": 1, "503": 2}
    assert second.integrity["rejected_reasons"][0] == (broken, 2)
    # Error rate: 2 failed (the 503s) out of 100 accepted + 5 refused requests; 4xx are not the service's failures.
    assert second.ops["requests"] == WINDOW + 5
    assert second.ops["failed_requests"] == 2
    assert second.ops["error_rate"] == pytest.approx(2 / (WINDOW + 5))
    assert second.metrics()["ops"]["error_rate"] == second.ops["error_rate"]
    assert _db_windows(settings)[1][3] == 3
    sent = [json.loads(line) for line in (settings.state_dir / "alerts.jsonl").read_text().splitlines()]
    integrity = [a for a in sent if a["rule"] == "integrity_failures"]
    assert [a["evidence"]["window_id"] for a in integrity] == [2] and integrity[0]["evidence"]["value"] == 3
    # 2 / 105 is above the 1 % SLO: the error-rate rule, which never had its metric before, now pages.
    errors = [a for a in sent if a["rule"] == "error_rate_slo"]
    assert [a["evidence"]["window_id"] for a in errors] == [2]
    assert errors[0]["evidence"]["value"] == pytest.approx(2 / (WINDOW + 5))


def test_monitor_needs_a_bundle_with_a_profile(bundle_dir: Path) -> None:
    from reference_impl.monitoring.job import Monitor
    from reference_impl.monitoring.profile import ProfileError

    with pytest.raises(ProfileError, match="package_with_profile"):
        Monitor(Settings.from_env(), bundle_dir=bundle_dir)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def test_cli_monitor_prints_the_timeline(profile_bundle: Path, stream, capsys: pytest.CaptureFixture[str]) -> None:
    from reference_impl.cli import main

    settings = Settings.from_env()
    write_log(settings, stream["baseline"][:WINDOW] + stream["camera"][:WINDOW] + stream["camera"][WINDOW:150])
    # --no-report: the Evidently reports are covered by the end-to-end test; here they would only cost time.
    args = ["monitor", "--bundle", str(profile_bundle), "--window-size", str(WINDOW), "--no-report"]
    assert main(args) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["window", "n", "drift"])
    assert set(lines[header + 1]) == {"-"}
    table = [line.split() for line in lines[header + 2 :]]
    assert [row[:3] for row in table] == [["1", "100", "no"], ["2", "100", "YES"]]  # the partial third waits
    assert "noise" in lines[header + 3] and "sharpness" in lines[header + 3]
    assert not (settings.state_dir / "reports").exists()

    assert main(args) == 0
    assert "no complete window" in capsys.readouterr().out
