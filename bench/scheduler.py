"""Scheduler benchmark: lateness and CPU with 100 / 1,000 / 10,000 schedules; takeover time.

``python -m bench.scheduler [--window S] [--no-write]``

A private ``redis-server``; the scheduler is the real ``gateway-scheduler`` binary in its own
process (log level WARNING), its state and lease in that Redis.

* **lateness**: N schedules ``every: WINDOW`` with their ``start`` spread evenly over the window,
  so N / WINDOW fires a second, all to one channel that a consumer task in this process reads.
  After a warm-up window, one window of fires is measured: *scheduler* lateness = the fire's
  ``fire_time`` - ``scheduled_time`` (the scheduler's own delay: wake-up, fenced commit, message
  build), *end to end* = the consumer's receive time - ``scheduled_time`` (plus the layer hop).
  *CPU/s* = the scheduler process's user+system CPU seconds over the measured window ÷ its
  length (``/proc/PID/stat``). The raw layer row is ``layer.send`` → ``receive`` of the same
  message shape at the same rate as the 1,000 row, in the same run.
* **takeover**: two schedulers (1,000 schedules, default ``tick: 1``, lease 1.5 s); the leader
  is SIGKILLed and the standby's ``/readyz`` polled every 10 ms until it says ``role: leader``;
  repeated, each time with a fresh standby.
* **trigger**: ``scheduler.trigger`` sent on the command channel of a scheduler with 100 quiet
  schedules, one at a time; the time from the send to the consumer receiving the
  ``manual: true`` fire (the command stores it; the leader reads the queue, claims the fire,
  sends it and confirms it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
import urllib.request
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
from core.layers import resolve_layer
from core.testing import RedisServer, Server, free_port

ROOT = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def write_config(tmp: Path, url: str, name: str, count: int, window: float) -> tuple[Path, int]:
    base = 1_700_000_000.0
    schedules = {
        f"s{i:05d}": {
            "every": window,
            "start": base + i * window / count,
            "channel": "bench-fires",
            "misfire": "skip",
        }
        for i in range(count)
    }
    port = free_port()
    config = {
        "gateway": "scheduler",
        "name": name,
        "layer": url,
        "health": {"port": port},
        "scheduler": {"schedules": schedules, "max_in_flight": 200},
    }
    path = tmp / f"{name}-{count}-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, port


def start(path: Path, name: str) -> Server:
    argv = [sys.executable, "-m", "gateways.scheduler.cli", "--config", str(path),
            "--log-level", "WARNING"]  # fmt: skip
    return Server(argv, None, 60, cwd=ROOT, env={**os.environ}, name=name)


def readyz(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return str(response.read().decode())
    except OSError:
        return ""


async def wait_leader(port: int, timeout: float = 60) -> float:
    deadline = time.monotonic() + timeout
    while "role: leader" not in await asyncio.to_thread(readyz, port):
        if time.monotonic() > deadline:
            raise TimeoutError("no leader")
        await asyncio.sleep(0.01)
    return time.monotonic()


async def lateness(url: str, tmp: Path, count: int, window: float) -> dict[str, Any]:
    path, port = write_config(tmp, url, "bench", count, window)
    layer: Any = resolve_layer(url)
    await layer.flush()
    server = start(path, f"scheduler-{count}")
    try:
        await wait_leader(port)
        measure_from = time.time() + window  # one window of warm-up
        measure_to = measure_from + window
        got: list[tuple[float, dict[str, Any]]] = []
        cpu_start: float | None = None
        while True:
            message = await layer.receive("bench-fires")
            now = time.time()
            if cpu_start is None and now >= measure_from:
                cpu_start, cpu_wall = cpu_seconds(server.pid or 0), time.monotonic()
            if measure_from <= message["scheduled_time"] < measure_to:
                got.append((now, message))
            if message["scheduled_time"] >= measure_to:
                break
        cpu = (cpu_seconds(server.pid or 0) - (cpu_start or 0)) / (time.monotonic() - cpu_wall)
    finally:
        server.stop()
        await layer.close_pools()
    own = [m["fire_time"] - m["scheduled_time"] for _, m in got]
    e2e = [t - m["scheduled_time"] for t, m in got]
    return {"fires": len(got), "own": own, "e2e": e2e, "cpu": cpu}


async def raw_layer(url: str, rate: float, seconds: float) -> list[float]:
    layer: Any = resolve_layer(url)
    count = int(rate * seconds)
    latencies: list[float] = []

    async def consume() -> None:
        while len(latencies) < count:
            message = await layer.receive("bench-raw")
            latencies.append(time.time() - message["scheduled_time"])

    consumer = asyncio.create_task(consume())
    start_at = time.time()
    for i in range(count):
        due = start_at + i / rate
        await asyncio.sleep(max(0.0, due - time.time()))
        await layer.send("bench-raw", {
            "type": "scheduler.fire", "gateway": "bench", "id": f"raw@{due}", "time": due,
            "reply_channel": "bench.send", "schedule": "raw", "scheduled_time": time.time(),
            "scheduled_local": "", "fire_time": time.time(), "missed": 0,
        })  # fmt: skip
    await consumer
    await layer.close_pools()
    return latencies


async def takeover(url: str, tmp: Path, rounds: int) -> list[float]:
    layer: Any = resolve_layer(url)
    await layer.flush()
    results = []
    path, port = write_config(tmp, url, "pair", 1000, 60)
    leader = start(path, "leader")
    await wait_leader(port)
    for _ in range(rounds):
        standby_path, standby_port = write_config(tmp, url, "pair", 1000, 60)
        standby = start(standby_path, "standby")
        await asyncio.sleep(3)  # the standby is up and polling
        assert "role: standby" in await asyncio.to_thread(readyz, standby_port)
        killed = time.monotonic()
        os.kill(leader.pid or 0, signal.SIGKILL)
        results.append(await wait_leader(standby_port) - killed)
        leader.kill()
        leader, port = standby, standby_port
    leader.stop()
    await layer.close_pools()
    return results


async def trigger_latency(url: str, tmp: Path, count: int) -> list[float]:
    layer: Any = resolve_layer(url)
    await layer.flush()
    path, port = write_config(tmp, url, "trig", 100, 3600)
    server = start(path, "scheduler-trigger")
    latencies: list[float] = []
    try:
        await wait_leader(port)
        for index in range(count):
            sent = time.time()
            asked = {"type": "scheduler.trigger", "schedule": "s00000", "request_id": f"r{index}"}
            await layer.send("trig.send", asked)
            while not (await layer.receive("bench-fires")).get("manual"):
                pass  # a scheduled fire of another schedule
            latencies.append(time.time() - sent)
    finally:
        server.stop()
        await layer.close_pools()
    return latencies


def ms(values: list[float], pct: float) -> str:
    return f"{percentile(values, pct) * 1000:.1f}"


async def run(
    args: argparse.Namespace, tmp: Path
) -> tuple[list[list[str]], list[float], list[float]]:
    rows: list[list[str]] = []
    with RedisServer() as redis:
        url = redis.url + "?capacity=1000000"
        for count in (100, 1000, 10_000):
            result = await lateness(url, tmp, count, args.window)
            rows.append([
                f"{count:,}", f"{count / args.window:,.1f}", str(result["fires"]),
                ms(result["own"], 50), ms(result["own"], 99),
                ms(result["e2e"], 50), ms(result["e2e"], 99), f"{result['cpu']:.3f}",
            ])  # fmt: skip
            print(text_table(HEADER, rows[-1:]), flush=True)
        raw = await raw_layer(url, 1000 / args.window, args.window)
        rows.append(["raw layer, same rate as 1,000", f"{1000 / args.window:,.1f}",
                     str(len(raw)), "-", "-", ms(raw, 50), ms(raw, 99), "-"])  # fmt: skip
        times = await takeover(url, tmp, args.rounds)
        triggered = await trigger_latency(url, tmp, args.triggers)
    return rows, times, triggered


HEADER = ["schedules", "fires/s", "fires measured", "scheduler p50 ms", "scheduler p99 ms",
          "end-to-end p50 ms", "end-to-end p99 ms", "CPU s/s"]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scheduler", description=__doc__)
    parser.add_argument("--window", type=float, default=30.0, help="every: and measured window")
    parser.add_argument("--rounds", type=int, default=5, help="takeovers measured")
    parser.add_argument("--triggers", type=int, default=200, help="triggers measured")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args(argv)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    started = time.strftime("%Y-%m-%d %H:%M %z")
    with tempfile.TemporaryDirectory() as tmp:
        rows, times, triggered = asyncio.run(run(args, Path(tmp)))
    end_load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(text_table(HEADER, rows))
    takeover_line = (
        f"Takeover after SIGKILL of the leader (1,000 schedules, tick 1 s, lease 1.5 s), "
        f"{len(times)} rounds: median {percentile(times, 50):.2f} s, "
        f"max {max(times):.2f} s (bound: lease 1.5 s + half a tick = 2.0 s)."
    )
    print(takeover_line)
    trigger_line = (
        f"scheduler.trigger → its fire at a consumer, {len(triggered)} one after the other "
        f"(100 quiet schedules): p50 {ms(triggered, 50)} ms, p99 {ms(triggered, 99)} ms."
    )
    print(trigger_line)
    if not args.no_write:
        body = "\n".join([
            f"- Date: {started}",
            *machine_lines(),
            f"- Load average when the run started: {load}; when it ended: {end_load}",
            f"- Command: `{command_line('bench.scheduler')}`",
            f"- Workload: N schedules `every: {args.window:g}s`, starts spread evenly over the "
            f"window (N / {args.window:g} fires a second), one window of warm-up, one measured; "
            "private redis-server; one gateway-scheduler process.",
            "",
            markdown_table(HEADER, rows),
            "",
            f"- {takeover_line}",
            f"- {trigger_line}",
            "",
            "How to read it: see the docstring of `bench/scheduler.py`. *scheduler* lateness is "
            "`fire_time` - `scheduled_time` (wake-up + fenced commit in Redis + building the "
            "message); *end to end* adds the layer hop to a consumer in the benchmark's process. "
            "*CPU s/s* is the scheduler process's CPU time per second of wall time (1.0 = one "
            "core busy). Every process shares the machine's 2 CPUs with the other helpers' "
            "tests and benchmarks.",
        ])  # fmt: skip
        update_section("Scheduler", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
