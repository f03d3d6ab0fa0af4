"""``python -m benchmarks [name ...] [--quick]``: run the benchmarks and save their results as JSON.

Each module in this package exposes ``run(quick) -> dict``; results go to ``$MLOPS_STATE_DIR/bench/`` (default
``.mlops/bench``) so two runs can be compared.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

from reference_impl.settings import Settings

BENCHMARKS = ("foundation", "runtime", "serving", "ood", "labs", "drift", "robustness")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"which benchmarks, from {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    out_dir = Settings.from_env().state_dir / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in args.names or BENCHMARKS:
        print(f"\n=== benchmark: {name} ===", flush=True)
        start = time.perf_counter()
        result = importlib.import_module(f"benchmarks.{name}").run(quick=args.quick)
        result["wall_seconds"] = time.perf_counter() - start
        path = out_dir / f"{name}.json"
        path.write_text(json.dumps(result, indent=2, default=str))
        print(f"=== {name}: {result['wall_seconds']:.0f} s, results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
