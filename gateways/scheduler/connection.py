"""The scheduler's only I/O besides the layer: where its state lives and who may fire.

The scheduler's transport is the clock; what it must not lose, and what replicas must agree on,
lives in a store:

* :class:`RedisStore` when the layer is Redis (through :mod:`core.redis`, under the layer's
  prefix). Several ``gateway-scheduler`` processes share it. One holds the **lease**
  (``SET NX PX``, renewed by a script that checks it is still the holder); each acquisition
  takes a new **fencing token** from ``INCR``. Every fire is **committed** by one script that
  checks, atomically, that the lease still holds this process's token *and* that the schedule's
  cursor is older than the due time, and then moves the cursor. Only a committed fire is sent.
  A leader that was paused past its lease (SIGSTOP, a long GC, a VM migration) and comes back
  finds its token gone: its commits fail, it sends nothing its successor fired, and it steps
  down. The cost of committing before sending: a leader that dies between the two loses that
  one fire (at most once in that window, never twice).
* :class:`SqliteStore` for every other layer: a local SQLite file, one process only (an
  exclusive ``flock`` on ``FILE.lock``; a second process exits 3). Its "lease" is always held.

Keys (Redis, each under ``{prefix}:gateways:scheduler:{name}:``): ``lease`` (owner:token, with a
TTL), ``fence`` (the token counter), ``cursors`` (hash: schedule → last handled due time),
``specs`` (hash: run-time schedule → JSON), ``version`` (bumped on every change of ``specs``),
``done:{id}`` (a fired run-time one-shot, for ``remember_done``), ``fingerprints`` (hash: YAML
schedule → a digest of its timing keys; a changed definition restarts its cursor at now).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

from core.redis import LayerRedis, RedisUnavailable

__all__ = ["AddOutcome", "RedisStore", "SqliteStore", "StateStore", "StoreUnavailable"]

T = TypeVar("T")

#: scheduler.add outcomes besides the JSON of an existing schedule
AddOutcome = str


class StoreUnavailable(Exception):
    """The store could not be reached or refused a call; the text says why."""


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
        self, owner: str, token: int, schedule: str, due: float, *, final: bool, done_ttl: float
    ) -> int:
        """1: committed (fire it); 0: already done (someone fired it); -1: not the leader."""

    async def cursor(self, schedule: str, default: float) -> float:
        """The schedule's cursor, set to ``default`` first when it has none."""

    async def cursors(self, defaults: dict[str, tuple[float, str]]) -> dict[str, float]:
        """The cursors of many schedules; id → (default, fingerprint of the definition).

        A schedule without a cursor gets its default. A non-empty fingerprint is stored with
        it: when it differs from the stored one (the YAML definition changed) the cursor is
        reset to the default, so a changed schedule does not catch up on its new due times.
        """

    async def runtime(self) -> dict[str, str]:
        """Run-time schedules: id → JSON."""

    async def version(self) -> int: ...

    async def add(self, schedule: str, spec: str, cursor: float, limit: int) -> AddOutcome:
        """``created``, ``done`` (a remembered fired one-shot), ``full``, or the existing JSON."""

    async def remove(self, schedule: str) -> bool: ...

    async def close(self) -> None: ...


# -- Redis ------------------------------------------------------------------------------------

_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. token, 'NX', 'PX', ARGV[2])
return token
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: lease fence cursors specs version done; ARGV: lease value, token, id, due, final, ttl
_ADVANCE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return -1 end
local current = redis.call('HGET', KEYS[3], ARGV[3])
if current and tonumber(current) >= tonumber(ARGV[4]) then return 0 end
if ARGV[5] == '1' then
  redis.call('HDEL', KEYS[3], ARGV[3])
  if redis.call('HDEL', KEYS[4], ARGV[3]) == 1 then redis.call('INCR', KEYS[5]) end
  redis.call('SET', KEYS[6], '1', 'PX', ARGV[6])
else
  redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
end
return 1
"""

_CURSOR = """
redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
return redis.call('HGET', KEYS[1], ARGV[1])
"""

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

# KEYS: specs cursors version; ARGV: id
_REMOVE = """
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
if removed == 1 then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('INCR', KEYS[3])
end
return removed
"""


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _num(value: float) -> str:
    return repr(float(value))


class RedisStore:
    """State in the layer's Redis; see the module docstring."""

    shared = True

    def __init__(self, redis: LayerRedis) -> None:
        self.redis = redis
        self.description = f"Redis at {redis.description}"
        client = redis.client
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._advance = client.register_script(_ADVANCE)
        self._cursor = client.register_script(_CURSOR)
        self._cursors = client.register_script(_CURSORS)
        self._add = client.register_script(_ADD)
        self._remove = client.register_script(_REMOVE)

    def _key(self, what: str) -> str:
        return self.redis.key(what)

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except Exception as exc:  # redis errors, timeouts, connection refused
            raise StoreUnavailable(f"{self.description}: {type(exc).__name__}: {exc}") from exc

    async def open(self) -> None:
        try:
            await self.redis.call("ping")
        except RedisUnavailable as exc:
            raise StoreUnavailable(str(exc)) from exc

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
        self, owner: str, token: int, schedule: str, due: float, *, final: bool, done_ttl: float
    ) -> int:
        keys = [self._key(k) for k in ("lease", "fence", "cursors", "specs", "version")] + [
            self._key(f"done:{schedule}")
        ]
        args = [f"{owner}|{token}", str(token), schedule, _num(due), int(final), _ms(done_ttl)]
        return int(await self._run(self._advance, keys, args))

    async def cursor(self, schedule: str, default: float) -> float:
        value = await self._run(self._cursor, [self._key("cursors")], [schedule, _num(default)])
        return float(value)

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
        try:
            raw = await self.redis.call("hgetall", self._key("specs"))
        except RedisUnavailable as exc:
            raise StoreUnavailable(str(exc)) from exc
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def version(self) -> int:
        try:
            value = await self.redis.call("get", self._key("version"))
        except RedisUnavailable as exc:
            raise StoreUnavailable(str(exc)) from exc
        return int(value or 0)

    async def add(self, schedule: str, spec: str, cursor: float, limit: int) -> AddOutcome:
        keys = [self._key(k) for k in ("specs", "cursors", "version", f"done:{schedule}")]
        result = await self._run(self._add, keys, [schedule, spec, _num(cursor), limit])
        return result.decode() if isinstance(result, bytes) else str(result)

    async def remove(self, schedule: str) -> bool:
        keys = [self._key(k) for k in ("specs", "cursors", "version")]
        return bool(await self._run(self._remove, keys, [schedule]))

    async def close(self) -> None:
        await self.redis.close()


# -- SQLite -----------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cursors (id TEXT PRIMARY KEY, due REAL NOT NULL);
CREATE TABLE IF NOT EXISTS specs (id TEXT PRIMARY KEY, spec TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS done (id TEXT PRIMARY KEY, until REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS fingerprints (id TEXT PRIMARY KEY, fingerprint TEXT NOT NULL);
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
        self._version = 0

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

    async def advance(
        self, owner: str, token: int, schedule: str, due: float, *, final: bool, done_ttl: float
    ) -> int:
        def work(db: sqlite3.Connection) -> int:
            row = db.execute("SELECT due FROM cursors WHERE id = ?", (schedule,)).fetchone()
            if row is not None and row[0] >= due:
                return 0
            if final:
                db.execute("DELETE FROM cursors WHERE id = ?", (schedule,))
                if db.execute("DELETE FROM specs WHERE id = ?", (schedule,)).rowcount:
                    self._bump(db)
                db.execute(
                    "INSERT OR REPLACE INTO done VALUES (?, ?)", (schedule, time.time() + done_ttl)
                )
            else:
                db.execute("INSERT OR REPLACE INTO cursors VALUES (?, ?)", (schedule, due))
            return 1

        return await self._call(work)

    def _bump(self, db: sqlite3.Connection) -> None:
        db.execute(
            "INSERT INTO meta VALUES ('version', 1) "
            "ON CONFLICT(key) DO UPDATE SET value = value + 1"
        )

    async def cursor(self, schedule: str, default: float) -> float:
        def work(db: sqlite3.Connection) -> float:
            db.execute("INSERT OR IGNORE INTO cursors VALUES (?, ?)", (schedule, default))
            row = db.execute("SELECT due FROM cursors WHERE id = ?", (schedule,)).fetchone()
            return float(row[0])

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

    async def version(self) -> int:
        def work(db: sqlite3.Connection) -> int:
            row = db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
            return int(row[0]) if row else 0

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
            db.execute("DELETE FROM cursors WHERE id = ?", (schedule,))
            self._bump(db)
            return True

        return await self._call(work)

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
