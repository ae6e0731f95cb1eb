"""Raw ``send`` → ``receive`` through every layer the suite ships, side by side in one run.

``python -m bench.layer [--senders 1,10,100,1000] [--messages 3000] [--rounds 3] [--no-write]``

Layers, each fresh for each row: channels' in-memory layer, channels_redis' own
``RedisChannelLayer``, ``core.layers.RedisChannelLayer`` (``redis://…?layer=channels_redis``)
and ``core.streams.StreamsChannelLayer`` (``redis://``), the three Redis ones on one private
``redis-server``. For each number of sender tasks, one process runs that many tasks calling
``layer.send`` and one task calling ``layer.receive`` on the same channel at once (one event loop,
as a worker that also sends would); msgs/s is messages delivered ÷ time from the first send to
the last receive. Every row runs in a fresh process of its own. Rounds are interleaved (round 1
of every row, then round 2, …) and the median is reported. Errors are counted, not raised:
with redis-py 8 channels_redis raises ``MaxConnectionsError`` from 100 concurrent callers on
(issue 6). Capacity is raised so no sender sees ``ChannelFull``.

Then the same with a ``core.worker.ConsumerWorker`` (a no-op consumer) receiving instead of a
plain ``receive()`` loop, ``--worker-senders`` senders (the worker acknowledges after the handler
on the streams layer).

Writes the ``Redis layer under concurrency`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from channels.layers import InMemoryChannelLayer
from channels_redis.core import RedisChannelLayer as StockLayer

from bench._common import (
    command_line,
    machine_lines,
    markdown_table,
    text_table,
    today,
    update_section,
)
from core.layers import RedisChannelLayer, _redis_host
from core.streams import StreamsChannelLayer
from core.testing import RedisServer
from core.worker import ConsumerWorker, RetryPolicy

SECTION = "Redis layer under concurrency"
CAPACITY = 1_000_000


@dataclass
class Row:
    layer: str
    senders: int
    messages: int
    rates: list[float] = field(default_factory=list)
    delivered: list[int] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""

    @property
    def rate(self) -> float:
        return statistics.median(self.rates) if self.rates else 0.0


async def one_run(layer: Any, senders: int, messages: int) -> tuple[int, float, list[str]]:
    per = max(1, messages // senders)
    total = per * senders
    errors: list[str] = []
    received = 0

    async def sender() -> None:
        for n in range(per):
            try:
                await layer.send("bench-layer", {"type": "bench.x", "n": n})
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    async def receiver() -> None:
        nonlocal received
        while received < total - len(errors):
            try:
                await asyncio.wait_for(layer.receive("bench-layer"), 30)
            except Exception as exc:
                errors.append(f"receive {type(exc).__name__}: {exc}")
                return
            received += 1

    started = time.perf_counter()
    receiving = asyncio.create_task(receiver())
    await asyncio.gather(*(sender() for _ in range(senders)))
    await receiving
    elapsed = time.perf_counter() - started
    if hasattr(layer, "flush"):
        await layer.flush()
    if hasattr(layer, "close_pools"):
        await layer.close_pools()
    return received, received / elapsed if elapsed else 0.0, errors


async def worker_run(layer: Any, senders: int, messages: int) -> tuple[int, float, list[str]]:
    """``senders`` tasks send while a ``ConsumerWorker`` (no-op consumer) receives, in one loop."""
    per = max(1, messages // senders)
    total = per * senders
    errors: list[str] = []
    handled = 0
    done = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal handled
        while True:
            await receive()
            handled += 1
            if handled >= total:
                done.set()

    async def sender() -> None:
        for n in range(per):
            try:
                await layer.send("bench-worker", {"type": "bench.x", "n": n})
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    worker = ConsumerWorker(
        app, ["bench-worker"], layer, retry=RetryPolicy(dead_letter="log"), shutdown_grace=1
    )
    started = time.perf_counter()
    running = asyncio.create_task(worker.arun())
    await asyncio.gather(*(sender() for _ in range(senders)))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), 60)
    elapsed = time.perf_counter() - started
    await worker.drain()
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    if hasattr(layer, "flush"):
        await layer.flush()
    return handled, handled / elapsed if elapsed else 0.0, errors


def layers(url: str) -> dict[str, Callable[[], Any]]:
    host = _redis_host(url)
    return {
        "memory": lambda: InMemoryChannelLayer(capacity=CAPACITY),
        "channels_redis": lambda: StockLayer(hosts=[host], capacity=CAPACITY),
        "core.layers (channels_redis)": lambda: RedisChannelLayer(hosts=[host], capacity=CAPACITY),
        "core.streams": lambda: StreamsChannelLayer(hosts=[url], capacity=CAPACITY),
    }


def run_isolated(
    url: str, name: str, senders: int, messages: int, through_worker: bool
) -> tuple[int, float, list[str]]:
    """One row in a process of its own, so no row pays for what an earlier one left behind
    (garbage, connections of a layer that failed, tasks of its pool)."""
    argv = [sys.executable, "-m", "bench.layer", "_row", url, name, str(senders), str(messages)]
    if through_worker:
        argv.append("worker")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        return 0, 0.0, [f"row process exited {done.returncode}: {done.stderr.strip()[-200:]}"]
    delivered, rate, errors = json.loads(done.stdout.strip().splitlines()[-1])
    return int(delivered), float(rate), list(errors)


def _row(argv: list[str]) -> int:
    url, name, senders, messages, *worker = argv
    run = worker_run if worker else one_run
    result = asyncio.run(run(layers(url)[name](), int(senders), int(messages)))
    print(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_row"]:
        return _row(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench.layer", description=__doc__)
    parser.add_argument("--senders", default="1,10,100,1000")
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--worker-senders", type=int, default=100, help="senders for the ConsumerWorker rows"
    )
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args(argv)
    counts = [int(x) for x in args.senders.split(",")]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rows: dict[tuple[str, int], Row] = {}
    with RedisServer() as server:
        makers = layers(server.url)
        for round_ in range(args.rounds):
            plan = [(name, n, False) for n in counts for name in makers]
            plan += [
                (name, args.worker_senders, True) for name in makers if name != "channels_redis"
            ]
            for name, senders, through_worker in plan:
                label = f"{name} → ConsumerWorker" if through_worker else name
                row = rows.setdefault(
                    (label, senders),
                    Row(label, senders, max(1, args.messages // senders) * senders),
                )
                delivered, rate, errors = run_isolated(
                    server.url, name, senders, args.messages, through_worker
                )
                row.rates.append(rate)
                row.delivered.append(delivered)
                row.errors += len(errors)
                row.first_error = row.first_error or (errors[0] if errors else "")
                print(
                    f"round {round_ + 1} {label:45} {senders:5} senders: {rate:8.0f} msg/s, "
                    f"{delivered}/{row.messages}, {len(errors)} errors {row.first_error[:50]}",
                    flush=True,
                )
    end_load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    best_stock = max((r.rate for r in rows.values() if r.layer == "channels_redis"), default=0.0)
    header = [
        "path",
        "senders",
        "delivered (min)",
        "msgs/s (median)",
        "rounds",
        "x channels_redis, same senders",
        "x channels_redis at its best",
        "errors",
        "first error",
    ]
    table = []
    for (_label, senders), r in rows.items():
        stock = rows.get(("channels_redis", senders))
        same = f"{r.rate / stock.rate:.1f}x" if stock and stock.rate else "—"
        table.append(
            [
                r.layer,
                str(r.senders),
                f"{min(r.delivered)}/{r.messages}",
                f"{r.rate:,.0f}",
                " / ".join(f"{x:,.0f}" for x in r.rates),
                same,
                f"{r.rate / best_stock:.1f}x" if best_stock else "—",
                str(r.errors),
                r.first_error[:60] or "—",
            ]
        )
    print(text_table(header, table))
    streams_100 = rows.get(("core.streams", 100))
    target = (
        f"core.streams at 100 senders: {streams_100.rate:,.0f} msg/s = "
        f"{streams_100.rate / best_stock:.1f}x channels_redis at its best ({best_stock:,.0f} msg/s)"
        if streams_100 and best_stock
        else ""
    )
    met = bool(streams_100 and best_stock and streams_100.rate >= 10 * best_stock)
    verdict = "meets it" if met else "misses it in this run"
    print(target, verdict)
    if not args.no_write:
        body = "\n".join(
            [
                f"- Date: {today()}",
                *machine_lines(),
                f"- redis-py {redis.__version__}",
                f"- Load average when the run started: {load}; when it ended: {end_load}",
                f"- Command: `{command_line('bench.layer')}`",
                f"- Workload: N sender tasks and one receiver in one event loop, "
                f"{args.messages} small messages, one channel, a private redis-server; "
                f"{args.rounds} interleaved rounds, median reported.",
                "",
                markdown_table(header, table),
                "",
                f"Target (issue 13): {target}; the target is ≥ 10x: {verdict}. The machine is "
                "shared: rates move a lot between rounds (see the rounds column), compare rows "
                "of the same run.",
                "",
                "channels_redis' own layer gets redis-py's default pool: with redis-py 8 at most "
                "100 connections, then `MaxConnectionsError`. `core.layers.RedisChannelLayer` "
                "(`redis://…?layer=channels_redis`) sends through a waiting pool and receives on a "
                "pool of its own, still a few round trips per message. `core.streams` "
                "(`redis://`) coalesces every send and acknowledgement waiting at a moment into "
                "one pipelined Lua call per host and fetches up to `batch` (100) entries per "
                "`XREADGROUP`, on one writer connection and one fetch connection.",
            ]
        )
        update_section(SECTION, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
