"""``python -m courseware <command>``: instructor and SME tasks (``INSTRUCTORS.md`` walks a whole term).

release [ids]             regenerate labs/ from solutions/ with nbgrader
quiz                      regenerate the quiz (solutions/quiz, labs/quiz) and quizzes/self-check.ipynb
overlay [file]            check the SME overlay and summarise it
book [--builder B]        render the chapter with the overlay into _build/book and build HTML if possible
chapter                   render the chapter for JupyterLab into _build/chapter (what the labs link)
lab [jupyter args]        the trainee's JupyterLab (make lab): rendered chapter, no instructor tools
collect ID DIR            copy DIR/<student>/ID/*.ipynb into submitted/
autograde ID [students]   autograde submitted/<student>/ID
feedback ID [students]    HTML feedback in feedback/<student>/ID
export [--out grades.csv] grades from the gradebook to CSV
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import grading


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m courseware",
        description="Instructor tooling for the course.",
        epilog="A term step by step: INSTRUCTORS.md. The SME overlay: chapters/CUSTOMIZING.md.",
    )
    parser.add_argument("--root", type=Path, default=grading.REPO_ROOT, help="course directory (default: the repo)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("release", help="regenerate labs/ from solutions/ with nbgrader")
    p.add_argument("assignments", nargs="*", help="assignment ids (default: all in solutions/)")
    sub.add_parser("quiz", help="regenerate the graded quiz and the self-check notebook from quizzes/bank.yaml")
    p = sub.add_parser("overlay", help="check the SME overlay (chapters/organization.yaml) and summarise it")
    p.add_argument("file", nargs="?", type=Path, help="overlay file (default: $MLOPS_OVERLAY or the repo's)")
    p = sub.add_parser("book", help="render the chapter with the overlay and build HTML if a toolchain is installed")
    p.add_argument("--overlay", type=Path, help="overlay file (default: $MLOPS_OVERLAY or the repo's)")
    p.add_argument("--builder", default="auto", choices=("auto", "sphinx", "myst", "none"))
    p.add_argument("--out", type=Path, help="output folder (default: _build/book)")
    p = sub.add_parser("chapter", help="render the chapter for JupyterLab into _build/chapter (the labs link it)")
    p.add_argument("--overlay", type=Path, help="overlay file (default: $MLOPS_OVERLAY or the repo's)")
    p = sub.add_parser("lab", help="start the trainee's JupyterLab (what `make lab` runs); extra arguments go to it")
    p.epilog = "Every other argument goes to JupyterLab, e.g. --no-browser --port=8890."
    p = sub.add_parser("collect", help="copy <dir>/<student>/<assignment>/*.ipynb into submitted/")
    p.add_argument("assignment")
    p.add_argument("source", type=Path, help="folder with one sub-folder per student")
    p = sub.add_parser("autograde", help="autograde submitted/<student>/<assignment>")
    p.add_argument("assignment")
    p.add_argument("students", nargs="*", help="student ids (default: everyone who submitted)")
    p = sub.add_parser("feedback", help="generate HTML feedback from autograded submissions")
    p.add_argument("assignment")
    p.add_argument("students", nargs="*", help="student ids (default: everyone autograded)")
    p = sub.add_parser("export", help="write grades from the gradebook to CSV")
    p.add_argument("--out", type=Path, default=Path("grades.csv"), help="CSV file (default: grades.csv)")
    p.add_argument("--assignment", action="append", help="only this assignment (repeatable)")
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "lab":  # only `lab` passes arguments on (to JupyterLab)
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.jupyter_args = extra

    from reference_impl.policy import OverlayError

    from .book import BookError
    from .quiz import QuizBankError

    try:
        return _run(args)
    except (grading.GradingError, OverlayError, BookError, QuizBankError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    root: Path = args.root.resolve()
    if args.command == "release":
        for path in grading.release(args.assignments or None, root=root):
            print(f"released {path}")
    elif args.command == "quiz":
        from . import quiz

        for path in quiz.generate(root):
            print(f"wrote {path}")
    elif args.command == "overlay":
        from .overlay import describe, load_overlay

        print(describe(load_overlay(args.file)))
    elif args.command == "book":
        from . import book

        result = book.build_book(args.overlay, out_dir=args.out or book.BUILD_DIR, builder=args.builder)
        print(result.summary())
    elif args.command == "chapter":
        from .jupyter_chapter import write_chapter

        print(f"wrote {write_chapter(args.overlay)}")
    elif args.command == "lab":
        from . import lab

        return lab.main(args.jupyter_args)
    elif args.command == "collect":
        from . import instructor

        students = instructor.collect(args.assignment, args.source, root)
        print(f"collected {len(students)} submission(s) of {args.assignment}: {', '.join(students)}")
    elif args.command == "autograde":
        from . import instructor

        for g in instructor.autograde(args.assignment, root, args.students or None):
            print(instructor.describe(g))
        print("Next: grade written answers in formgrader (INSTRUCTORS.md, step 5), then feedback and export.")
    elif args.command == "feedback":
        from . import instructor

        for path in instructor.feedback(args.assignment, root, args.students or None):
            print(f"feedback {path}")
    elif args.command == "export":
        from . import instructor

        out = instructor.export_csv(args.out, root, args.assignment)
        print(f"grades written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
