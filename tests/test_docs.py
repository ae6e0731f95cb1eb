"""The Python in docs/*.md runs as written: every ```python block is executed, and a
``print(…)  # TEXT`` line must print TEXT."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"```python\n(?P<body>.*?)```", re.DOTALL)
PRINTED = re.compile(r"^\s*print\(.*\)\s+# (?P<text>.+)$", re.MULTILINE)
PAGES = ["docs/consumers.md"]


def blocks(page: str) -> list[str]:
    found = [m["body"] for m in BLOCK.finditer((ROOT / page).read_text(encoding="utf-8"))]
    assert found, f"{page} has no python blocks"
    return found


@pytest.mark.parametrize(("page", "index"), [(p, i) for p in PAGES for i in range(len(blocks(p)))])
def test_python_blocks_run(page: str, index: int) -> None:
    body = blocks(page)[index]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(body, f"{page} block {index + 1}", "exec"), {"__name__": "guide"})
    assert out.getvalue().splitlines() == [m["text"] for m in PRINTED.finditer(body)]
