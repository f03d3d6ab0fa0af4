"""The production loop end to end: what ``make demo`` runs. Chapter: "The production loop" and "Retraining".

One run plays a week on the weld line in a few minutes, with every stage of the course doing its real job:

1. **build**: generate baseline radiographs -> train -> package a bundle with its monitoring profile -> verify the
   reloaded bundle predicts bit for bit like the trained model -> register it as version 1, alias ``champion``;
2. **serve**: start the inference server as a real uvicorn process on a free loopback port;
3. **observe**: send baseline traffic in windows; the monitor finds nothing, inspectors audit a sample;
4. **drift**: the line switches to a new condition (``new_camera`` by default): drift tests fire, true accuracy
   drops while the model's own confidence hardly moves; the review queue fills and (simulated) inspectors label it,
   with a configurable label-noise rate;
5. **retrain**: the retraining policy decides (and says why), the approval is recorded, the training set is
   assembled from a rehearsal sample of the original data plus inspector feedback (the golden test set never
   enters it), a challenger is fine-tuned from the champion, and the evaluation gate compares both models;
6. **roll out**: shadow (the challenger sees live traffic, answers nobody) -> canary (it answers a share of
   requests) -> promote (alias switch + hot reload, no failed request) -> watch (automatic rollback on a breach);
7. **report**: a timeline table, and ``report.html`` with accuracy and drift over time and the events marked.

Everything a run writes goes into its own folder ``<state_dir>/demo/<run id>/`` (registry, prediction log, review
queue, monitoring store, audit log, report), so a second run starts clean and the first stays inspectable. The
server is stopped on every exit, including Ctrl-C.

What is simulated, and why: the line (synthetic images with a known label), and the inspectors (they know the true
label and make mistakes at ``label_noise``). Knowing the truth for every image lets the timeline show the *true*
accuracy next to what the monitor could see, which no real line can: that gap is the lesson.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .monitoring.profile import package_with_profile
from .settings import Settings

if TYPE_CHECKING:
    from .data import WeldImages
    from .monitoring.job import Monitor, WindowReport
    from .monitoring.review import ReviewQueue
    from .registry import Registry
    from .retraining import AuditLog

__all__ = [
    "DemoConfig",
    "DemoResult",
    "Line",
    "WindowRow",
    "baseline_bundle",
    "label_queue",
    "package_with_profile",
    "run_demo",
    "wait_for_rows",
]

GOLDEN_SEED_OFFSET = 3  # the frozen golden test set: never trained on, never served
TRAFFIC_SEED_OFFSET = 1000  # live traffic of window w uses seed + 1000 + w: fresh images in every window
INSPECTOR = "inspector-sim"


@dataclass
class DemoConfig:
    """Every knob of the demo. The defaults run in about 3-4 minutes on 2 CPU cores; ``fast`` is a smoke run."""

    n_images: int = 5000  # baseline training images
    epochs: int = 6
    condition: str = "new_camera"  # what changes on the line
    severity: float = 0.3  # accuracy falls from 99% to about 55-70%: it hurts, and a few hundred labels fix it
    seed: int | None = None  # None: the settings' seed
    window_size: int = 200  # images per monitoring window
    baseline_windows: int = 2
    max_drift_windows: int = 4  # give up waiting for a retraining decision after this many windows of drift
    watch_windows: int = 2  # windows watched after promotion (automatic rollback on a breach)
    inspector_capacity: int = 200  # labels the inspectors give per window
    min_new_labels: int = 400  # raises the policy's retraining.min_new_labels: a few labels cannot teach a camera
    label_noise: float = 0.02  # share of inspector labels that are wrong
    audit_fraction: float = 0.1  # random sample of confident predictions sent for review (unbiased accuracy)
    holdout_fraction: float = 0.25  # feedback held out as the gate's "recent data" (never trained on)
    rehearsal: int = 2000  # original training images replayed in retraining, so the baseline is not forgotten
    max_retrain_attempts: int = 2  # a failed gate: keep collecting labels for a window, then one more attempt
    golden_size: int = 1000
    canary_fraction: float = 0.25
    concurrency: int = 4  # simultaneous clients sending traffic
    n_reference: int = 800  # monitoring profile sizes (see monitoring/profile.py)
    n_null: int = 1600
    fast: bool = False

    def __post_init__(self) -> None:
        if self.fast:  # a smoke run for tests: small data and windows, same code path end to end
            # 2,000 images need the default 10 epochs to converge (the full run's 5,000 converge in 6): a champion
            # still converging moves under every fine-tune, and the gate would then be a coin toss.
            self.n_images, self.epochs, self.window_size = min(self.n_images, 2000), 10, 100
            self.inspector_capacity, self.golden_size, self.rehearsal, self.min_new_labels = 100, 400, 2000, 300
            self.n_reference, self.n_null = 300, 600
            self.watch_windows = 1
        from .data import CONDITIONS

        if self.condition not in CONDITIONS[1:]:
            raise ValueError(f"condition must be one of {', '.join(CONDITIONS[1:])}; got {self.condition!r}")
        checks = {
            "severity": 0 < self.severity <= 1,
            "label_noise": 0 <= self.label_noise < 1,
            "audit_fraction": 0 <= self.audit_fraction <= 1,
            "holdout_fraction": 0 < self.holdout_fraction < 1,
            "canary_fraction": 0 < self.canary_fraction < 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"out of range: {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)} "
                "(severity in (0, 1]; noise in [0, 1); fractions in (0, 1))"
            )
        if min(self.window_size, self.baseline_windows, self.max_drift_windows, self.max_retrain_attempts) < 1:
            raise ValueError("window_size, baseline_windows, max_drift_windows and max_retrain_attempts must be >= 1")
        if self.n_images < 200:  # the champion's train/val/test split needs a few dozen images of every class
            raise ValueError(f"n_images must be at least 200 (the champion needs enough of every class); "
                             f"got {self.n_images}")  # fmt: skip


@dataclass
class WindowRow:
    """One line of the timeline: what was served, what the monitor saw, what was true, and what happened."""

    window: int
    phase: str  # baseline, drift, shadow, canary, watch
    condition: str
    served: dict[str, int]  # "role v<version>" -> requests
    n: int
    errors: int
    drift: bool | None
    moved: list[str]
    psi_max: float | None
    acc_true: float  # from the simulation's ground truth: what nobody on a real line knows
    acc_est: float | None  # the monitor's estimate from calibrated confidence
    acc_labelled: float | None  # from inspector labels (random audit when there are enough)
    n_labelled: int
    events: list[str] = field(default_factory=list)


@dataclass
class StepRecord:
    step: str
    seconds: float
    detail: str


@dataclass
class DemoResult:
    run_dir: Path
    bundle_dir: Path
    metrics: dict[str, Any]
    steps: list[StepRecord] = field(default_factory=list)
    windows: list[WindowRow] = field(default_factory=list)
    gate: dict[str, Any] | None = None
    promoted: str | None = None
    rolled_back: bool = False
    report: Path | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)  # every gate verdict, in order
    seconds: float = 0.0
    interrupted: bool = False

    def accuracy(self, phase: str) -> float | None:
        """Mean true accuracy over the windows of one phase (e.g. ``"drift"`` vs ``"watch"``)."""
        values = [w.acc_true for w in self.windows if w.phase == phase]
        return float(np.mean(values)) if values else None

    def timeline(self) -> str:
        header = (
            f"{'win':>3} {'phase':<8} {'condition':<14} {'served by':<30} {'drift':>5} {'acc true':>8} "
            f"{'acc est':>7} {'acc lab':>7} {'labels':>6}  event"
        )
        lines = [header, "-" * len(header)]
        event_column = header.index("event")

        def pct(v: float | None) -> str:
            return "" if v is None else f"{v:.1%}"

        for w in self.windows:
            served = ", ".join(f"{k}:{v}" for k, v in sorted(w.served.items()))
            drift = "" if w.drift is None else ("YES" if w.drift else "no")
            first, *rest = w.events or [""]
            lines.append(
                f"{w.window:>3} {w.phase:<8} {w.condition:<14} {served:<30.30} {drift:>5} "
                f"{pct(w.acc_true):>8} {pct(w.acc_est):>7} {pct(w.acc_labelled):>7} {w.n_labelled:>6}  "
                f"{first}"
            )
            lines += [" " * event_column + e for e in rest]  # further events line up under the first
        return "\n".join(lines)

    def summary(self) -> str:
        lines = ["", "Production loop summary", "=" * 100]
        lines += [f"{s.step:<10} {s.seconds:>6.1f} s  {s.detail}" for s in self.steps]
        lines += ["", self.timeline(), ""]
        before, after = self.accuracy("drift"), self.accuracy("watch")
        base = self.accuracy("baseline")
        if before is not None:
            recovery = f" -> {after:.1%} after the rollout" if after is not None else " (no new model was rolled out)"
            lines.append(
                f"true accuracy: baseline {base:.1%}; on the new condition {before:.1%} before retraining{recovery}"
            )
        if len(self.attempts) > 1 or (self.attempts and not self.attempts[-1]["passed"]):
            lines += [f"gate, attempt {a['attempt']} (v{a['version']}): {a['explanation']}" for a in self.attempts]
        if self.interrupted:
            lines.append("INTERRUPTED: the server was stopped; the report covers the windows completed so far.")
        lines += [f"run folder: {self.run_dir}", f"report:     {self.report}", f"wall time:  {self.seconds:.0f} s", ""]
        return "\n".join(lines)


# ==============================================================================================================
# The simulated line and inspectors
# ==============================================================================================================
class Line:
    """The simulated weld line: sends windows of fresh images to the server and remembers the truth of each.

    ``predlog``: the server's prediction log. When given, :meth:`send` returns only once every answered request
    (and the shadow's mirrored predictions) is in the log, so the monitor that runs next sees a complete window.
    """

    def __init__(self, server_url: str, seed: int, *, window_size: int = 200, concurrency: int = 4,
                 predlog: Path | None = None) -> None:  # fmt: skip
        self.server_url, self.seed = server_url, seed
        self.window_size, self.concurrency, self.predlog = window_size, concurrency, predlog
        self.truth: dict[str, str] = {}  # image sha256 (what the server logs) -> true class
        self.windows = self.sent = self.errors = 0

    def send(self, condition: str, severity: float = 0.0) -> tuple[int, int]:
        """Generate and send one window of fresh images; returns (requests, failed requests)."""
        from . import data
        from .loadtest import run_load

        self.windows += 1
        batch = data.generate(self.window_size, seed=self.seed + TRAFFIC_SEED_OFFSET + self.windows,
                              condition=condition, severity=severity)  # fmt: skip
        payloads = [data.encode_png(img) for img in batch.images]
        for payload, label in zip(payloads, batch.labels, strict=True):
            self.truth[hashlib.sha256(payload).hexdigest()] = batch.classes[int(label)]
        before = last_row_id(self.predlog) if self.predlog else 0
        result = run_load(self.server_url, payloads, n_requests=len(payloads), concurrency=self.concurrency)
        self.sent += result.requests
        self.errors += result.errors
        if self.predlog:
            # The server writes its log from a background thread (a request never waits for the disk), so the
            # last rows land a moment after the last answer: wait for them, and for the shadow's predictions.
            wait_for_rows(self.predlog, "role IN ('champion', 'canary')", before, result.requests - result.errors)
            wait_for_rows(self.predlog, "role = 'shadow'", before, None)
        return result.requests, result.errors


def last_row_id(predlog: Path) -> int:
    """The newest row id of the prediction log (0 if it is empty or not created yet)."""
    import sqlite3

    if not predlog.is_file():
        return 0
    with sqlite3.connect(predlog) as conn:
        return int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM predictions").fetchone()[0])


def label_queue(
    queue: ReviewQueue,
    truth: dict[str, str],
    capacity: int,
    noise: float,
    rng: np.random.Generator,
    classes: tuple[str, ...],
) -> int:
    """Simulated inspectors: claim up to ``capacity`` items (highest priority first) and label them, wrongly with
    probability ``noise`` (real inspectors disagree with each other a few percent of the time)."""
    done = 0
    for item in queue.claim(INSPECTOR, n=capacity):
        true = truth.get(item.input_sha256)
        if true is None:  # not an image this run sent (cannot happen in a fresh run folder): leave it to people
            queue.release(item.id, INSPECTOR)
            continue
        label = true
        if rng.random() < noise:
            label = str(rng.choice([c for c in classes if c != true]))
        queue.label(item.id, INSPECTOR, label, note="simulated inspector")
        done += 1
    return done


def wait_for_rows(predlog: Path, where: str, after_id: int, expected: int | None, timeout_s: float = 30.0) -> int:
    """Wait until the prediction log holds ``expected`` rows matching ``where`` after ``after_id`` (``None``: until
    the count stops growing). Returns the count; the caller's next step reads a complete window."""
    import sqlite3

    deadline, last, stable = time.monotonic() + timeout_s, -1, 0
    while True:
        with sqlite3.connect(predlog) as conn:
            n = conn.execute(f"SELECT COUNT(*) FROM predictions WHERE id > ? AND {where}", (after_id,)).fetchone()[0]
        stable = stable + 1 if n == last else 0
        if (expected is not None and n >= expected) or (expected is None and stable >= 2):
            return n
        if time.monotonic() > deadline:
            return n
        last = n
        time.sleep(0.2)


# ==============================================================================================================
# The loop
# ==============================================================================================================
class _Run:
    """State shared by the phases of one demo run (kept in one object so each phase reads like the chapter)."""

    def __init__(self, settings: Settings, config: DemoConfig, echo: bool) -> None:
        from .retraining import AuditLog

        self.config, self.echo = config, echo
        self.seed = settings.seed if config.seed is None else config.seed
        self.run_id = time.strftime("%Y%m%d-%H%M%S")
        run_dir = settings.state_dir / "demo" / self.run_id
        n = 1
        while run_dir.exists():  # two runs in the same second still get separate folders
            run_dir = settings.state_dir / "demo" / f"{self.run_id}-{n}"
            n += 1
        run_dir.mkdir(parents=True)
        self.settings = settings.with_(state_dir=run_dir, seed=self.seed)
        policy = self.settings.policy
        if policy.retraining.min_new_labels < config.min_new_labels:
            self.settings = self.settings.with_policy(
                policy.override({"retraining.min_new_labels": config.min_new_labels})
            )
        self.audit = AuditLog(self.settings)
        self.rng = np.random.default_rng(self.seed + 17)
        self.admin_key = secrets.token_urlsafe(24)  # this run's server only; never printed
        self.result = DemoResult(run_dir, run_dir, {})
        self.pending_events: list[str] = []

    # -- output --------------------------------------------------------------------------------------------
    def step(self, name: str, start: float, detail: str) -> None:
        self.result.steps.append(StepRecord(name, time.perf_counter() - start, detail))
        self.say(f"[{name}] {detail} ({self.result.steps[-1].seconds:.1f} s)")

    def say(self, text: str) -> None:
        if self.echo:
            print(text, flush=True)

    def event(self, text: str) -> None:
        """An event is shown on the window it happened after (or the next one, if no window has run yet)."""
        self.say(f"  -> {text}")
        if self.result.windows:
            self.result.windows[-1].events.append(text)
        else:
            self.pending_events.append(text)

    # -- 1. build ------------------------------------------------------------------------------------------
    def build(self) -> tuple[WeldImages, WeldImages, Any]:
        from . import data, training
        from .registry import CHAMPION, Registry

        s, c = self.settings, self.config
        t = time.perf_counter()
        baseline = data.generate(c.n_images, seed=self.seed)
        golden = data.generate(c.golden_size, seed=self.seed + GOLDEN_SEED_OFFSET)
        data_dir = s.data_dir / f"baseline-seed{self.seed}-n{c.n_images}"
        data.write_dataset(baseline, data_dir)
        self.step(
            "generate",
            t,
            f"{len(baseline)} baseline radiographs {baseline.class_counts()}, and a frozen "
            f"golden test set of {len(golden)}",
        )

        t = time.perf_counter()
        config = training.TrainConfig(epochs=c.epochs, seed=self.seed, device=s.device)
        result = training.train_model(baseline, config, progress=self.echo)
        training.save_metrics(result, s.runs_dir / "champion")
        self.result.metrics = result.metrics
        self.step(
            "train", t, f"test accuracy {result.metrics['accuracy']:.2%} on {result.metrics['n']} held-out images"
        )

        t = time.perf_counter()
        bundle_dir = s.bundles_dir / f"{s.model_name}-v1"
        package_with_profile(
            result,
            bundle_dir,
            seed=self.seed,
            model_name=s.model_name,
            model_version="1",
            data_manifest=data_dir / data.MANIFEST_NAME,
            n_reference=c.n_reference,
            n_null=c.n_null,
            ood_false_flag_rate=s.policy.drift.ood_false_flag_rate,
        )
        self.result.bundle_dir = bundle_dir
        self._verify(bundle_dir, result, baseline.images[:64])
        self.registry: Registry = Registry(s)
        info = self.registry.register_bundle(bundle_dir, alias=CHAMPION)
        self.audit.append(
            "initial_champion",
            actor="demo",
            summary=f"version {info.version} registered as champion",
            evidence={"bundle": bundle_dir, "metrics": {"accuracy": result.metrics["accuracy"]}},
        )
        self.step(
            "package",
            t,
            f"bundle with monitoring profile verified (reloaded logits identical) and "
            f"registered as version {info.version}, alias champion",
        )
        return baseline, golden, result

    @staticmethod
    def _verify(bundle_dir: Path, result: Any, probe: np.ndarray) -> None:
        import torch

        from . import training
        from .inference import Predictor
        from .packaging import load_bundle

        # load_bundle verifies every hash first; torch, because this checks the saved weights bit for bit
        predictor = Predictor(load_bundle(bundle_dir), device="cpu", runtime="torch")
        x = predictor.preprocess(probe)
        if not torch.equal(predictor.forward(x)[0], training.predict_logits(result.model, x, torch.device("cpu"))):
            raise RuntimeError("the reloaded bundle predicts differently from the trained model: packaging is broken")

    # -- one window of live traffic ------------------------------------------------------------------------
    def window(
        self, line: Line, monitor: Monitor, queue: ReviewQueue, phase: str, condition: str, severity: float
    ) -> WindowRow:
        from .monitoring.quality import labelled_quality
        from .serving.predlog import read_predictions

        c = self.config
        w_id = len(self.result.windows) + 1
        sent, errors = line.send(condition, severity)
        predlog = self.settings.state_dir / "predictions.db"
        reports = monitor.run(window_size=sent - errors)
        report: WindowReport | None = reports[-1] if reports else None
        rows = read_predictions(predlog, "id > ? AND role IN ('champion', 'canary')", (self.last_row,))
        if rows:
            self.last_row = rows[-1]["id"]
        drifted = bool(report.drift["drifted"]) if report else None
        # The review queue: low confidence always, every image of a drifted window, and a random audit sample.
        queue.enqueue_from_predictions(
            predlog,
            since_id=self.last_scanned,
            audit_fraction=c.audit_fraction,
            window_request_ids=[r["request_id"] for r in rows] if drifted else None,
        )
        self.last_scanned = max(self.last_row, self.last_scanned)
        label_queue(queue, line.truth, c.inspector_capacity, c.label_noise, self.rng, monitor.profile.class_names)
        labels = {f["input_sha256"]: (f["label"], f.get("reason") or "") for f in queue.feedback()}
        quality = labelled_quality(rows, labels, monitor.profile.class_names)
        served: dict[str, int] = {}
        for r in rows:
            key = f"{r['role']} v{r['model_version']}"
            served[key] = served.get(key, 0) + 1
        row = WindowRow(
            window=w_id,
            phase=phase,
            condition=condition if condition == "baseline" else f"{condition}@{severity:g}",
            served=served,
            n=len(rows),
            errors=errors,
            drift=drifted,
            moved=list(report.drift.get("moved", [])) if report else [],
            psi_max=float(report.drift["statistics"]["psi"]) if report else None,
            acc_true=float(np.mean([r["label"] == line.truth.get(r["input_sha256"]) for r in rows])) if rows else 0.0,
            acc_est=float(report.quality["accuracy_estimated"]) if report else None,
            acc_labelled=quality["accuracy"],
            n_labelled=quality["n_labelled"],
            events=self.pending_events,
        )
        self.pending_events = []
        if errors:
            row.events.append(f"{errors} of {sent} requests failed")
        self.result.windows.append(row)
        moved = f" (moved: {', '.join(row.moved[:3])})" if row.moved else ""
        self.say(
            f"[window {w_id}] {phase:<8} {row.condition:<18} drift {'YES' if drifted else 'no '}{moved}; "
            f"true accuracy {row.acc_true:.1%}, estimated {row.acc_est or 0:.1%}, "
            f"{queue.stats().get('labelled', 0)} labels so far"
        )
        return row

    def as_window(self, row: WindowRow) -> Any:
        from .retraining import Window

        return Window(
            row.window,
            drifted=bool(row.drift),
            moved=tuple(row.moved),
            accuracy=row.acc_labelled,
            n_labelled=row.n_labelled,
            accuracy_estimated=row.acc_est,
            error_rate=row.errors / max(row.n + row.errors, 1),
        )

    # -- 5. retrain and gate --------------------------------------------------------------------------------
    def retrain(
        self, decision: Any, queue: ReviewQueue, baseline: WeldImages, golden: WeldImages, champion: Any, attempt: int
    ) -> tuple[str, Any]:
        """One recorded retraining attempt: approval, training set, fine-tuned challenger, registration, gate."""
        from . import training
        from .data import WeldImages, decode_image
        from .monitoring.review import audit_pick
        from .retraining import (
            approve,
            assemble_training_set,
            evaluate_gate,
            golden_hashes,
            measure,
            record_gate,
            register_challenger,
            train_challenger,
        )

        c, s = self.config, self.settings
        t = time.perf_counter()
        approval = approve(decision, mode="auto", policy=s.policy, audit=self.audit)
        feedback = queue.feedback()
        # Hold out a deterministic share of the new labels as the gate's "recent data": a model must never be
        # judged on the images it was trained on, and the golden set says nothing about the new condition.
        held = [f for f in feedback if audit_pick(f["input_sha256"], c.holdout_fraction, self.seed + 7)]
        held_ids = {f["input_sha256"] for f in held}
        train_feedback = [f for f in feedback if f["input_sha256"] not in held_ids]
        pick = np.random.default_rng(self.seed + 5).choice(
            len(baseline), min(c.rehearsal, len(baseline)), replace=False
        )
        rehearsal = WeldImages(baseline.images[np.sort(pick)], baseline.labels[np.sort(pick)], baseline.classes)
        training_set = assemble_training_set(
            rehearsal, train_feedback, golden_hashes(golden), classes=baseline.classes, audit=self.audit
        )
        result = train_challenger(
            training_set,
            approval=approval,
            policy=s.policy,
            audit=self.audit,
            champion=champion,
            # another attempt is another training run (another seed) on more labels, never a looser gate
            config=training.fine_tune_config(seed=self.seed + attempt - 1, device=s.device),
        )
        info = register_challenger(
            self.registry,
            result,
            training_set,
            decision=decision,
            approval=approval,
            audit=self.audit,
            condition=c.condition,
            severity=c.severity,
            n_reference=c.n_reference,
            n_null=c.n_null,
        )
        summary = training_set.summary()
        self.step(
            "retrain",
            t,
            f"attempt {attempt}: challenger v{info.version} fine-tuned on {summary['n']} images "
            f"({summary['by_source'].get('feedback', 0)} inspector labels); {len(held)} labels "
            "held out for the gate",
        )
        self.event(
            f"retrain (attempt {attempt}): v{info.version} trained on {summary['by_source'].get('feedback', 0)} "
            "new labels"
        )

        t = time.perf_counter()
        serving, _ = self.registry.load("champion")
        challenger, _ = self.registry.load(info.version)
        images = [decode_image(f["image_path"]) for f in held]
        truth = [f["label"] for f in held]
        gate = evaluate_gate(
            measure(serving, golden.images, golden.labels, baseline.classes),
            measure(challenger, golden.images, golden.labels, baseline.classes),
            recent_champion=measure(serving, images, truth, baseline.classes),
            recent_challenger=measure(challenger, images, truth, baseline.classes),
            policy=s.policy,
            audit=self.audit,
        )
        record_gate(self.registry, info.version, gate, audit=self.audit)
        self.result.gate = {"passed": gate.passed, "explanation": gate.explanation, "numbers": gate.numbers,
                             "attempt": attempt, "version": info.version}  # fmt: skip
        self.result.attempts.append(self.result.gate)
        self.step("gate", t, gate.explanation)
        self.event(f"gate {gate.explanation}")  # the explanation starts with PASS or FAIL
        return info.version, gate

    # -- the whole run -------------------------------------------------------------------------------------
    def run(self) -> DemoResult:
        from .monitoring.job import Monitor
        from .monitoring.review import ReviewQueue
        from .registry import CHALLENGER
        from .retraining import (
            RolloutError,
            canary_report,
            decide,
            promote,
            reload_server,
            set_rollout,
            shadow_report,
            watch,
        )
        from .serving.process import ServerProcess

        c, s = self.config, self.settings
        start = time.perf_counter()
        self.say(f"Production loop demo: condition {c.condition} at severity {c.severity:g}; run folder {s.state_dir}")
        baseline, golden, trained = self.build()
        self.last_row = self.last_scanned = 0
        t = time.perf_counter()
        server = ServerProcess(
            [], state_dir=s.state_dir, env={"MLOPS_ADMIN_KEY": self.admin_key}, log_path=s.state_dir / "server.log"
        )
        with server:  # started here, stopped on every exit: normal, error, Ctrl-C
            self.step("serve", t, f"inference server ready at {server.url} (log: server.log)")
            url, key = server.url, self.admin_key
            line = Line(url, self.seed, window_size=c.window_size, concurrency=c.concurrency,
                        predlog=s.state_dir / "predictions.db")  # fmt: skip
            monitor = Monitor(s)
            queue = ReviewQueue(s, bundle=self.result.bundle_dir)
            predlog = s.state_dir / "predictions.db"

            for _ in range(c.baseline_windows):
                self.window(line, monitor, queue, "baseline", "baseline", 0.0)
            self.event(f"the line switches to {c.condition} (severity {c.severity:g}); nobody tells the model")

            decision = None
            for _ in range(c.max_drift_windows):
                self.window(line, monitor, queue, "drift", c.condition, c.severity)
                decision = decide(
                    time.time(),
                    time.time(),
                    [self.as_window(w) for w in self.result.windows],
                    len(queue.feedback()),
                    policy=s.policy,
                    audit=self.audit,
                )
                if decision.retrain:
                    self.event(f"decision: {decision.explanation}")
                    break
            if decision is None or not decision.retrain:
                self.event(
                    f"no retraining decision after {c.max_drift_windows} drifted windows: "
                    f"{decision.explanation if decision else ''}"
                )
                return self.finish(start)

            # A failed gate is not the end of the story: the champion stays, the failure is on record, the line
            # keeps running and the inspectors keep labelling; then a new, recorded attempt (a bounded number).
            for attempt in range(1, c.max_retrain_attempts + 1):
                version, gate = self.retrain(decision, queue, baseline, golden, trained, attempt)
                if gate.passed:
                    break
                self.registry.clear_alias(CHALLENGER)  # a failed challenger is not even shadowed
                last = attempt == c.max_retrain_attempts
                then = (
                    "no attempts left: the line stays on the champion"
                    if last
                    else "collecting one more window of labels before the next attempt"
                )
                self.event(f"champion untouched; the challenger alias was removed; {then}")
                self.window(line, monitor, queue, "drift", c.condition, c.severity)
            if not gate.passed:
                return self.finish(start)

            # Shadow: the server loads the challenger next to the champion and mirrors traffic to it.
            reload_server(url, admin_key=key)
            self.window(line, monitor, queue, "shadow", c.condition, c.severity)
            shadow = shadow_report(predlog, version, audit=self.audit)
            self.event(f"shadow: {shadow.summary()}")

            set_rollout(url, admin_key=key, canary_fraction=c.canary_fraction, audit=self.audit, decided_by="demo")
            since = self.last_row
            self.window(line, monitor, queue, "canary", c.condition, c.severity)
            canary = canary_report(predlog, version, since_id=since, audit=self.audit)
            self.event(f"canary: {canary.summary()}")

            promoted = promote(
                self.registry,
                version,
                server_url=url,
                admin_key=key,
                audit=self.audit,
                decided_by="demo (gate passed, shadow and canary healthy)",
            )
            set_rollout(url, admin_key=key, canary_fraction=0.0, audit=self.audit, decided_by="demo")
            self.result.promoted = version
            self.event(f"promoted v{version} (previous champion v{promoted.previous}); server hot-reloaded")
            # The monitor now compares the line with the NEW champion's reference (drawn from the new condition).
            monitor.close()
            monitor = Monitor(s)
            watched = []
            for _ in range(c.watch_windows):
                watched.append(self.as_window(self.window(line, monitor, queue, "watch", c.condition, c.severity)))
                try:
                    verdict = watch(
                        self.registry,
                        watched,
                        promoted_version=version,
                        policy=s.policy,
                        max_windows=c.watch_windows,
                        server_url=url,
                        admin_key=key,
                        audit=self.audit,
                    )
                except RolloutError as exc:  # the rollback itself failed: say so loudly, keep the evidence
                    self.event(f"watch: rollback FAILED: {exc}")
                    break
                if verdict.verdict == "rolled_back":
                    self.result.rolled_back = True
                    self.event(f"watch: breach ({'; '.join(verdict.breaches)}): rolled back automatically")
                    break
                self.event(f"watch: {verdict.verdict}")
            monitor.close()
        return self.finish(start)

    def finish(self, start: float, interrupted: bool = False) -> DemoResult:
        self.result.seconds = time.perf_counter() - start
        self.result.interrupted = interrupted
        self.result.report = write_report(self.result, self.audit)
        if self.echo:
            print(self.result.summary(), flush=True)
        return self.result


def run_demo(settings: Settings | None = None, config: DemoConfig | None = None, *, echo: bool = True) -> DemoResult:
    """Run the whole production loop (see the module docstring). Ctrl-C stops the server, writes the report of the
    windows completed so far, and re-raises ``KeyboardInterrupt``."""
    run = _Run(settings or Settings.from_env(), config or DemoConfig(), echo)
    try:
        return run.run()
    except KeyboardInterrupt:
        run.finish(0.0, interrupted=True)  # the server was already stopped by its context manager
        raise


# ==============================================================================================================
# The report
# ==============================================================================================================
def write_report(result: DemoResult, audit: AuditLog) -> Path:
    """``timeline.json``, ``timeline.png`` and ``report.html`` in the run folder."""
    import base64
    import html

    from reference_impl import figures

    run_dir = result.run_dir
    rows = result.windows
    (run_dir / "timeline.json").write_text(json.dumps([asdict(w) for w in rows], indent=2))
    fig = figures.timeline(
        [w.window for w in rows],
        {"true accuracy (simulation only)": [w.acc_true for w in rows],
         "estimated from confidence": [w.acc_est for w in rows],
         "measured on inspector labels": [w.acc_labelled for w in rows]},
        [w.psi_max or 0.0 for w in rows],
        [bool(w.drift) for w in rows],
        phases=[w.phase for w in rows],
        title=f"Production loop: {rows[0].condition if rows else ''} -> {rows[-1].condition if rows else ''}",
    )  # fmt: skip
    png = figures.save(fig, run_dir / "timeline.png")

    def esc(v: Any) -> str:
        return html.escape(str(v))

    table = "".join(
        f"<tr><td>{w.window}</td><td>{esc(w.phase)}</td><td>{esc(w.condition)}</td>"
        f"<td>{esc(', '.join(f'{k}: {v}' for k, v in sorted(w.served.items())))}</td>"
        f"<td>{'' if w.drift is None else ('YES' if w.drift else 'no')}</td><td>{esc(', '.join(w.moved[:3]))}</td>"
        f"<td>{w.acc_true:.1%}</td><td>{'' if w.acc_est is None else f'{w.acc_est:.1%}'}</td>"
        f"<td>{'' if w.acc_labelled is None else f'{w.acc_labelled:.1%}'}</td><td>{w.n_labelled}</td>"
        f"<td>{'<br>'.join(esc(e) for e in w.events)}</td></tr>"
        for w in rows
    )
    events = "".join(
        f"<tr><td>{esc(e.at)}</td><td>{esc(e.event)}</td><td>{esc(e.actor)}</td><td>{esc(e.summary)}</td></tr>"
        for e in audit.read()
    )
    interrupted = "; INTERRUPTED" if result.interrupted else ""
    gate = "".join(
        f"<p>Attempt {a['attempt']} (version {esc(a['version'])}): <b>{esc(a['explanation'])}</b></p>"
        for a in result.attempts
    )
    gate += f"<pre>{esc(json.dumps(result.gate, indent=2, default=str))}</pre>" if result.gate else "not reached"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Production loop report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;vertical-align:top}}</style></head><body>
<h1>Production loop report</h1>
<p>Run folder <code>{esc(run_dir)}</code>; wall time {result.seconds:.0f} s{interrupted}.
Champion training accuracy {result.metrics.get("accuracy", float("nan")):.2%}.</p>
<img src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}" alt="accuracy and drift per window">
<h2>Timeline</h2><table><tr><th>window</th><th>phase</th><th>condition</th><th>served by</th><th>drift</th>
<th>moved</th><th>acc true</th><th>acc est</th><th>acc labelled</th><th>labels</th><th>events</th></tr>{table}</table>
<h2>Evaluation gate</h2>{gate}
<h2>Audit log</h2><table><tr><th>when</th><th>what</th><th>who</th><th>summary</th></tr>{events}</table>
</body></html>"""
    out = run_dir / "report.html"
    out.write_text(page, encoding="utf-8")
    return out


def baseline_bundle(
    settings: Settings | None = None, *, n_images: int = 2000, epochs: int = 10, progress: bool = True
) -> Path:
    """A trained, packaged baseline model, built once and cached in the state dir.

    Labs start from this so a trainee (or the autograder) does not wait for training every time: the first call
    generates data, trains and packages (93 s on one idle core, measured; less on more) and later calls return the
    cached bundle after checking that it still verifies. The bundle is written to a temporary folder and renamed
    into place, so an interrupted run never leaves a half-written bundle behind. ``progress`` shows a bar while it
    trains.
    """
    import shutil
    import tempfile

    from . import data, training
    from .packaging import BundleError, verify_bundle

    settings = settings or Settings.from_env()
    config = training.TrainConfig(epochs=epochs, seed=settings.seed, device="cpu")
    # the name says how it was trained and packaged (p3: monitoring profile v1, the ONNX export and the
    # out-of-distribution detector), so a changed recipe trains a new one
    target = settings.bundles_dir / f"baseline-seed{settings.seed}-n{n_images}-e{epochs}-b{config.batch_size}-p3"
    if target.exists():
        try:
            verify_bundle(target)
            return target
        except BundleError:
            shutil.rmtree(target)  # damaged cache: rebuild rather than serve a broken model
    images = data.generate(n_images, seed=settings.seed)
    data_dir = settings.data_dir / f"baseline-seed{settings.seed}-n{n_images}"
    if not (data_dir / data.MANIFEST_NAME).exists():
        data.write_dataset(images, data_dir)
    if progress:
        print(f"Training the baseline model the labs start from ({n_images} images, {epochs} epochs); "
              "this happens once, later runs reuse it.", flush=True)  # fmt: skip
    result = training.train_model(images, config, progress=progress)
    settings.bundles_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=settings.bundles_dir))
    package_with_profile(
        result,
        tmp / "bundle",
        seed=settings.seed,
        model_name=settings.model_name,
        model_version="1",
        data_manifest=data_dir / data.MANIFEST_NAME,
        ood_false_flag_rate=settings.policy.drift.ood_false_flag_rate,
    )
    try:
        (tmp / "bundle").rename(target)
    except OSError:  # another process finished first: use theirs
        if not target.exists():
            raise
    shutil.rmtree(tmp, ignore_errors=True)
    return target
