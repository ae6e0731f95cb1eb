"""Helpers shared by the benchmarks: machine description, percentiles, tables, BENCHMARKS.md.

Every benchmark owns one ``## Title`` section of ``BENCHMARKS.md`` and replaces only that
section (:func:`update_section`), so benchmarks written by different people can share the file.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import math
import os
import platform
import re
import shlex
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = [
    "BENCHMARKS_MD",
    "REPO_ROOT",
    "command_line",
    "cpu_seconds",
    "machine",
    "machine_lines",
    "markdown_table",
    "percentile",
    "text_table",
    "today",
    "update_section",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO_ROOT / "BENCHMARKS.md"

_HEADER = """\
# Benchmarks

Numbers written by the scripts in `bench/`; each section names the machine, the date and the
exact command that produced it. Re-run the command to refresh a section.
"""


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or "unknown CPU"
    for line in text.splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine() -> dict[str, str]:
    """``uname -srm``, the CPU model, the number of CPUs and the Python version."""
    uname = os.uname()
    return {
        "uname": f"{uname.sysname} {uname.release} {uname.machine}",
        "cpu": _cpu_model(),
        "nproc": str(len(os.sched_getaffinity(0))),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_lines() -> list[str]:
    """The machine as Markdown list items."""
    m = machine()
    return [
        f"- Machine: `{m['uname']}`, {m['cpu']}, {m['nproc']} CPU(s) (nproc)",
        f"- Python: {m['python']}",
    ]


def today() -> str:
    """The local date and time, to the minute, with the UTC offset."""
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %z")


def command_line(module: str) -> str:
    """The command that ran this benchmark, as a user would type it from the repository root."""
    return shlex.join(["python", "-m", module, *sys.argv[1:]])


def percentile(values: Sequence[float], pct: float) -> float:
    """The ``pct`` percentile (nearest rank) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table with aligned columns (numbers right-aligned)."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def fmt(row: Sequence[str]) -> str:
        cells = []
        for cell, width in zip(row, widths, strict=True):
            text = str(cell)
            numeric = bool(re.fullmatch(r"[-+~]?[\d.,]+ ?%?", text))
            cells.append(text.rjust(width) if numeric else text.ljust(width))
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(r) for r in rows)])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # the lock lives outside the repository so no stray file shows up in `git status`
    lock = Path(tempfile.gettempdir()) / f"channels-gateways-{path.name}.lock"
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def update_section(title: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the ``## title`` section of ``path`` with ``body``, keeping everything else.

    The section runs from its heading to the next ``## `` heading (or the end of the file). A
    missing file is created with a short header; a missing section is appended. The read and
    the write happen under an advisory lock, right after each other.
    """
    heading = f"## {title}"
    section = f"{heading}\n\n{body.strip()}\n"
    with _locked(path):
        text = path.read_text(encoding="utf-8") if path.exists() else _HEADER
        lines = text.splitlines(keepends=True)
        start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
        if start is None:
            new = text.rstrip("\n") + "\n\n" + section
        else:
            end = next(
                (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                len(lines),
            )
            after = "".join(lines[end:])
            new = "".join(lines[:start]) + section + ("\n" + after if after else "")
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(new, encoding="utf-8")
        os.replace(tmp, path)
