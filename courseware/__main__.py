"""``python -m courseware <command>``: instructor tasks."""

from __future__ import annotations

import argparse
import sys

from . import grading


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m courseware", description="Instructor tooling for the course.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("release", help="regenerate labs/ from solutions/ with nbgrader")
    p.add_argument("assignments", nargs="*", help="assignment ids (default: all in solutions/)")
    args = parser.parse_args(argv)
    if args.command == "release":
        try:
            for path in grading.release(args.assignments or None):
                print(f"released {path}")
        except grading.GradingError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
