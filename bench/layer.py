"""The Redis layer under concurrent senders: channels_redis' own layer vs ``core.layers``.

``python -m bench.layer [--senders 10,50,100,1000] [--messages 3000] [--no-write]``

For each number of sender tasks, one process runs that many tasks calling ``layer.send`` and
one task calling ``layer.receive`` on the same channel at once (one event loop, as a worker
that also sends would), on a private ``redis-server``; msgs/s is messages delivered ÷ time from
the first send to the last receive. Errors are counted, not raised: with redis-py 8 the stock
layer raises ``MaxConnectionsError`` from 100 concurrent callers on (issue 6). Each row uses a
fresh layer; capacity is raised so the senders never see ``ChannelFull``.

Writes the ``Redis layer under concurrency`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any

import redis
from channels_redis.core import RedisChannelLayer as StockLayer

from bench._common import (
    command_line,
    machine_lines,
    markdown_table,
    text_table,
    today,
    update_section,
)
from core.layers import REDIS_POOL_SIZE, RedisChannelLayer, _redis_host
from core.testing import RedisServer

SECTION = "Redis layer under concurrency"


@dataclass
class Row:
    layer: str
    senders: int
    delivered: int
    messages: int
    seconds: float
    errors: int
    first_error: str

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds else 0.0


async def one_run(layer: Any, name: str, senders: int, messages: int) -> Row:
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
    await layer.flush()
    await layer.close_pools()
    return Row(name, senders, received, total, elapsed, len(errors), errors[0] if errors else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.layer", description=__doc__)
    parser.add_argument("--senders", default="10,50,100,1000")
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args(argv)
    counts = [int(x) for x in args.senders.split(",")]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rows: list[Row] = []
    with RedisServer() as server:
        host = _redis_host(server.url)
        for senders in counts:
            for name, cls in (("channels_redis", StockLayer), ("core.layers", RedisChannelLayer)):
                layer = cls(hosts=[host], capacity=1_000_000)
                row = asyncio.run(one_run(layer, name, senders, args.messages))
                rows.append(row)
                print(
                    f"{name:15} {senders:5} senders: {row.rate:8.0f} msg/s, "
                    f"{row.delivered}/{row.messages} delivered, {row.errors} errors "
                    f"{row.first_error[:60]}",
                    flush=True,
                )
    header = ["layer", "senders", "delivered", "msgs/s", "errors", "first error"]
    table = [
        [
            r.layer,
            str(r.senders),
            f"{r.delivered}/{r.messages}",
            f"{r.rate:,.0f}",
            str(r.errors),
            r.first_error[:60] or "—",
        ]
        for r in rows
    ]
    print(text_table(header, table))
    if not args.no_write:
        body = "\n".join(
            [
                f"- Date: {today()}",
                *machine_lines(),
                f"- redis-py {redis.__version__}",
                f"- Load average when the run started: {load}",
                f"- Command: `{command_line('bench.layer')}`",
                f"- Workload: N sender tasks and one receiver in one event loop, "
                f"{args.messages} small messages, one channel, a private redis-server.",
                "",
                markdown_table(header, table),
                "",
                "channels_redis' own layer gets redis-py's default pool: with redis-py 8 at most "
                "100 connections, then `MaxConnectionsError` (here the receive failed first, so "
                "nothing was delivered). Below 100 every sender keeps a round trip in flight, so "
                "each of the receiver's round trips waits behind all of them; how much that costs "
                "depends on the load of the machine (the issue measured 95 msg/s at 50 senders). "
                f"`core.layers.RedisChannelLayer` sends through a waiting pool of "
                f"{REDIS_POOL_SIZE} connections per host and receives on a pool of its own "
                "(see `RedisChannelLayer.create_pool`).",
            ]
        )
        update_section(SECTION, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
