"""gateway-irc against a hostile IRC server: memory, frozen time and events kept (issue 21).

Run it from the repository root::

    python -m bench.irc_hostile [--seconds S] [--lines N] [--only NAME ...] [--compare DIR]
                                [--max-rss MB] [--no-write]

The hostile server is :class:`core.testing.ScriptedIrcServer` in this process; the gateway is
the real binary in its own process, at log level INFO, its output in a file, on a private
``redis-server`` (the streams layer, ``capacity`` raised so the layer itself never refuses).
Each scenario starts a fresh gateway, waits for ``/readyz`` (``cap_flood``: for ``/healthz``),
then lets the server loose:

ping_flood (item 2)
    PINGs with 400-byte tokens as fast as the gateway reads them, on every connection; the
    server never reads the PONGs. ``--seconds`` long.
cap_flood (item 3)
    every registration is answered with ``CAP LS`` continuation lines (30 new capabilities
    each) for ``--seconds``.
log_flood (item 4)
    ``--lines`` lines the ``irc`` library cannot parse, then one PRIVMSG.
join_flood (item 5)
    ``--lines`` JOINs of other users at full speed, then one PRIVMSG.
self_join (item 5)
    ``--lines`` JOINs of the gateway itself to distinct channels, one PRIVMSG, then the server
    hangs up; the JOINs the gateway sends on its next connection in 5 s are counted
    (``flood: {burst: 100, rate: 1000}``).

Columns: *RSS MB* is the gateway's peak resident memory (``VmRSS`` sampled every 0.1 s; the
gateway is killed above ``--max-rss``); *frozen s* the longest ``/healthz`` answer (a thread in
this process asks every 50 ms, 10 s timeout); *ready* the share of ``/readyz`` answers (every
0.2 s) that were 200 while the flood ran; *conns* the connections the gateway made; *log KB*
its output; *kept* the ``irc.joined`` events the layer accepted of the JOINs the server sent
(``gateway_events_total{type="irc.joined"}``), *dropped* what ``gateway_dropped_total`` grew
by (after the fix: lines read but not handled when a connection was dropped,
``reason="connection_lost"``); *took s* from the start of the flood until every line was
handled (the PRIVMSG that follows it reached the layer; else until the metrics stood still for
3 s), or the flood's length.

``--compare DIR`` runs every scenario twice: first with the gateway of another checkout
(``mkdir DIR && git archive 919d67a | tar -x -C DIR`` for the code before issue 21;
``PYTHONPATH=DIR``, working directory ``DIR``), row *before*, then with this tree's, row
*after*.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:
    sys.exit("run this benchmark as a module from the repository root: python -m bench.irc_hostile")

import argparse
import asyncio
import contextlib
import json
import os
import signal
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bench._common import (
    REPO_ROOT,
    command_line,
    machine_lines,
    markdown_table,
    scrape_metrics,
    text_table,
    today,
    update_section,
)
from core.testing import RedisServer, free_port, metric_from_text
from tests.support.irc import IrcSession, ScriptedIrcServer

SCENARIOS = ("ping_flood", "cap_flood", "log_flood", "join_flood", "self_join")


@dataclass
class Outcome:
    scenario: str
    code: str
    took: float = 0.0
    peak_rss: float = 0.0
    killed: bool = False
    frozen: float = 0.0
    ready: list[bool] = field(default_factory=list)
    connections: int = 0
    log_bytes: int = 0
    kept: str = "-"
    dropped: float = 0.0
    note: str = ""

    def row(self) -> list[str]:
        rss = f"≥ {self.peak_rss:,.0f} (killed)" if self.killed else f"{self.peak_rss:,.0f}"
        ready = f"{sum(self.ready) / len(self.ready):.0%}" if self.ready else "-"
        return [
            self.scenario, self.code, f"{self.took:.1f}", rss, f"{self.frozen:.2f}", ready,
            str(self.connections), f"{self.log_bytes / 1024:,.0f}", self.kept,
            f"{self.dropped:,.0f}", self.note,
        ]  # fmt: skip


HEADER = [
    "scenario", "code", "took s", "RSS MB", "frozen s", "ready", "conns", "log KB", "kept",
    "dropped", "note",
]  # fmt: skip


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Probe(threading.Thread):
    """Asks ``url`` every ``every`` s; keeps the longest answer time and the statuses."""

    def __init__(self, url: str, every: float) -> None:
        super().__init__(daemon=True)
        self.url, self.every = url, every
        self.longest = 0.0
        self.statuses: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=10) as response:
                    status = int(response.status)
            except urllib.error.HTTPError as exc:
                status = exc.code
            except OSError:
                status = 0
            took = time.monotonic() - started
            self.longest = max(self.longest, took)
            self.statuses.append(status)
            self.stop.wait(max(0.0, self.every - took))


class Gateway:
    """The gateway binary with its YAML, output in a file, RSS watched."""

    def __init__(
        self, tmp: Path, name: str, config: Mapping[str, object], source: Path | None
    ) -> None:
        self.health = free_port()
        self.path = tmp / f"{name}.yaml"
        self.log = tmp / f"{name}.log"
        self.path.write_text(json.dumps({**config, "health": {"port": self.health}}))
        self.source = source
        self.proc: asyncio.subprocess.Process | None = None
        self.peak = 0.0
        self.killed = False
        self._watch: asyncio.Task[None] | None = None

    async def start(self, max_rss: float) -> None:
        env = {**os.environ}
        if self.source is not None:
            env["PYTHONPATH"] = str(self.source)
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateways.irc.cli", "--config", str(self.path),
                cwd=self.source or REPO_ROOT, env=env, stdout=log, stderr=log,
            )  # fmt: skip
        self._watch = asyncio.create_task(self._watch_rss(max_rss))

    async def _watch_rss(self, limit: float) -> None:
        assert self.proc is not None
        while self.proc.returncode is None:
            self.peak = max(self.peak, rss_mb(self.proc.pid))
            if self.peak > limit:
                self.killed = True
                self.proc.kill()
                return
            await asyncio.sleep(0.1)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.health}{path}"

    async def wait(self, path: str, timeout: float = 60) -> None:
        def ok() -> bool:
            try:
                with urllib.request.urlopen(self.url(path), timeout=5) as response:
                    return int(response.status) == 200
            except OSError:
                return False

        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(ok):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{path} not 200 within {timeout} s; see {self.log}")
            await asyncio.sleep(0.1)

    async def joined(self) -> float:
        """``gateway_events_total{type="irc.joined"}``, 0 once the gateway is gone."""
        if self.killed or self.proc is None or self.proc.returncode is not None:
            return 0.0

        def page() -> str:
            with urllib.request.urlopen(self.url("/metrics"), timeout=5) as response:
                return str(response.read().decode())

        try:
            text = await asyncio.to_thread(page)
        except OSError:
            return 0.0
        return metric_from_text(text, "gateway_events_total", type="irc.joined")

    async def metrics(self) -> dict[str, float]:
        if self.killed or self.proc is None or self.proc.returncode is not None:
            return {}
        try:
            return await scrape_metrics(self.url("/metrics"))
        except OSError:
            return {}

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def settle(gateway: Gateway, done: Callable[[dict[str, float]], bool], limit: float) -> None:
    """Until ``done(metrics)``, the metrics stop moving for 3 s, or ``limit`` s passed."""
    deadline = time.monotonic() + limit
    last: dict[str, float] = {}
    still = time.monotonic()
    while time.monotonic() < deadline:
        now = await gateway.metrics()
        if not now or done(now):
            return
        if now != last:
            last, still = now, time.monotonic()
        elif time.monotonic() - still > 3:
            return
        await asyncio.sleep(0.2)


async def scenario(
    name: str, args: argparse.Namespace, redis: RedisServer, tmp: Path, source: Path | None
) -> Outcome:
    outcome = Outcome(name, "before" if source is not None else "after")
    go = asyncio.Event()
    lines = args.lines
    second_joins: list[str] = []
    counted = asyncio.Event()

    async def script(session: IrcSession) -> None:
        if name == "cap_flood":
            await session.expect("CAP")
            await session.flood(
                lambda i: (
                    b":hostile.test CAP * LS * :"
                    + b" ".join(b"cap%d-%d-%d=v" % (session.index, i, j) for j in range(30))
                    + b"\r\n"
                )
            )
            return
        nick = await session.register()
        if name == "ping_flood":  # every connection, not only the first
            if session.index == 0:
                await go.wait()
            await session.flood(lambda i: b"PING :%0400d\r\n" % i)
            return
        if session.index > 0:
            if name == "self_join":
                await session.read_for(5)
                if not counted.is_set():
                    second_joins.extend(x for x in session.received if x.startswith("JOIN "))
                    counted.set()
            else:
                await session.read_all()
            return
        await go.wait()
        if name == "log_flood":
            await session.flood(lambda i: b" unparsable line %d\r\n" % i, lines)
        elif name == "join_flood":
            await session.flood(lambda i: b":u%d!u@h JOIN #bench\r\n" % i, lines)
        elif name == "self_join":
            await session.flood(lambda i: f":{nick}!b@h JOIN #c{i}\r\n".encode(), lines)
        session.send(":alice!a@h PRIVMSG #bench :marker")
        await session.drain()
        if name == "self_join":
            await asyncio.sleep(1)
            return  # hang up: the gateway reconnects and rejoins what it kept
        await session.read_all()

    async with ScriptedIrcServer(script) as server:
        config = {
            "gateway": "irc", "name": "hostile", "layer": redis.url + "?capacity=10000000",
            "irc": {"server": "127.0.0.1", "port": server.port, "nick": "bench",
                    "channels": ["#bench"], "flood": {"burst": 100, "rate": 1000},
                    "reconnect": {"initial": 0.5, "maximum": 5}},
        }  # fmt: skip
        gateway = Gateway(tmp, f"{name}-{outcome.code}", config, source)
        await gateway.start(args.max_rss)
        try:
            await gateway.wait("/healthz" if name == "cap_flood" else "/readyz")
            before = await gateway.metrics()
            joined_before = await gateway.joined()
            health = Probe(gateway.url("/healthz"), 0.05)
            ready = Probe(gateway.url("/readyz"), 0.2)
            health.start()
            ready.start()
            started = time.monotonic()
            go.set()
            if name in ("ping_flood", "cap_flood"):
                await asyncio.sleep(args.seconds)
            else:

                def marked(m: dict[str, float]) -> bool:
                    return m.get("gateway_events_total", 0) - before.get(
                        "gateway_events_total", 0
                    ) >= (lines + 1 if name in ("join_flood", "self_join") else 1)

                await settle(gateway, marked, args.seconds * 10)
            outcome.took = time.monotonic() - started
            health.stop.set()
            ready.stop.set()
            outcome.frozen = health.longest
            outcome.ready = [s == 200 for s in ready.statuses]
            after = await gateway.metrics()
            if name in ("join_flood", "self_join"):
                # irc.joined events the layer took (a rejoin after the hang-up may add one)
                kept = min(lines, await gateway.joined() - joined_before)
                outcome.kept = f"{kept:,.0f} / {lines:,}"
            outcome.dropped = after.get("gateway_dropped_total", 0) - before.get(
                "gateway_dropped_total", 0
            )
            if name == "self_join":
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(counted.wait(), 120)
                outcome.note = (
                    f"{len(second_joins):,} JOINs in the 5 s after the next registration"
                    if counted.is_set()
                    else "no new registration within 120 s"
                )
            elif name == "ping_flood":
                errors = after.get("gateway_errors_total", 0) - before.get(
                    "gateway_errors_total", 0
                )
                outcome.note = f"{errors:.0f} drop(s) counted"
            elif name == "cap_flood":
                outcome.note = "never registered" if not after else ""
        finally:
            await gateway.stop()
        outcome.connections = len(server.sessions)
        outcome.peak_rss, outcome.killed = gateway.peak, gateway.killed
        outcome.log_bytes = gateway.log.stat().st_size
    return outcome


async def run(args: argparse.Namespace, tmp: Path) -> list[Outcome]:
    outcomes = []
    sources = [args.compare, None] if args.compare is not None else [None]
    with RedisServer() as redis:
        for name in args.only or SCENARIOS:
            for source in sources:
                outcome = await scenario(name, args, redis, tmp, source)
                print(text_table(HEADER, [outcome.row()]), flush=True)
                outcomes.append(outcome)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.irc_hostile", description=__doc__)
    parser.add_argument("--seconds", type=float, default=15, help="length of the endless floods")
    parser.add_argument("--lines", type=int, default=100_000, help="lines of the counted floods")
    parser.add_argument("--only", nargs="*", choices=SCENARIOS, help="these scenarios only")
    parser.add_argument("--compare", type=Path, help="also run the gateway of this checkout")
    parser.add_argument(
        "--max-rss", type=float, default=2000, help="MB; the gateway is killed above"
    )
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args(argv)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    started = today()
    with tempfile.TemporaryDirectory() as tmp:
        outcomes = asyncio.run(run(args, Path(tmp)))
    rows = [o.row() for o in outcomes]
    print()
    print(text_table(HEADER, rows))
    if not args.no_write:
        body = "\n".join(
            [
                f"- Date: {started}",
                *machine_lines(),
                f"- Load average when the run started: {load}",
                f"- Load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
                f"- Command: `{command_line('bench.irc_hostile')}`"
                + (
                    f"; *before* is the checkout in `{args.compare}` (the code before issue 21: "
                    "`git archive 919d67a`), *after* this tree"
                    if args.compare is not None
                    else ""
                ),
                "",
                markdown_table(HEADER, rows),
                "",
                "What the *after* rows should show: a server that floods PINGs and never reads "
                "is dropped once 1 MiB waits unread (one WARNING and one "
                '`gateway_errors_total{kind="write_buffer_full"}` per connection, reconnects with '
                "backoff, `/readyz` red meanwhile) and memory stays flat; an endless `CAP LS` is "
                "cut off after 32 lines, every attempt; unparsable lines are one WARNING line; "
                "a JOIN flood is pushed back through TCP, nothing dropped, `/healthz` answering; "
                "a server that claims thousands of joins for us gets `max_channels` (200) "
                "rejoined.",
                "",
                "How to read it: see the docstring of `bench/irc_hostile.py`. The hostile server "
                "and the probes share this benchmark's process; the gateway and Redis are their "
                "own processes; every process shares the machine's CPUs.",
            ]
        )
        update_section("IRC against a hostile server", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
