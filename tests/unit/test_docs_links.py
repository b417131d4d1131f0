"""The README and docs/ point only inside the repository, at files and headings that exist."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    lines, fenced = [], False
    for line in page.read_text().splitlines():
        fenced ^= line.startswith("```")
        if not fenced and line.startswith("#"):
            lines.append(line.lstrip("#"))
    return {slug(h) for h in lines}


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [m for m in LINK.findall(text) if not m.startswith(("http://", "https://", "mailto:"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_names_a_file_and_heading_in_the_repository(page):
    bad = []
    for link in links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if ROOT not in target.parents and target != ROOT:
            bad.append(f"{link}: outside the repository")
        elif not target.exists():
            bad.append(f"{link}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            bad.append(f"{link}: no heading #{anchor} in {target.name}")
    assert not bad, f"{page.name}: " + "; ".join(bad)


def test_the_slug_follows_githubs_rule():
    assert slug(" The default run's idle core: more workers (tried 2026-12-07, not kept)") == \
        "the-default-runs-idle-core-more-workers-tried-2026-12-07-not-kept"
    assert slug(" Stages 0-2") == "stages-0-2"
    assert slug(" The default run, `instructray run` from a fresh clone") == \
        "the-default-run-instructray-run-from-a-fresh-clone"
