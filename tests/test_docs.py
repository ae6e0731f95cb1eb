"""The Python in docs/*.md runs as written: every ```python block is executed, and a
``print(…)  # TEXT`` line must print TEXT. And every relative link of the README, BENCHMARKS.md,
docs/ and the gateway READMEs reaches a file (and a heading, when it names one)."""

from __future__ import annotations

import contextlib
import io
import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(
    r"^(?P<indent> *)```python\n(?P<body>.*?)^(?P=indent)```", re.DOTALL | re.MULTILINE
)
PRINTED = re.compile(r"^\s*print\(.*\)\s+# (?P<text>.+)$", re.MULTILINE)
# every page of docs/ that has a python block: a new page is checked without being listed here
PAGES = sorted(
    page.relative_to(ROOT).as_posix()
    for page in (ROOT / "docs").glob("*.md")
    if BLOCK.search(page.read_text(encoding="utf-8"))
)


def blocks(page: str) -> list[str]:
    # a block inside a list item is indented like the item's text
    found = [
        textwrap.dedent(m["body"])
        for m in BLOCK.finditer((ROOT / page).read_text(encoding="utf-8"))
    ]
    assert found, f"{page} has no python blocks"
    return found


@pytest.mark.parametrize(("page", "index"), [(p, i) for p in PAGES for i in range(len(blocks(p)))])
def test_python_blocks_run(page: str, index: int) -> None:
    body = blocks(page)[index]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(body, f"{page} block {index + 1}", "exec"), {"__name__": "guide"})
    assert out.getvalue().splitlines() == [m["text"] for m in PRINTED.finditer(body)]


# -- links: the README sends a newcomer to docs/; a moved section must not leave a dead link ----

LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")
FENCE = re.compile(r"^ *```.*?^ *```", re.DOTALL | re.MULTILINE)
LINKING_PAGES = sorted(
    page.relative_to(ROOT).as_posix()
    for pattern in ("*.md", "docs/*.md", "gateways/*/README.md")
    for page in ROOT.glob(pattern)
)


def anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation gone, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


@pytest.mark.parametrize("page", LINKING_PAGES)
def test_relative_links_resolve(page: str) -> None:
    source = ROOT / page
    dead = []
    for match in LINK.finditer(FENCE.sub("", source.read_text(encoding="utf-8"))):
        target = match["target"]
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto: …
        path, _, fragment = target.partition("#")
        resolved = (source.parent / path).resolve() if path else source
        missing_heading = (
            resolved.exists()
            and bool(fragment)
            and resolved.suffix == ".md"
            and fragment not in headings(resolved)
        )
        if not resolved.exists() or missing_heading:
            dead.append(target)
    assert not dead, f"{page}: dead links {dead}"
