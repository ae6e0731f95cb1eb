"""``SchedulerGateway``: the clock → timed messages on the layer; ``scheduler.add`` & co.

Roles. Every process runs a **lease loop**: a standby tries to take the lease every half tick,
the leader renews it every third of a tick (and steps down when the store says it is no longer
the holder, or when it could not renew for a whole lease). Only the leader fires. With a SQLite
store (no Redis layer) the one process is always the leader.

Firing. The leader keeps one entry per schedule (YAML ones, and run-time ones read from the
store whenever its ``version`` changes) with its **cursor** (loaded from the store when it
becomes leader; a schedule seen for the first time starts at *now*, so nothing in the past fires
at a first start) and a heap of fire times. When an entry's time comes, one task (at most
``max_in_flight`` at once, one per schedule) asks :func:`translate.catch_up` what to do, commits
each fire with the fenced script of :mod:`connection` and only then sends it with
:meth:`Gateway.publish`, retrying while the layer is full or down until the fire's misfire
deadline (fire time + ``misfire_grace``); then it counts the fire as missed and logs it.
Misfire-policy decisions are counted and logged the same way. Then the entry is rescheduled.

Metrics (beside the core ones): ``scheduler_fires_total``, ``scheduler_misses_total{reason}``
(``misfire``: given up by the policy, ``deadline``: the layer did not take it in time,
``store``: the store could not commit it in time, ``refused``: the message can never be sent),
``scheduler_lateness_seconds`` (histogram: send time - fire time), ``scheduler_leader``,
``scheduler_schedules``, ``scheduler_leader_changes_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import os
import platform
import uuid
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from core.clock import LOOP_CLOCK, Clock
from core.envelope import Command, CommandError, check_payload
from core.metrics import REGISTRY
from core.redis import layer_redis
from core.service import Backoff, EventRefused, Gateway, StartupError, cancel_and_wait, handles
from core.types import ChannelLayer
from gateways.scheduler.config import SchedulerGatewayConfig
from gateways.scheduler.connection import (
    RedisStore,
    SqliteStore,
    StateStore,
    StoreUnavailable,
    dumps,
)
from gateways.scheduler.translate import (
    ScheduleError,
    Spec,
    catch_up,
    describe,
    fingerprint,
    fire_message,
    jitter_offset,
    next_fire,
    parse_list,
    parse_remove,
    spec_from_command,
)

__all__ = ["SchedulerGateway"]

_FIRES = Counter(
    "scheduler_fires", "Due times fired (accepted by the layer)", ["gateway"], registry=REGISTRY
)
_MISSES = Counter(
    "scheduler_misses",
    "Due times not fired, by reason (misfire, deadline, store, refused)",
    ["gateway", "reason"],
    registry=REGISTRY,
)
_LATENESS = Histogram(
    "scheduler_lateness_seconds",
    "Seconds between a fire's planned time (due + jitter) and the layer accepting it",
    ["gateway"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)
_LEADER = Gauge(
    "scheduler_leader",
    "1 while this process holds the lease and fires",
    ["gateway"],
    registry=REGISTRY,
)
_SCHEDULES = Gauge("scheduler_schedules", "Schedules known", ["gateway"], registry=REGISTRY)
_CHANGES = Counter(
    "scheduler_leader_changes",
    "Times this process became the leader",
    ["gateway"],
    registry=REGISTRY,
)


@dataclass
class _Entry:
    spec: Spec
    #: the last handled due time; None until loaded (this process became leader)
    cursor: float | None = None
    #: bumped whenever the entry is rescheduled or dropped: stale heap items are skipped
    generation: int = 0
    busy: bool = False
    fire_at: float | None = None


class SchedulerGateway(Gateway[SchedulerGatewayConfig]):
    """The scheduler daemon; see the module docstring."""

    protocol = "scheduler"
    config_model = SchedulerGatewayConfig
    command_concurrency = 16

    def __init__(
        self,
        config: SchedulerGatewayConfig,
        layer: ChannelLayer,
        *,
        clock: Clock = LOOP_CLOCK,
        store: StateStore | None = None,
    ) -> None:
        super().__init__(config, layer)
        self.settings = settings = config.scheduler
        self.clock = clock
        self.store = store if store is not None else self._make_store()
        self.owner = f"{platform.node()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.yaml_ids = set(settings.schedules)
        self.entries: dict[str, _Entry] = {
            spec.id: _Entry(spec) for spec in settings.specs(config.inbound_channel)
        }
        #: the fencing token while this process is the leader
        self.token: int | None = None
        self._heap: list[tuple[float, int, str]] = []
        self._wake = asyncio.Event()
        self._version = -1
        self._refresh_lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(settings.max_in_flight)
        self._runs: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._store_problem: str | None = None
        self._dead: str | None = None
        self._renewed = 0.0
        self._firing = True
        self.fires = _FIRES.labels(self.name)
        self.lateness = _LATENESS.labels(self.name)
        _SCHEDULES.labels(self.name).set(len(self.entries))

    def _make_store(self) -> StateStore:
        redis = layer_redis(self.layer, self.protocol, self.name)
        if redis is not None:
            return RedisStore(redis)
        path = self.settings.state_file or f"{self.name}.scheduler.sqlite3"
        return SqliteStore(path)

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            await self.store.open()
        except StoreUnavailable as exc:
            if not self.store.shared:
                raise StartupError(str(exc)) from exc
            self._store_down(str(exc))  # Redis: the lease loop keeps trying
        self.log.info(
            "%s: %d YAML schedule(s); state in %s%s",
            self.name,
            len(self.yaml_ids),
            self.store.description,
            "" if self.store.shared else " (one process only: no replicas without Redis)",
        )
        self._loops = [
            asyncio.create_task(self._lease_loop(), name=f"{self.name}-lease"),
            asyncio.create_task(self._fire_loop(), name=f"{self.name}-fire"),
        ]
        for task in self._loops:
            task.add_done_callback(self._loop_done)

    def _loop_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        self._dead = f"{task.get_name()} ended: {error!r}"
        self.log.error("%s: %s; stopping", self.name, self._dead, exc_info=error)
        self.metrics.error("loop")
        self.stop()

    def readiness(self) -> list[str]:
        if self._dead is not None:
            return [self._dead]
        if self._store_problem is not None:
            return [f"state store unreachable: {self._store_problem}"]
        return []

    def status(self) -> list[str]:
        if self.token is not None and not self.store.shared:
            role = "role: leader (single instance: state in SQLite, no replicas)"
        elif self.token is not None:
            role = f"role: leader (fencing token {self.token})"
        else:
            role = "role: standby (another process holds the lease)"
        return [role, f"schedules: {len(self.entries)}"]

    async def drain(self) -> None:
        # fires not yet committed are left to the next leader; committed ones are sent
        self._firing = False
        self._wake.set()
        if self._runs:
            await asyncio.wait(set(self._runs))

    async def close(self) -> None:
        await cancel_and_wait(*self._loops, *self._runs)
        if self.token is not None:
            token, self.token = self.token, None
            _LEADER.labels(self.name).set(0)
            if self.store.shared:
                with contextlib.suppress(StoreUnavailable):
                    await self.store.release(self.owner, token)  # a standby takes over at once
                    self.log.info("%s: released the lease", self.name)
        await self.store.close()

    # -- leadership ---------------------------------------------------------------------------

    @property
    def leader(self) -> bool:
        return self.token is not None

    def _store_down(self, problem: str) -> None:
        if self._store_problem is None:
            self.log.warning("%s: state store unreachable: %s", self.name, problem)
        self._store_problem = problem

    def _store_up(self) -> None:
        if self._store_problem is not None:
            self.log.info("%s: state store reachable again", self.name)
        self._store_problem = None

    async def _lease_loop(self) -> None:
        tick, ttl = self.settings.tick, self.settings.lease_seconds
        while True:
            try:
                if self.token is None:
                    if self._firing:
                        token = await self.store.acquire(self.owner, ttl)
                        self._store_up()
                        if token is not None:
                            await self._become_leader(token)
                elif await self.store.renew(self.owner, self.token, ttl):
                    self._store_up()
                    self._renewed = self.clock.monotonic()
                else:
                    self._step_down("another process holds the lease now")
                await self._refresh_runtime()
            except StoreUnavailable as exc:
                self._store_down(str(exc))
                if self.token is not None and self.clock.monotonic() - self._renewed > ttl:
                    self._step_down("could not renew the lease in time")
            await self.clock.sleep(tick / 3 if self.token is not None else tick / 2)

    async def _become_leader(self, token: int) -> None:
        self.token = token
        self._renewed = self.clock.monotonic()
        _LEADER.labels(self.name).set(1)
        _CHANGES.labels(self.name).inc()
        self.log.info("%s: leader now (fencing token %d)", self.name, token)
        try:
            await self._refresh_runtime(force=True)
            await self._load_cursors(list(self.entries.values()))
        except StoreUnavailable:
            self._step_down("the store failed while taking over")
            raise
        self._wake.set()

    def _step_down(self, why: str) -> None:
        if self.token is None:
            return
        self.log.warning("%s: standby now: %s", self.name, why)
        self.token = None
        _LEADER.labels(self.name).set(0)
        self._heap.clear()
        for entry in self.entries.values():
            entry.cursor = None
            entry.generation += 1

    async def _load_cursors(self, entries: list[_Entry]) -> None:
        now = self.clock.wall()
        defaults = {e.spec.id: (now, fingerprint(e.spec)) for e in entries}
        cursors = await self.store.cursors(defaults)
        for entry in entries:
            entry.cursor = cursors[entry.spec.id]
            self._schedule(entry)

    async def _refresh_runtime(self, *, force: bool = False) -> None:
        """Bring run-time entries in line with the store when its version moved."""
        async with self._refresh_lock:
            version = await self.store.version()
            if version == self._version and not force:
                return
            stored = await self.store.runtime()
            self._version = version
            added: list[_Entry] = []
            for id_, data in stored.items():
                if id_ in self.entries or id_ in self.yaml_ids:
                    continue
                try:
                    spec = Spec.from_json(json.loads(data))
                except (ValueError, TypeError) as exc:
                    self.metrics.error("bad_stored_schedule")
                    self.log.error("%s: ignoring stored schedule %r: %s", self.name, id_, exc)
                    continue
                entry = self.entries[id_] = _Entry(spec)
                added.append(entry)
            for id_ in [i for i, e in self.entries.items() if e.spec.source == "runtime"]:
                if id_ not in stored:
                    entry = self.entries.pop(id_)
                    entry.generation += 1
            _SCHEDULES.labels(self.name).set(len(self.entries))
            if self.token is not None and added:
                await self._load_cursors(added)
                self._wake.set()

    # -- firing -------------------------------------------------------------------------------

    def _schedule(self, entry: _Entry) -> None:
        entry.generation += 1
        entry.fire_at = None
        if entry.cursor is None or self.token is None:
            return
        upcoming = next_fire(entry.spec, entry.cursor)
        if upcoming is None:
            return  # finished (a fired one-shot, or past its end)
        entry.fire_at = upcoming[1]
        heapq.heappush(self._heap, (upcoming[1], entry.generation, entry.spec.id))

    async def _fire_loop(self) -> None:
        tick = self.settings.tick
        while True:
            self._wake.clear()
            delay = tick
            if self.token is not None and self._firing:
                now = self.clock.wall()
                while self._heap and self._heap[0][0] <= now:
                    _, generation, id_ = heapq.heappop(self._heap)
                    entry = self.entries.get(id_)
                    if entry is None or entry.generation != generation or entry.busy:
                        continue
                    entry.busy = True
                    task = asyncio.create_task(self._run(entry, self.token))
                    self._runs.add(task)
                    task.add_done_callback(self._runs.discard)
                if self._heap:
                    delay = min(tick, max(0.0, self._heap[0][0] - now))
            await self._sleep_or_wake(delay)

    async def _sleep_or_wake(self, delay: float) -> None:
        sleeper = asyncio.ensure_future(self.clock.sleep(delay))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()

    async def _run(self, entry: _Entry, token: int) -> None:
        try:
            async with self._slots:
                await self._catch_up(entry, token)
        except Exception:
            self.metrics.error("fire")
            self.log.exception("%s: schedule %s: firing failed", self.name, entry.spec.id)
        finally:
            entry.busy = False
            if self.token == token and self.entries.get(entry.spec.id) is entry:
                self._schedule(entry)
                self._wake.set()

    async def _catch_up(self, entry: _Entry, token: int) -> None:
        spec = entry.spec
        if entry.cursor is None or self.token != token:
            return
        decided = self.clock.wall()
        plan = catch_up(spec, entry.cursor, decided)
        if plan.missed:
            _MISSES.labels(self.name, "misfire").inc(plan.missed)
            self.log.warning(
                "%s: schedule %s: %s%d due time(s) more than %gs late given up (misfire: %s%s)",
                self.name,
                spec.id,
                "at least " if plan.missed_at_least else "",
                plan.missed,
                spec.misfire_grace,
                spec.misfire,
                f", {len(plan.fire)} fired" if plan.fire else "",
            )
        final = spec.one_shot and spec.source == "runtime"
        given_up = not plan.fire and plan.cursor > entry.cursor
        if given_up and await self._commit(spec, plan.cursor, token, decided, final=final) < 0:
            return
        for index, due in enumerate(plan.fire):
            if not self._firing:
                return  # stopping: not committed, so the next leader fires it
            missed = plan.missed if index == 0 else 0
            outcome = await self._fire(spec, due, token, decided, missed, final)
            if outcome < 0:
                return
        entry.cursor = max(entry.cursor, plan.cursor)
        if final and entry.cursor >= (spec.at or 0):
            self.entries.pop(spec.id, None)
            entry.generation += 1
            _SCHEDULES.labels(self.name).set(len(self.entries))

    @staticmethod
    def _deadline(spec: Spec, due: float, decided: float) -> float:
        """Until when a fire may still be sent: ``misfire_grace`` after its fire time, or after
        the moment it was decided for one the misfire policy picked late."""
        return max(due + jitter_offset(spec, due), decided) + spec.misfire_grace

    async def _commit(
        self, spec: Spec, due: float, token: int, decided: float, *, final: bool
    ) -> int:
        """Commit ``due`` with the fencing token; retried while the store is unreachable.

        1: committed, 0: already done or given up, -1: no longer the leader (stepped down).
        """
        deadline = self._deadline(spec, due, decided)
        backoff = Backoff(0.05, 1.0)
        while True:
            try:
                outcome = await self.store.advance(
                    self.owner,
                    token,
                    spec.id,
                    due,
                    final=final,
                    done_ttl=self.settings.remember_done,
                )
            except StoreUnavailable as exc:
                self._store_down(str(exc))
                delay = backoff.next()
                if not self._firing:
                    return -1  # stopping: not committed, so the next leader handles it
                if self.clock.wall() + delay > deadline or self.token != token:
                    _MISSES.labels(self.name, "store").inc()
                    self.log.warning(
                        "%s: schedule %s: due %.3f not fired: the state store stayed "
                        "unreachable until its misfire deadline (counted missed)",
                        self.name,
                        spec.id,
                        due,
                    )
                    return 0
                await self.clock.sleep(delay)
                continue
            self._store_up()
            if outcome < 0:
                self._step_down("fenced: another process took the lease (this one paused?)")
            elif outcome == 0:
                self.log.debug(
                    "%s: schedule %s: due %.3f was handled already", self.name, spec.id, due
                )
            return outcome

    async def _fire(
        self, spec: Spec, due: float, token: int, decided: float, missed: int, final: bool
    ) -> int:
        committed = await self._commit(spec, due, token, decided, final=final)
        if committed <= 0:
            return committed
        fire_at = due + jitter_offset(spec, due)
        deadline = self._deadline(spec, due, decided)
        message = fire_message(
            spec,
            due,
            fire_time=self.clock.wall(),
            gateway=self.name,
            reply_channel=self.config.command_channel,
            missed=missed,
        )
        try:
            accepted = await self.publish(
                message, channel=spec.channel, timeout=max(0.001, deadline - self.clock.wall())
            )
        except EventRefused:
            _MISSES.labels(self.name, "refused").inc()
            return 0
        if not accepted:
            _MISSES.labels(self.name, "deadline").inc()
            self.log.warning(
                "%s: schedule %s: due %.3f missed: %r refused it (full or unreachable) until "
                "its misfire deadline",
                self.name,
                spec.id,
                due,
                spec.channel,
            )
            return 0
        self.fires.inc()
        self.lateness.observe(max(0.0, self.clock.wall() - fire_at))
        return 1

    # -- commands -----------------------------------------------------------------------------

    @handles("scheduler.add")
    async def handle_add(self, command: Command) -> dict[str, Any]:
        now = self.clock.wall()
        try:
            spec = spec_from_command(
                command.body,
                now=now,
                default_channel=self.config.inbound_channel,
                defaults=self.settings.defaults(),
            )
        except ScheduleError as exc:
            raise CommandError(str(exc)) from None
        if spec.id in self.yaml_ids:
            raise CommandError(f"schedule: {spec.id!r} is a YAML schedule")
        if spec.message is not None:
            try:
                check_payload(dict(spec.message))
            except TypeError as exc:
                raise CommandError(str(exc)) from None
        start = now if spec.at is None else min(now, spec.at)
        cursor = start - 0.001
        try:
            outcome = await self.store.add(
                spec.id, dumps(spec.to_json()), cursor, self.settings.max_schedules
            )
        except StoreUnavailable as exc:
            raise CommandError(f"state store unreachable: {exc}") from None
        if outcome == "full":
            raise CommandError(
                f"{self.settings.max_schedules} run-time schedules exist (max_schedules)"
            )
        if outcome == "done":
            self.log.info("%s: add %s: a one-shot with this id fired already", self.name, spec.id)
            return {"schedule": spec.id, "created": False, "done": True, "next_fire": None}
        created = outcome == "created"
        if not created:
            spec = Spec.from_json(json.loads(outcome))
        else:
            self.log.info(
                "%s: added schedule %s: %s → %s", self.name, spec.id, describe(spec), spec.channel
            )
            with contextlib.suppress(StoreUnavailable):
                await self._refresh_runtime()
        upcoming = next_fire(spec, cursor)
        return {
            "schedule": spec.id,
            "created": created,
            "done": False,
            "next_fire": None if upcoming is None else upcoming[1],
        }

    @handles("scheduler.remove")
    async def handle_remove(self, command: Command) -> dict[str, Any]:
        try:
            schedule = parse_remove(command.body)
        except ScheduleError as exc:
            raise CommandError(str(exc)) from None
        if schedule in self.yaml_ids:
            raise CommandError(f"schedule: {schedule!r} is a YAML schedule; edit the file")
        try:
            removed = await self.store.remove(schedule)
            await self._refresh_runtime()
        except StoreUnavailable as exc:
            raise CommandError(f"state store unreachable: {exc}") from None
        if removed:
            self.log.info("%s: removed schedule %s", self.name, schedule)
        return {"schedule": schedule, "removed": removed}

    @handles("scheduler.list")
    async def handle_list(self, command: Command) -> dict[str, Any]:
        try:
            prefix = parse_list(command.body)
        except ScheduleError as exc:
            raise CommandError(str(exc)) from None
        with contextlib.suppress(StoreUnavailable):
            await self._refresh_runtime()
        now = self.clock.wall()
        ids = sorted(i for i in self.entries if i.startswith(prefix))
        limit = self.settings.list_limit
        rows = []
        for id_ in ids[:limit]:
            entry = self.entries[id_]
            spec = entry.spec
            upcoming = next_fire(spec, entry.cursor if entry.cursor is not None else now)
            rows.append(
                {
                    "schedule": id_,
                    "kind": spec.kind,
                    "source": spec.source,
                    "channel": spec.channel,
                    "what": describe(spec),
                    "timezone": spec.timezone,
                    "next_fire": None if upcoming is None else upcoming[1],
                    "last_due": entry.cursor,
                }
            )
        return {
            "schedules": rows,
            "truncated": len(ids) > limit,
            "leader": self.leader,
        }
