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
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.layers import resolve_layer
from core.testing import WAIT, GatewayProcess, RedisServer, command, until

pytestmark = pytest.mark.timeout(180)


def config(redis: RedisServer, name: str, schedules: dict[str, Any]) -> dict[str, Any]:
    return {
        "gateway": "scheduler",
        "name": name,
        "layer": redis.url,
        "shutdown_grace": 5,
        "scheduler": {"tick": 0.5, "schedules": schedules},
    }


async def start(directory: Path, cfg: dict[str, Any]) -> GatewayProcess:
    process = GatewayProcess.from_config(directory, cfg)
    await asyncio.to_thread(process.start)
    await process.wait_ready()
    return process


def tail(process: GatewayProcess) -> str:
    return process.server.tail() if process.server is not None else ""


async def role(process: GatewayProcess) -> str:
    status, body = await asyncio.to_thread(process.get, "/readyz")
    assert status == 200, body  # a standby is ready too
    return "leader" if "role: leader" in body else "standby"


async def wait_role(process: GatewayProcess, wanted: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while await role(process) != wanted:
        if loop.time() > deadline:
            raise TimeoutError(f"{process.path.name} never became {wanted}")
        await asyncio.sleep(0.05)


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


def assert_exactly_once_without_gaps(messages: list[dict[str, Any]], step: float = 1.0) -> None:
    times = [m["scheduled_time"] for m in messages]
    duplicates = {t: n for t, n in Counter(times).items() if n > 1}
    assert duplicates == {}
    ordered = sorted(times)
    gaps = [(a, b) for a, b in itertools.pairwise(ordered) if b - a != step]
    assert gaps == []


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
            assert "standby now" in first.server.tail()
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
        ({"at": "2001-01-01T00:00:00Z"}, "scheduler.schedules.bad.at: is in the past"),
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
