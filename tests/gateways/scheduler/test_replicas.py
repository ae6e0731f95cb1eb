"""Real ``gateway-scheduler`` processes on a private Redis: exactly one fire per due time with two
replicas when the leader is killed or paused past its lease, pending one-shots across a restart,
/readyz naming the role, bad YAML, and ``gateways schedules``."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.layers import resolve_layer
from core.testing import GatewayProcess, RedisServer, command, until
from gateways.scheduler.gateway import LOST_LEASE
from tests.gateways.scheduler.conftest import cursor, role, start, tail, wait_role

pytestmark = pytest.mark.timeout(180)


def config(redis: RedisServer, name: str, schedules: dict[str, Any]) -> dict[str, Any]:
    return {
        "gateway": "scheduler",
        "name": name,
        "layer": redis.url,
        "shutdown_grace": 5,
        "scheduler": {"tick": 0.5, "schedules": schedules},
    }


class Collector:
    """Every message on ``channel``, read by a task of its own."""

    def __init__(self, layer: Any, channel: str) -> None:
        self.layer, self.channel = layer, channel
        self.messages: list[dict[str, Any]] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.messages.append(await self.layer.receive(self.channel))

    async def at_least(self, count: int) -> None:
        await until(lambda: len(self.messages) >= count, what=f"{count} messages", timeout=60)

    async def finish(self) -> list[dict[str, Any]]:
        """Drain what the stopped schedulers left in Redis, then stop reading."""
        seen = -1
        while seen != len(self.messages):
            seen = len(self.messages)
            await asyncio.sleep(1.0)  # nothing signals "no more messages": give them a second
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        return self.messages


@contextlib.asynccontextmanager
async def collecting(redis: RedisServer, channel: str) -> AsyncIterator[Collector]:
    collector = Collector(resolve_layer(redis.url), channel)
    try:
        yield collector
    finally:
        collector.task.cancel()


def assert_exactly_once_without_gaps(
    messages: list[dict[str, Any]], step: float = 1.0, *, allow_gaps: bool = False
) -> None:
    times = [m["scheduled_time"] for m in messages]
    duplicates = {t: n for t, n in Counter(times).items() if n > 1}
    assert duplicates == {}
    ordered = sorted(times)
    gaps = [(a, b) for a, b in itertools.pairwise(ordered) if b - a != step]
    assert allow_gaps or gaps == []


@pytest.mark.replicas
async def test_two_replicas_fire_each_due_time_once_when_the_leader_is_killed(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    cfg = config(redis_server, "pair", {"beat": {"every": "1s", "channel": "ticks"}})
    first = await start(tmp_path, cfg)
    second: GatewayProcess | None = None
    try:
        async with collecting(redis_server, "ticks") as ticks:
            await wait_role(first, "leader")
            second = await start(tmp_path, cfg)
            assert await role(second) == "standby"
            await ticks.at_least(4)
            await asyncio.to_thread(first.kill)
            await wait_role(second, "leader")
            taken_over = len(ticks.messages)
            await ticks.at_least(taken_over + 4)
            assert await asyncio.to_thread(second.stop) == 0, tail(second)
            messages = await ticks.finish()
    finally:
        await asyncio.to_thread(first.kill)
        if second is not None:
            await asyncio.to_thread(second.kill)
    assert len(messages) >= 8
    assert_exactly_once_without_gaps(messages)


@pytest.mark.replicas
async def test_a_leader_paused_past_its_lease_fires_nothing_twice(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    cfg = config(redis_server, "paused", {"beat": {"every": "1s", "channel": "ticks"}})
    first = await start(tmp_path, cfg)
    second: GatewayProcess | None = None
    try:
        async with collecting(redis_server, "ticks") as ticks:
            await wait_role(first, "leader")
            second = await start(tmp_path, cfg)
            await ticks.at_least(3)
            assert first.server is not None and first.server.pid is not None
            os.kill(first.server.pid, signal.SIGSTOP)
            await wait_role(second, "leader")
            await ticks.at_least(len(ticks.messages) + 3)
            os.kill(first.server.pid, signal.SIGCONT)
            await wait_role(first, "standby")
            await ticks.at_least(len(ticks.messages) + 3)
            assert await role(second) == "leader"
            assert await asyncio.to_thread(first.stop) == 0, tail(first)
            assert await asyncio.to_thread(second.stop) == 0, tail(second)
            messages = await ticks.finish()
            assert f"standby now: {LOST_LEASE}" in first.server.tail()
    finally:
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(first.server.pid, signal.SIGCONT)  # type: ignore[union-attr, arg-type]
        await asyncio.to_thread(first.kill)
        if second is not None:
            await asyncio.to_thread(second.kill)
    assert_exactly_once_without_gaps(messages)


async def test_pending_one_shots_survive_a_crash_and_fire_once(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    cfg = config(redis_server, "oneshots", {})
    process = await start(tmp_path, cfg)
    client = resolve_layer(redis_server.url)
    try:
        for index in range(10):
            result = await command(
                client,
                "oneshots.send",
                {
                    "type": "scheduler.add",
                    "schedule": f"job-{index}",
                    "in": 3 + index * 0.1,
                    "channel": "jobs",
                    "message": {"n": index},
                },
            )
            assert result["ok"] and result["created"], result
        await asyncio.to_thread(process.kill)  # before any of them is due
        async with collecting(redis_server, "jobs") as jobs:
            restarted = GatewayProcess(process.path, process.health_port, gateway="scheduler")
            await asyncio.to_thread(restarted.start)
            await jobs.at_least(10)
            assert await asyncio.to_thread(restarted.stop) == 0, tail(restarted)
            messages = await jobs.finish()
    finally:
        await asyncio.to_thread(process.kill)
    assert sorted(m["n"] for m in messages) == list(range(10))
    assert {m["schedule"] for m in messages} == {f"job-{i}" for i in range(10)}


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ({"cron": "0 25 * * *"}, "scheduler.schedules.bad.cron: "),
        (
            {"cron": "0 7 * * *", "timezone": "Europe/Atlantis"},
            "scheduler.schedules.bad.timezone: unknown time zone 'Europe/Atlantis'",
        ),
        ({"at": "tomorrow"}, "scheduler.schedules.bad.at: 'tomorrow' is not an ISO 8601"),
        (
            {"every": "1m", "jitter": "2m"},
            "scheduler.schedules.bad.jitter: 120 s is longer than the interval (every: 60 s)",
        ),
        ({"every": "0s"}, "scheduler.schedules.bad.every: must be longer than 0 s"),
        ({"every": "soon"}, "scheduler.schedules.bad.every: 'soon' is not a duration"),
        ({"every": "1m", "misfire": "maybe"}, "scheduler.schedules.bad.misfire: "),
        (
            {"cron": "0 7 * * *", "every": "1m"},
            "scheduler.schedules.bad: give exactly one of cron, every, at",
        ),
    ],
)
def test_bad_yaml_exits_2_with_the_key_path(
    tmp_path: Path, schedule: dict[str, Any], expected: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "gateway": "scheduler",
                "name": "bad",
                "layer": "redis://127.0.0.1:1/0",
                "scheduler": {"schedules": {"bad": schedule}},
            }
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "gateways.scheduler.cli", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr


def test_gateways_schedules_prints_the_next_fire_times(tmp_path: Path) -> None:
    path = tmp_path / "timers.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "gateway": "scheduler",
                "name": "timers",
                "scheduler": {
                    "schedules": {
                        "digest": {
                            "cron": "0 18 * * *",
                            "timezone": "Europe/Berlin",
                            "channel": "digest",
                        },
                        "beat": {"every": "1h"},
                    }
                },
            }
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "gateways.cli", "schedules", str(path), "--count", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "  digest: cron '0 18 * * *' Europe/Berlin → digest" in lines
    digest = lines[lines.index("  digest: cron '0 18 * * *' Europe/Berlin → digest") + 1]
    # 18:00 in Berlin is 17:00 or 16:00 UTC depending on the season
    assert "T18:00:00+0" in digest and "Europe/Berlin  =  " in digest
    assert digest.split("=  ")[1][11:19] in ("17:00:00", "16:00:00")
    beat = lines[lines.index("  beat: every 3600s → timers") + 1]
    assert beat.strip().endswith(":00:00+00:00")


def test_check_config_accepts_a_fired_one_shot(tmp_path: Path) -> None:
    path = tmp_path / "timers.yaml"
    schedules = {"new-year": {"at": "2001-01-01T00:00:00Z"}}
    cfg = {"gateway": "scheduler", "name": "timers", "layer": "redis://127.0.0.1:1/0"}
    path.write_text(yaml.safe_dump({**cfg, "scheduler": {"schedules": schedules}}))
    done = subprocess.run(
        [sys.executable, "-m", "gateways.scheduler.cli", "--config", str(path), "--check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


async def test_a_restart_with_a_fired_one_shot_in_the_file_keeps_every_schedule(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    soon = time.time() + 4  # after the process started: a first start fires nothing past
    cfg = config(redis_server, "restart-at", {
        "once": {"at": soon, "channel": "once"},
        "beat": {"every": "1s", "channel": "ticks"},
    })  # fmt: skip
    layer = resolve_layer(redis_server.url)
    process = await start(tmp_path, cfg)
    try:
        fired = await asyncio.wait_for(layer.receive("once"), 30)
        assert fired["schedule"] == "once"
        assert await asyncio.to_thread(process.stop) == 0, tail(process)
        # a routine restart with the same file: the one-shot is past now
        restarted = GatewayProcess(process.path, process.health_port, gateway="scheduler")
        await asyncio.to_thread(restarted.start)
        await restarted.wait_ready()
        tick = await asyncio.wait_for(layer.receive("ticks"), 30)
        assert tick["schedule"] == "beat"
        assert await asyncio.to_thread(restarted.stop) == 0, tail(restarted)
        lines = [line for line in restarted.output if "schedule once:" in line]
        assert len(lines) == 1 and "INFO" in lines[0] and lines[0].endswith("skipped")
    finally:
        await layer.close_pools()
        await asyncio.to_thread(process.kill)


async def metric_of(process: GatewayProcess, name: str, **labels: str) -> float:
    return await asyncio.to_thread(process.metric, name, **labels)


@pytest.mark.replicas
async def test_a_resumed_ex_leader_counts_no_misfire_its_successor_counted(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    # a grace shorter than a takeover: the due times of the takeover misfire (skip)
    name = "recount"
    cfg = config(redis_server, name, {
        "beat": {"every": "1s", "channel": "ticks", "misfire": "skip", "misfire_grace": "0.2s"},
    })  # fmt: skip
    first = await start(tmp_path, cfg)
    second: GatewayProcess | None = None
    client = resolve_layer(redis_server.url)
    try:
        async with collecting(redis_server, "ticks") as ticks:
            await wait_role(first, "leader")
            second = await start(tmp_path, cfg)
            await ticks.at_least(3)
            assert first.server is not None and first.server.pid is not None
            os.kill(first.server.pid, signal.SIGSTOP)
            await wait_role(second, "leader")
            await ticks.at_least(len(ticks.messages) + 3)
            os.kill(first.server.pid, signal.SIGCONT)
            await wait_role(first, "standby")
            await ticks.at_least(len(ticks.messages) + 2)
            paused = await command(client, f"{name}.send", {
                "type": "scheduler.pause", "schedule": "beat", "note": "count"})  # fmt: skip
            assert paused["ok"], paused
            messages = await ticks.finish()
            last = await cursor(redis_server.url, name, "beat")
            given_up = [
                await metric_of(p, "scheduler_misses_total", gateway=name) for p in (first, second)
            ]
            assert await asyncio.to_thread(first.stop) == 0, tail(first)
            assert await asyncio.to_thread(second.stop) == 0, tail(second)
    finally:
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(first.server.pid, signal.SIGCONT)  # type: ignore[union-attr, arg-type]
        await client.close_pools()
        await asyncio.to_thread(first.kill)
        if second is not None:
            await asyncio.to_thread(second.kill)
    assert_exactly_once_without_gaps(messages, allow_gaps=True)
    handled = int(last - min(m["scheduled_time"] for m in messages)) + 1  # due times, 1 s apart
    assert sum(given_up) == handled - len(messages), given_up
    stepped_down = [line for line in first.output if "standby now" in line]
    assert len(stepped_down) == 1 and stepped_down[0].endswith(f"standby now: {LOST_LEASE}")
