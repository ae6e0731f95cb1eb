"""IRC gateway benchmark: inbound lines/s and latency beside the raw layer; outbound pacing.

``python -m bench.irc [--count N] [--no-write]``

Private ``redis-server`` and ``ngircd`` (flood control off, so the server is not the limit) on
free ports; the gateway is the real ``gateway-irc`` binary in its own process at log level INFO.

* **raw layer**: one task ``layer.send``s ``count`` ``irc.receive``-shaped events (the same keys
  the gateway produces) to a channel while a consumer task ``layer.receive``s them.
* **inbound**: a second IRC connection (plain asyncio) writes ``count`` PRIVMSG lines into a
  channel the gateway sits in; the same consumer loop takes the ``irc.receive`` events off the
  layer. lines/s = (count - 1) / (first → last receive); ratio = that ÷ the raw rate of the same
  run (target ≥ 80 %). Latency: the same, paced at 200 lines/s, from a stamp in the line (taken
  right before the write) to ``receive()`` returning; p50/p99.
* **outbound paced rate**: ``irc.send`` commands are queued faster than allowed; the other IRC
  connection stamps each arriving line. measured = (lines after the burst) ÷ (time from the
  last burst line to the last line); error = measured ÷ configured - 1. The pacer must never be
  faster; slower shows scheduling overhead.

Everything but the gateway and the servers shares this process's event loop (sender, consumer,
IRC peer); the machine's CPUs are shared by all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench._common import (
    command_line,
    machine_lines,
    markdown_table,
    percentile,
    text_table,
    update_section,
)
from core.envelope import new_event
from core.layers import resolve_layer
from core.retry import send_command
from core.testing import NgircdServer, RedisServer, Server

ROOT = Path(__file__).resolve().parents[1]


async def consume(layer: Any, channel: str, count: int) -> list[tuple[float, dict[str, Any]]]:
    out = []
    while len(out) < count:
        message = await layer.receive(channel)
        if message["type"] in ("irc.receive", "bench.raw"):
            out.append((time.time(), message))
    return out


def rate(stamps: list[float]) -> float:
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


async def raw_rate(url: str, count: int) -> float:
    layer = resolve_layer(url)
    channel = "bench-raw"
    sample = new_event(
        "bench.raw", gateway="bench", reply_channel="x", kind="message", nick="alice",
        user="~alice", host="127.0.0.1", target="#bench", text="line 000000 0.0",
        plain="line 000000 0.0", tags={}, private=False, self=False,
    )  # fmt: skip
    consumer = asyncio.create_task(consume(layer, channel, count))

    async def send() -> None:
        for _ in range(count):
            await send_command(layer, channel, dict(sample))

    await send()
    got = await consumer
    return rate([t for t, _ in got])


class Peer:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, nick: str, channel: str) -> Peer:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        peer = cls(reader, writer)
        writer.write(f"NICK {nick}\r\nUSER {nick} 0 * :{nick}\r\nJOIN {channel}\r\n".encode())
        await peer.expect(" 366 ")
        return peer

    async def line(self) -> str:
        while True:
            text = (await self.reader.readline()).decode().rstrip("\r\n")
            if not text:
                raise ConnectionError("closed")
            if text.startswith("PING "):
                self.writer.write(f"PONG {text[5:]}\r\n".encode())
                continue
            return text

    async def expect(self, needle: str) -> str:
        while needle not in (text := await self.line()):
            pass
        return text


def gateway(tmp: Path, url: str, port: int, name: str, flood: dict[str, float]) -> Server:
    config = {
        "gateway": "irc",
        "name": name,
        "layer": url,
        "irc": {"server": "127.0.0.1", "port": port, "nick": name, "channels": ["#bench"],
                "flood": flood, "queue": 100_000, "buffer": 100_000},
    }  # fmt: skip
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "gateways.irc.cli", "--config", str(path)]
    return Server(argv, "ready: events", 30, cwd=ROOT, env={**os.environ}, name=name)


async def inbound(url: str, irc: NgircdServer, count: int, paced: float | None) -> list[float]:
    """Receive times (throughput) or latencies (paced) of ``count`` lines through the gateway."""
    layer = resolve_layer(url)
    peer = await Peer.connect(irc.port, f"alice{int(paced or 0)}", "#bench")
    consumer = asyncio.create_task(consume(layer, "benchin", count))
    for i in range(count):
        peer.writer.write(f"PRIVMSG #bench :line {i:06d} {time.time():.6f}\r\n".encode())
        if paced:
            await peer.writer.drain()
            await asyncio.sleep(1 / paced)
    await peer.writer.drain()
    got = await consumer
    peer.writer.close()
    if paced:
        return [t - float(m["text"].rsplit(" ", 1)[1]) for t, m in got]
    return [t for t, _ in got]


async def outbound(url: str, irc: NgircdServer, name: str, lines: int, burst: int) -> float:
    layer = resolve_layer(url)
    peer = await Peer.connect(irc.port, f"watch{name}", "#bench")
    stamps: list[float] = []

    async def watch() -> None:  # reads while the commands are still being queued
        while len(stamps) < lines:
            if " PRIVMSG #bench :out " in await peer.line():
                stamps.append(time.monotonic())

    watcher = asyncio.create_task(watch())
    for i in range(lines):
        await send_command(layer, f"{name}.send", {"type": "irc.send", "target": "#bench",
                                                   "text": f"out {i}"})  # fmt: skip
    await watcher
    peer.writer.close()
    return (lines - burst) / (stamps[-1] - stamps[burst - 1])


async def run(args: argparse.Namespace, tmp: Path) -> tuple[list[list[str]], list[str]]:
    rows: list[list[str]] = []
    notes: list[str] = []
    with RedisServer() as redis, NgircdServer() as irc:
        url = redis.url + "?capacity=1000000"  # as bench.mqtt: no ChannelFull backoff in either row
        gw = gateway(tmp, url, irc.port, "benchin", {"burst": 10, "rate": 100})
        try:
            await asyncio.sleep(0.5)  # joined #bench
            raw = await raw_rate(url, args.count)
            through = rate(await inbound(url, irc, args.count, None))
            lat = await inbound(url, irc, args.latency_count, 200)
        finally:
            gw.stop()
        rows.append(["raw layer send → receive", f"{args.count}", f"{raw:,.0f}", "", "-", "-"])
        rows.append([
            "IRC peer → ngircd → gateway-irc → layer → consumer", f"{args.count}",
            f"{through:,.0f}", f"{through / raw:.1%}",
            f"{percentile(lat, 50) * 1000:.2f}", f"{percentile(lat, 99) * 1000:.2f}",
        ])  # fmt: skip
        verdict = "meets" if through >= 0.8 * raw else "misses"
        notes.append(
            f"Inbound: {through / raw:.1%} of the raw layer's rate: {verdict} the 80 % target."
        )
        paced_rows = []
        for configured, lines, burst in ((10.0, 100, 5), (100.0, 500, 10)):
            name = f"pace{int(configured)}"
            flood = {"burst": burst, "rate": configured}
            gw = gateway(tmp, url, irc.port, name, flood)
            try:
                await asyncio.sleep(0.5)
                measured = await outbound(url, irc, name, lines, burst)
            finally:
                gw.stop()
            paced_rows.append([f"{configured:g}", str(burst), str(lines), f"{measured:.2f}",
                               f"{measured / configured - 1:+.1%}"])  # fmt: skip
    return rows, [*notes, "PACED", *("|".join(r) for r in paced_rows)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.irc", description=__doc__)
    parser.add_argument("--count", type=int, default=5000, help="lines for lines/s")
    parser.add_argument("--latency-count", type=int, default=1000, help="lines at 200/s")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args(argv)
    load = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M %z")
    with tempfile.TemporaryDirectory() as tmp:
        rows, notes = asyncio.run(run(args, Path(tmp)))
    split = notes.index("PACED")
    paced = [line.split("|") for line in notes[split + 1 :]]
    notes = notes[:split]
    header = ["path", "lines", "lines/s", "ratio", "p50 ms", "p99 ms"]
    paced_header = ["configured lines/s", "burst", "lines", "measured lines/s", "error"]
    print(text_table(header, rows))
    print(text_table(paced_header, paced))
    print("\n".join(notes))
    if not args.no_write:
        body = "\n".join(
            [
                f"- Date: {started}",
                *machine_lines(),
                f"- Load average when the run started: {' '.join(f'{x:.2f}' for x in load)}",
                f"- Command: `{command_line('bench.irc')}`",
                f"- Workload: {args.count} PRIVMSG lines for lines/s, {args.latency_count} at "
                "200/s for latency; private redis-server and ngircd (flood control off).",
                "",
                markdown_table(header, rows),
                "",
                "Outbound flood control (`irc.send` queued faster than allowed):",
                "",
                markdown_table(paced_header, paced),
                "",
                *(f"- {note}" for note in notes),
                "- Outbound: the pacer schedules line k after the burst at exactly k / rate; a "
                "measured rate a little above the configured one comes from the window's first "
                "stamp (the last burst line, read by the peer a little late), not from lines "
                "leaving early. The issue's bar is within 10 %.",
                "",
                "How to read it: see the docstring of `bench/irc.py`. The sender, consumer and "
                "IRC peer share the benchmark's event loop; the gateway and servers are their "
                "own processes; every process shares the machine's CPUs.",
            ]
        )
        update_section("IRC", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
