"""The scheduler in this process on a real Redis (and on SQLite): start-up, downtime and the
misfire policies, commands, pushback from a full channel."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from channels.exceptions import ChannelFull
from channels.layers import InMemoryChannelLayer
from redis.exceptions import ConnectionError as RedisConnectionError

from core.retry import StartupError
from core.testing import RedisServer, command, metric, receive, run_gateway, until
from gateways.scheduler.config import SchedulerGatewayConfig
from gateways.scheduler.gateway import SchedulerGateway
from tests.gateways.scheduler.conftest import (
    ShiftedClock,
    cursor,
    running,
    scheduler_config,
)

pytestmark = pytest.mark.timeout(120)


async def test_a_first_start_fires_nothing_from_the_past(redis_server: RedisServer) -> None:
    name = "first-start"
    schedules = {
        "minutely": {"every": "1m", "misfire": "all"},
        "daily": {"cron": "0 0 * * *", "misfire": "once"},
    }
    clock = ShiftedClock()
    async with running(scheduler_config(name, schedules), redis_server.url, clock) as (gw, _):
        await until(lambda: gw.leader, what="leader")
        started = clock.wall()
        value = await until(lambda: gw.entries["daily"].cursor, what="cursors loaded")
        assert isinstance(value, float) and abs(value - started) < 5
        assert await cursor(redis_server.url, name, "minutely") == gw.entries["minutely"].cursor
    assert metric("scheduler_misses_total", gateway=name) == 0
    assert metric("scheduler_fires_total", gateway=name) == 0


@pytest.mark.parametrize(
    ("policy", "cap", "fired"),
    [("skip", 100, 0), ("once", 100, 1), ("all", 3, 3)],
)
async def test_misfire_policy_after_downtime(
    redis_server: RedisServer, policy: str, cap: int, fired: int
) -> None:
    name = f"downtime-{policy}"
    schedules = {
        "tick": {"every": "1m", "misfire": policy, "misfire_cap": cap, "misfire_grace": "10s"}
    }
    config = scheduler_config(name, schedules)
    clock = ShiftedClock()
    async with running(config, redis_server.url, clock) as (gw, _):
        await until(lambda: gw.entries["tick"].cursor, what="cursor stored")
    before = await cursor(redis_server.url, name, "tick")
    assert before is not None
    # down for ten and a half minutes: wall time 30 s past a minute, 11 due times behind
    first_due = math.ceil(before / 60) * 60
    clock.offset = first_due + 630 - clock.wall() + clock.offset - 0.0
    last_due = first_due + 600
    async with running(config, redis_server.url, clock) as (gw, layer):
        await until(
            lambda: gw.entries["tick"].cursor == last_due, what="caught up to the last due time"
        )
        fires = [await receive(layer, name) for _ in range(fired)]
        assert metric("scheduler_misses_total", gateway=name, reason="misfire") == 11 - fired
        assert metric("scheduler_fires_total", gateway=name) == fired
    assert [f["scheduled_time"] for f in fires] == [last_due - 60 * k for k in range(fired)][::-1]
    if fired:
        assert fires[0]["missed"] == 11 - fired
    assert await cursor(redis_server.url, name, "tick") == last_due


async def test_add_is_idempotent_and_a_one_shot_fires_once(redis_server: RedisServer) -> None:
    name = "adds"
    async with running(scheduler_config(name, {}), redis_server.url) as (gw, layer):
        await until(lambda: gw.leader, what="leader")
        add = {
            "type": "scheduler.add",
            "schedule": "remind-1",
            "in": 0.5,
            "message": {"note": "tea"},
        }
        first = await command(layer, f"{name}.send", add)
        assert first["ok"] and first["created"] is True
        again = await command(layer, f"{name}.send", add)
        assert again["ok"] and again["created"] is False
        fire = await receive(layer, name)
        assert (fire["type"], fire["schedule"], fire["note"]) == (
            "scheduler.fire",
            "remind-1",
            "tea",
        )
        assert fire["reply_channel"] == f"{name}.send"
        retried = await command(layer, f"{name}.send", add)
        assert retried["ok"] and retried["done"] is True and retried["created"] is False
        listed = await command(layer, f"{name}.send", {"type": "scheduler.list"})
        assert listed["schedules"] == [] and listed["leader"] is True
    assert metric("scheduler_fires_total", gateway=name) == 1


async def test_commands_list_remove_and_refuse(redis_server: RedisServer) -> None:
    name = "cmds"
    schedules = {"nightly": {"cron": "0 3 * * *", "timezone": "Europe/Berlin"}}
    async with running(scheduler_config(name, schedules), redis_server.url) as (gw, layer):
        send = f"{name}.send"
        ok = await command(
            layer,
            send,
            {"type": "scheduler.add", "schedule": "poll", "every": "1h", "channel": "pollers"},
        )
        assert ok["ok"] and ok["created"] and ok["next_fire"] % 3600 == 0
        listed = await command(layer, send, {"type": "scheduler.list"})
        rows = {r["schedule"]: r for r in listed["schedules"]}
        assert rows["nightly"]["source"] == "yaml" and rows["nightly"]["kind"] == "cron"
        assert rows["poll"]["channel"] == "pollers" and rows["poll"]["what"] == "every 3600s"
        bad = await command(
            layer, send, {"type": "scheduler.add", "schedule": "x", "cron": "0 0 30 2 * * *"}
        )
        assert bad["ok"] is False and bad["error"].startswith("cron:")
        past = await command(
            layer, send, {"type": "scheduler.add", "schedule": "x", "at": "2001-01-01T00:00:00Z"}
        )
        assert past["ok"] is False and past["error"] == "at: is in the past"
        yaml = await command(layer, send, {"type": "scheduler.remove", "schedule": "nightly"})
        assert yaml["ok"] is False and "YAML" in yaml["error"]
        removed = await command(layer, send, {"type": "scheduler.remove", "schedule": "poll"})
        assert removed["ok"] and removed["removed"] is True
        gone = await command(layer, send, {"type": "scheduler.remove", "schedule": "poll"})
        assert gone["ok"] and gone["removed"] is False
        await until(lambda: "poll" not in gw.entries, what="entry dropped")
        unknown = await command(layer, send, {"type": "scheduler.frobnicate"})
        assert unknown["ok"] is False


async def test_a_full_channel_is_retried_until_the_deadline_then_missed(
    redis_server: RedisServer,
) -> None:
    name = "pushback"
    schedules = {"beat": {"every": "1s", "channel": "slow", "misfire_grace": "1s"}}
    # the layer's capacity (1), not the gateway's inbound_capacity: the channel fills up
    settings = {**scheduler_config(name, schedules), "inbound_capacity": None}
    async with running(settings, f"{redis_server.url}?capacity=1") as (
        _gw,
        layer,
    ):
        await layer.send("slow", {"type": "filler"})
        await until(
            lambda: metric("scheduler_misses_total", gateway=name, reason="deadline") >= 1,
            what="a fire missed its deadline",
        )
        assert (await receive(layer, "slow"))["type"] == "filler"
        fire = await receive(layer, "slow")
        assert fire["type"] == "scheduler.fire" and fire["schedule"] == "beat"
        assert metric("gateway_backpressure_waits_total", gateway=name) >= 1


async def test_a_lease_lost_and_taken_again_during_a_pushback_keeps_the_schedule_firing(
    redis_server: RedisServer,
) -> None:
    """The lease lapses while a fire is pushed back (a stalled process; CI's lowest-versions
    run hit it): the leader steps down, takes the lease again under a new token, and the
    schedule fires again once the channel has room. Before, the fire loop dropped the busy
    entry's heap place and the old run did not reschedule it under the new token: the
    schedule never fired again."""
    name = "flap"
    schedules = {"beat": {"every": "1s", "channel": "slow", "misfire_grace": "1s"}}
    settings = {**scheduler_config(name, schedules), "inbound_capacity": None}
    async with running(settings, f"{redis_server.url}?capacity=1") as (gateway, layer):
        await layer.send("slow", {"type": "filler"})
        await until(
            lambda: metric("gateway_backpressure_waits_total", gateway=name) >= 1,
            what="a fire pushed back",
        )
        first = gateway.token
        raw = redis.Redis.from_url(redis_server.url)
        try:
            leases = raw.keys(f"*{name}*lease*")
            assert leases, raw.keys("*")
            raw.delete(*leases)  # what an expired lease looks like to its holder
        finally:
            raw.close()
        await until(
            lambda: gateway.token is not None and gateway.token != first,
            what="the lease taken again under a new token",
        )
        await until(
            lambda: metric("scheduler_misses_total", gateway=name, reason="deadline") >= 1,
            what="the pushed-back fire missed its deadline",
        )
        assert (await receive(layer, "slow"))["type"] == "filler"
        fire = await receive(layer, "slow", timeout=10)
        assert fire["type"] == "scheduler.fire" and fire["schedule"] == "beat"


def sqlite_gateway(path: Path, name: str = "local") -> SchedulerGateway:
    config: dict[str, Any] = scheduler_config(name, {}, state_file=str(path))
    layer = InMemoryChannelLayer(capacity=100)
    return SchedulerGateway(SchedulerGatewayConfig.model_validate(config), layer)


async def test_sqlite_keeps_run_time_schedules_and_admits_one_process(tmp_path: Path) -> None:
    state = tmp_path / "state" / "timers.sqlite3"
    gateway = sqlite_gateway(state)
    async with run_gateway(gateway):
        assert gateway.status()[0].startswith("role: leader")
        result = await command(
            gateway.layer, "local.send", {"type": "scheduler.add", "schedule": "later", "in": "1h"}
        )
        assert result["ok"] and result["created"]
        second = sqlite_gateway(state)
        with pytest.raises(StartupError, match="another scheduler process"):
            async with run_gateway(second):
                pass
    restarted = sqlite_gateway(state)
    async with run_gateway(restarted):
        await until(lambda: "later" in restarted.entries, what="run-time schedule restored")
        entry = restarted.entries["later"]
        assert entry.spec.source == "runtime" and entry.spec.kind == "at"


async def test_a_state_file_that_is_no_database_leaves_nothing_open(tmp_path: Path) -> None:
    """Start-up fails with the reason, and closes the connection and releases the lock it took
    (issue 29): the second start meets the same file, not a lock the first one kept."""
    state = tmp_path / "timers.sqlite3"
    state.write_bytes(b"not a database, " * 1000)
    for _ in range(2):
        with pytest.raises(StartupError, match="file is not a database"):
            async with run_gateway(sqlite_gateway(state)):
                pass
    gc.collect()  # a connection left to the collector warns here on 3.13 (an error)


async def test_redis_down_makes_the_leader_step_down_and_firing_resumes(
    durable_redis_server: RedisServer,
) -> None:
    name = "outage"
    schedules = {"beat": {"every": "1s", "misfire_grace": "1s", "misfire": "skip"}}
    async with running(scheduler_config(name, schedules), durable_redis_server.url) as (gw, layer):
        first = await receive(layer, name)
        await asyncio.to_thread(durable_redis_server.kill)
        # it can no longer prove it holds the lease: it stops firing and says why
        await until(lambda: not gw.leader, what="stepped down")
        assert any("state store unreachable" in r for r in gw.ready_reasons())
        await asyncio.to_thread(durable_redis_server.restart)
        await until(lambda: gw.leader, what="leader again")
        seen = [first["scheduled_time"]]
        while seen[-1] < first["scheduled_time"] + 2:  # fires resume after the outage
            try:
                seen.append((await receive(layer, name))["scheduled_time"])
            except RedisConnectionError:  # the test's own connection, cut by the restart
                continue
        # the message received right before the kill may come again: core.layers restores
        # receives Redis had not seen acknowledged (at least once); the scheduler fired it once
        later = [t for t in seen[1:] if t != first["scheduled_time"]]
        assert len(later) == len(set(later))
        await until(lambda: not gw.ready_reasons(), what="ready again")


async def test_adds_taken_by_either_replica_fire_once(redis_server: RedisServer) -> None:
    name = "two-in-one"
    config = scheduler_config(name, {})
    async with (
        running(config, redis_server.url) as (first, layer),
        running(config, redis_server.url) as (second, _),
    ):
        await until(lambda: first.leader != second.leader, what="one leader, one standby")
        for index in range(6):  # both processes read the command channel: each takes some
            result = await command(layer, f"{name}.send", {
                "type": "scheduler.add", "schedule": f"r{index}", "in": 0.5,
                "message": {"n": index}})  # fmt: skip
            assert result["ok"] and result["created"], result
        fires = [await receive(layer, name) for _ in range(6)]
        assert sorted(f["n"] for f in fires) == list(range(6))
        await until(lambda: not first.entries and not second.entries, what="one-shots done")
    assert metric("scheduler_fires_total", gateway=name) == 6
    took = metric("gateway_commands_total", gateway=name, type="scheduler.add", outcome="ok")
    assert took == 6


async def test_a_pending_one_shot_fires_after_a_restart_on_sqlite(tmp_path: Path) -> None:
    state = tmp_path / "timers.sqlite3"
    gateway = sqlite_gateway(state, "restart-local")
    async with run_gateway(gateway):
        result = await command(gateway.layer, "restart-local.send", {
            "type": "scheduler.add", "schedule": "soon", "in": "2s"})  # fmt: skip
        assert result["ok"]
    restarted = sqlite_gateway(state, "restart-local")
    async with run_gateway(restarted):
        fire = await receive(restarted.layer, "restart-local")
        assert fire["schedule"] == "soon"
        await until(lambda: "soon" not in restarted.entries, what="one-shot removed")
    again = sqlite_gateway(state, "restart-local")
    async with run_gateway(again):
        assert "soon" not in again.entries
        retried = await command(again.layer, "restart-local.send", {
            "type": "scheduler.add", "schedule": "soon", "in": "2s"})  # fmt: skip
        assert retried["done"] is True


async def test_a_changed_yaml_schedule_starts_again_at_now(redis_server: RedisServer) -> None:
    name = "changed"
    clock = ShiftedClock()
    hourly = scheduler_config(name, {"job": {"every": "1h", "misfire": "all"}})
    async with running(hourly, redis_server.url, clock) as (gw, _):
        await until(lambda: gw.entries["job"].cursor, what="cursor stored")
    clock.offset += 3 * 3600  # down for three hours, and the file was edited meanwhile
    edited = scheduler_config(name, {"job": {"every": "30m", "misfire": "all"}})
    async with running(edited, redis_server.url, clock) as (gw, _):
        value = await until(lambda: gw.entries["job"].cursor, what="cursor loaded")
        assert isinstance(value, float) and abs(value - clock.wall()) < 5
    assert metric("scheduler_fires_total", gateway=name) == 0
    assert metric("scheduler_misses_total", gateway=name) == 0


# -- issue 22 ---------------------------------------------------------------------------------


async def test_missed_counts_what_skip_gave_up_before_the_next_fire(
    redis_server: RedisServer,
) -> None:
    name = "missed-skip"
    schedules = {"tick": {"every": "10s", "misfire": "skip", "misfire_grace": "1s"}}
    config = scheduler_config(name, schedules)
    clock = ShiftedClock()
    async with running(config, redis_server.url, clock) as (gw, _):
        await until(lambda: gw.entries["tick"].cursor, what="cursor stored")
    # down for about 100 s, back 4 s after a due time: ~10 due times misfired, none on time
    later = clock.wall() + 100
    clock.offset += math.floor(later / 10) * 10 + 4 - clock.wall()
    async with running(config, redis_server.url, clock) as (gw, layer):
        fire = await receive(layer, name, timeout=30)  # the next due time, on time
        given_up = metric("scheduler_misses_total", gateway=name, reason="misfire")
        assert given_up >= 9
        assert fire["missed"] == given_up


class LoopLag:
    """The worst lateness of this event loop's timers while the block runs: what a deadline
    check in the same loop may overshoot by on a loaded machine."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(0.02)
            self.worst = max(self.worst, loop.time() - started - 0.02)

    async def __aenter__(self) -> LoopLag:
        self._task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class GatedLayer(InMemoryChannelLayer):  # type: ignore[misc]
    """An in-memory layer that refuses every send to ``gated`` while ``closed``, and records
    when each attempt was made."""

    def __init__(self, gated: str) -> None:
        super().__init__(capacity=1000)
        self.gated = gated
        self.closed = True
        self.attempts: list[tuple[float, dict[str, Any]]] = []

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        if channel == self.gated:
            self.attempts.append((time.time(), message))
            if self.closed:
                raise ChannelFull(channel)
        await super().send(channel, message)


def gated_gateway(path: Path, name: str, schedules: dict[str, Any], **settings: Any) -> Any:
    config = scheduler_config(name, schedules, state_file=str(path), **settings)
    layer = GatedLayer("slow")
    return SchedulerGateway(SchedulerGatewayConfig.model_validate(config), layer)


async def test_a_pushed_back_fire_is_tried_only_until_its_own_fire_time_plus_the_grace(
    tmp_path: Path,
) -> None:
    name = "grace-limit"
    schedules = {"beat": {"every": "1s", "channel": "slow", "misfire_grace": "3s"}}
    gateway = gated_gateway(tmp_path / "state.sqlite3", name, schedules)
    lag = LoopLag()
    layer = gateway.layer

    def tried() -> int:  # distinct due times attempted so far
        return len({m["scheduled_time"] for _, m in layer.attempts})

    async with run_gateway(gateway), lag:
        # the fourth due time can be tried after the third miss is counted: waited for, not
        # raced (seen in CI: the snapshot came between the third miss and that first attempt)
        await until(
            lambda: (
                metric("scheduler_misses_total", gateway=name, reason="deadline") >= 3
                and tried() >= 4
            ),
            timeout=60,
            what="three fires missed their deadline and a fourth was tried",
        )
        attempts = list(gateway.layer.attempts)
        gateway.layer.closed = False
        fire = await receive(gateway.layer, "slow")
    # a fire waiting behind a pushed-back one keeps its own deadline: no attempt after it, but
    # for the event loop's own lateness (measured: a busy CI machine runs timers late)
    allowed = 3 + 0.1 + lag.worst
    late = [(t, m["scheduled_time"]) for t, m in attempts if t > m["scheduled_time"] + allowed]
    assert late == []
    assert len({m["scheduled_time"] for _, m in attempts}) >= 4
    assert fire["type"] == "scheduler.fire"


async def test_list_shows_last_due_only_once_a_due_time_was_handled(
    redis_server: RedisServer,
) -> None:
    name = "last-due"
    schedules = {"beat": {"every": "1s"}}
    async with running(scheduler_config(name, schedules), redis_server.url) as (gw, layer):
        send = f"{name}.send"
        added = await command(
            layer, send, {"type": "scheduler.add", "schedule": "later", "in": "1h"}
        )
        assert added["ok"]
        fire = await receive(layer, name)
        await until(lambda: gw.entries["beat"].cursor == fire["scheduled_time"], what="cursor")
        listed = await command(layer, send, {"type": "scheduler.list"})
        rows = {r["schedule"]: r for r in listed["schedules"]}
        assert rows["later"]["last_due"] is None  # never fired: no due time handled yet
        assert rows["later"]["next_fire"] == added["next_fire"]
        assert rows["beat"]["last_due"] >= fire["scheduled_time"]


async def test_a_past_yaml_at_is_skipped_with_one_info_line(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    name = "past-at"
    schedules = {"new-year": {"at": "2001-01-01T00:00:00Z"}, "beat": {"every": "1s"}}
    caplog.set_level(logging.INFO, logger="gateway.scheduler")
    async with running(scheduler_config(name, schedules), redis_server.url) as (_, layer):
        fires = [await receive(layer, name) for _ in range(2)]
        assert {f["schedule"] for f in fires} == {"beat"}
        listed = await command(layer, f"{name}.send", {"type": "scheduler.list"})
        rows = {r["schedule"]: r for r in listed["schedules"]}
        assert rows["new-year"]["next_fire"] is None
    lines = [r.getMessage() for r in caplog.records if "new-year" in r.getMessage()]
    assert lines == [
        f"{name}: schedule new-year: at 2001-01-01T00:00:00+00:00 is past (it fired, or passed "
        "before the schedule was known): skipped"
    ]
    assert all(r.levelno == logging.INFO for r in caplog.records if "new-year" in r.getMessage())


async def test_controls_on_sqlite_pause_trigger_backfill_overlap_and_run_timeout(
    tmp_path: Path,
) -> None:
    """The same commands on the single-process SQLite store (no Redis)."""
    name = "controls-local"
    schedules = {
        "job": {"every": "1h", "channel": "slow", "overlap": "skip", "run_timeout": "2s"},
        "other": {"every": "1h", "channel": "slow", "overlap": "buffer_one"},
    }
    gateway = gated_gateway(tmp_path / "state.sqlite3", name, schedules)
    gateway.layer.closed = False
    layer, send = gateway.layer, f"{name}.send"
    async with run_gateway(gateway):
        paused = await command(layer, send, {"type": "scheduler.pause", "all": True, "note": "x"})
        assert paused["ok"] and paused["changed"] == 2
        first = await command(layer, send, {
            "type": "scheduler.trigger", "schedule": "job", "request_id": "r1"})  # fmt: skip
        again = await command(layer, send, {
            "type": "scheduler.trigger", "schedule": "job", "request_id": "r1"})  # fmt: skip
        assert first["created"] is True and again["created"] is False  # idempotent
        fire = await receive(layer, "slow")  # a trigger fires even while paused
        assert (fire["run_id"], fire["manual"], fire["report_done"]) == (
            "job@manual:r1", True, "worker")  # fmt: skip
        # a second trigger while the first run is unfinished: overlap skip skips it
        await command(layer, send, {"type": "scheduler.trigger", "schedule": "job"})
        listed = await command(layer, send, {"type": "scheduler.list", "prefix": "job"})
        (row,) = listed["schedules"]
        assert row["paused"] and row["pause_note"] == "x" and row["next_fire"] is None
        assert [r["run_id"] for r in row["running"]] == ["job@manual:r1"]
        await until(
            lambda: metric("scheduler_misses_total", gateway=name, reason="overlap") == 1,
            what="the second trigger skipped",
        )
        # nobody reports done: the run ends at its run_timeout, then a trigger fires again
        await until(
            lambda: metric("scheduler_runs_finished_total", gateway=name, how="timeout") == 1,
            what="the run timed out",
        )
        await command(layer, send, {"type": "scheduler.trigger", "schedule": "job"})
        assert (await receive(layer, "slow"))["manual"] is True
        # buffer_one: a backfill of three while the first runs: one held back, one skipped
        now = time.time()
        backfill = await command(layer, send, {
            "type": "scheduler.backfill", "schedule": "other", "from": now - 3 * 3600 - 1,
            "to": now})  # fmt: skip
        assert backfill["ok"] and backfill["count"] == 3
        first_run = await receive(layer, "slow")
        assert first_run["backfill"] is True
        await until(
            lambda: metric("scheduler_misses_total", gateway=name, reason="overlap") == 2,
            what="the third backfilled due time skipped",
        )
        done = await command(layer, send, {"type": "scheduler.done", "run_id": first_run["run_id"]})
        assert done["finished"] is True and done["schedule"] == "other"
        held = await receive(layer, "slow")  # the held back one, once the first finished
        assert held["scheduled_time"] == first_run["scheduled_time"] + 3600
        unknown = await command(layer, send, {"type": "scheduler.done", "run_id": "nope"})
        assert unknown["ok"] and unknown["finished"] is False
        resumed = await command(layer, send, {"type": "scheduler.resume", "schedule": "job"})
        assert resumed["changed"] == 1
        history = (await command(layer, send, {"type": "scheduler.list"}))["schedules"]
        outcomes = {r["schedule"]: [h["outcome"] for h in r["history"]] for r in history}
        assert outcomes["job"][:3] == ["sent", "skipped-overlap", "sent"]
        assert sorted(outcomes["other"]) == ["buffered", "sent", "sent", "skipped-overlap"]
