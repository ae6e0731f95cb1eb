"""Slack gateway benchmark: Socket Mode events/s to a consumer and ack latency, beside the raw
layer's rate in the same run.

``python -m bench.slack [--count N] [--latency-count N] [--no-write]``

A private ``redis-server`` and the local Slack of ``core.testing.slack`` (Web API + Socket Mode
WebSocket, in this process); the gateway is the real ``gateway-slack`` binary in its own process
at log level INFO, knowing Slack only by its ``api_url``.

* **raw layer**: one task ``layer.send``s ``count`` ``slack.message``-shaped events (the same
  keys the gateway produces) to a channel while a consumer task ``layer.receive``s them.
* **Socket Mode, flat out**: the local Slack pushes ``count`` ``events_api`` envelopes (a
  ``message`` event each) as fast as its WebSocket takes them; a consumer task takes the
  ``slack.message`` events off the layer. events/s = (count - 1) / (first → last receive);
  ratio = that ÷ the raw rate of the same run. Ack latency: envelope sent → its
  ``{"envelope_id"}`` acknowledgement back at the local Slack (the gateway acknowledges only
  after the layer took the event); p50/p99 under that load, where envelopes queue in the
  socket behind each other. Slack wants an ack within 3 s.
* **Socket Mode, a burst**: ``--burst`` envelopes (1,000) written at once to an idle gateway;
  the same ack latency. Slack redelivers what is not acknowledged within 3 s, so p99 must stay
  well under that (issue 21, item 12).
* **Socket Mode, steady rate**: ``latency-count`` envelopes at each of ``--rates`` per second
  (sent on schedule); the same ack latency when the gateway keeps up.
* **Redis outage** (one run per ``--outages`` length, on a second, fsync-always redis-server
  and gateway): Redis is killed, 64 envelopes (twice ``max_in_flight``) are sent, the local
  Slack redelivers each one not acknowledged within 3 s (as Slack does), Redis comes back after
  that many seconds (whether a redelivery overlaps its original depends on when);
  once every envelope is acknowledged, the events on the layer are counted:
  *duplicates* = events published more than once (issue 21, item 12: 4-8 per run before), and
  the time from Redis back to the last acknowledgement.

``--gateway-src DIR`` runs the gateway (only it) from another source tree, e.g. ``git archive``
of an older commit, for before/after figures with the same benchmark and local Slack.

The local Slack and the consumer share the benchmark's event loop; the gateway and Redis are
their own processes; every process shares the machine's CPUs.
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
from core.testing import RedisServer, Server
from core.testing.slack import FakeSlack

ROOT = Path(__file__).resolve().parents[1]
CHANNEL = "benchslack"


async def consume(layer: Any, count: int) -> list[float]:
    stamps = []
    while len(stamps) < count:
        message = await layer.receive(CHANNEL)
        if message["type"] in ("slack.message", "bench.raw"):
            stamps.append(time.monotonic())
    return stamps


def rate(stamps: list[float]) -> float:
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def event(i: int) -> dict[str, Any]:
    return {
        "type": "message", "channel": "C0GENERAL", "channel_type": "channel",
        "user": "U0ALICE", "text": f"message {i:06d}", "ts": f"1700000000.{i:06d}",
        "event_ts": f"1700000000.{i:06d}",
    }  # fmt: skip


async def raw_rate(url: str, count: int) -> float:
    layer = resolve_layer(url)
    sample = new_event(
        "bench.raw", gateway="bench", reply_channel="x", team="T0TEAM", event_time=1700000000,
        channel="C0GENERAL", channel_type="channel", user="U0ALICE", bot_id=None,
        text="message 000000", ts="1700000000.000000", thread_ts=None, subtype=None, files=[],
        previous_text=None, event_ts="1700000000.000000", self=False,
    )  # fmt: skip
    consumer = asyncio.create_task(consume(layer, count))
    for _ in range(count):
        await send_command(layer, CHANNEL, dict(sample))
    return rate(await consumer)


def gateway(tmp: Path, url: str, fake: FakeSlack, source: Path | None = None) -> Server:
    config = {
        "gateway": "slack",
        "name": CHANNEL,
        "layer": url,
        "slack": {"bot_token": fake.bot_token, "app_token": fake.app_token,
                  "api_url": fake.api_url, "dedup": {"redis": True}},
    }  # fmt: skip
    path = tmp / f"slack-{fake.port}.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "gateways.slack.cli", "--config", str(path)]
    env = {**os.environ}
    if source is not None:  # that tree's core and gateways come first on the gateway's path
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), env.get("PYTHONPATH")]))
    cwd = source or ROOT
    return Server(argv, "ready: events", 30, cwd=cwd, env=env, name="gateway-slack")


async def socket_mode(
    url: str, fake: FakeSlack, count: int, paced: float | None
) -> tuple[list[float], list[float]]:
    """(receive stamps, ack latencies) of ``count`` envelopes through the gateway."""
    layer = resolve_layer(url)
    consumer = asyncio.create_task(consume(layer, count))
    ids = []
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(count):
        ids.append(await fake.send_event(event(i)))
        if paced and (ahead := start + (i + 1) / paced - loop.time()) > 0:
            await asyncio.sleep(ahead)  # on schedule: i / rate after the start
    stamps = await consumer
    await fake.wait_for(lambda: all(i in fake.acked_at for i in ids), 60, "every ack")
    return stamps, [fake.acked_at[i] - fake.sent_at[i] for i in ids]


async def outage(
    redis: RedisServer, url: str, fake: FakeSlack, run: int, seconds: float
) -> tuple[int, float]:
    """One Redis outage with 64 envelopes outstanding: (duplicates, Redis back → last ack s)."""
    ids = [f"Ev{run}{i:04d}" for i in range(64)]
    await asyncio.to_thread(redis.kill)
    sent = [await fake.send_event(event(i), event_id) for i, event_id in enumerate(ids)]
    await asyncio.sleep(seconds)
    await asyncio.to_thread(redis.start)
    back = time.monotonic()
    await fake.wait_for(lambda: all(i in fake.acked_at for i in sent), 120, "every ack")
    recovered = max(fake.acked_at[i] for i in sent) - back
    # sent after every ack, so after every publish of this run in the stream
    await fake.wait_ack(await fake.send_event(event(0), f"Ev{run}MARK"))
    layer: Any = resolve_layer(url)
    seen: dict[str, int] = {}
    while (message := await layer.receive(CHANNEL))["id"] != f"Ev{run}MARK":
        if message["type"] == "slack.message":
            seen[message["id"]] = seen.get(message["id"], 0) + 1
    await layer.close_pools()  # its acknowledgements, while Redis is up
    missing = set(ids) - set(seen)
    if missing:
        raise RuntimeError(f"run {run}: {len(missing)} event(s) never arrived")
    return sum(n - 1 for n in seen.values()), recovered


async def outages(args: argparse.Namespace, tmp: Path) -> list[list[str]]:
    rows = []
    with RedisServer(durable=True) as redis:
        url = redis.url + "?capacity=1000000"
        fake = await FakeSlack().start()
        gw = await asyncio.to_thread(gateway, tmp, url, fake, args.gateway_src)
        try:
            fake.auto_redeliver(after=3.0)
            for run, seconds in enumerate(args.outages):
                duplicates, recovered = await outage(redis, url, fake, run, seconds)
                rows.append([str(run + 1), "64", f"{seconds:g}", str(duplicates),
                             f"{recovered:.2f}"])  # fmt: skip
        finally:
            await asyncio.to_thread(gw.stop)
            await fake.stop()
    return rows


async def run(
    args: argparse.Namespace, tmp: Path
) -> tuple[list[list[str]], list[str], list[list[str]]]:
    with RedisServer() as redis:
        url = redis.url + "?capacity=1000000"  # as bench.irc: no ChannelFull backoff in any row
        fake = await FakeSlack().start()
        gw = await asyncio.to_thread(gateway, tmp, url, fake, args.gateway_src)
        try:
            raw = await raw_rate(url, args.count)
            stamps, flat = await socket_mode(url, fake, args.count, None)
            burst_stamps, burst = await socket_mode(url, fake, args.burst, None)
            paced = [
                (pace, *await socket_mode(url, fake, args.latency_count, pace))
                for pace in args.rates
            ]
        finally:
            await asyncio.to_thread(gw.stop)
            await fake.stop()
    outage_rows = await outages(args, tmp) if args.outages else []
    through = rate(stamps)
    ms = 1000.0
    rows = [
        ["raw layer send → receive", str(args.count), f"{raw:,.0f}", "", "-", "-"],
        ["Slack Socket Mode → gateway-slack → layer → consumer, flat out", str(args.count),
         f"{through:,.0f}", f"{through / raw:.1%}",
         f"{percentile(flat, 50) * ms:.1f}", f"{percentile(flat, 99) * ms:.1f}"],
        [f"the same, a burst of {args.burst:,} to an idle gateway", str(args.burst),
         f"{rate(burst_stamps):,.0f}", f"{rate(burst_stamps) / raw:.1%}",
         f"{percentile(burst, 50) * ms:.1f}", f"{percentile(burst, 99) * ms:.1f}"],
    ]  # fmt: skip
    for pace, paced_stamps, latencies in paced:
        rows.append([f"the same, sent at {pace:g}/s", str(args.latency_count),
                     f"{rate(paced_stamps):,.0f}", "-",
                     f"{percentile(latencies, 50) * ms:.1f}",
                     f"{percentile(latencies, 99) * ms:.1f}"])  # fmt: skip
    worst = max(max(latencies) for _, _, latencies in paced)
    notes = [
        f"Socket Mode flat out: {through / raw:.1%} of the raw layer's rate. All {args.count} "
        "envelopes are written to the socket at once, so the ack latency of that row is mostly "
        "the wait behind the envelopes ahead (the last one waits count ÷ rate); Slack would "
        "redeliver what is not acked within 3 s, and the de-dup window absorbs those.",
        f"At a steady rate below what the gateway can take, the slowest ack took "
        f"{worst * ms:.0f} ms (Slack's limit: 3000 ms).",
        f"A burst of {args.burst:,}: ack p99 {percentile(burst, 99) * ms:.0f} ms "
        "(target: under 3000 ms, Slack's redelivery window).",
    ]
    return rows, notes, outage_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.slack", description=__doc__)
    parser.add_argument("--count", type=int, default=5000, help="envelopes for events/s")
    parser.add_argument(
        "--latency-count", type=int, default=2000, help="envelopes per steady-rate row"
    )
    parser.add_argument(
        "--rates",
        type=lambda text: [float(x) for x in text.split(",")],
        default=[200.0, 400.0],
        help="steady rates (envelopes/s), comma-separated",
    )
    parser.add_argument("--burst", type=int, default=1000, help="envelopes in the burst row")
    parser.add_argument(
        "--outages",
        type=lambda text: [float(x) for x in text.split(",") if x],
        default=[3.0, 3.5, 4.0, 4.5, 5.0, 5.5],
        help="seconds Redis is down in each outage run, comma-separated ('': none)",
    )
    parser.add_argument(
        "--gateway-src",
        type=Path,
        default=None,
        help="run the gateway from this source tree (for before/after figures)",
    )
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args(argv)
    load = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M %z")
    with tempfile.TemporaryDirectory() as tmp:
        rows, notes, outage_rows = asyncio.run(run(args, Path(tmp)))
    header = ["path", "events", "events/s", "ratio", "ack p50 ms", "ack p99 ms"]
    outage_header = ["outage run", "envelopes", "Redis down s", "duplicates",
                     "Redis back → last ack s"]  # fmt: skip
    print(text_table(header, rows))
    if outage_rows:
        print(text_table(outage_header, outage_rows))
    print("\n".join(notes))
    if not args.no_write:
        body = "\n".join(
            [
                f"- Date: {started}",
                *machine_lines(),
                f"- Load average when the run started: {' '.join(f'{x:.2f}' for x in load)} "
                "(the machine is shared with other benchmarks and test runs)",
                f"- Command: `{command_line('bench.slack')}`",
                f"- Workload: {args.count} `events_api` envelopes (a `message` event each) "
                f"flat out, a burst of {args.burst}, {args.latency_count} at each steady rate; "
                "private redis-server, the de-dup window in it; the local Slack of "
                "`core.testing.slack`"
                + (f"; {len(args.outages)} Redis outage runs (below)." if args.outages else "."),
                "",
                markdown_table(header, rows),
                "",
                *(
                    [
                        f"Redis outages ({len(args.outages)} runs; 64 envelopes outstanding, "
                        "the local Slack redelivering what is not acknowledged within 3 s, as "
                        "Slack does; fsync-always Redis):",
                        "",
                        markdown_table(outage_header, outage_rows),
                        "",
                    ]
                    if outage_rows
                    else []
                ),
                *(f"- {note}" for note in notes),
                "- Each envelope costs the gateway two de-dup calls in Redis (`SET NX` pending, "
                "`SET` done) and a layer send before its ack; up to `max_in_flight` (32) "
                "envelopes are handled at once per socket. The raw layer's rate moves a lot "
                "between runs on this shared machine; the ratio of the same run is the figure "
                "to read.",
                "",
                "How to read it: see the docstring of `bench/slack.py`.",
            ]
        )
        update_section("Slack", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
