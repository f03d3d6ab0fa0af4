"""The chapter as a trainee reads it inside JupyterLab: the overlay filled in, MyST turned into plain Markdown.

JupyterLab renders CommonMark (plus tables, ``$math$`` and a sanitised subset of HTML), not MyST: opened as it is, the
chapter shows ``{{ program_name }}``, ``{term}`...``` roles and the glossary as a code block. :func:`write_chapter`
writes ``_build/chapter/model-deployment-and-monitoring.md`` (the file every lab's "chapter" link opens) with:

- the organisation's names and SME slots substituted (``book.substitute``, the same as ``make book``);
- ``(label)=`` targets as HTML anchors, so ``{ref}`` links and the labs' ``#sec-...`` links jump to their section;
- glossary entries as paragraphs with an anchor each, ``{term}`` roles as links to them;
- admonitions as block quotes, figures as images with a numbered caption, ``{math}`` as ``$...$``;
- links written relative to ``chapters/`` rewritten so they resolve from the output folder.

``python -m courseware lab`` (``make lab``) and Binder's ``postBuild`` call it, so an SME's edit of
``chapters/organization.yaml`` shows up the next time JupyterLab starts.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from .book import CHAPTER, CHAPTERS, REPO_ROOT, relink, substitute
from .overlay import load_overlay

OUT_DIR = REPO_ROOT / "_build" / "chapter"
LINK_FROM_LABS = "../../_build/chapter/model-deployment-and-monitoring.md"  # what a lab's intro links

FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.S)
DIRECTIVE = re.compile(r"^```\{(\w+)\}[ \t]*([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)
LABEL_LINE = re.compile(r"^\(([A-Za-z0-9_.:-]+)\)=[ \t]*$", re.M)
ROLE = re.compile(r"\{(ref|term|math)\}`([^`]*)`")


def slug(term: str) -> str:
    """A glossary term's anchor: ``bundle (artifact)`` -> ``term-bundle-artifact``."""
    return "term-" + re.sub(r"[^a-z0-9]+", "-", term.lower()).strip("-")


def _split_role(text: str) -> tuple[str | None, str]:
    """``text <target>`` -> (text, target); ``target`` -> (None, target)."""
    m = re.match(r"^(.*?)\s*<([^>]+)>\s*$", text, re.S)
    return (m.group(1), m.group(2).strip()) if m else (None, text.strip())


def _options_and_body(block: str) -> tuple[dict[str, str], str]:
    """A directive's ``:key: value`` lines and the text after them."""
    options: dict[str, str] = {}
    lines = block.split("\n")
    while lines and (m := re.match(r"^:(\w+):\s*(.*)$", lines[0])):
        options[m.group(1)] = m.group(2)
        lines.pop(0)
    return options, "\n".join(lines).strip("\n")


def _quote(text: str) -> str:
    return "\n".join(f"> {line}" if line else ">" for line in text.split("\n"))


def _glossary(body: str) -> str:
    """``term`` / ``: definition`` pairs -> one paragraph per term, each with an anchor ``{term}`` links point at."""
    out, term = [], None
    for line in body.split("\n"):
        if line.startswith(": ") and term is not None:
            out.append(f'<a id="{slug(term)}"></a>**{term}**: {line[2:].strip()}')
            term = None
        elif line.strip():
            term = line.strip()
    return "\n\n".join(out)


def to_jupyter_markdown(text: str) -> str:
    """MyST (the chapter's source, overlay already substituted) -> Markdown JupyterLab renders as intended."""
    title = None
    if m := FRONT_MATTER.match(text):
        title = re.search(r"^title:\s*(.+)$", m.group(1), re.M)
        text = text[m.end() :]
    # Reference targets: the heading after a label names it; a figure label names "Figure N".
    names: dict[str, str] = {}
    figures = 0
    for m in LABEL_LINE.finditer(text):
        rest = text[m.end() :].lstrip("\n")
        if rest.startswith("```{figure}"):
            figures += 1
            names[m.group(1)] = f"Figure {figures}"
        elif h := re.match(r"^#+\s+(.+)$", rest, re.M):
            names[m.group(1)] = h.group(1).strip()
    figure_number = iter(range(1, figures + 2))

    def directive(m: re.Match[str]) -> str:
        kind, argument, block = m.group(1), m.group(2).strip(), m.group(3)
        options, body = _options_and_body(block)
        if kind == "glossary":
            return _glossary(body)
        if kind == "math":
            return f"$$\n{body}\n$$"
        if kind == "figure":
            return f"![{options.get('alt', '')}]({argument})\n\n*Figure {next(figure_number)}. {body}*"
        heading = argument or kind.capitalize()  # admonition "Title", or note / tip / warning
        return _quote(f"**{heading}**\n\n{body}")

    text = DIRECTIVE.sub(directive, text)
    text = LABEL_LINE.sub(lambda m: f'<a id="{m.group(1)}"></a>', text)

    def role(m: re.Match[str]) -> str:
        kind, content = m.group(1), m.group(2)
        if kind == "math":
            return f"${content}$"
        shown, target = _split_role(content)
        if kind == "term":
            return f"[{shown or target}](#{slug(target)})"
        return f"[{shown or names.get(target, target)}](#{target})"

    text = ROLE.sub(role, text)
    return (f"# {title.group(1).strip()}\n\n" if title else "") + text.lstrip("\n")


def write_chapter(overlay_path: str | Path | None = None, out_dir: Path = OUT_DIR) -> Path:
    """Render the chapter for JupyterLab into ``out_dir`` (with its figures); returns the Markdown file."""
    text = substitute(CHAPTER.read_text(encoding="utf-8"), load_overlay(overlay_path).substitutions())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / CHAPTER.name
    tmp = target.with_suffix(".tmp")  # JupyterLab may have the file open: replace it in one step
    tmp.write_text(to_jupyter_markdown(relink(text, out_dir)), encoding="utf-8")
    tmp.replace(target)
    shutil.copytree(CHAPTERS / "figures", out_dir / "figures", dirs_exist_ok=True)
    return target
