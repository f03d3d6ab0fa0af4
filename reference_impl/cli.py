"""``python -m reference_impl <command>``: every stage of the loop from the command line.

Only ``argparse`` and the settings are imported at start-up; each command imports what it needs (torch, mlflow,
...) when it runs, so ``--help`` answers instantly.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .settings import Settings, SettingsError


class CLIError(Exception):
    """A user mistake on the command line: printed as one clear line, exit status 2."""


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(state_dir=args.state_dir, device=getattr(args, "device", None),
                             runtime=getattr(args, "runtime", None), seed=args.seed)  # fmt: skip


def _parse_mix(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    mix = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        try:
            mix[name.strip()] = float(weight)
        except ValueError:
            raise CLIError(f"--class-mix expects name=weight pairs like good=0.7,crack=0.3; got {part!r}") from None
    return mix


def cmd_generate(args: argparse.Namespace) -> int:
    from . import data

    classes = data.CLASSES + (data.NOVEL_CLASSES if args.novel else ())
    # --seed defaults to None (meaning $MLOPS_SEED or 0): resolve it through the settings like other commands.
    # Building the LineCondition here makes "--severity 0.5" without a --condition an error, not a silent baseline.
    condition = data.LineCondition(args.condition, args.severity)
    images = data.generate(args.n, seed=_settings(args).seed, condition=condition, size=args.size,
                           class_mix=_parse_mix(args.class_mix), classes=classes,
                           bit_depth=args.bit_depth)  # fmt: skip
    manifest = data.write_dataset(images, args.out)
    print(f"wrote {len(images)} images {images.class_counts()} and {manifest}")
    if args.grid:
        print(f"sample grid: {data.save_grid(images, args.grid)}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from . import data, training
    from .packaging import save_bundle

    settings = _settings(args)
    if args.data:
        dataset = data.load_folder(args.data)
        manifest = Path(args.data) / data.MANIFEST_NAME
        manifest = manifest if manifest.exists() else None
    else:
        dataset = data.generate(args.n, seed=settings.seed)
        out = settings.data_dir / f"baseline-seed{settings.seed}-n{args.n}"
        manifest = out / data.MANIFEST_NAME
        if not manifest.exists():
            data.write_dataset(dataset, out)
    result = training.train_model(dataset, training.TrainConfig(epochs=args.epochs, seed=settings.seed,
                                                                device=settings.device), progress=True)  # fmt: skip
    if args.data:  # real images: no generator for held-out references, so the bundle has no monitoring profile
        bundle = save_bundle(result, args.out, model_name=settings.model_name, model_version=args.version,
                             data_manifest=manifest)  # fmt: skip
    else:
        from .monitoring.profile import package_with_profile

        bundle = package_with_profile(result, Path(args.out), seed=settings.seed, model_name=settings.model_name,
                                      model_version=args.version or time.strftime("%Y%m%d%H%M%S"),
                                      data_manifest=manifest,
                                      ood_false_flag_rate=settings.policy.drift.ood_false_flag_rate)  # fmt: skip
    training.save_metrics(result, Path(args.out).with_name(Path(args.out).name + "-metrics"))
    print(f"test accuracy {result.metrics['accuracy']:.2%} in {result.seconds:.1f} s; bundle: {bundle}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .packaging import load_bundle

    bundle = load_bundle(args.bundle)
    print(f"OK: {bundle.path} version {bundle.version}, {len(bundle.files)} files verified, sha256 {bundle.sha256}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .packaging import export_onnx, export_torchscript, load_bundle

    bundle = load_bundle(args.bundle)
    out = Path(args.out or Path(args.bundle).with_suffix(".onnx" if args.format == "onnx" else ".pt"))
    (export_onnx if args.format == "onnx" else export_torchscript)(bundle, out)
    print(f"{args.format} export matches the eager model: {out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .data import decode_image
    from .inference import Predictor

    settings = _settings(args)
    predictor = Predictor.from_path(args.bundle, device=settings.device, runtime=settings.runtime)
    for path in args.images:
        print(json.dumps({"file": path, **predictor.predict_one(decode_image(path))}))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .loop import DemoConfig, run_demo

    size = {} if args.images is None else {"n_images": args.images}
    config = DemoConfig(condition=args.condition, severity=args.severity, seed=args.seed, fast=args.fast,
                        label_noise=args.label_noise, **size)  # fmt: skip
    try:
        result = run_demo(_settings(args), config)
    except KeyboardInterrupt:
        print("\ninterrupted: the demo server was stopped; the partial report is in the run folder", file=sys.stderr)
        return 130
    return 0 if result.report is not None else 1


def _predictor_from(args: argparse.Namespace) -> tuple[object, str | None]:
    """A Predictor from --bundle, or from the registry by --model-ref (alias or version)."""
    from .inference import Predictor

    settings = _settings(args)
    if args.bundle:
        return Predictor.from_path(args.bundle, device=settings.device, runtime=settings.runtime), None
    from .registry import Registry

    bundle, info = Registry(settings).load(args.model_ref)
    return Predictor(bundle, device=settings.device, runtime=settings.runtime), info.version


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .serving import ServingConfig, create_app

    settings = _settings(args)
    config = ServingConfig.from_env(
        model_ref=args.model_ref, bundle_path=str(args.bundle) if args.bundle else None,
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, queue_size=args.queue_size,
        shadow=not args.no_shadow, canary_fraction=args.canary_fraction, device=args.device or "auto",
        runtime=settings.runtime,
    )  # fmt: skip
    app = create_app(settings, config)
    # uvicorn shuts down gracefully on SIGTERM and then re-raises the signal; with this handler in place the
    # re-raised signal ends the process with status 0, so supervisors and tests can tell "stopped cleanly" from
    # "killed".
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # One worker process: the model and the micro-batcher live in it. Scale out with more replicas, not workers.
    # No access log: every request is already in the prediction log and the Prometheus counters, and formatting a
    # log line per request costs a measurable share of a small model's latency.
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning",
                access_log=args.verbose, timeout_graceful_shutdown=15)  # fmt: skip
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from .registry import Registry

    info = Registry(_settings(args)).register_bundle(args.bundle, alias=args.alias)
    print(f"registered {info.uri} aliases={list(info.aliases)} tags={json.dumps(info.tags)}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    """Through retraining.promote: refuses a version that did not pass the evaluation gate (unless --skip-gate),
    writes the audit log, and hot-reloads a running server when --server-url is given."""
    import getpass
    import os

    from .registry import Registry
    from .retraining import AuditLog, promote

    settings = _settings(args)
    result = promote(Registry(settings), args.version, server_url=args.server_url,
                     admin_key=os.environ.get("MLOPS_ADMIN_KEY"), audit=AuditLog(settings),
                     decided_by=args.by or getpass.getuser(), require_gate=not args.skip_gate)  # fmt: skip
    print(f"champion -> version {result.version} (previous champion: {result.previous})"
          + (f"; server reloaded: {result.reload}" if result.reload else ""))  # fmt: skip
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    import getpass
    import os

    from .registry import Registry
    from .retraining import AuditLog, rollback

    settings = _settings(args)
    result = rollback(Registry(settings), reason=args.reason, decided_by=args.by or getpass.getuser(),
                      server_url=args.server_url, admin_key=os.environ.get("MLOPS_ADMIN_KEY"),
                      audit=AuditLog(settings))  # fmt: skip
    print(f"champion rolled back from version {result.from_version} to {result.to_version}"
          + (f"; server reloaded: {result.reload}" if result.reload else ""))  # fmt: skip
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    from .registry import Registry

    print(json.dumps(Registry(_settings(args)).describe(), indent=2))
    return 0


def cmd_services(args: argparse.Namespace) -> int:
    from .services import run_mlflow_ui

    return run_mlflow_ui(_settings(args), host=args.host, port=args.port)


def cmd_score(args: argparse.Namespace) -> int:
    from .scoring import score_folder

    predictor, version = _predictor_from(args)
    summary = score_folder(args.folder, args.out, predictor, model_version=version, batch_size=args.batch_size,
                           num_workers=args.workers)  # fmt: skip
    print(f"scored {summary.scored}, skipped {summary.skipped} already scored, {summary.errors} unreadable "
          f"({summary.images_per_second:.0f} images/s) -> {summary.out}")  # fmt: skip
    if summary.errors:
        print(f"unreadable files are listed in {summary.errors_path}", file=sys.stderr)
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    from .monitoring.job import Monitor, timeline

    monitor = Monitor(_settings(args), bundle_dir=args.bundle, model_ref=args.model_ref, reports=not args.no_report)
    try:
        reports = monitor.run(window_size=args.window_size, window_minutes=args.window_minutes,
                              from_start=args.from_start)  # fmt: skip
    finally:
        monitor.close()
    if not reports:
        print("no complete window of new predictions yet (the last, partial window waits for the next run)")
        return 0
    print(timeline(reports))
    last = reports[-1]
    if last.report_paths:
        print(f"latest report: {last.report_paths['html']}")
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    from . import data
    from .loadtest import run_load

    images = data.generate(32, seed=_settings(args).seed + 99)
    payloads = [data.encode_png(im) for im in images.images]
    result = run_load(args.url, payloads, kind=args.kind, concurrency=args.concurrency,
                      n_requests=args.requests, duration_s=args.duration)  # fmt: skip
    print(json.dumps(result.summary(), indent=2))
    return 0 if result.errors == 0 else 1


# ---- Monitoring: review queue and alerts (issue 4, sections 6-7) ----------------------------------------------
def cmd_review(args: argparse.Namespace) -> int:
    """``review enqueue|claim|label|release|stats``: the human-in-the-loop review queue from a terminal."""
    from .monitoring.review import ReviewQueue

    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if getattr(args, "classes", None) else None
    queue = ReviewQueue(_settings(args), classes, bundle=getattr(args, "bundle", None))
    action = args.review_command
    if action == "enqueue":
        window = [r.strip() for r in args.drifted_requests.split(",") if r.strip()] if args.drifted_requests else None
        added = queue.enqueue_from_predictions(args.predlog, confidence_below=args.confidence_below,
                                               include_shadow_disagreements=not args.no_shadow,
                                               since_id=args.since_id, window_request_ids=window,
                                               audit_fraction=args.audit_fraction)  # fmt: skip
        stats = queue.stats()
        print(json.dumps({"added": added, "pending": stats["pending"], "labelled": stats["labelled"]}))
    elif action == "claim":
        items = queue.claim(args.reviewer, n=args.n, lease_s=args.lease_s)
        for item in items:
            print(json.dumps(item.to_dict()))
        if not items:
            print("nothing to review: the queue has no pending items", file=sys.stderr)
    elif action == "label":
        print(json.dumps(queue.label(args.item_id, args.reviewer, args.label, note=args.note).to_dict()))
    elif action == "release":
        print(json.dumps(queue.release(args.item_id, args.reviewer).to_dict()))
    else:
        print(json.dumps(queue.stats(), indent=2))
    return 0


def cmd_alerts(args: argparse.Namespace) -> int:
    """``alerts test|rules``: prove every alert destination works; show the rules with their thresholds."""
    from .monitoring.alerts import AlertManager

    # Alerts are meant to be seen: show info-level ones in the terminal even without --verbose.
    logging.getLogger("reference_impl.alerts").setLevel(logging.INFO)
    manager = AlertManager(_settings(args), args.rules)
    if args.alerts_command == "rules":
        for rule in manager.rules:
            source = "" if rule.threshold_source == "rule" else f"  ({rule.threshold_source})"
            threshold = manager.thresholds[rule.name]
            also = f"  and {rule.op} {rule.window_threshold} (from the window)" if rule.window_threshold else ""
            print(f"{rule.name:24} {rule.severity:8} {rule.metric} {rule.op} {threshold}{source}{also}")
        print(f"cool-down: {manager.cooldown_s / 60:g} min; sinks: {', '.join(s.name for s in manager.sinks)}")
        return 0
    _, results = manager.send_test()
    for name, error in results.items():
        print(f"ok      {name}" if error is None else f"FAILED  {name}: {error}")
    return 0 if all(error is None for error in results.values()) else 1


def build_parser() -> argparse.ArgumentParser:
    from .data import CONDITIONS  # numpy only: cheap

    parser = argparse.ArgumentParser(
        prog="python -m reference_impl", description="Every stage of the weld-defect production loop."
    )
    parser.add_argument("--state-dir", type=Path, help="where data, bundles and logs live (default ./.mlops or "
                        "$MLOPS_STATE_DIR)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=None, help="random seed (default 0 or $MLOPS_SEED)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (e.g. training epochs)")
    sub = parser.add_subparsers(dest="command", metavar="command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    p = add("demo", cmd_demo, "run the production loop end to end on embedded defaults")
    p.add_argument("--condition", choices=CONDITIONS[1:], default="new_camera", help="line condition to switch to")
    p.add_argument("--severity", type=float, default=0.3, help="severity of the condition in (0, 1]")
    p.add_argument("--seed", type=int, help="random seed of the whole run (default: MLOPS_SEED or 0)")
    p.add_argument("--label-noise", type=float, default=0.02, help="share of wrong inspector labels (default 0.02)")
    p.add_argument("--fast", action="store_true", help="small data and windows, same steps (smoke test, ~1 min)")
    p.add_argument("--images", type=int, metavar="N",
                   help="baseline images the champion trains on (default 5,000; --fast: 2,000; fewer train faster "
                        "and give a weaker champion)")  # fmt: skip
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--runtime",
        choices=("auto", "onnxruntime", "torch"),
        help="inference runtime (default auto: ONNX Runtime when the bundle has a verified export)",
    )

    p = add("generate", cmd_generate, "generate synthetic weld radiographs into a class-per-folder dataset")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("-n", type=int, default=1000, help="number of images")
    p.add_argument("--condition", choices=CONDITIONS, default="baseline")
    p.add_argument("--severity", type=float, default=0.0)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--bit-depth", type=int, choices=(8, 16), default=8)
    p.add_argument("--class-mix", help="defect mix, e.g. good=0.7,porosity=0.1,crack=0.1,lack_of_fusion=0.1")
    p.add_argument("--novel", action="store_true", help="also generate the novel tungsten_inclusion defect")
    p.add_argument("--grid", type=Path, help="also write a PNG grid of samples here")

    p = add("train", cmd_train, "train a model and package it as a bundle")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to create")
    p.add_argument("--data", type=Path, help="class-per-folder dataset (default: generate baseline data)")
    p.add_argument("-n", type=int, default=5000, help="images to generate when --data is not given")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--version", help="model version recorded in the bundle (default: a timestamp)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--runtime",
        choices=("auto", "onnxruntime", "torch"),
        help="inference runtime (default auto: ONNX Runtime when the bundle has a verified export)",
    )

    p = add("verify", cmd_verify, "verify a bundle's hashes and load it")
    p.add_argument("bundle", type=Path)

    p = add("export", cmd_export, "export a bundle to ONNX or TorchScript (checked against the eager model)")
    p.add_argument("bundle", type=Path)
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    p.add_argument("--out", type=Path)

    p = add("predict", cmd_predict, "predict image files with a bundle (one JSON line per image)")
    p.add_argument("bundle", type=Path)
    p.add_argument("images", nargs="+")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--runtime",
        choices=("auto", "onnxruntime", "torch"),
        help="inference runtime (default auto: ONNX Runtime when the bundle has a verified export)",
    )

    p = add("serve", cmd_serve, "start the inference server (FastAPI + uvicorn)")
    p.add_argument("--bundle", type=Path, help="serve this bundle directory instead of a registry alias")
    p.add_argument("--model-ref", default="champion", help="registry alias or version to serve (default champion)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=16, help="1 disables micro-batching")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="how long a batch waits to fill")
    p.add_argument("--queue-size", type=int, default=256, help="waiting requests before answering 503")
    p.add_argument("--no-shadow", action="store_true", help="do not mirror traffic to the challenger")
    p.add_argument("--canary-fraction", type=float, default=0.0, help="share of requests the challenger answers")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--runtime",
        choices=("auto", "onnxruntime", "torch"),
        help="inference runtime (default auto: ONNX Runtime when the bundle has a verified export)",
    )

    p = add("register", cmd_register, "register a bundle in the MLflow model registry")
    p.add_argument("bundle", type=Path)
    p.add_argument("--alias", choices=("champion", "challenger"), help="also point this alias at the new version")

    p = add("promote", cmd_promote, "make a registered version the champion (gated, audited; the previous one is kept "
            "for rollback)")  # fmt: skip
    p.add_argument("version")
    p.add_argument("--server-url", help="hot-reload this server after moving the alias (key from MLOPS_ADMIN_KEY)")
    p.add_argument("--by", default=None, help="who decides (recorded in the audit log; default: your user name)")
    p.add_argument("--skip-gate", action="store_true", help="promote without a passed evaluation gate (audited)")

    p = add("rollback", cmd_rollback, "point the champion alias back at the previous champion (audited)")
    p.add_argument("--reason", required=True, help="why (recorded in the audit log)")
    p.add_argument("--by", default=None, help="who decides (default: your user name)")
    p.add_argument("--server-url", help="hot-reload this server afterwards (key from MLOPS_ADMIN_KEY)")
    add("registry", cmd_registry, "show registered versions, aliases and tags")

    p = add("services", cmd_services, "run the MLflow UI/tracking server on loopback until Ctrl-C")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)

    p = add("score", cmd_score, "batch-score a folder of images into a JSON-lines file (idempotent)")
    p.add_argument("folder", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--bundle", type=Path, help="score with this bundle (default: the registry's --model-ref)")
    p.add_argument("--model-ref", default="champion")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (0 = decode in-process)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--runtime",
        choices=("auto", "onnxruntime", "torch"),
        help="inference runtime (default auto: ONNX Runtime when the bundle has a verified export)",
    )

    p = add("monitor", cmd_monitor, "check new windows of the prediction log for drift, integrity and quality")
    p.add_argument("--window-size", type=int, help="images per window (default: the policy's drift.window_size)")
    p.add_argument("--window-minutes", type=float, help="time windows of this many minutes instead of counts")
    p.add_argument("--bundle", type=Path, help="compare against this bundle's profile (default: --model-ref)")
    p.add_argument("--model-ref", default="champion")
    p.add_argument("--from-start", action="store_true", help="forget processed windows and recompute all")
    p.add_argument("--no-report", action="store_true", help="skip the Evidently HTML/JSON reports (faster)")

    p = add("loadtest", cmd_loadtest, "closed-loop load test of a running server (loopback only)")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--kind", choices=("v1", "v2", "mlflow"), default="v1")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--duration", type=float, help="stop after this many seconds instead")

    # ---- Monitoring: review queue and alerts (issue 4, sections 6-7) -------------------------------------------
    p = add("review", cmd_review, "human-in-the-loop review queue: enqueue flagged predictions, claim, label")
    review = p.add_subparsers(dest="review_command", metavar="action", required=True)
    r = review.add_parser("enqueue", help="queue low-confidence, disputed, drifted and audit predictions")
    r.add_argument("--predlog", type=Path, help="prediction log (default: <state dir>/predictions.db)")
    r.add_argument("--confidence-below", type=float, default=0.6, help="queue served answers below this confidence")
    r.add_argument("--no-shadow", action="store_true", help="do not queue shadow disagreements")
    r.add_argument("--since-id", type=int, help="only prediction-log rows with a larger id")
    r.add_argument("--drifted-requests", help="comma-separated request ids of a drifted window")
    r.add_argument("--audit-fraction", type=float, default=0.0, help="random share of confident answers to audit")
    r = review.add_parser("claim", help="claim items to label (printed as JSON lines)")
    r.add_argument("--reviewer", required=True)
    r.add_argument("-n", type=int, default=1, help="how many items")
    r.add_argument("--lease-s", type=float, default=600.0, help="seconds before an unlabelled claim returns")
    r = review.add_parser("label", help="label an item you claimed")
    r.add_argument("item_id", type=int)
    r.add_argument("label")
    r.add_argument("--reviewer", required=True)
    r.add_argument("--note")
    r.add_argument("--classes", help="comma-separated class names (default: the model's, from the prediction log)")
    r.add_argument("--bundle", type=Path, help="read the class names from this bundle's labels.json")
    r = review.add_parser("release", help="give a claimed item back to the pool")
    r.add_argument("item_id", type=int)
    r.add_argument("--reviewer", required=True)
    review.add_parser("stats", help="counts by status and reason, labels per reviewer")

    p = add("alerts", cmd_alerts, "alert rules and destinations")
    alerts = p.add_subparsers(dest="alerts_command", metavar="action", required=True)
    rules_file = argparse.ArgumentParser(add_help=False)
    rules_file.add_argument("--rules", type=Path, help="rules file (default: the shipped alert_rules.yaml)")
    alerts.add_parser("test", parents=[rules_file], help="send a synthetic alert through every configured sink")
    alerts.add_parser("rules", parents=[rules_file], help="show the rules with the thresholds in force")
    # ---- end of monitoring: review queue and alerts ----------------------------------------------------------
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from .data import DatasetError
    from .model import SpecError
    from .packaging import BundleError

    expected: tuple[type[BaseException], ...] = (CLIError, SettingsError, DatasetError, SpecError, BundleError,
                                                  FileExistsError, ValueError)  # fmt: skip
    if args.command in ("register", "promote", "rollback", "registry", "serve", "score", "monitor"):
        from .monitoring.profile import ProfileError
        from .registry import RegistryError
        from .retraining import RetrainingError, RolloutError

        expected += (RegistryError, ProfileError, RetrainingError, RolloutError)
    try:
        return args.func(args)
    except expected as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
