"""``SchedulerGateway``: the clock → timed messages on the layer; ``scheduler.add`` & co.

Roles. Every process runs a **lease loop**: a standby tries to take the lease every half tick,
the leader renews it every third of a tick (and steps down when the store says it is no longer
the holder, or when it could not renew for a whole lease). Only the leader fires. With a SQLite
store (no Redis layer) the one process is always the leader. The lease loop also brings
run-time schedules and pauses in line with the store when their counters moved, and on the
leader finishes runs past their ``run_timeout`` and writes the run history.

Firing. The leader keeps one entry per schedule (YAML ones, and run-time ones read from the
store) with its **cursor** (loaded from the store when it becomes leader; a schedule seen for
the first time starts at *now*, so nothing in the past fires at a first start) and a heap of
fire times. When an entry's time comes, one task (at most ``max_in_flight`` at once, one per
schedule) asks :func:`translate.catch_up` what to do and carries the plan out commit by commit
(:meth:`CatchUp.steps`): each fire is committed with the fenced script of :mod:`connection`
(which also refuses a paused schedule and applies the overlap policy) and only then sent with
:meth:`Gateway.publish`, retrying while the layer is full or down until its send deadline
(:func:`translate.send_deadline`); then it counts the fire as missed and logs it. Given-up due
times are counted and logged only once their commit succeeded, so a leader that lost its lease
counts nothing its successor handles. A paused schedule is not in the heap.

Queued fires (``scheduler.trigger``, ``scheduler.backfill``, a fire ``buffer_one`` held back
until the running run finished) are taken by the **queue loop** of the leader, oldest first:
claimed (fenced), sent, confirmed; a claimed fire the previous leader never confirmed is sent
again.

Runs. A fire of a schedule with an overlap policy other than ``allow`` is a run until a
``scheduler.done`` with its ``run_id`` arrives (any replica takes it) or its ``run_timeout``
passed; the policy decides what a due time does while a run is unfinished.

Metrics: see the module's counters below and the README's table.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import math
import os
import platform
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from prometheus_client import Counter, Gauge, Histogram

from core.clock import LOOP_CLOCK, Clock
from core.envelope import Command, CommandError, check_payload
from core.metrics import REGISTRY
from core.redis import layer_redis
from core.retry import Backoff, StartupError, cancel_and_wait
from core.service import EventRefused, Gateway, handles
from core.types import ChannelLayer
from gateways.scheduler.config import SchedulerGatewayConfig
from gateways.scheduler.connection import (
    Commit,
    Committed,
    Queued,
    RedisStore,
    SqliteStore,
    StateStore,
    StoreNotReplicated,
    StoreUnavailable,
    dumps,
)
from gateways.scheduler.translate import (
    Overlap,
    ScheduleError,
    Spec,
    Step,
    backfill_dues,
    cancel_message,
    catch_up,
    check_overlap,
    describe,
    fingerprint,
    fire_message,
    jitter_offset,
    next_fire,
    parse_backfill,
    parse_done,
    parse_instant,
    parse_list,
    parse_remove,
    parse_targets,
    parse_trigger,
    run_id,
    send_deadline,
    spec_from_command,
)

__all__ = ["LOST_LEASE", "OUTCOMES", "SchedulerGateway"]

_T = TypeVar("_T")

#: why a leader steps down when another process took the lease (its renewal or a commit found
#: the fencing token replaced): one wording, whichever noticed first
LOST_LEASE = (
    "lost the lease: another process holds it now (this one was paused or cut off for longer "
    "than lease_ttl)"
)
#: what happened to a due time, in the run history and ``scheduler_schedule_fires_total``
OUTCOMES = ("sent", "missed", "paused", "skipped-overlap", "buffered")
#: schedules whose state is loaded (and specs parsed) between two turns of the event loop
LOAD_BATCH = 500
#: queued fires read at once by the queue loop
QUEUE_BATCH = 100
#: runs past their deadline finished per lease tick
EXPIRE_BATCH = 100

_FIRES = Counter(
    "scheduler_fires",
    "Fires the layer accepted, by kind (scheduled, buffered, manual, backfill)",
    ["gateway", "kind"],
    registry=REGISTRY,
)
_MISSES = Counter(
    "scheduler_misses",
    "Due times not fired, by reason (misfire, paused, overlap, deadline, store, refused, removed)",
    ["gateway", "reason"],
    registry=REGISTRY,
)
_LATENESS = Histogram(
    "scheduler_lateness_seconds",
    "Seconds between a scheduled fire's planned time (due + jitter) and the layer accepting it",
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
_PAUSED = Gauge("scheduler_paused", "Schedules paused", ["gateway"], registry=REGISTRY)
_CHANGES = Counter(
    "scheduler_leader_changes",
    "Times this process became the leader",
    ["gateway"],
    registry=REGISTRY,
)
_RUNS = Counter(
    "scheduler_runs_finished",
    "Runs (fires of schedules with an overlap policy) that ended: done, timeout, cancelled",
    ["gateway", "how"],
    registry=REGISTRY,
)
# per schedule (scheduler.schedule_metrics says for which): the run history as Prometheus sees it
_SCHEDULE_FIRES = Counter(
    "scheduler_schedule_fires",
    "Due times of one schedule by outcome (sent, missed, paused, skipped-overlap, buffered)",
    ["gateway", "schedule", "outcome"],
    registry=REGISTRY,
)
_SCHEDULE_LAST_DUE = Gauge(
    "scheduler_schedule_last_due_timestamp_seconds",
    "Due time of the schedule's newest history entry",
    ["gateway", "schedule"],
    registry=REGISTRY,
)
_SCHEDULE_LAST_SENT = Gauge(
    "scheduler_schedule_last_sent_timestamp_seconds",
    "When the layer accepted the schedule's newest fire",
    ["gateway", "schedule"],
    registry=REGISTRY,
)
_SCHEDULE_LATENESS = Gauge(
    "scheduler_schedule_last_lateness_seconds",
    "Lateness of the schedule's newest fire (sent - fire time)",
    ["gateway", "schedule"],
    registry=REGISTRY,
)
_SCHEDULE_PAUSED = Gauge(
    "scheduler_schedule_paused",
    "1 while the schedule is paused",
    ["gateway", "schedule"],
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


def _record(
    due: float,
    outcome: str,
    *,
    kind: str = "scheduled",
    run: str | None = None,
    fire_at: float | None = None,
    sent: float | None = None,
    reason: str | None = None,
    count: int = 1,
) -> dict[str, Any]:
    """One run-history entry (``scheduler.list``'s ``history``)."""
    lateness = None if sent is None or fire_at is None else max(0.0, sent - fire_at)
    return {
        "due": due,
        "sent": sent,
        "lateness": lateness,
        "outcome": outcome,
        "reason": reason,
        "kind": kind,
        "run_id": run,
        "count": count,
    }


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
        #: paused schedules (id → {note, since}) and when each was last resumed, as last read
        self.pauses: dict[str, dict[str, Any]] = {}
        self.resumed: dict[str, float] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._wake = asyncio.Event()
        self._queue_wake = asyncio.Event()
        self._version = -1
        self._state = -1
        self._refresh_lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(settings.max_in_flight)
        self._runs: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._store_problem: str | None = None
        self._dead: str | None = None
        self._renewed = 0.0
        self._firing = True
        #: queued fires sent but not yet confirmed in the store (confirmed before the next pass)
        self._unconfirmed: set[str] = set()
        #: history entries not yet written to the store, per schedule (oldest first)
        self._history: dict[str, list[dict[str, Any]]] = {}
        self._past_logged: set[str] = set()
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
            asyncio.create_task(self._queue_loop(), name=f"{self.name}-queue"),
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
        return [role, f"schedules: {len(self.entries)}", f"paused: {len(self.pauses)}"]

    async def drain(self) -> None:
        # fires not yet committed are left to the next leader; committed ones are sent
        self._firing = False
        self._wake.set()
        self._queue_wake.set()
        if self._runs:
            await asyncio.wait(set(self._runs))
        if self.token is not None:
            with contextlib.suppress(StoreUnavailable):
                await self._flush_history()

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
                    self._step_down(LOST_LEASE)
                await self._refresh()
                if self.token is not None:
                    await self._expire_runs()
                    await self._flush_history()
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
        # loading every schedule's state can take longer than a lease (100,000 schedules, a
        # slow store): it runs beside the lease loop, which keeps renewing meanwhile
        task = asyncio.create_task(self._take_over(token), name=f"{self.name}-takeover")
        self._runs.add(task)
        task.add_done_callback(self._runs.discard)

    async def _take_over(self, token: int) -> None:
        try:
            await self._refresh(force=True)
            await self._load_cursors(list(self.entries.values()), token)
        except StoreUnavailable as exc:
            self._store_down(str(exc))
            if self.token == token:
                self._step_down("the store failed while taking over")
            return
        self._wake.set()
        self._queue_wake.set()

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

    async def _load_cursors(self, entries: list[_Entry], token: int | None = None) -> None:
        token = self.token if token is None else token
        now = self.clock.wall()
        for start in range(0, len(entries), LOAD_BATCH):
            chunk = entries[start : start + LOAD_BATCH]
            defaults = {e.spec.id: (now, fingerprint(e.spec)) for e in chunk}
            cursors = await self.store.cursors(defaults)
            if self.token != token or token is None:
                return  # stepped down meanwhile
            for entry in chunk:
                entry.cursor = cursors[entry.spec.id]
                self._schedule(entry)
                self._skipped_if_past(entry)
            self._wake.set()

    def _skipped_if_past(self, entry: _Entry) -> None:
        spec = entry.spec
        past = spec.kind == "at" and spec.source == "yaml" and entry.fire_at is None
        if past and spec.id not in self._past_logged:
            self._past_logged.add(spec.id)
            self.log.info(
                "%s: schedule %s: %s is past (it fired, or passed before the schedule was "
                "known): skipped",
                self.name,
                spec.id,
                describe(spec),
            )

    async def _refresh(self, *, force: bool = False) -> None:
        """Bring run-time entries and pauses in line with the store when its counters moved."""
        async with self._refresh_lock:
            version, state = await self.store.versions()
            if version != self._version or force:
                await self._load_runtime(version)
            if state != self._state or force:
                self._state = state
                await self._load_pauses()
                self._queue_wake.set()

    async def _load_runtime(self, version: int) -> None:
        stored = await self.store.runtime()
        self._version = version
        added: list[_Entry] = []
        for index, (id_, data) in enumerate(stored.items()):
            if index % LOAD_BATCH == LOAD_BATCH - 1:
                await asyncio.sleep(0)  # 100,000 specs to parse: let the lease loop renew
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
                self._forget_metrics(entry.spec)
        _SCHEDULES.labels(self.name).set(len(self.entries))
        if self.token is not None and added:
            await self._load_cursors(added)
            self._wake.set()

    async def _load_pauses(self) -> None:
        pauses, resumed = await self.store.pauses()
        before = set(self.pauses)
        self.pauses, self.resumed = pauses, resumed
        for id_ in before ^ set(pauses):
            entry = self.entries.get(id_)
            if entry is None:
                continue
            if id_ in pauses:
                entry.generation += 1  # out of the heap
            elif self.token is not None:
                self._schedule(entry)  # due times passed while paused: the misfire policy
                self._wake.set()
        _PAUSED.labels(self.name).set(len(pauses))
        for id_, entry in self.entries.items():
            if self._exported(entry.spec):
                _SCHEDULE_PAUSED.labels(self.name, id_).set(1 if id_ in pauses else 0)

    # -- firing -------------------------------------------------------------------------------

    def _schedule(self, entry: _Entry) -> None:
        entry.generation += 1
        entry.fire_at = None
        if entry.cursor is None or self.token is None or entry.spec.id in self.pauses:
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
            # still the leader, even under a new token (the lease was lost and taken again
            # while this run pushed back): the fire loop dropped the entry's heap place while
            # it was busy, so without this the schedule would never fire again
            if self.token is not None and self.entries.get(entry.spec.id) is entry:
                self._schedule(entry)
                self._wake.set()

    async def _catch_up(self, entry: _Entry, token: int) -> None:
        spec = entry.spec
        if entry.cursor is None or self.token != token or spec.id in self.pauses:
            return
        decided = self.clock.wall()
        plan = catch_up(spec, entry.cursor, decided)
        final = spec.one_shot and spec.source == "runtime"
        given_up: dict[str, int] = {"misfire": 0, "paused": 0}
        try:
            for step in plan.steps():
                if step.fire and not self._firing:
                    return  # stopping: not committed, so the next leader fires it
                outcome = await self._step(entry, step, token, decided, final, given_up)
                if outcome < 0:
                    return
                entry.cursor = max(entry.cursor, step.due)
        finally:
            if given_up["misfire"] or given_up["paused"]:
                self.log.warning(
                    "%s: schedule %s: %s%d due time(s) given up (misfire: %s; more than %gs "
                    "late: %d, passed while paused: %d)",
                    self.name,
                    spec.id,
                    "at least " if plan.missed_at_least else "",
                    given_up["misfire"] + given_up["paused"],
                    spec.misfire,
                    spec.misfire_grace,
                    given_up["misfire"],
                    given_up["paused"],
                )
        if final and entry.cursor >= (spec.at or 0):
            self.entries.pop(spec.id, None)
            entry.generation += 1
            _SCHEDULES.labels(self.name).set(len(self.entries))

    async def _step(
        self,
        entry: _Entry,
        step: Step,
        token: int,
        decided: float,
        final: bool,
        given_up: dict[str, int],
    ) -> int:
        """Commit one step of a catch-up and send its fire; 1 done, 0 nothing to do, -1 no
        longer the leader, -2 paused meanwhile."""
        spec = entry.spec
        now = self.clock.wall()
        run = run_id(spec.id, step.due)
        if step.fire:
            deadline = send_deadline(spec, step.due, decided if step.late else None)
        else:
            deadline = decided + spec.misfire_grace
        buffered = ""
        if spec.overlap == "buffer_one":
            buffered = json.dumps(
                {"qid": run, "schedule": spec.id, "due": step.due, "kind": "buffered"}
            )
        commit = Commit(
            spec.id,
            step.due,
            step.fire,
            len(step.given_up),
            final,
            spec.overlap,
            spec.tracks_runs,
            run,
            now + spec.run_timeout,
            now,
            buffered,
        )
        result = await self._commit(spec, commit, token, deadline)
        if result.code == -2:
            self.log.info("%s: schedule %s: paused meanwhile; not fired", self.name, spec.id)
            # paused by another replica: out of the heap until the next refresh says otherwise
            self.pauses.setdefault(spec.id, {"note": "", "since": now})
            return -2
        if result.code <= 0:
            return result.code
        self._given_up(spec, step.given_up, given_up, final)
        self._finished_runs(result.expired, "timeout")
        if result.action == "giveup":
            return 1
        if result.action in ("skip", "buffer"):
            self._overlapped(spec, step.due, result.action, "scheduled", run, final)
            return 1
        if result.action == "cancel":
            await self._cancel(spec, run, result.cancelled, deadline)
        fire_at = step.due + jitter_offset(spec, step.due)
        return await self._send(
            spec, step.due, run, deadline, missed=result.missed, kind="scheduled",
            fire_at=fire_at, history=not final,
        )  # fmt: skip

    def _given_up(
        self, spec: Spec, dues: tuple[float, ...], counts: dict[str, int], final: bool
    ) -> None:
        """Count (metric, log, history) due times a committed step gave up: those up to the
        schedule's last resume passed while it was paused, the others misfired."""
        until = self.resumed.get(spec.id, -math.inf)
        paused = [d for d in dues if d <= until]
        late = [d for d in dues if d > until]
        for reason, outcome, group in (("paused", "paused", paused), ("misfire", "missed", late)):
            if not group:
                continue
            counts[reason] += len(group)
            _MISSES.labels(self.name, reason).inc(len(group))
            if not final:
                self._remember(spec, _record(max(group), outcome, reason=reason, count=len(group)))

    def _overlapped(
        self, spec: Spec, due: float, action: str, kind: str, run: str, final: bool = False
    ) -> None:
        if action == "skip":
            _MISSES.labels(self.name, "overlap").inc()
            self.log.info(
                "%s: schedule %s: due %.3f skipped: a run has not finished (overlap: %s)",
                self.name,
                spec.id,
                due,
                spec.overlap,
            )
            outcome = "skipped-overlap"
        else:
            self.log.info(
                "%s: schedule %s: due %.3f held back until the running run finished "
                "(overlap: buffer_one)",
                self.name,
                spec.id,
                due,
            )
            outcome = "buffered"
        if not final:
            self._remember(spec, _record(due, outcome, kind=kind, run=run))

    def _finished_runs(self, runs: tuple[str, ...], how: str) -> None:
        for run in runs:
            _RUNS.labels(self.name, how).inc()
            self.log.info(
                "%s: run %s finished: %s",
                self.name,
                run,
                "no scheduler.done within its run_timeout" if how == "timeout" else how,
            )

    async def _cancel(
        self, spec: Spec, run: str, cancelled: tuple[str, ...], deadline: float
    ) -> None:
        """``overlap: cancel_other``: tell each unfinished run's consumer it was cancelled."""
        for other in cancelled:
            _RUNS.labels(self.name, "cancelled").inc()
            message = cancel_message(
                spec,
                other,
                by=run,
                time=self.clock.wall(),
                gateway=self.name,
                reply_channel=self.config.command_channel,
            )
            try:
                sent = await self.publish(
                    message,
                    channel=spec.channel,
                    timeout=max(0.001, deadline - self.clock.wall()),
                )
            except EventRefused:
                sent = False
            self.log.info(
                "%s: schedule %s: run %s cancelled for %s (overlap: cancel_other)%s",
                self.name,
                spec.id,
                other,
                run,
                "" if sent else "; the scheduler.cancel could not be sent in time",
            )

    async def _commit(self, spec: Spec, commit: Commit, token: int, deadline: float) -> Committed:
        """Commit with the fencing token; retried while the store is unreachable.

        ``code`` -1 means no longer the leader (stepped down here).
        """
        backoff = Backoff(0.05, 1.0)
        while True:
            try:
                result = await self.store.advance(
                    self.owner, token, commit, done_ttl=self.settings.remember_done
                )
            except StoreNotReplicated as exc:
                # on the master, maybe: a retry would find it done and send nothing either
                _MISSES.labels(self.name, "store").inc()
                self.log.warning(
                    "%s: schedule %s: due %.3f not fired: %s (counted missed)",
                    self.name,
                    spec.id,
                    commit.due,
                    exc,
                )
                return Committed(0)
            except StoreUnavailable as exc:
                self._store_down(str(exc))
                delay = backoff.next()
                if not self._firing:
                    return Committed(-1)  # stopping: not committed, so the next leader does
                if self.clock.wall() + delay > deadline or self.token != token:
                    _MISSES.labels(self.name, "store").inc()
                    self.log.warning(
                        "%s: schedule %s: due %.3f not fired: the state store stayed "
                        "unreachable until its send deadline (counted missed)",
                        self.name,
                        spec.id,
                        commit.due,
                    )
                    return Committed(0)
                await self.clock.sleep(delay)
                continue
            self._store_up()
            if result.code == -1:
                self._step_down(LOST_LEASE)
            elif result.code == 0:
                self.log.debug(
                    "%s: schedule %s: due %.3f was handled already", self.name, spec.id, commit.due
                )
            return result

    async def _send(
        self,
        spec: Spec,
        due: float,
        run: str,
        deadline: float,
        *,
        missed: int,
        kind: str,
        fire_at: float,
        history: bool = True,
    ) -> int:
        """Send a committed (or claimed) fire until ``deadline``: 1 sent, 0 missed."""
        now = self.clock.wall()
        message = fire_message(
            spec,
            due,
            fire_time=now,
            gateway=self.name,
            reply_channel=self.config.command_channel,
            missed=missed,
            run=run,
            manual=kind == "manual",
            backfill=kind == "backfill",
        )
        record = history and spec.id in self.entries
        if now > deadline:
            accepted = False
        else:
            try:
                accepted = await self.publish(
                    message, channel=spec.channel, timeout=max(0.001, deadline - now)
                )
            except EventRefused:
                _MISSES.labels(self.name, "refused").inc()
                if record:
                    self._remember(
                        spec, _record(due, "missed", kind=kind, run=run, reason="refused")
                    )
                return 0
        if not accepted:
            _MISSES.labels(self.name, "deadline").inc()
            self.log.warning(
                "%s: schedule %s: due %.3f missed: %r refused it (full or unreachable) until "
                "its send deadline",
                self.name,
                spec.id,
                due,
                spec.channel,
            )
            if record:
                self._remember(spec, _record(due, "missed", kind=kind, run=run, reason="deadline"))
            return 0
        sent = self.clock.wall()
        _FIRES.labels(self.name, kind).inc()
        if kind == "scheduled":
            self.lateness.observe(max(0.0, sent - fire_at))
        if record:
            self._remember(
                spec, _record(due, "sent", kind=kind, run=run, fire_at=fire_at, sent=sent)
            )
        return 1

    # -- queued fires (trigger, backfill, buffer_one) -----------------------------------------

    async def _queue_loop(self) -> None:
        tick = self.settings.tick
        while True:
            await self._queue_wake.wait()
            self._queue_wake.clear()
            token = self.token
            if token is None or not self._firing:
                continue
            try:
                for qid in list(self._unconfirmed):
                    await self.store.confirm(qid)
                    self._unconfirmed.discard(qid)
                items = await self.store.queue(QUEUE_BATCH)
                for item in items:
                    if self.token != token or not self._firing:
                        break
                    task = asyncio.create_task(self._fire_queued(item, token))
                    self._runs.add(task)
                    task.add_done_callback(self._runs.discard)
                    try:
                        await task
                    except StoreUnavailable:
                        raise
                    except Exception:  # a bug or a bad stored item: drop it, keep the loop
                        self.metrics.error("queued_fire")
                        self.log.exception(
                            "%s: queued fire %s failed; dropped", self.name, item.qid
                        )
                        await self.store.confirm(item.qid)
            except StoreUnavailable as exc:
                self._store_down(str(exc))
                await self.clock.sleep(tick / 2)
                self._queue_wake.set()
                continue
            if len(items) == QUEUE_BATCH:
                self._queue_wake.set()

    async def _fire_queued(self, item: Queued, token: int) -> None:
        data = item.data
        schedule, kind = str(data["schedule"]), str(data["kind"])
        entry = self.entries.get(schedule)
        if entry is None:
            _MISSES.labels(self.name, "removed").inc()
            self.log.warning(
                "%s: queued fire %s dropped: schedule %s no longer exists",
                self.name,
                item.qid,
                schedule,
            )
            await self.store.confirm(item.qid)
            return
        spec = entry.spec
        now = self.clock.wall()
        overlap: Overlap = data.get("overlap") or spec.overlap
        result = await self.store.claim(
            self.owner,
            token,
            item,
            overlap,
            track=spec.tracks_runs,
            run_deadline=now + spec.run_timeout,
            now=now,
            consume_missed=kind == "buffered",
        )
        if result.code == -1:
            self._step_down(LOST_LEASE)
            return
        if result.code == 0:
            return
        due = float(data["due"])
        self._finished_runs(result.expired, "timeout")
        if result.action in ("skip", "buffer"):
            self._overlapped(spec, due, result.action, kind, item.qid)
            return
        deadline = now + spec.misfire_grace
        if result.action == "cancel":
            await self._cancel(spec, item.qid, result.cancelled, deadline)
        if result.action == "resend":
            self.log.info(
                "%s: queued fire %s: its previous leader claimed it and did not confirm it; "
                "sending it",
                self.name,
                item.qid,
            )
        fire_at = due + jitter_offset(spec, due) if kind == "buffered" else float(data["requested"])
        self._unconfirmed.add(item.qid)
        await self._send(
            spec, due, item.qid, deadline, missed=result.missed, kind=kind, fire_at=fire_at
        )
        await self.store.confirm(item.qid)
        self._unconfirmed.discard(item.qid)

    # -- runs ---------------------------------------------------------------------------------

    async def _expire_runs(self) -> None:
        now = self.clock.wall()
        runs = await self.store.expired_runs(now, EXPIRE_BATCH)
        for schedule in sorted(set(runs.values())):
            result = await self.store.finish(schedule, None, now)
            self._finished_runs(result.expired, "timeout")
            if result.released:
                self._queue_wake.set()

    # -- history ------------------------------------------------------------------------------

    def _exported(self, spec: Spec) -> bool:
        which = self.settings.schedule_metrics
        return which == "all" or (which == "yaml" and spec.source == "yaml")

    def _forget_metrics(self, spec: Spec) -> None:
        """Drop the per-schedule series of a schedule that is gone."""
        if not self._exported(spec):
            return
        labels = (self.name, spec.id)
        series: list[tuple[Counter | Gauge, tuple[str, ...]]] = [
            (gauge, labels)
            for gauge in (
                _SCHEDULE_LAST_DUE,
                _SCHEDULE_LAST_SENT,
                _SCHEDULE_LATENESS,
                _SCHEDULE_PAUSED,
            )
        ]
        series += [(_SCHEDULE_FIRES, (*labels, outcome)) for outcome in OUTCOMES]
        for metric, values in series:
            with contextlib.suppress(KeyError):
                metric.remove(*values)

    def _remember(self, spec: Spec, entry: dict[str, Any]) -> None:
        """Add a run-history entry (written to the store on the next lease tick)."""
        size = self.settings.history_size
        if self._exported(spec):
            labels = (self.name, spec.id)
            _SCHEDULE_FIRES.labels(*labels, entry["outcome"]).inc(entry["count"])
            _SCHEDULE_LAST_DUE.labels(*labels).set(entry["due"])
            if entry["sent"] is not None:
                _SCHEDULE_LAST_SENT.labels(*labels).set(entry["sent"])
                _SCHEDULE_LATENESS.labels(*labels).set(entry["lateness"] or 0.0)
        if size <= 0:
            return
        pending = self._history.setdefault(spec.id, [])
        pending.append(entry)
        del pending[:-size]

    async def _flush_history(self) -> None:
        if not self._history:
            return
        pending, self._history = self._history, {}
        try:
            await self.store.push_history(
                {k: [json.dumps(e) for e in v] for k, v in pending.items()},
                self.settings.history_size,
            )
        except StoreUnavailable:
            for key, entries in pending.items():  # keep them for the next tick (bounded)
                merged = entries + self._history.get(key, [])
                self._history[key] = merged[-self.settings.history_size :]
            raise

    # -- commands -----------------------------------------------------------------------------

    def _known(self, schedule: Any, key: str = "schedule") -> Spec:
        if not isinstance(schedule, str) or not schedule:
            raise CommandError(f"{key}: required (a schedule id)")
        entry = self.entries.get(schedule)
        if entry is None:
            raise CommandError(f"{key}: no schedule {schedule!r}")
        return entry.spec

    @staticmethod
    def _parsed(parse: Callable[[Mapping[str, Any]], _T], command: Command) -> _T:
        """``parse(command.body)`` (translate's check, shared with the consumer helpers)."""
        try:
            return parse(command.body)
        except ScheduleError as exc:
            raise CommandError(str(exc)) from None

    @staticmethod
    def _overlap_of(overlap: Overlap | None, spec: Spec) -> Overlap:
        if overlap is None:
            return spec.overlap
        try:
            return check_overlap(overlap, spec.message)
        except ValueError as exc:
            raise CommandError(f"overlap: {exc}") from None

    async def _refresh_quietly(self) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self._refresh()

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
            await self._refresh_quietly()
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
            await self._refresh()
        except StoreUnavailable as exc:
            raise CommandError(f"state store unreachable: {exc}") from None
        if removed:
            self.log.info("%s: removed schedule %s", self.name, schedule)
        return {"schedule": schedule, "removed": removed}

    async def _targets(self, command: Command) -> tuple[list[str], str]:
        schedule, note = self._parsed(parse_targets, command)  # checked before any I/O
        await self._refresh_quietly()
        if schedule is None:
            return sorted(self.entries), note
        return [self._known(schedule).id], note

    def _changed(self, changed: list[str]) -> dict[str, Any]:
        limit = self.settings.list_limit
        return {
            "changed": len(changed),
            "schedules": changed[:limit],
            "truncated": len(changed) > limit,
        }

    @handles("scheduler.pause")
    async def handle_pause(self, command: Command) -> dict[str, Any]:
        targets, note = await self._targets(command)
        now = self.clock.wall()
        try:
            changed = await self.store.pause(targets, note, now)
            await self._refresh()
        except StoreUnavailable as exc:
            raise CommandError(f"state store unreachable: {exc}") from None
        self.log.info(
            "%s: paused %d schedule(s)%s%s",
            self.name,
            len(changed),
            f" ({', '.join(changed[:5])}{', …' if len(changed) > 5 else ''})" if changed else "",
            f": {note}" if note else "",
        )
        return self._changed(changed)

    @handles("scheduler.resume")
    async def handle_resume(self, command: Command) -> dict[str, Any]:
        targets, note = await self._targets(command)
        now = self.clock.wall()
        try:
            changed = await self.store.resume(targets, now)
            await self._refresh()
        except StoreUnavailable as exc:
            raise CommandError(f"state store unreachable: {exc}") from None
        self.log.info(
            "%s: resumed %d schedule(s)%s%s",
            self.name,
            len(changed),
            f" ({', '.join(changed[:5])}{', …' if len(changed) > 5 else ''})" if changed else "",
            f": {note}" if note else "",
        )
        return self._changed(changed)

    @handles("scheduler.trigger")
    async def handle_trigger(self, command: Command) -> dict[str, Any]:
        control = self._parsed(parse_trigger, command)
        await self._refresh_quietly()
        spec = self._known(control.schedule)
        request = control.request_id or uuid.uuid4().hex
        overlap = self._overlap_of(control.overlap, spec)
        now = self.clock.wall()
        qid = run_id(spec.id, now, request=request)
        item = {
            "qid": qid,
            "schedule": spec.id,
            "due": now,
            "requested": now,
            "kind": "manual",
            "overlap": overlap,
        }
        created = await self._enqueue(f"trigger:{spec.id}:{request}", [(qid, item)])
        if created:
            self.log.info("%s: schedule %s: triggered (%s)", self.name, spec.id, qid)
        return {"schedule": spec.id, "run_id": qid, "request_id": request, "created": created}

    @handles("scheduler.backfill")
    async def handle_backfill(self, command: Command) -> dict[str, Any]:
        control = self._parsed(parse_backfill, command)
        await self._refresh_quietly()
        spec = self._known(control.schedule)
        request = control.request_id or uuid.uuid4().hex
        overlap = self._overlap_of(control.overlap, spec)
        now = self.clock.wall()
        # checked by parse_backfill; read again in the schedule's own zone (naive date-times)
        window = {
            "from": parse_instant(control.start, spec.timezone),
            "to": parse_instant(control.end, spec.timezone),
        }
        if window["to"] > now:
            raise CommandError(
                "to: is in the future: a backfill fires past due times (the schedule fires "
                "the coming ones itself)"
            )
        if window["from"] > window["to"]:
            raise CommandError("from: must not be after to")
        try:
            dues = backfill_dues(spec, window["from"], window["to"], self.settings.backfill_limit)
        except ScheduleError as exc:
            raise CommandError(str(exc)) from None
        items = [
            (
                qid := run_id(spec.id, due, request=request, backfill=True),
                {
                    "qid": qid,
                    "schedule": spec.id,
                    "due": due,
                    "requested": now,
                    "kind": "backfill",
                    "overlap": overlap,
                },
            )
            for due in dues
        ]
        created = await self._enqueue(f"backfill:{spec.id}:{request}", items) if items else False
        if created:
            self.log.info(
                "%s: schedule %s: backfill of %d due time(s) queued (request %s)",
                self.name,
                spec.id,
                len(dues),
                request,
            )
        return {
            "schedule": spec.id,
            "request_id": request,
            "created": created,
            "count": len(dues),
            "first": dues[0] if dues else None,
            "last": dues[-1] if dues else None,
        }

    async def _enqueue(self, request: str, items: list[tuple[str, dict[str, Any]]]) -> bool:
        try:
            created = await self.store.enqueue(
                request, [(q, json.dumps(i)) for q, i in items], self.settings.remember_done
            )
        except StoreUnavailable as exc:
            raise CommandError(f"state store unreachable: {exc}") from None
        if created and self.leader:
            self._queue_wake.set()
        return created

    @handles("scheduler.done")
    async def handle_done(self, command: Command) -> dict[str, Any]:
        run = self._parsed(parse_done, command)
        now = self.clock.wall()
        try:
            schedule = await self.store.run_schedule(run)
            if schedule is None:
                return {"run_id": run, "schedule": None, "finished": False}
            result = await self.store.finish(schedule, run, now)
        except StoreUnavailable as exc:
            raise CommandError(f"state store unreachable: {exc}") from None
        if result.removed:
            _RUNS.labels(self.name, "done").inc()
        self._finished_runs(result.expired, "timeout")
        if result.released and self.leader:
            self._queue_wake.set()
        return {"run_id": run, "schedule": schedule, "finished": result.removed}

    @handles("scheduler.list")
    async def handle_list(self, command: Command) -> dict[str, Any]:
        try:
            prefix = parse_list(command.body)
        except ScheduleError as exc:
            raise CommandError(str(exc)) from None
        await self._refresh_quietly()
        now = self.clock.wall()
        ids = sorted(i for i in self.entries if i.startswith(prefix))
        limit = self.settings.list_limit
        shown = ids[:limit]
        try:
            details = await self.store.details(shown, self.settings.history_size)
        except StoreUnavailable as exc:
            raise CommandError(f"state store unreachable: {exc}") from None
        rows = []
        for id_ in shown:
            entry = self.entries[id_]
            spec = entry.spec
            detail = details[id_]
            upcoming = next_fire(spec, entry.cursor if entry.cursor is not None else now)
            pending = list(reversed(self._history.get(id_, [])))
            history = (pending + detail.history)[: self.settings.history_size]
            rows.append(
                {
                    "schedule": id_,
                    "kind": spec.kind,
                    "source": spec.source,
                    "channel": spec.channel,
                    "what": describe(spec),
                    "timezone": spec.timezone,
                    "next_fire": None if upcoming is None or detail.paused else upcoming[1],
                    "last_due": detail.last_due,
                    "paused": detail.paused is not None,
                    "pause_note": None if detail.paused is None else detail.paused["note"],
                    "paused_at": None if detail.paused is None else detail.paused["since"],
                    "overlap": spec.overlap,
                    "running": [
                        {"run_id": run, "timeout_at": deadline}
                        for run, deadline in sorted(detail.running.items())
                    ],
                    "buffered": detail.buffered,
                    "history": history,
                }
            )
        return {
            "schedules": rows,
            "truncated": len(ids) > limit,
            "leader": self.leader,
        }
