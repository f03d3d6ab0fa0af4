"""The chapter as a book: fill in the SME overlay, check every cross-reference, build HTML when a toolchain exists.

``make book`` (``python -m courseware book``) runs :func:`build_book`:

1. validate the overlay (``chapters/organization.yaml`` or ``$MLOPS_OVERLAY``): a malformed file stops here with a
   message naming the key;
2. :func:`render_chapter` replaces the chapter's ``{{ name }}`` placeholders with the organisation's names and the
   four SME slots, and :func:`check_chapter` verifies that every ``{ref}`` has a label, every ``{term}`` a glossary
   entry, and every linked lab, quiz or file exists (links to labs that are not written yet are reported, not
   hidden);
3. the rendered Markdown goes to ``_build/book/`` (always, so an SME can read it without any toolchain), then HTML is
   built with the first toolchain available: Sphinx + myst-parser (``pip install -e '.[book]'``; works offline) or
   mystmd / Jupyter Book 2 (``myst``; needs internet on first use to download its site theme).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .overlay import Overlay, describe, load_overlay

REPO_ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = REPO_ROOT / "chapters"
CHAPTER = CHAPTERS / "model-deployment-and-monitoring.md"
BUILD_DIR = REPO_ROOT / "_build" / "book"
BUILDERS = ("auto", "sphinx", "myst", "none")

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
LABEL = re.compile(r"^\(([A-Za-z0-9_.:-]+)\)=\s*$", re.M)
REF = re.compile(r"\{ref\}`([^`]*)`")
TERM = re.compile(r"\{term\}`([^`]*)`")
# Markdown links and images: [text](target) / ![alt](target); the target stops at whitespace or ")".
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FIGURE = re.compile(r"^```\{figure\}\s+(\S+)", re.M)
LAB_PATH = re.compile(r"^labs/([^/]+)/")


class BookError(RuntimeError):
    """The chapter cannot be rendered or built; the message says what to fix."""


# --------------------------------------------------------------------------------------------------------------
# Rendering: the overlay's text into the chapter.
# --------------------------------------------------------------------------------------------------------------
def substitute(text: str, values: Mapping[str, str]) -> str:
    """Replace every ``{{ name }}``; an unknown name is an error (a typo in the chapter must not reach readers)."""
    unknown = sorted({m.group(1) for m in PLACEHOLDER.finditer(text)} - set(values))
    if unknown:
        lines = [text.count("\n", 0, m.start()) + 1 for m in PLACEHOLDER.finditer(text) if m.group(1) in unknown]
        raise BookError(
            f"the chapter uses placeholders the overlay does not define: {unknown} (lines {lines}); "
            f"known placeholders: {sorted(values)}"
        )
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def render_chapter(overlay_path: str | Path | None = None, *, chapter: Path = CHAPTER) -> str:
    """The chapter's MyST source with the overlay's organisation names and SME slots filled in."""
    return substitute(chapter.read_text(encoding="utf-8"), load_overlay(overlay_path).substitutions())


# --------------------------------------------------------------------------------------------------------------
# Cross-references: labels, glossary terms, links to labs, quizzes and figures.
# --------------------------------------------------------------------------------------------------------------
def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _target(role_text: str) -> str:
    """``text <target>`` -> ``target``; ``target`` -> ``target`` (the two forms of a MyST role)."""
    m = re.search(r"<([^>]+)>\s*$", role_text)
    return (m.group(1) if m else role_text).strip()


def labels(text: str) -> set[str]:
    """Targets declared with ``(name)=``."""
    return set(LABEL.findall(text))


def glossary_terms(text: str) -> set[str]:
    """Terms defined in the chapter's ``{glossary}`` block, lower-cased (term references ignore case)."""
    m = re.search(r"^```\{glossary\}\n(.*?)^```", text, flags=re.M | re.S)
    if not m:
        return set()
    terms = set()
    for line in m.group(1).splitlines():
        if line.strip() and not line.startswith((":", " ", "\t")):
            terms.add(line.strip().lower())
    return terms


@dataclass(frozen=True)
class Link:
    """A link from the chapter to a file of the repository, e.g. a lab notebook."""

    target: str  # as written, relative to chapters/
    line: int

    @property
    def repo_path(self) -> str:
        """The target relative to the repository root, without a ``#fragment``."""
        path = (CHAPTERS / self.target.split("#")[0]).resolve()
        try:
            return path.relative_to(REPO_ROOT).as_posix()
        except ValueError:
            return str(path)

    @property
    def lab(self) -> str | None:
        """The assignment id when the link points into ``labs/<id>/``."""
        m = LAB_PATH.match(self.repo_path)
        return m.group(1) if m else None


def file_links(text: str) -> list[Link]:
    """Links to local files (not web addresses, not in-page anchors), including figure paths."""
    out = []
    for m in LINK.finditer(text):
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        out.append(Link(target, _line(text, m.start())))
    out += [Link(m.group(1), _line(text, m.start())) for m in FIGURE.finditer(text)]
    return out


@dataclass
class ChapterCheck:
    """Result of :func:`check_chapter`.

    ``problems``: broken ``{ref}``/``{term}`` references, errors in the chapter itself. ``missing``: links to files
    that do not exist (a typo, or a lab whose release was not generated). ``pending``: labs not written yet.
    """

    problems: list[str] = field(default_factory=list)
    missing: list[Link] = field(default_factory=list)
    pending: list[Link] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.missing


def link_status(link: Link, root: Path = REPO_ROOT) -> str:
    """``ok`` (the file exists), ``pending`` (a lab whose source is not in solutions/ yet) or ``missing``."""
    if (root / link.repo_path).exists():
        return "ok"
    if link.lab and not (root / "solutions" / link.lab).is_dir():
        return "pending"
    return "missing"  # a typo, or a lab whose release was never generated (run `make release`)


def check_chapter(text: str, root: Path = REPO_ROOT) -> ChapterCheck:
    """Check every ``{ref}``, ``{term}`` and file link of the chapter source ``text``."""
    result = ChapterCheck()
    known_labels, terms = labels(text), glossary_terms(text)
    for m in REF.finditer(text):
        if _target(m.group(1)) not in known_labels:
            result.problems.append(
                f"line {_line(text, m.start())}: {{ref}} target {_target(m.group(1))!r} has no label"
            )
    for m in TERM.finditer(text):
        if _target(m.group(1)).lower() not in terms:
            result.problems.append(
                f"line {_line(text, m.start())}: {{term}} {_target(m.group(1))!r} is not defined in the glossary"
            )
    for link in file_links(text):
        status = link_status(link, root)
        if status == "pending":
            result.pending.append(link)
        elif status == "missing":
            result.missing.append(link)
    return result


# --------------------------------------------------------------------------------------------------------------
# Building.
# --------------------------------------------------------------------------------------------------------------
def relink(text: str, out_dir: Path) -> str:
    """Rewrite links written relative to ``chapters/`` so they still resolve from ``out_dir``."""

    def fix(m: re.Match[str]) -> str:
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#") or target.startswith("figures/"):
            return m.group(0)
        path, _, fragment = target.partition("#")
        new = os.path.relpath(CHAPTERS / path, out_dir).replace(os.sep, "/") + (f"#{fragment}" if fragment else "")
        return m.group(0).replace(f"({target})", f"({new})")

    return LINK.sub(fix, text)


def _sphinx_source(text: str) -> str:
    """Sphinx's glossary (docutils) refuses blank lines between entries, which mystmd needs: drop them there only."""

    def compact(m: re.Match[str]) -> str:
        return re.sub(r"\n\n+(?=[^:\s])", "\n", m.group(0))

    return re.sub(r"^```\{glossary\}\n.*?^```", compact, text, flags=re.M | re.S)


SPHINX_CONF = """\
# Generated by courseware/book.py for `make book`; edit that file, not this one.
project = {title!r}
author = {author!r}
copyright = {author!r}
extensions = ["myst_parser"]
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath"]
myst_title_to_header = True  # the chapter's title lives in its front matter
myst_all_links_external = True  # links to labs and quizzes point at repository files, not at other pages
myst_heading_anchors = 3
html_theme = "alabaster"
html_title = {title!r}
html_theme_options = {{"description": {program!r}, "page_width": "1100px"}}
html_show_sourcelink = False
root_doc = "index"
"""


@dataclass
class BookResult:
    """What :func:`build_book` produced."""

    overlay: Overlay
    markdown: Path
    builder: str  # "sphinx", "myst" or "none"
    html: Path | None
    check: ChapterCheck
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [describe(self.overlay), f"rendered chapter: {self.markdown}"]
        for link in self.check.pending:
            lines.append(f"note: line {link.line} links {link.target}, a lab that is not written yet")
        for link in self.check.missing:  # reported, not fatal: the page is still worth previewing
            lines.append(f"WARNING: line {link.line} links {link.target}, which does not exist (`make release`?)")
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"HTML ({self.builder}): {self.html / 'index.html'}" if self.html else "HTML: not built")
        return "\n".join(lines)


def available_builder() -> str:
    """The toolchain ``auto`` picks: Sphinx + myst-parser if installed (works offline), else mystmd, else none."""
    if importlib.util.find_spec("sphinx") and importlib.util.find_spec("myst_parser"):
        return "sphinx"
    if shutil.which("myst"):
        return "myst"
    return "none"


def build_book(
    overlay_path: str | Path | None = None, out_dir: Path = BUILD_DIR, builder: str = "auto", timeout: int = 300
) -> BookResult:
    """Validate the overlay, render and check the chapter, write it to ``out_dir`` and build HTML if possible."""
    if builder not in BUILDERS:
        raise BookError(f"builder must be one of {BUILDERS}, got {builder!r}")
    overlay = load_overlay(overlay_path)
    source = CHAPTER.read_text(encoding="utf-8")
    check = check_chapter(source)
    if check.problems:  # a broken reference is an error in the chapter: fix it before anyone reads it
        raise BookError("the chapter has broken references:\n" + "\n".join(f"  - {p}" for p in check.problems))
    text = substitute(source, overlay.substitutions())

    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    markdown = out_dir / CHAPTER.name
    markdown.write_text(relink(text, out_dir), encoding="utf-8")
    shutil.copytree(CHAPTERS / "figures", out_dir / "figures")

    chosen = available_builder() if builder == "auto" else builder
    result = BookResult(overlay, markdown, chosen, None, check)
    if chosen == "none" and builder == "none":
        result.notes.append("HTML not requested (--builder none)")
    elif chosen == "none":
        result.notes.append(
            "no book toolchain installed, so only the rendered Markdown was written. For HTML run "
            "`.venv/bin/pip install -e '.[book]'` (Sphinx + myst-parser, works offline) and `make book` again."
        )
    elif chosen == "sphinx":
        result.html = _build_sphinx(text, overlay, out_dir, timeout)
    else:
        result.html = _build_myst(markdown, overlay, out_dir, timeout)
    return result


def _run(cmd: list[str], cwd: Path, timeout: int, what: str) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise BookError(f"{what} failed (exit {proc.returncode}):\n{tail}")


def _build_sphinx(text: str, overlay: Overlay, out_dir: Path, timeout: int) -> Path:
    src, html = out_dir / "sphinx-src", out_dir / "html"
    src.mkdir()
    (src / "index.md").write_text(_sphinx_source(relink(text, html)), encoding="utf-8")
    shutil.copytree(CHAPTERS / "figures", src / "figures")
    title = re.search(r"^title:\s*(.+)$", text, flags=re.M)
    conf = SPHINX_CONF.format(
        title=title.group(1).strip() if title else CHAPTER.stem,
        author=overlay.organization["name"],
        program=overlay.organization["program_name"],
    )
    (src / "conf.py").write_text(conf, encoding="utf-8")
    # -W: any warning (an unresolved {ref} or {term}, a malformed directive) fails the build instead of shipping.
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-n", "-W", "--keep-going", str(src), str(html)]
    _run(cmd, out_dir, timeout, "sphinx-build")
    return html


MYST_YML = """\
# Generated by courseware/book.py for `make book BUILDER=myst`.
version: 1
project:
  title: {title}
  toc:
    - file: {chapter}
site:
  template: book-theme
"""


def _build_myst(markdown: Path, overlay: Overlay, out_dir: Path, timeout: int) -> Path:
    (out_dir / "myst.yml").write_text(
        MYST_YML.format(title=overlay.organization["program_name"], chapter=markdown.name), encoding="utf-8"
    )
    try:
        _run(["myst", "build", "--html", "--strict"], out_dir, timeout, "myst build --html")
    except BookError as exc:
        if "ENOTFOUND" in str(exc) or "getaddrinfo" in str(exc):
            raise BookError(
                f"{exc}\nmystmd downloads its site theme on first use and this machine is offline. "
                "Use the offline builder instead: `.venv/bin/pip install -e '.[book]'` and `make book`."
            ) from None
        raise
    return out_dir / "_build" / "html"
