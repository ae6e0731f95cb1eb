"""Schedule control with two real ``gateway-scheduler`` replicas on one Redis and the example
project's real ``manage.py runworker timers`` (TimerConsumer records every fire it handles):
pause and resume, trigger (also with its leader killed between the trigger and the send),
backfill, the overlap policies fed by ConsumerWorker's ``scheduler.done``, and the
``gateways schedules`` sub-commands."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis import asyncio as aioredis

from core.layers import resolve_layer
from core.testing import GatewayProcess, RedisServer, command, until
from tests.gateways.scheduler.conftest import keys, role, start, tail, wait_role
from tests.support.example import ExampleProject, example_project

pytestmark = pytest.mark.timeout(240)

NAME = "ctl"
SEND = f"{NAME}.send"


def config(url: str, schedules: dict[str, Any], **scheduler: Any) -> dict[str, Any]:
    return {
        "gateway": "scheduler",
        "name": NAME,
        "layer": url,
        "shutdown_grace": 5,
        "scheduler": {"tick": 0.5, "schedules": schedules, **scheduler},
    }


@contextlib.asynccontextmanager
async def replicas(
    directory: Path, cfg: dict[str, Any]
) -> AsyncIterator[tuple[GatewayProcess, GatewayProcess]]:
    """Two replicas of one scheduler; the first is the leader when the block starts."""
    first = await start(directory, cfg)
    second: GatewayProcess | None = None
    try:
        await wait_role(first, "leader")
        second = await start(directory, cfg)
        assert await role(second) == "standby"
        yield first, second
        for process in (first, second):
            if process.alive:
                assert await asyncio.to_thread(process.stop) == 0, tail(process)
    finally:
        for process in (first, second):
            if process is not None:
                await asyncio.to_thread(process.kill)


async def leader_of(*processes: GatewayProcess) -> GatewayProcess:
    for process in processes:
        if process.alive and await role(process) == "leader":
            return process
    raise AssertionError("no leader")


@dataclass(frozen=True)
class Row:
    schedule: str
    kind: str
    run_id: str
    deliveries: int
    missed: int
    scheduled_time: float
    fire_time: float
    started_at: float
    finished_at: float | None
    cancelled: bool


def rows(project: ExampleProject, schedule: str) -> list[Row]:
    """What TimerConsumer recorded for ``schedule``, in the order it handled them."""
    try:
        found = project.rows(
            "SELECT schedule, kind, run_id, deliveries, missed, scheduled_time, fire_time, "
            "started_at, finished_at, cancelled FROM timers_fire WHERE schedule = ? ORDER BY id",
            schedule,
        )
    except Exception:  # the table is being written: ask again
        return []
    return [Row(*r[:9], bool(r[9])) for r in found]


def overlapping(fired: list[Row]) -> list[tuple[Row, Row]]:
    """Fires sent while the run before them had not finished."""
    return [(a, b) for a, b in itertools.pairwise(fired) if b.fire_time < (a.finished_at or 0)]


@contextlib.asynccontextmanager
async def project_and_worker(
    directory: Path, redis: RedisServer, *, start_worker: bool = True
) -> AsyncIterator[tuple[ExampleProject, Any]]:
    project = await asyncio.to_thread(example_project, directory, redis.url)
    worker = project.worker("timers") if start_worker else None
    try:
        yield project, worker
    finally:
        if worker is not None:
            await asyncio.to_thread(worker.stop)


@contextlib.asynccontextmanager
async def client(url: str) -> AsyncIterator[Any]:
    layer = resolve_layer(url)
    try:
        yield layer
    finally:
        await layer.close_pools()


async def history(layer: Any, schedule: str) -> dict[str, Any]:
    listed = await command(layer, SEND, {"type": "scheduler.list", "prefix": schedule})
    assert listed["ok"], listed
    (row,) = [r for r in listed["schedules"] if r["schedule"] == schedule]
    return row


async def metric_sum(name: str, *processes: GatewayProcess, **labels: str) -> float:
    total = 0.0
    for process in processes:
        if process.alive:
            total += await asyncio.to_thread(process.metric, name, gateway=NAME, **labels)
    return total


def long_job(overlap: str, every: str, hold: float) -> dict[str, Any]:
    """A schedule whose runs take ``hold`` seconds in TimerConsumer, longer than its interval."""
    return {
        "every": every,
        "channel": "timers",
        "overlap": overlap,
        "misfire": "skip",
        "misfire_grace": "1s",
        "message": {"hold": hold},
    }


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateways.cli", "schedules", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def test_pause_keeps_the_cursor_and_resume_applies_the_misfire_policy(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    schedules = {
        "beat": {"every": "1s", "channel": "timers", "misfire": "skip", "misfire_grace": "1s"},
        "other": {"every": "1h", "channel": "timers"},
    }
    async with (
        project_and_worker(tmp_path, redis_server) as (project, _),
        client(redis_server.url) as layer,
        replicas(tmp_path, config(redis_server.url, schedules)) as (first, second),
    ):
        await until(lambda: len(rows(project, "beat")) >= 3, timeout=60, what="three beats")
        paused = await command(layer, SEND, {
            "type": "scheduler.pause", "schedule": "beat", "note": "maintenance"})  # fmt: skip
        answered = time.time()
        assert paused["ok"] and paused["changed"] == 1 and paused["schedules"] == ["beat"]
        await asyncio.sleep(3.5)  # due times pass while it is paused
        row = await history(layer, "beat")
        assert row["paused"] and row["pause_note"] == "maintenance" and row["next_fire"] is None
        # no due time after the pause was answered fired: the commit refuses a paused schedule
        assert [r for r in rows(project, "beat") if r.scheduled_time > answered] == []
        resumed = await command(layer, SEND, {
            "type": "scheduler.resume", "schedule": "beat", "note": "back"})  # fmt: skip
        assert resumed["ok"] and resumed["changed"] == 1
        after = await until(
            lambda: [r for r in rows(project, "beat") if r.scheduled_time > answered],
            timeout=60,
            what="beats after the resume",
        )
        assert isinstance(after, list)

        # misfire: skip gave up what passed while paused; the next fire says how many (the
        # history reaches the store on the leader's next lease tick)
        async def paused_entries() -> int:
            row = await history(layer, "beat")
            return sum(h["count"] for h in row["history"] if h["outcome"] == "paused")

        given_up = await until(paused_entries, what="the paused due times in the history")
        assert isinstance(given_up, int) and given_up >= 2
        row = await history(layer, "beat")
        assert after[0].missed == given_up
        leader = await leader_of(first, second)
        assert await metric_sum("scheduler_misses_total", leader, reason="paused") == given_up
        assert not row["paused"] and row["last_due"] >= after[0].scheduled_time
        everything = await command(layer, SEND, {"type": "scheduler.pause", "all": True})
        assert everything["changed"] == 2 and sorted(everything["schedules"]) == ["beat", "other"]
        back = await command(layer, SEND, {"type": "scheduler.resume", "all": True})
        assert back["changed"] == 2
    assert all(r.deliveries == 1 for r in rows(project, "beat"))


async def test_trigger_fires_once_per_request_on_either_replica(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    schedules = {"report": {"every": "1d", "channel": "timers", "message": {"note": "report"}}}
    cfg = config(redis_server.url, schedules)
    async with (
        project_and_worker(tmp_path, redis_server) as (project, _),
        client(redis_server.url) as layer,
        replicas(tmp_path, cfg) as (first, second),
    ):
        asked = {"type": "scheduler.trigger", "schedule": "report", "request_id": "req-1"}
        once = await command(layer, SEND, asked)
        again = await command(layer, SEND, asked)  # a retried request (either replica took it)
        assert once["ok"] and once["created"] is True and again["created"] is False
        assert once["run_id"] == again["run_id"] == "report@manual:req-1"
        done = await asyncio.to_thread(
            cli, "trigger", str(first.path), "report", "--request-id", "cli-1"
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "report: queued, run_id report@manual:cli-1"
        found = await until(lambda: len(rows(project, "report")) >= 2, timeout=60, what="fires")
        assert found
        await asyncio.sleep(1.0)  # a duplicate would arrive right behind
        fired = rows(project, "report")
        assert sorted(r.run_id for r in fired) == ["report@manual:cli-1", "report@manual:req-1"]
        assert {(r.kind, r.deliveries) for r in fired} == {("manual", 1)}
        assert await metric_sum("scheduler_fires_total", first, second, kind="manual") == 2


async def test_a_trigger_fires_exactly_once_when_its_leader_is_killed_before_the_send(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    url = f"{redis_server.url}?capacity=3"
    schedules = {"job": {"every": "1d", "channel": "timers"}}
    # the layer's capacity of 3, not the gateway's own inbound_capacity (100,000), bounds timers
    cfg = {**config(url, schedules), "inbound_capacity": None}
    async with (
        project_and_worker(tmp_path, redis_server, start_worker=False) as (project, _),
        client(url) as layer,
        replicas(tmp_path, cfg) as (first, second),
    ):
        now = time.time()
        for index in range(3):  # the consumer's channel is full: the leader's send waits
            await layer.send("timers", {
                "type": "scheduler.fire", "id": f"filler-{index}", "schedule": "filler",
                "scheduled_time": now, "fire_time": now})  # fmt: skip
        asked = {"type": "scheduler.trigger", "schedule": "job", "request_id": "kill-1"}
        assert (await command(layer, SEND, asked))["created"] is True
        await until(
            lambda: metric_sum("gateway_backpressure_waits_total", first),
            timeout=60,
            what="the leader trying to send the triggered fire",
        )
        await asyncio.to_thread(first.kill)  # between the trigger and the send
        await wait_role(second, "leader")
        worker = project.worker("timers")  # the channel drains: the new leader's send goes in
        try:
            await until(lambda: rows(project, "job"), timeout=60, what="the triggered fire")
            redis = aioredis.Redis.from_url(redis_server.url)

            async def confirmed() -> bool:
                return int(await redis.hlen(keys(NAME, "queued"))) == 0

            try:
                await until(confirmed, timeout=60, what="the new leader confirmed it")
            finally:
                await redis.aclose()
            await asyncio.sleep(1.0)  # a duplicate would arrive right behind
            fired = rows(project, "job")
        finally:
            await asyncio.to_thread(worker.stop)
    assert [(r.run_id, r.kind, r.deliveries) for r in fired] == [("job@manual:kill-1", "manual", 1)]
    assert len(rows(project, "filler")) == 3


async def test_backfill_fires_every_due_time_of_a_past_window_oldest_first(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    schedules = {"hourly": {"every": "1h", "channel": "timers"}}
    cfg = config(redis_server.url, schedules, backfill_limit=10)
    async with (
        project_and_worker(tmp_path, redis_server) as (project, _),
        client(redis_server.url) as layer,
        replicas(tmp_path, cfg) as (_, second),
    ):
        now = time.time()
        asked = {"type": "scheduler.backfill", "schedule": "hourly", "from": now - 5 * 3600,
                 "to": now, "request_id": "bf-1"}  # fmt: skip
        result = await command(layer, SEND, asked)
        assert result["ok"] and result["created"] and result["count"] == 5, result
        again = await command(layer, SEND, asked)
        assert again["created"] is False and again["count"] == 5
        too_many = await command(layer, SEND, {**asked, "from": now - 20 * 3600, "request_id": "x"})
        assert too_many["ok"] is False and "backfill_limit" in too_many["error"]
        future = await command(layer, SEND, {**asked, "to": now + 3600, "request_id": "y"})
        assert future["ok"] is False and future["error"].startswith("to: is in the future")
        # the CLI: yesterday's due times between 10:00 and 12:00 UTC
        day = time.strftime("%Y-%m-%d", time.gmtime(now - 86400))
        done = await asyncio.to_thread(
            cli, "backfill", str(second.path), "hourly",
            "--from", f"{day}T10:00:00Z", "--to", f"{day}T12:00:00Z", "--request-id", "bf-2",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("hourly: 3 due time(s) queued")
        await until(lambda: len(rows(project, "hourly")) >= 8, timeout=60, what="eight fires")
        await asyncio.sleep(1.0)  # a duplicate would arrive right behind
        fired = rows(project, "hourly")
    assert len(fired) == 8 and {(r.kind, r.deliveries) for r in fired} == {("backfill", 1)}
    first_request = [r.scheduled_time for r in fired if r.run_id.endswith(":backfill:bf-1")]
    assert first_request == sorted(first_request) and len(first_request) == 5
    assert all(now - 5 * 3600 <= t <= now and t % 3600 == 0 for t in first_request)


async def test_overlap_skip_waits_for_the_run_the_worker_reports_done(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    schedules = {"slow": long_job("skip", "1s", 2.5)}
    async with (
        project_and_worker(tmp_path, redis_server) as (project, _),
        client(redis_server.url) as layer,
        replicas(tmp_path, config(redis_server.url, schedules)) as (first, second),
    ):
        await until(
            lambda: len([r for r in rows(project, "slow") if r.finished_at]) >= 3,
            timeout=90,
            what="three finished runs",
        )
        await command(layer, SEND, {"type": "scheduler.pause", "schedule": "slow"})
        row = await history(layer, "slow")
        skipped = await metric_sum("scheduler_misses_total", first, second, reason="overlap")
        reported = await metric_sum("scheduler_runs_finished_total", first, second, how="done")
        fired = rows(project, "slow")
    # each fire went out only once the previous run had finished and said so
    assert overlapping(fired) == []
    assert skipped >= 2 and "skipped-overlap" in {h["outcome"] for h in row["history"]}
    assert reported >= 3
    assert all(r.deliveries == 1 for r in fired)


async def test_overlap_buffer_one_sends_the_held_fire_when_the_run_finished(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    schedules = {"held": long_job("buffer_one", "1s", 2.5)}
    async with (
        project_and_worker(tmp_path, redis_server) as (project, _),
        client(redis_server.url) as layer,
        replicas(tmp_path, config(redis_server.url, schedules)),
    ):
        await until(
            lambda: len([r for r in rows(project, "held") if r.finished_at]) >= 3,
            timeout=90,
            what="three finished runs",
        )
        await command(layer, SEND, {"type": "scheduler.pause", "schedule": "held"})
        row = await history(layer, "held")
        held = {h["due"] for h in row["history"] if h["outcome"] == "buffered"}
        sent_later = {
            h["due"] for h in row["history"] if h["outcome"] == "sent" and h["kind"] == "buffered"
        }
        assert held & sent_later  # a due time held back, then sent once the run before it finished
        # "sent" is the layer's word: the last one may still be on its way to the worker
        await until(
            lambda: {r.scheduled_time for r in rows(project, "held")} >= held & sent_later,
            timeout=30,
            what="every held fire handled by the worker",
        )
        fired = rows(project, "held")
    assert overlapping(fired) == []


async def test_overlap_cancel_other_cancels_the_running_run_and_fires(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    schedules = {"fresh": long_job("cancel_other", "2s", 3)}
    async with (
        project_and_worker(tmp_path, redis_server) as (project, _),
        client(redis_server.url) as layer,
        replicas(tmp_path, config(redis_server.url, schedules)) as (first, second),
    ):
        await until(
            lambda: [r for r in rows(project, "fresh") if r.cancelled],
            timeout=90,
            what="a run cancelled by the next fire",
        )
        await command(layer, SEND, {"type": "scheduler.pause", "schedule": "fresh"})
        row = await history(layer, "fresh")
        cancelled = await metric_sum(
            "scheduler_runs_finished_total", first, second, how="cancelled"
        )
    assert cancelled >= 1
    assert "skipped-overlap" not in {h["outcome"] for h in row["history"]}


async def test_gateways_schedules_sub_commands(tmp_path: Path, redis_server: RedisServer) -> None:
    schedules = {"beat": {"every": "1h"}, "job": {"every": "1d"}}
    async with replicas(tmp_path, config(redis_server.url, schedules)) as (first, _):
        path = str(first.path)
        listed = await asyncio.to_thread(cli, "list", path)
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.splitlines()[0].split() == [
            "SCHEDULE", "NEXT", "FIRE", "LAST", "DUE", "STATE", "OVERLAP", "RUNS"]  # fmt: skip
        assert any(line.split()[:1] == ["beat"] for line in listed.stdout.splitlines())
        paused = await asyncio.to_thread(cli, "pause", path, "beat", "--note", "quiet please")
        assert (paused.returncode, paused.stdout.strip()) == (0, "paused 1: beat")
        shown = await asyncio.to_thread(cli, "list", path, "--json", "--prefix", "beat")
        (row,) = json.loads(shown.stdout)["schedules"]
        assert row["paused"] and row["pause_note"] == "quiet please"
        resumed = await asyncio.to_thread(cli, "resume", path, "--all")
        assert (resumed.returncode, resumed.stdout.strip()) == (0, "resumed 1: beat")
        unknown = await asyncio.to_thread(cli, "trigger", path, "nosuch")
        assert unknown.returncode == 1
        assert "trigger: schedule: no schedule 'nosuch'" in unknown.stderr
        done = await asyncio.to_thread(cli, "done", path, "job@1.000")
        assert (done.returncode, done.stdout.strip()) == (0, "job@1.000: was not running")
        memory = await asyncio.to_thread(cli, "list", path, "--layer", "memory://")
        assert memory.returncode == 2 and "memory://" in memory.stderr
    # nobody answers on the layer any more
    silent = await asyncio.to_thread(cli, "list", path, "--timeout", "1")
    assert silent.returncode == 3 and "no answer" in silent.stderr
