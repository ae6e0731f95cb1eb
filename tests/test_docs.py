"""The Python in docs/*.md runs as written: every ```python block is executed, and a
``print(…)  # TEXT`` line must print TEXT."""

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
