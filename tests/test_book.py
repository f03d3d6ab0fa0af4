"""The chapter: cross-references resolve, every outline item has its place, and the book renders and builds.

The outline's items and where the course covers them are listed in chapters/outline-coverage.yaml; these tests hold
the chapter (and tests/test_quiz.py the quizzes) to that map.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from courseware import book
from courseware.book import BookError, check_chapter, file_links, glossary_terms, labels, link_status
from courseware.overlay import load_overlay

REPO = Path(__file__).resolve().parent.parent
SOURCE = book.CHAPTER.read_text(encoding="utf-8")
COVERAGE = yaml.safe_load((REPO / "chapters" / "outline-coverage.yaml").read_text(encoding="utf-8"))
BANK = yaml.safe_load((REPO / "quizzes" / "bank.yaml").read_text(encoding="utf-8"))


@pytest.fixture(autouse=True)
def no_overlay_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLOPS_OVERLAY", raising=False)


def normalise(text: str) -> str:
    """Compare wording, not typography: case, emphasis, quotes, contractions, final punctuation."""
    text = text.lower().replace("\u2019", "'")
    for short, long in (("you're", "you are"), ("you'd", "you would"), ("you'll", "you will")):
        text = text.replace(short, long)
    text = re.sub(r"[*_`'\"]", "", text)
    return " ".join(text.split()).rstrip(".?!")


def section_text(label: str) -> str:
    """The chapter source from ``(label)=`` up to the next section label."""
    start = SOURCE.index(f"({label})=")
    nxt = re.search(r"^\(sec-[\w-]+\)=$", SOURCE[start + 1 :], flags=re.M)
    return SOURCE[start : start + 1 + nxt.start()] if nxt else SOURCE[start:]


def list_items(heading: str) -> list[str]:
    """The bullet or numbered items under a ``## heading``."""
    block = SOURCE.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return [re.sub(r"^(-|\d+\.)\s+", "", ln).strip() for ln in block.splitlines() if re.match(r"^(-|\d+\.)\s", ln)]


# --------------------------------------------------------------------------------------------------------------
# Cross-references.
# --------------------------------------------------------------------------------------------------------------
def test_every_ref_has_a_label_and_every_term_a_glossary_entry() -> None:
    result = check_chapter(SOURCE)
    assert not [p for p in result.problems if "{ref}" in p or "{term}" in p], result.problems
    assert len(labels(SOURCE)) >= 9 and len(glossary_terms(SOURCE)) >= 21


def test_glossary_defines_the_key_terms() -> None:
    missing = {t.lower() for t in COVERAGE["key_terms"]} - glossary_terms(SOURCE)
    assert not missing, f"glossary lacks {sorted(missing)}"


@pytest.mark.parametrize("link", file_links(SOURCE), ids=lambda link: f"line{link.line}:{link.repo_path}")
def test_linked_lab_quiz_or_file_exists(link: book.Link) -> None:
    status = link_status(link)
    if status == "pending":
        pytest.xfail(f"{link.repo_path}: lab {link.lab} is not written yet (no solutions/{link.lab}/)")
    assert status == "ok", f"line {link.line}: {link.target} does not exist (run `make release` if it is a lab)"


def test_the_checker_reports_broken_references(tmp_path: Path) -> None:
    broken = (
        "(sec-a)=\n## A\n{ref}`sec-b` and {term}`nonsense` and [lab](../labs/lab01-packaging/lab01-packagin.ipynb)\n"
        "and [soon](../labs/lab09-future/lab09-future.ipynb)\n```{glossary}\nalert\n: x\n```\n"
    )
    result = check_chapter(broken)
    assert any("'sec-b' has no label" in p for p in result.problems)
    assert any("'nonsense' is not defined in the glossary" in p for p in result.problems)
    assert [link.target for link in result.missing] == ["../labs/lab01-packaging/lab01-packagin.ipynb"]
    assert not result.ok, "a typo in an existing lab's path is an error"
    assert [link.lab for link in result.pending] == ["lab09-future"], "an unwritten lab is pending, not an error"


# --------------------------------------------------------------------------------------------------------------
# Every outline item has its place.
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "heading"), [("objectives", "What you'll be able to do"), ("competencies", "Competencies you'll build")]
)
def test_objectives_and_competencies_are_stated_taught_and_quizzed(kind: str, heading: str) -> None:
    stated = [normalise(x) for x in list_items(heading)]
    assert stated == [normalise(item["text"]) for item in COVERAGE[kind]], f"{heading} differs from the outline"
    questions = BANK["practice"] + BANK["check"]
    for item in COVERAGE[kind]:
        assert item["section"] in labels(SOURCE)
        quizzed = [q["id"] for q in questions if normalise(q["objective"]) == normalise(item["text"])]
        assert quizzed, f"no practice or quiz question checks {item['text']!r}"


def test_every_question_checks_an_outline_objective_or_competency() -> None:
    goals = {normalise(i["text"]) for i in COVERAGE["objectives"] + COVERAGE["competencies"]}
    for q in BANK["practice"] + BANK["check"]:
        assert normalise(q["objective"]) in goals, f"{q['id']}: {q['objective']!r}"
        assert q["section"] in labels(SOURCE), f"{q['id']}: unknown section {q['section']}"


@pytest.mark.parametrize("item", COVERAGE["sections"], ids=lambda i: i["section"])
def test_outline_section_is_covered_and_ends_with_its_lab(item: dict) -> None:
    text = section_text(item["section"])
    headings = re.findall(r"^#{2,3} (.+)$", text, flags=re.M)
    for point in item.get("points", []):
        for heading in point["covered_by"]:
            assert heading in headings, f"{point['text']!r}: no heading {heading!r} in {item['section']}"
    for heading in item.get("covered_by", []):
        assert heading in headings
    for word in item.get("mentions", []):
        assert word in text, f"{item['section']} should mention {word!r}"
    assert "reference_impl/" in text, f"{item['section']} should cite the reference_impl module that implements it"
    last_block = text.rstrip().rsplit("```{admonition}", 1)
    assert len(last_block) == 2 and last_block[1].lstrip().startswith("Lab"), "the section ends with a Lab callout"
    assert f"labs/{item['lab']}/" in last_block[1], f"the Lab callout links {item['lab']}"
    assert last_block[1].rstrip().endswith("```"), "nothing after the Lab callout"


@pytest.mark.parametrize("item", COVERAGE["sme_slots"], ids=lambda i: i["slot"])
def test_sme_slot_is_rendered_in_its_section(item: dict) -> None:
    assert f"{{{{ sme_{item['slot']} }}}}" in section_text(item["section"])
    rendered = book.render_chapter()
    slot_text = load_overlay().sme_slots[item["slot"]].strip()
    start = rendered.index(f"({item['section']})=")
    end = rendered.index("\n## ", rendered.index("\n## ", start) + 1)
    assert slot_text in rendered[start:end], f"{item['slot']} is not shown in {item['section']}"


@pytest.mark.parametrize(("kind", "label"), [("practice", "sec-practice"), ("check", "sec-quiz")])
def test_outline_questions_appear_in_the_chapter_in_order(kind: str, label: str) -> None:
    numbered = re.findall(r"^\d+\. (.+)$", section_text(label), flags=re.M)
    numbered = [re.sub(r"\s*\(\{ref\}`[^`]+`\)$", "", q) for q in numbered]  # drop the "(see section)" pointer
    assert [normalise(q) for q in numbered] == [normalise(i["text"]) for i in COVERAGE[kind]]


# --------------------------------------------------------------------------------------------------------------
# Rendering and building.
# --------------------------------------------------------------------------------------------------------------
def test_render_fills_every_placeholder() -> None:
    rendered = book.render_chapter()
    assert "{{" not in rendered and "}}" not in rendered
    overlay = load_overlay()
    assert overlay.organization["program_name"] in rendered
    assert f"At {overlay.organization['short_name']}" in rendered


def test_an_unknown_placeholder_is_an_error_naming_it_and_its_line() -> None:
    with pytest.raises(BookError, match=r"\['sme_typo'\] \(lines \[2\]\)"):
        book.substitute("ok {{ a }}\n{{ sme_typo }}\n", {"a": "x"})


def test_make_book_without_a_toolchain_still_writes_the_rendered_chapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(book, "available_builder", lambda: "none")  # as on a machine without Sphinx or mystmd
    result = book.build_book(out_dir=tmp_path / "book")
    assert result.html is None and "pip install -e '.[book]'" in result.summary()
    text = result.markdown.read_text()
    assert "{{" not in text
    # Links were rewritten so that, from the output folder, they reach the same repository files as before.
    originals = [link.repo_path for link in file_links(SOURCE) if not link.target.startswith("figures/")]
    rewritten = [link.target for link in file_links(text) if not link.target.startswith("figures/")]
    assert len(rewritten) == len(originals) >= 7
    for target, repo_path in zip(rewritten, originals, strict=True):
        assert (result.markdown.parent / target.split("#")[0]).resolve() == REPO / repo_path
    assert (tmp_path / "book" / "figures" / "production-loop.svg").exists()


def test_make_book_refuses_a_malformed_overlay(tmp_path: Path) -> None:
    from reference_impl.policy import OverlayError

    bad = tmp_path / "org.yaml"
    bad.write_text(book.CHAPTERS.joinpath("organization.yaml").read_text().replace("window_size: 200", "window_size:"))
    with pytest.raises(OverlayError, match=r"policy\.drift\.window_size must be a whole number"):
        book.build_book(bad, out_dir=tmp_path / "book", builder="none")
    assert not (tmp_path / "book").exists(), "nothing is written from a malformed overlay"


@pytest.mark.skipif(
    not (importlib.util.find_spec("sphinx") and importlib.util.find_spec("myst_parser")),
    reason="book toolchain not installed: pip install -e '.[book]' (Sphinx + myst-parser)",
)
def test_make_book_builds_html_with_no_warnings(tmp_path: Path) -> None:
    result = book.build_book(out_dir=tmp_path / "book", builder="sphinx")  # sphinx -W: any warning fails
    html = (result.html / "index.html").read_text()
    overlay = load_overlay()
    assert overlay.organization["program_name"] in html
    assert 'id="term-data-drift"' in html and 'href="#sec-packaging"' in html
    assert (result.html / "_images" / "production-loop.svg").exists()
    lab1 = re.search(r'href="([^"]*lab01-packaging\.ipynb)"', html)
    assert lab1 and (result.html / lab1.group(1)).resolve() == REPO / "labs/lab01-packaging/lab01-packaging.ipynb"
