"""The scheduler's only I/O besides the layer: where its state lives and who may fire.

The scheduler's transport is the clock; what it must not lose, and what replicas must agree on,
lives in a store:

* :class:`RedisStore` when the layer is Redis: one host, Sentinel or a Redis Cluster (through
  :mod:`core.redis`, under the layer's prefix; on a cluster every key of one scheduler carries
  the hash tag ``{scheduler:NAME}``, so each script's keys are in one slot). Several
  ``gateway-scheduler`` processes share it. One holds the **lease** (:mod:`core.lease`'s
  scripts: ``SET NX PX``, renewed by a script that checks it is still the holder); each
  acquisition takes a new **fencing token** from ``INCR``. Every scheduled fire is
  **committed** by one script that checks, atomically, that the lease still holds this process's
  token, that the schedule's cursor is older than the due time and that the schedule is not
  paused, applies its overlap policy against the runs that have not reported ``scheduler.done``,
  and moves the cursor. Only a committed fire is sent. A leader that was paused past its lease
  (SIGSTOP, a long GC, a VM migration) and comes back finds its token gone: its commits fail, it
  sends nothing its successor fired, and it steps down. The cost of committing before sending: a
  leader that dies between the two loses that one fire (at most once in that window, never twice).
* **Queued fires** (``scheduler.trigger``, ``scheduler.backfill``, a fire ``buffer_one`` kept
  back) go the other way round: the command stores them (idempotent per request id), the leader
  *claims* one (fenced, overlap policy applied), sends it, then *confirms* it. A claimed fire
  its leader never confirmed (it died in between) is sent again by the next leader, so a
  trigger fires even when its leader is killed between the trigger and the send. A duplicate
  (with the same ``id``) needs the leader to die, or lose the store, in the instant between
  the layer taking the fire and the confirmation, or to be paused past its lease while the
  layer pushes that fire back (``Gateway.publish`` retries are not fenced).
* With the layer's ``durability="replicated"`` every commit, claim, confirmation and change a
  command answers (add, remove, pause, resume, trigger, backfill, done) waits for a replica
  (``WAIT 1``, :mod:`core.redis`); one no replica confirmed in time is not accepted
  (:class:`StoreNotReplicated`): its fire is not sent (counted missed; a failover that lost
  the commit lets the next leader make it), its command answers an error. Without it a
  failover can lose a commit made just before, and the next leader fires that due time again.
* :class:`SqliteStore` for every other layer: a local SQLite file, one process only (an
  exclusive ``flock`` on ``FILE.lock``; a second process exits 3). Its "lease" is always held.

Keys (Redis, each under ``{prefix}:gateways:scheduler:{name}:``; on a Redis Cluster
``{prefix}:gateways:{scheduler:NAME}:``): ``lease`` (owner|token, with
a TTL), ``fence`` (the token counter), ``cursors`` (hash: schedule → last handled due time,
or where it starts), ``last`` (hash: schedule → last handled due time), ``missed`` (hash:
schedule → due times given up since its last fire), ``specs`` (hash: run-time schedule → JSON),
``version`` (bumped on every change of ``specs``), ``done:{id}`` (a fired run-time one-shot,
for ``remember_done``), ``fingerprints`` (hash: YAML schedule → a digest of its timing keys; a
changed definition restarts its cursor at now), ``paused`` (hash: schedule → JSON note and
since), ``resumed`` (hash: schedule → when it was last resumed), ``state`` (bumped on every
pause, resume and queued fire), ``queue`` (sorted set: queued fire id → order), ``queued``
(hash: id → JSON), ``claimed`` (hash: id → fencing token of the leader sending it), ``seq``
(the queue's order counter), ``request:{id}`` (a trigger or backfill request, for
``remember_done``), ``running:{schedule}`` (hash: run id → deadline), ``runs`` (hash: run id →
schedule), ``deadlines`` (sorted set: run id → deadline), ``buffered`` (hash: schedule → the
JSON of the fire ``buffer_one`` keeps), ``history:{schedule}`` (list: its newest fires, JSON).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from core.lease import ACQUIRE_SCRIPT, RELEASE_SCRIPT, RENEW_SCRIPT
from core.redis import LayerRedis, NotReplicated, RedisUnavailable
from gateways.scheduler.translate import Overlap, overlap_action

__all__ = [
    "AddOutcome",
    "Commit",
    "Committed",
    "Details",
    "Finished",
    "Queued",
    "RedisStore",
    "SqliteStore",
    "StateStore",
    "StoreNotReplicated",
    "StoreUnavailable",
    "dumps",
]

T = TypeVar("T")

#: scheduler.add outcomes besides the JSON of an existing schedule
AddOutcome = str


class StoreUnavailable(Exception):
    """The store could not be reached or refused a call; the text says why."""


class StoreNotReplicated(StoreUnavailable):
    """``durability="replicated"``: Redis took a commit and no replica confirmed it in time
    (``WAIT 1``). Not accepted: nothing is sent or answered on it. The master may still have
    it (a retry of the same commit then finds it done) or lose it in a failover (the next
    leader then makes it)."""


@dataclass(frozen=True)
class Commit:
    """One fenced commit of a schedule's due time.

    ``fire``: fire ``due`` (else move the cursor to it: everything up to it was given up);
    ``given_up``: due times given up since the previous commit (they count toward the next
    fire's ``missed``); ``final``: a run-time one-shot, removed with it. ``overlap`` decides
    against the schedule's unfinished runs; with ``track`` the fire becomes one (``run``, until
    ``run_deadline``); ``buffered`` is the queue item ``buffer_one`` keeps (JSON).
    """

    schedule: str
    due: float
    fire: bool
    given_up: int = 0
    final: bool = False
    overlap: Overlap = "allow"
    track: bool = False
    run: str = ""
    run_deadline: float = 0.0
    now: float = 0.0
    buffered: str = ""


@dataclass(frozen=True)
class Committed:
    """What a commit or a claim did.

    ``code``: 1 done (see ``action``), 0 nothing to do (someone handled it, or the queued fire
    is gone), -1 not the leader, -2 the schedule is paused (nothing changed). ``action``:
    ``fire``, ``cancel`` (fire after cancelling ``cancelled``), ``skip``, ``buffer``,
    ``giveup`` (a cursor move) or ``resend`` (a queued fire a previous leader claimed and never
    confirmed). ``missed``: the due times given up since the schedule's previous fire (for this
    fire's ``missed``); ``expired``: runs this commit found past their ``run_timeout``.
    """

    code: int
    action: str = ""
    missed: int = 0
    expired: tuple[str, ...] = ()
    cancelled: tuple[str, ...] = ()


@dataclass(frozen=True)
class Finished:
    """``scheduler.done`` or a run's timeout: ``removed`` (the run was running), the runs found
    past their deadline meanwhile, and whether a buffered fire was queued (``released``)."""

    removed: bool
    expired: tuple[str, ...] = ()
    released: bool = False


@dataclass(frozen=True)
class Queued:
    """A queued fire: ``qid`` (its id and run id) and its JSON; ``claimed``: a leader claimed
    it (its token) and did not confirm it yet."""

    qid: str
    data: dict[str, Any]
    claimed: int | None = None


@dataclass
class Details:
    """What ``scheduler.list`` shows of one schedule beyond its definition."""

    last_due: float | None = None
    paused: dict[str, Any] | None = None
    buffered: float | None = None
    running: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


class StateStore(Protocol):
    """What the gateway needs from its state; see the module docstring."""

    #: True when several processes may share it (Redis)
    shared: bool
    #: for logs (never a password)
    description: str

    async def open(self) -> None: ...

    async def acquire(self, owner: str, ttl: float) -> int | None: ...

    async def renew(self, owner: str, token: int, ttl: float) -> bool: ...

    async def release(self, owner: str, token: int) -> None: ...

    async def advance(
        self, owner: str, token: int, commit: Commit, *, done_ttl: float
    ) -> Committed: ...

    async def cursors(self, defaults: dict[str, tuple[float, str]]) -> dict[str, float]:
        """The cursors of many schedules; id → (default, fingerprint of the definition).

        A schedule without a cursor gets its default. A non-empty fingerprint is stored with
        it: when it differs from the stored one (the YAML definition changed) the cursor is
        reset to the default, so a changed schedule does not catch up on its new due times.
        """

    async def runtime(self) -> dict[str, str]:
        """Run-time schedules: id → JSON."""

    async def versions(self) -> tuple[int, int]:
        """(``version``: run-time schedules changed, ``state``: pauses or the queue changed)."""

    async def add(self, schedule: str, spec: str, cursor: float, limit: int) -> AddOutcome:
        """``created``, ``done`` (a remembered fired one-shot), ``full``, or the existing JSON."""

    async def remove(self, schedule: str) -> bool: ...

    async def pause(self, schedules: Sequence[str], note: str, now: float) -> list[str]:
        """Pause ``schedules``; those that were not paused yet (a paused one gets the note)."""

    async def resume(self, schedules: Sequence[str], now: float) -> list[str]:
        """Resume ``schedules``; those that were paused."""

    async def pauses(self) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
        """(paused schedule → {note, since}, schedule → when it was last resumed)."""

    async def enqueue(self, request: str, items: list[tuple[str, str]], ttl: float) -> bool:
        """Queue ``items`` (id, JSON) in order unless ``request`` was seen within ``ttl``."""

    async def queue(self, limit: int) -> list[Queued]:
        """The oldest ``limit`` queued fires."""

    async def claim(
        self,
        owner: str,
        token: int,
        item: Queued,
        overlap: Overlap,
        *,
        track: bool,
        run_deadline: float,
        now: float,
        consume_missed: bool,
    ) -> Committed: ...

    async def confirm(self, qid: str) -> None:
        """The queued fire ``qid`` was sent (or given up): forget it."""

    async def run_schedule(self, run: str) -> str | None:
        """The schedule of the unfinished run ``run`` (``None``: finished or unknown)."""

    async def finish(self, schedule: str, run: str | None, now: float) -> Finished:
        """End ``run`` (``None``: only the runs past their deadline) of ``schedule``."""

    async def expired_runs(self, now: float, limit: int) -> dict[str, str]:
        """Runs past their deadline: run → schedule (at most ``limit``)."""

    async def details(self, schedules: Sequence[str], history: int) -> dict[str, Details]: ...

    async def push_history(self, entries: dict[str, list[str]], size: int) -> None:
        """Prepend JSON history entries (oldest first in each list); keep ``size`` per schedule."""

    async def close(self) -> None: ...


# -- Redis ------------------------------------------------------------------------------------

#: the keys of the scripts below, in this order (``done``, ``running``, ``history`` and
#: ``request`` belong to one schedule or request)
_KEYS = (
    *("lease", "fence", "cursors", "specs", "version", "done", "missed", "last", "paused"),
    *("running", "runs", "deadlines", "buffered", "queue", "queued", "claimed", "seq"),
    *("state", "history", "request"),
)

# Shared by the scripts that decide fires: named keys, runs past their deadline, the overlap
# decision (gateways.scheduler.translate.overlap_action, the same table) and releasing a
# buffered fire into the queue.
_PRELUDE = (
    "local "
    + ", ".join(_KEYS)
    + """ = unpack(KEYS)

local function expire(now)
  local out = {}
  local entries = redis.call('HGETALL', running)
  for i = 1, #entries, 2 do
    if tonumber(entries[i + 1]) <= now then
      redis.call('HDEL', running, entries[i])
      redis.call('HDEL', runs, entries[i])
      redis.call('ZREM', deadlines, entries[i])
      out[#out + 1] = entries[i]
    end
  end
  return out
end

local function release(id)
  if redis.call('HLEN', running) > 0 then return 0 end
  local item = redis.call('HGET', buffered, id)
  if not item then return 0 end
  redis.call('HDEL', buffered, id)
  local qid = cjson.decode(item)['qid']
  redis.call('ZADD', queue, redis.call('INCR', seq), qid)
  redis.call('HSET', queued, qid, item)
  redis.call('INCR', state)
  return 1
end

local function decide(id, policy, track, run, deadline, item)
  local action, cancelled = 'fire', {}
  if policy ~= 'allow' and redis.call('HLEN', running) > 0 then
    if policy == 'skip' then
      action = 'skip'
    elseif policy == 'buffer_one' then
      if redis.call('HEXISTS', buffered, id) == 1 then
        action = 'skip'
      else
        action = 'buffer'
        redis.call('HSET', buffered, id, item)
      end
    else
      action = 'cancel'
      cancelled = redis.call('HKEYS', running)
      redis.call('DEL', running)
      for _, other in ipairs(cancelled) do
        redis.call('HDEL', runs, other)
        redis.call('ZREM', deadlines, other)
      end
    end
  end
  if track and (action == 'fire' or action == 'cancel') then
    redis.call('HSET', running, run, deadline)
    redis.call('HSET', runs, run, id)
    redis.call('ZADD', deadlines, deadline, run)
  end
  return action, cancelled
end
"""
)

# ARGV: lease value, token, id, due, final, done ttl (ms), fire, given up, overlap, track,
# run, run deadline, now, buffered item
_ADVANCE = (
    _PRELUDE
    + """
if redis.call('GET', lease) ~= ARGV[1] then return {-1} end
if redis.call('GET', fence) ~= ARGV[2] then return {-1} end
local id, due = ARGV[3], tonumber(ARGV[4])
local current = redis.call('HGET', cursors, id)
if current and tonumber(current) >= due then return {0} end
local fire = ARGV[7] == '1'
if fire and redis.call('HEXISTS', paused, id) == 1 then return {-2} end
local missed_now = tonumber(redis.call('HGET', missed, id) or '0') + tonumber(ARGV[8])
local action, expired, cancelled = 'giveup', {}, {}
if fire then
  local track = ARGV[10] == '1'
  if track then
    expired = expire(tonumber(ARGV[13]))
    if #expired > 0 then release(id) end
  end
  action, cancelled = decide(id, ARGV[9], track, ARGV[11], ARGV[12], ARGV[14])
end
local reported = 0
if action == 'fire' or action == 'cancel' then
  reported = missed_now
  redis.call('HDEL', missed, id)
elseif missed_now > 0 then
  redis.call('HSET', missed, id, missed_now)
end
if ARGV[5] == '1' then
  redis.call('HDEL', cursors, id)
  redis.call('HDEL', missed, id)
  redis.call('HDEL', last, id)
  redis.call('HDEL', paused, id)
  redis.call('DEL', history)
  if redis.call('HDEL', specs, id) == 1 then redis.call('INCR', version) end
  redis.call('SET', done, '1', 'PX', ARGV[6])
else
  redis.call('HSET', cursors, id, ARGV[4])
  redis.call('HSET', last, id, ARGV[4])
end
return {1, action, reported, expired, cancelled}
"""
)

# ARGV: lease value, token, id (schedule), qid, overlap, track, run deadline, now, consume missed
_CLAIM = (
    _PRELUDE
    + """
if redis.call('GET', lease) ~= ARGV[1] then return {-1} end
if redis.call('GET', fence) ~= ARGV[2] then return {-1} end
local id, qid = ARGV[3], ARGV[4]
local item = redis.call('HGET', queued, qid)
if not item then return {0} end
if redis.call('HEXISTS', claimed, qid) == 1 then
  redis.call('HSET', claimed, qid, ARGV[2])
  return {1, 'resend', 0, {}, {}}
end
local track = ARGV[6] == '1'
local expired = {}
if track then
  expired = expire(tonumber(ARGV[8]))
  if #expired > 0 then release(id) end
end
local action, cancelled = decide(id, ARGV[5], track, qid, ARGV[7], item)
local reported = 0
if action == 'fire' or action == 'cancel' then
  redis.call('HSET', claimed, qid, ARGV[2])
  if ARGV[9] == '1' then
    reported = tonumber(redis.call('HGET', missed, id) or '0')
    redis.call('HDEL', missed, id)
  end
else
  redis.call('ZREM', queue, qid)
  redis.call('HDEL', queued, qid)
end
return {1, action, reported, expired, cancelled}
"""
)

# ARGV: id (schedule), run or '', now
_FINISH = (
    _PRELUDE
    + """
local removed = 0
if ARGV[2] ~= '' then
  removed = redis.call('HDEL', running, ARGV[2])
  redis.call('HDEL', runs, ARGV[2])
  redis.call('ZREM', deadlines, ARGV[2])
end
local expired = expire(tonumber(ARGV[3]))
return {removed, expired, release(ARGV[1])}
"""
)

_CONFIRM = (
    _PRELUDE
    + """
redis.call('ZREM', queue, ARGV[1])
redis.call('HDEL', queued, ARGV[1])
redis.call('HDEL', claimed, ARGV[1])
return 1
"""
)

# ARGV: request ttl (ms), then (id, JSON) pairs
_ENQUEUE = (
    _PRELUDE
    + """
if redis.call('EXISTS', request) == 1 then return 0 end
redis.call('SET', request, '1', 'PX', ARGV[1])
for i = 2, #ARGV, 2 do
  redis.call('ZADD', queue, redis.call('INCR', seq), ARGV[i])
  redis.call('HSET', queued, ARGV[i], ARGV[i + 1])
end
redis.call('INCR', state)
return 1
"""
)

# ARGV: note, now, ids...
_PAUSE = (
    _PRELUDE
    + """
local changed = {}
for i = 3, #ARGV do
  local old = redis.call('HGET', paused, ARGV[i])
  local since = ARGV[2]
  if old then since = cjson.decode(old)['since'] else changed[#changed + 1] = ARGV[i] end
  redis.call('HSET', paused, ARGV[i], cjson.encode({note = ARGV[1], since = tonumber(since)}))
end
redis.call('INCR', state)
return changed
"""
)

# ARGV: now, ids...
_RESUME = (
    _PRELUDE
    + """
local changed = {}
for i = 2, #ARGV do
  if redis.call('HDEL', paused, ARGV[i]) == 1 then
    redis.call('HSET', KEYS[#KEYS], ARGV[i], ARGV[1])
    changed[#changed + 1] = ARGV[i]
  end
end
if #changed > 0 then redis.call('INCR', state) end
return changed
"""
)

# KEYS: cursors fingerprints; ARGV: (id, default cursor, fingerprint or "") triples
_CURSORS = """
local out = {}
for i = 1, #ARGV, 3 do
  local id, default, fingerprint = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if fingerprint ~= '' then
    local old = redis.call('HGET', KEYS[2], id)
    if old and old ~= fingerprint then redis.call('HSET', KEYS[1], id, default) end
    if old ~= fingerprint then redis.call('HSET', KEYS[2], id, fingerprint) end
  end
  redis.call('HSETNX', KEYS[1], id, default)
  out[#out + 1] = redis.call('HGET', KEYS[1], id)
end
return out
"""

# KEYS: specs cursors version done; ARGV: id, json, cursor, limit
_ADD = """
if redis.call('EXISTS', KEYS[4]) == 1 then return 'done' end
local existing = redis.call('HGET', KEYS[1], ARGV[1])
if existing then return existing end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then return 'full' end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('INCR', KEYS[3])
return 'created'
"""

# the standard keys; ARGV: id
_REMOVE = (
    _PRELUDE
    + """
local id = ARGV[1]
local removed = redis.call('HDEL', specs, id)
if removed == 1 then
  redis.call('HDEL', cursors, id)
  redis.call('HDEL', missed, id)
  redis.call('HDEL', last, id)
  redis.call('HDEL', buffered, id)
  if redis.call('HDEL', paused, id) == 1 then redis.call('INCR', state) end
  redis.call('DEL', history)
  redis.call('INCR', version)
end
return removed
"""
)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _num(value: float) -> str:
    return repr(float(value))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _committed(result: Any) -> Committed:
    code = int(result[0])
    if code != 1:
        return Committed(code)
    return Committed(
        1,
        _text(result[1]),
        int(result[2]),
        tuple(_text(r) for r in result[3]),
        tuple(_text(r) for r in result[4]),
    )


class RedisStore:
    """State in the layer's Redis; see the module docstring."""

    shared = True

    def __init__(self, redis: LayerRedis) -> None:
        self.redis = redis
        self.description = f"Redis at {redis.description}"
        client = redis.client
        self._acquire = client.register_script(ACQUIRE_SCRIPT)
        self._renew = client.register_script(RENEW_SCRIPT)
        self._release = client.register_script(RELEASE_SCRIPT)
        self._advance = client.register_script(_ADVANCE)
        self._claim = client.register_script(_CLAIM)
        self._finish = client.register_script(_FINISH)
        self._confirm = client.register_script(_CONFIRM)
        self._enqueue = client.register_script(_ENQUEUE)
        self._pause = client.register_script(_PAUSE)
        self._resume = client.register_script(_RESUME)
        self._cursors = client.register_script(_CURSORS)
        self._add = client.register_script(_ADD)
        self._remove = client.register_script(_REMOVE)

    def _key(self, what: str) -> str:
        return self.redis.key(what)

    def _keys(self, schedule: str = "", request: str = "") -> list[str]:
        """:data:`_KEYS` for ``schedule`` (and a request), in the scripts' order."""
        per = {
            "done": f"done:{schedule}",
            "running": f"running:{schedule}",
            "history": f"history:{schedule}",
            "request": f"request:{request}",
        }
        return [self._key(per.get(name, name)) for name in _KEYS]

    async def _run(
        self, script: Any, keys: list[str], args: list[Any], *, durable: bool = False
    ) -> Any:
        """``durable``: a commit (its outcome is acted on, or answered to a command): with the
        layer's ``durability="replicated"`` a replica must confirm it, else
        :class:`StoreNotReplicated`."""
        try:
            return await self.redis.script(script, keys, args, durable=durable)
        except NotReplicated as exc:
            raise StoreNotReplicated(str(exc)) from exc
        except RedisUnavailable as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            return await self.redis.call(method, *args)
        except RedisUnavailable as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def open(self) -> None:
        await self._call("ping")

    async def acquire(self, owner: str, ttl: float) -> int | None:
        token = await self._run(
            self._acquire, [self._key("lease"), self._key("fence")], [owner, _ms(ttl)]
        )
        return int(token) or None

    async def renew(self, owner: str, token: int, ttl: float) -> bool:
        result = await self._run(self._renew, [self._key("lease")], [f"{owner}|{token}", _ms(ttl)])
        return bool(result)

    async def release(self, owner: str, token: int) -> None:
        await self._run(self._release, [self._key("lease")], [f"{owner}|{token}"])

    async def advance(
        self, owner: str, token: int, commit: Commit, *, done_ttl: float
    ) -> Committed:
        args = [
            f"{owner}|{token}",
            str(token),
            commit.schedule,
            _num(commit.due),
            int(commit.final),
            _ms(done_ttl),
            int(commit.fire),
            commit.given_up,
            commit.overlap,
            int(commit.track),
            commit.run,
            _num(commit.run_deadline),
            _num(commit.now),
            commit.buffered,
        ]
        return _committed(
            await self._run(self._advance, self._keys(commit.schedule), args, durable=True)
        )

    async def cursors(self, defaults: dict[str, tuple[float, str]]) -> dict[str, float]:
        out: dict[str, float] = {}
        ids = list(defaults)
        keys = [self._key("cursors"), self._key("fingerprints")]
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            args = [x for id_ in chunk for x in (id_, _num(defaults[id_][0]), defaults[id_][1])]
            values = await self._run(self._cursors, keys, args)
            out.update(zip(chunk, (float(v) for v in values), strict=True))
        return out

    async def runtime(self) -> dict[str, str]:
        raw = await self._call("hgetall", self._key("specs"))
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def versions(self) -> tuple[int, int]:
        version, state = await self._call("mget", self._key("version"), self._key("state"))
        return int(version or 0), int(state or 0)

    async def add(self, schedule: str, spec: str, cursor: float, limit: int) -> AddOutcome:
        keys = [self._key(k) for k in ("specs", "cursors", "version", f"done:{schedule}")]
        result = await self._run(
            self._add, keys, [schedule, spec, _num(cursor), limit], durable=True
        )
        return _text(result)

    async def remove(self, schedule: str) -> bool:
        return bool(await self._run(self._remove, self._keys(schedule), [schedule], durable=True))

    async def pause(self, schedules: Sequence[str], note: str, now: float) -> list[str]:
        changed: list[str] = []
        for start in range(0, len(schedules), 1000):
            chunk = list(schedules[start : start + 1000])
            result = await self._run(
                self._pause, self._keys(), [note, _num(now), *chunk], durable=True
            )
            changed += [_text(r) for r in result]
        return changed

    async def resume(self, schedules: Sequence[str], now: float) -> list[str]:
        changed: list[str] = []
        keys = [*self._keys(), self._key("resumed")]
        for start in range(0, len(schedules), 1000):
            chunk = list(schedules[start : start + 1000])
            result = await self._run(self._resume, keys, [_num(now), *chunk], durable=True)
            changed += [_text(r) for r in result]
        return changed

    async def pauses(self) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
        paused = await self._call("hgetall", self._key("paused"))
        resumed = await self._call("hgetall", self._key("resumed"))
        return (
            {_text(k): json.loads(v) for k, v in paused.items()},
            {_text(k): float(v) for k, v in resumed.items()},
        )

    async def enqueue(self, request: str, items: list[tuple[str, str]], ttl: float) -> bool:
        args: list[Any] = [_ms(ttl)] + [x for pair in items for x in pair]
        return bool(await self._run(self._enqueue, self._keys(request=request), args, durable=True))

    async def queue(self, limit: int) -> list[Queued]:
        ids = [_text(q) for q in await self._call("zrange", self._key("queue"), 0, limit - 1)]
        if not ids:
            return []
        items = await self._call("hmget", self._key("queued"), *ids)
        claims = await self._call("hmget", self._key("claimed"), *ids)
        return [
            Queued(qid, json.loads(item), None if claim is None else int(claim))
            for qid, item, claim in zip(ids, items, claims, strict=True)
            if item is not None
        ]

    async def claim(
        self,
        owner: str,
        token: int,
        item: Queued,
        overlap: Overlap,
        *,
        track: bool,
        run_deadline: float,
        now: float,
        consume_missed: bool,
    ) -> Committed:
        schedule = str(item.data["schedule"])
        args = [
            f"{owner}|{token}",
            str(token),
            schedule,
            item.qid,
            overlap,
            int(track),
            _num(run_deadline),
            _num(now),
            int(consume_missed),
        ]
        return _committed(await self._run(self._claim, self._keys(schedule), args, durable=True))

    async def confirm(self, qid: str) -> None:
        await self._run(self._confirm, self._keys(), [qid], durable=True)

    async def run_schedule(self, run: str) -> str | None:
        value = await self._call("hget", self._key("runs"), run)
        return None if value is None else _text(value)

    async def finish(self, schedule: str, run: str | None, now: float) -> Finished:
        result = await self._run(
            self._finish, self._keys(schedule), [schedule, run or "", _num(now)], durable=True
        )
        return Finished(bool(result[0]), tuple(_text(r) for r in result[1]), bool(int(result[2])))

    async def expired_runs(self, now: float, limit: int) -> dict[str, str]:
        key = self._key("deadlines")
        runs = await self._call("zrangebyscore", key, "-inf", _num(now), 0, limit)
        if not runs:
            return {}
        schedules = await self._call("hmget", self._key("runs"), *runs)
        return {
            _text(run): _text(schedule)
            for run, schedule in zip(runs, schedules, strict=True)
            if schedule is not None
        }

    async def details(self, schedules: Sequence[str], history: int) -> dict[str, Details]:
        if not schedules:
            return {}
        try:
            pipe = self.redis.client.pipeline(transaction=False)
            pipe.hmget(self._key("last"), *schedules)
            pipe.hmget(self._key("paused"), *schedules)
            pipe.hmget(self._key("buffered"), *schedules)
            for schedule in schedules:
                pipe.hgetall(self._key(f"running:{schedule}"))
                pipe.lrange(self._key(f"history:{schedule}"), 0, history - 1)
            results = await pipe.execute()
        except Exception as exc:
            raise StoreUnavailable(f"{self.description}: {type(exc).__name__}: {exc}") from exc
        last, paused, buffered = results[0], results[1], results[2]
        out: dict[str, Details] = {}
        for index, schedule in enumerate(schedules):
            running, entries = results[3 + 2 * index], results[4 + 2 * index]
            out[schedule] = Details(
                None if last[index] is None else float(last[index]),
                None if paused[index] is None else json.loads(paused[index]),
                None if buffered[index] is None else float(json.loads(buffered[index])["due"]),
                {_text(k): float(v) for k, v in running.items()},
                [json.loads(e) for e in entries] if history else [],
            )
        return out

    async def push_history(self, entries: dict[str, list[str]], size: int) -> None:
        if not entries or size <= 0:
            return
        try:
            pipe = self.redis.client.pipeline(transaction=False)
            for schedule, items in entries.items():
                key = self._key(f"history:{schedule}")
                pipe.lpush(key, *items)
                pipe.ltrim(key, 0, size - 1)
            await pipe.execute()
        except Exception as exc:
            raise StoreUnavailable(f"{self.description}: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        await self.redis.close()


# -- SQLite -----------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cursors (id TEXT PRIMARY KEY, due REAL NOT NULL);
CREATE TABLE IF NOT EXISTS specs (id TEXT PRIMARY KEY, spec TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS done (id TEXT PRIMARY KEY, until REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS fingerprints (id TEXT PRIMARY KEY, fingerprint TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS last (id TEXT PRIMARY KEY, due REAL NOT NULL);
CREATE TABLE IF NOT EXISTS missed (id TEXT PRIMARY KEY, count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS paused (id TEXT PRIMARY KEY, note TEXT NOT NULL, since REAL NOT NULL);
CREATE TABLE IF NOT EXISTS resumed (id TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run TEXT PRIMARY KEY, schedule TEXT NOT NULL, deadline REAL NOT NULL);
CREATE INDEX IF NOT EXISTS runs_by_schedule ON runs (schedule);
CREATE INDEX IF NOT EXISTS runs_by_deadline ON runs (deadline);
CREATE TABLE IF NOT EXISTS buffered (id TEXT PRIMARY KEY, item TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS queue (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, qid TEXT UNIQUE NOT NULL, item TEXT NOT NULL,
    claimed INTEGER);
CREATE TABLE IF NOT EXISTS requests (id TEXT PRIMARY KEY, until REAL NOT NULL);
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, entry TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS history_by_id ON history (id, seq);
"""


class SqliteStore:
    """State in a local SQLite file, for one process; see the module docstring."""

    shared = False

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.description = f"SQLite file {self.path}"
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="scheduler-sqlite")

    async def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            assert self._db is not None
            with self._db:  # one transaction
                return work(self._db)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, run)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"{self.description}: {exc}") from exc

    async def open(self) -> None:
        def connect() -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise StoreUnavailable(
                    f"{self.description} is used by another scheduler process (locked: "
                    f"{self.path}.lock); without a Redis layer only one may run"
                ) from None
            self._lock_fd = fd
            db = None
            try:
                db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(_SCHEMA)
                db.isolation_level = "DEFERRED"
            except BaseException:
                # not a half-open store: the connection closed (3.13 warns about one left to
                # the collector) and the lock released, so open() can be tried again
                if db is not None:
                    db.close()
                self._lock_fd = None
                os.close(fd)
                raise
            self._db = db

        try:
            await asyncio.get_running_loop().run_in_executor(self._pool, connect)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"{self.description}: {exc}") from exc

    async def acquire(self, owner: str, ttl: float) -> int | None:
        return 1

    async def renew(self, owner: str, token: int, ttl: float) -> bool:
        return True

    async def release(self, owner: str, token: int) -> None:
        return None

    @staticmethod
    def _bump(db: sqlite3.Connection, key: str = "version") -> None:
        db.execute(
            "INSERT INTO meta VALUES (?, 1) ON CONFLICT(key) DO UPDATE SET value = value + 1",
            (key,),
        )

    @staticmethod
    def _missed(db: sqlite3.Connection, schedule: str) -> int:
        row = db.execute("SELECT count FROM missed WHERE id = ?", (schedule,)).fetchone()
        return int(row[0]) if row else 0

    def _expire(self, db: sqlite3.Connection, schedule: str, now: float) -> tuple[str, ...]:
        expired = tuple(
            run
            for (run,) in db.execute(
                "SELECT run FROM runs WHERE schedule = ? AND deadline <= ?", (schedule, now)
            )
        )
        db.executemany("DELETE FROM runs WHERE run = ?", [(r,) for r in expired])
        return expired

    def _release(self, db: sqlite3.Connection, schedule: str) -> bool:
        if db.execute("SELECT 1 FROM runs WHERE schedule = ?", (schedule,)).fetchone():
            return False
        row = db.execute("SELECT item FROM buffered WHERE id = ?", (schedule,)).fetchone()
        if row is None:
            return False
        db.execute("DELETE FROM buffered WHERE id = ?", (schedule,))
        db.execute(
            "INSERT OR IGNORE INTO queue (qid, item) VALUES (?, ?)",
            (json.loads(row[0])["qid"], row[0]),
        )
        self._bump(db, "state")
        return True

    def _decide(
        self,
        db: sqlite3.Connection,
        schedule: str,
        overlap: Overlap,
        *,
        track: bool,
        run: str,
        deadline: float,
        item: str,
    ) -> tuple[str, tuple[str, ...]]:
        running = [r for (r,) in db.execute("SELECT run FROM runs WHERE schedule = ?", (schedule,))]
        has_buffer = bool(db.execute("SELECT 1 FROM buffered WHERE id = ?", (schedule,)).fetchone())
        action = overlap_action(overlap, len(running), has_buffer)
        cancelled: tuple[str, ...] = ()
        if action == "buffer":
            db.execute("INSERT INTO buffered VALUES (?, ?)", (schedule, item))
        elif action == "cancel":
            cancelled = tuple(running)
            db.execute("DELETE FROM runs WHERE schedule = ?", (schedule,))
        if track and action in ("fire", "cancel"):
            db.execute("INSERT OR REPLACE INTO runs VALUES (?, ?, ?)", (run, schedule, deadline))
        return action, cancelled

    async def advance(
        self, owner: str, token: int, commit: Commit, *, done_ttl: float
    ) -> Committed:
        id_ = commit.schedule

        def work(db: sqlite3.Connection) -> Committed:
            row = db.execute("SELECT due FROM cursors WHERE id = ?", (id_,)).fetchone()
            if row is not None and row[0] >= commit.due:
                return Committed(0)
            if commit.fire and db.execute("SELECT 1 FROM paused WHERE id = ?", (id_,)).fetchone():
                return Committed(-2)
            missed = self._missed(db, id_) + commit.given_up
            action = "giveup"
            expired: tuple[str, ...] = ()
            cancelled: tuple[str, ...] = ()
            if commit.fire:
                if commit.track:
                    expired = self._expire(db, id_, commit.now)
                    if expired:
                        self._release(db, id_)
                action, cancelled = self._decide(
                    db,
                    id_,
                    commit.overlap,
                    track=commit.track,
                    run=commit.run,
                    deadline=commit.run_deadline,
                    item=commit.buffered,
                )
            reported = 0
            if action in ("fire", "cancel"):
                reported = missed
                db.execute("DELETE FROM missed WHERE id = ?", (id_,))
            elif missed:
                db.execute("INSERT OR REPLACE INTO missed VALUES (?, ?)", (id_, missed))
            if commit.final:
                for table in ("cursors", "missed", "last", "paused"):
                    db.execute(f"DELETE FROM {table} WHERE id = ?", (id_,))
                db.execute("DELETE FROM history WHERE id = ?", (id_,))
                if db.execute("DELETE FROM specs WHERE id = ?", (id_,)).rowcount:
                    self._bump(db)
                db.execute(
                    "INSERT OR REPLACE INTO done VALUES (?, ?)", (id_, time.time() + done_ttl)
                )
            else:
                db.execute("INSERT OR REPLACE INTO cursors VALUES (?, ?)", (id_, commit.due))
                db.execute("INSERT OR REPLACE INTO last VALUES (?, ?)", (id_, commit.due))
            return Committed(1, action, reported, expired, cancelled)

        return await self._call(work)

    async def cursors(self, defaults: dict[str, tuple[float, str]]) -> dict[str, float]:
        def work(db: sqlite3.Connection) -> dict[str, float]:
            stored = dict(db.execute("SELECT id, fingerprint FROM fingerprints"))
            for id_, (default, fingerprint) in defaults.items():
                if not fingerprint:
                    continue
                if stored.get(id_, fingerprint) != fingerprint:
                    db.execute("INSERT OR REPLACE INTO cursors VALUES (?, ?)", (id_, default))
                db.execute("INSERT OR REPLACE INTO fingerprints VALUES (?, ?)", (id_, fingerprint))
            db.executemany(
                "INSERT OR IGNORE INTO cursors VALUES (?, ?)",
                [(id_, default) for id_, (default, _) in defaults.items()],
            )
            found = dict(db.execute("SELECT id, due FROM cursors"))
            return {id_: float(found[id_]) for id_ in defaults}

        return await self._call(work)

    async def runtime(self) -> dict[str, str]:
        return await self._call(lambda db: dict(db.execute("SELECT id, spec FROM specs")))

    async def versions(self) -> tuple[int, int]:
        def work(db: sqlite3.Connection) -> tuple[int, int]:
            values = dict(db.execute("SELECT key, value FROM meta"))
            return int(values.get("version", 0)), int(values.get("state", 0))

        return await self._call(work)

    async def add(self, schedule: str, spec: str, cursor: float, limit: int) -> AddOutcome:
        def work(db: sqlite3.Connection) -> str:
            now = time.time()
            db.execute("DELETE FROM done WHERE until < ?", (now,))
            if db.execute("SELECT 1 FROM done WHERE id = ?", (schedule,)).fetchone():
                return "done"
            row = db.execute("SELECT spec FROM specs WHERE id = ?", (schedule,)).fetchone()
            if row is not None:
                return str(row[0])
            if db.execute("SELECT count(*) FROM specs").fetchone()[0] >= limit:
                return "full"
            db.execute("INSERT INTO specs VALUES (?, ?)", (schedule, spec))
            db.execute("INSERT OR REPLACE INTO cursors VALUES (?, ?)", (schedule, cursor))
            self._bump(db)
            return "created"

        return await self._call(work)

    async def remove(self, schedule: str) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            if not db.execute("DELETE FROM specs WHERE id = ?", (schedule,)).rowcount:
                return False
            for table in ("cursors", "missed", "last", "buffered", "history"):
                db.execute(f"DELETE FROM {table} WHERE id = ?", (schedule,))
            if db.execute("DELETE FROM paused WHERE id = ?", (schedule,)).rowcount:
                self._bump(db, "state")
            self._bump(db)
            return True

        return await self._call(work)

    async def pause(self, schedules: Sequence[str], note: str, now: float) -> list[str]:
        def work(db: sqlite3.Connection) -> list[str]:
            already = {i for (i,) in db.execute("SELECT id FROM paused")}
            for id_ in schedules:
                if id_ in already:
                    db.execute("UPDATE paused SET note = ? WHERE id = ?", (note, id_))
                else:
                    db.execute("INSERT INTO paused VALUES (?, ?, ?)", (id_, note, now))
            self._bump(db, "state")
            return [i for i in schedules if i not in already]

        return await self._call(work)

    async def resume(self, schedules: Sequence[str], now: float) -> list[str]:
        def work(db: sqlite3.Connection) -> list[str]:
            changed = []
            for id_ in schedules:
                if db.execute("DELETE FROM paused WHERE id = ?", (id_,)).rowcount:
                    db.execute("INSERT OR REPLACE INTO resumed VALUES (?, ?)", (id_, now))
                    changed.append(id_)
            if changed:
                self._bump(db, "state")
            return changed

        return await self._call(work)

    async def pauses(self) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
        def work(
            db: sqlite3.Connection,
        ) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
            paused = {
                i: {"note": note, "since": since}
                for i, note, since in db.execute("SELECT id, note, since FROM paused")
            }
            return paused, dict(db.execute("SELECT id, at FROM resumed"))

        return await self._call(work)

    async def enqueue(self, request: str, items: list[tuple[str, str]], ttl: float) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            now = time.time()
            db.execute("DELETE FROM requests WHERE until < ?", (now,))
            if db.execute("SELECT 1 FROM requests WHERE id = ?", (request,)).fetchone():
                return False
            db.execute("INSERT INTO requests VALUES (?, ?)", (request, now + ttl))
            db.executemany("INSERT OR IGNORE INTO queue (qid, item) VALUES (?, ?)", items)
            self._bump(db, "state")
            return True

        return await self._call(work)

    async def queue(self, limit: int) -> list[Queued]:
        def work(db: sqlite3.Connection) -> list[Queued]:
            rows = db.execute(
                "SELECT qid, item, claimed FROM queue ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
            return [Queued(q, json.loads(i), c) for q, i, c in rows]

        return await self._call(work)

    async def claim(
        self,
        owner: str,
        token: int,
        item: Queued,
        overlap: Overlap,
        *,
        track: bool,
        run_deadline: float,
        now: float,
        consume_missed: bool,
    ) -> Committed:
        schedule = str(item.data["schedule"])

        def work(db: sqlite3.Connection) -> Committed:
            row = db.execute(
                "SELECT item, claimed FROM queue WHERE qid = ?", (item.qid,)
            ).fetchone()
            if row is None:
                return Committed(0)
            if row[1] is not None:
                db.execute("UPDATE queue SET claimed = ? WHERE qid = ?", (token, item.qid))
                return Committed(1, "resend")
            expired: tuple[str, ...] = ()
            if track:
                expired = self._expire(db, schedule, now)
                if expired:
                    self._release(db, schedule)
            action, cancelled = self._decide(
                db,
                schedule,
                overlap,
                track=track,
                run=item.qid,
                deadline=run_deadline,
                item=row[0],
            )
            reported = 0
            if action in ("fire", "cancel"):
                db.execute("UPDATE queue SET claimed = ? WHERE qid = ?", (token, item.qid))
                if consume_missed:
                    reported = self._missed(db, schedule)
                    db.execute("DELETE FROM missed WHERE id = ?", (schedule,))
            else:
                db.execute("DELETE FROM queue WHERE qid = ?", (item.qid,))
            return Committed(1, action, reported, expired, cancelled)

        return await self._call(work)

    async def confirm(self, qid: str) -> None:
        await self._call(lambda db: db.execute("DELETE FROM queue WHERE qid = ?", (qid,)))

    async def run_schedule(self, run: str) -> str | None:
        def work(db: sqlite3.Connection) -> str | None:
            row = db.execute("SELECT schedule FROM runs WHERE run = ?", (run,)).fetchone()
            return None if row is None else str(row[0])

        return await self._call(work)

    async def finish(self, schedule: str, run: str | None, now: float) -> Finished:
        def work(db: sqlite3.Connection) -> Finished:
            removed = bool(run and db.execute("DELETE FROM runs WHERE run = ?", (run,)).rowcount)
            expired = self._expire(db, schedule, now)
            return Finished(removed, expired, self._release(db, schedule))

        return await self._call(work)

    async def expired_runs(self, now: float, limit: int) -> dict[str, str]:
        def work(db: sqlite3.Connection) -> dict[str, str]:
            rows = db.execute(
                "SELECT run, schedule FROM runs WHERE deadline <= ? ORDER BY deadline LIMIT ?",
                (now, limit),
            )
            return dict(rows.fetchall())

        return await self._call(work)

    async def details(self, schedules: Sequence[str], history: int) -> dict[str, Details]:
        def work(db: sqlite3.Connection) -> dict[str, Details]:
            out: dict[str, Details] = {}
            for id_ in schedules:
                last = db.execute("SELECT due FROM last WHERE id = ?", (id_,)).fetchone()
                paused = db.execute(
                    "SELECT note, since FROM paused WHERE id = ?", (id_,)
                ).fetchone()
                buffered = db.execute("SELECT item FROM buffered WHERE id = ?", (id_,)).fetchone()
                running = dict(
                    db.execute("SELECT run, deadline FROM runs WHERE schedule = ?", (id_,))
                )
                entries = db.execute(
                    "SELECT entry FROM history WHERE id = ? ORDER BY seq DESC LIMIT ?",
                    (id_, history),
                ).fetchall()
                out[id_] = Details(
                    None if last is None else float(last[0]),
                    None if paused is None else {"note": paused[0], "since": paused[1]},
                    None if buffered is None else float(json.loads(buffered[0])["due"]),
                    running,
                    [json.loads(e) for (e,) in entries],
                )
            return out

        return await self._call(work)

    async def push_history(self, entries: dict[str, list[str]], size: int) -> None:
        if not entries or size <= 0:
            return

        def work(db: sqlite3.Connection) -> None:
            for id_, items in entries.items():
                db.executemany(
                    "INSERT INTO history (id, entry) VALUES (?, ?)", [(id_, e) for e in items]
                )
                db.execute(
                    "DELETE FROM history WHERE id = ? AND seq NOT IN "
                    "(SELECT seq FROM history WHERE id = ? ORDER BY seq DESC LIMIT ?)",
                    (id_, id_, size),
                )

        await self._call(work)

    async def close(self) -> None:
        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None
            if self._lock_fd is not None:
                with contextlib.suppress(OSError):
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
                self._lock_fd = None

        await asyncio.get_running_loop().run_in_executor(self._pool, shut)
        self._pool.shutdown(wait=False)


def dumps(data: dict[str, Any]) -> str:
    """Stable JSON for a spec (sorted keys: an identical re-add compares equal)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"))
