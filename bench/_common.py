"""Helpers shared by the benchmarks: machine description, percentiles, tables, BENCHMARKS.md.

Every benchmark owns one ``## Title`` section of ``BENCHMARKS.md`` and replaces only that
section (:func:`update_section`), so benchmarks written by different people can share the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import fcntl
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BENCHMARKS_MD",
    "REPO_ROOT",
    "GatewayProcess",
    "command_line",
    "cpu_seconds",
    "load_average",
    "machine",
    "machine_lines",
    "markdown_table",
    "percentile",
    "program_version",
    "scrape_metrics",
    "text_table",
    "today",
    "update_section",
    "wait_http_ok",
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


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` prints them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def program_version(*argv: str) -> str:
    """The first line ``argv`` prints that names a version (``redis-server --version``,
    ``mosquitto -h``), or ``"unknown"``."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    for line in (done.stdout + done.stderr).splitlines():
        if re.search(r"\bv(ersion)?[ =]?\d", line):
            return line.strip()
    return "unknown"


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


async def wait_http_ok(url: str, timeout: float = 60.0) -> None:
    """Poll ``url`` until it answers 200 (a gateway's ``/readyz``); ``TimeoutError`` after
    ``timeout`` seconds."""

    def status() -> int:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if await asyncio.to_thread(status) == 200:
                return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{url} did not answer 200 within {timeout:.0f} s")


async def scrape_metrics(url: str) -> dict[str, float]:
    """A Prometheus ``/metrics`` page as {metric name: value summed over its labels}."""

    def text() -> str:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    values: dict[str, float] = {}
    for line in (await asyncio.to_thread(text)).splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(\{.*\})? ([-+\w.]+)", line.strip())
        if match and not line.startswith("#"):
            with contextlib.suppress(ValueError):
                values[match[1]] = values.get(match[1], 0.0) + float(match[3])
    return values


class GatewayProcess:
    """One gateway binary (``python -m gateways.<protocol>.cli --config FILE``) in its own
    process, its YAML written from ``config`` (a health port is added), its output in a log.

    :meth:`start` / :meth:`ready` / :meth:`stop` can be repeated (a persistent MQTT session is
    made by one start-ready-stop, then drained by the next start).
    """

    def __init__(self, protocol: str, config: dict[str, Any], tmp: Path, name: str) -> None:
        from core.testing import free_port

        self.protocol = protocol
        #: the integration's YAML as given (``name`` is its inbound channel)
        self.settings = config
        self.health = free_port()
        self.config = tmp / f"{name}.yaml"
        self.log = tmp / f"{name}.log"
        self.config.write_text(json.dumps({**config, "health": {"port": self.health}}))
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                f"gateways.{self.protocol}.cli",
                "--config",
                str(self.config),
                cwd=REPO_ROOT,
                stdout=log,
                stderr=log,
            )

    async def ready(self, timeout: float = 60.0) -> None:
        """Wait for ``/readyz`` (for MQTT: connected and subscribed)."""
        try:
            await wait_http_ok(f"http://127.0.0.1:{self.health}/readyz", timeout)
        except TimeoutError:
            raise RuntimeError(f"{self.protocol} gateway not ready; see {self.log}") from None

    async def metrics(self) -> dict[str, float]:
        """The gateway's ``/metrics``, summed over labels (see :func:`scrape_metrics`)."""
        return await scrape_metrics(f"http://127.0.0.1:{self.health}/metrics")

    async def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for the exit (SIGKILL after ``timeout``); the exit code."""
        if self.proc is None:
            return 0
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
                raise RuntimeError(
                    f"the {self.protocol} gateway did not stop within {timeout:.0f} s of "
                    f"SIGTERM (killed); see {self.log}"
                ) from None
        return int(self.proc.returncode or 0)


def publish_paced(
    port: int,
    topic: str,
    count: int,
    qos: int,
    rate: float,
    payload: Callable[[int, float], bytes],
    timeout: float = 120.0,
) -> float:
    """Publish ``count`` messages with paho (MQTT 5, 1,000 in flight), ``rate`` a second (0:
    flat out), each ``payload(n, time.monotonic())``; wait for every PUBACK. Seconds taken."""
    from paho.mqtt.client import Client, MQTTv5
    from paho.mqtt.enums import CallbackAPIVersion

    client = Client(CallbackAPIVersion.VERSION2, client_id="", protocol=MQTTv5)
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port)
    client.loop_start()
    started = time.monotonic()
    infos = []
    for n in range(count):
        if rate:
            time.sleep(max(0.0, started + n / rate - time.monotonic()))
        infos.append(client.publish(topic, payload(n, time.monotonic()), qos))
    for info in infos:
        info.wait_for_publish(timeout)
    took = time.monotonic() - started
    client.disconnect()
    client.loop_stop()
    return took
