"""The de-dup window: event ids already handed to the layer, so a retried delivery is not.

With a Redis layer the window is Redis keys next to the layer's own, reached through
:mod:`core.redis` (the layer's host and prefix), so a restarted gateway and every replica see
the same ids:

    {prefix}:gateways:slack:{name}:seen:{event id}   "pending" | "done", with a TTL

(on a Redis Cluster ``slack:{name}`` is the keys' hash tag, e.g.
``asgi:gateways:{slack:acme}:seen:Ev123``: :mod:`core.redis`).
With the layer's ``durability="replicated"`` the ``done`` mark counts only once a replica has
it; a mark no replica confirmed is handled as one Redis did not take (below: remembered in
this process). The event itself is acknowledged either way: the layer has it (its own
``durability`` covers that); the mark only keeps a redelivery from being published again.

Any other layer keeps an in-memory window bounded by ``dedup.max_entries`` (the oldest id is
forgotten first).

An id goes through two states. :meth:`DedupWindow.claim` marks it ``pending`` for a short
time (Redis ``SET NX PX``, atomic across replicas) and says what it found:

* :attr:`Claim.NEW` — nobody has it: hand the event to the layer, then :meth:`DedupWindow.done`
  (``done`` for the whole window) or, when the layer did not take it,
  :meth:`DedupWindow.release` so Slack's redelivery goes through;
* :attr:`Claim.DONE` — delivered before: acknowledge, do not publish again;
* :attr:`Claim.PENDING` — another delivery of it is being handed over right now (by a replica;
  within one process the gateway sees it first): do **not** acknowledge, since that hand-off
  may still fail; Slack retries.

A ``pending`` mark left by a process that died expires after ``pending_for`` seconds. When
Redis cannot answer, an id counts as new: a duplicate is better than a lost event. Two things
keep that from becoming a duplicate within one process: the gateway keeps the ids it is
handing over in memory as well (a redelivery follows the hand-off in progress), and an id whose
``done`` could not be written to Redis is remembered ``done`` in memory
(:class:`RedisDedupWindow`, bounded by ``max_entries``).
"""

from __future__ import annotations

import enum
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from core.metrics import GatewayMetrics
from core.redis import LayerRedis, RedisUnavailable

__all__ = ["Claim", "DedupWindow", "RedisDedupWindow", "TtlMemory"]


class Claim(enum.Enum):
    NEW = "new"
    DONE = "done"
    PENDING = "pending"


class DedupWindow:
    """In memory: at most ``max_entries`` ids; ``done`` for ``window`` seconds."""

    description = "memory"

    def __init__(
        self,
        window: float,
        max_entries: int,
        pending_for: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.max_entries = max_entries
        self.pending_for = pending_for
        self.clock = clock
        #: id → (done?, expiry on ``clock``); oldest first
        self._seen: OrderedDict[str, tuple[bool, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    async def claim(self, key: str) -> Claim:
        now = self.clock()
        while self._seen:
            oldest, (_, expires) = next(iter(self._seen.items()))
            if expires > now and len(self._seen) < self.max_entries:
                break
            del self._seen[oldest]
        found = self._seen.get(key)
        if found is not None and found[1] > now:
            return Claim.DONE if found[0] else Claim.PENDING
        self._seen[key] = (False, now + self.pending_for)
        self._seen.move_to_end(key)
        return Claim.NEW

    def is_done(self, key: str) -> bool:
        """``key`` is marked ``done`` (without touching it)."""
        found = self._seen.get(key)
        return found is not None and found[0] and found[1] > self.clock()

    async def done(self, key: str) -> None:
        self._seen[key] = (True, self.clock() + self.window)
        self._seen.move_to_end(key)
        while len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)

    async def release(self, key: str) -> None:
        self._seen.pop(key, None)

    async def close(self) -> None:
        return None


class RedisDedupWindow(DedupWindow):
    """Redis keys with a TTL beside a Redis layer (:mod:`core.redis`)."""

    def __init__(
        self,
        redis: LayerRedis,
        window: float,
        pending_for: float,
        metrics: GatewayMetrics,
        log: logging.Logger,
        max_entries: int = 100_000,
    ) -> None:
        super().__init__(window, 1, pending_for)
        #: ids delivered whose ``done`` mark Redis did not take (it went away meanwhile)
        self.unwritten = DedupWindow(window, max_entries, pending_for)
        self.redis = redis
        self.metrics = metrics
        self.log = log
        self.description = f"Redis keys {redis.key('seen:')}*"
        self._failing = False

    def _key(self, key: str) -> str:
        return self.redis.key(f"seen:{key}")

    def _unavailable(self, exc: RedisUnavailable) -> None:
        self.metrics.error("dedup_unavailable")
        if not self._failing:
            self.log.warning("de-dup window unavailable (%s); events pass unchecked", exc)
        self._failing = True

    async def claim(self, key: str) -> Claim:
        if self.unwritten.is_done(key):
            return Claim.DONE
        try:
            for _ in range(2):  # a second try when the mark expired between SET and GET
                new = await self.redis.call(
                    "set", self._key(key), "pending", nx=True, px=_ms(self.pending_for)
                )
                if new:
                    break
                state = await self.redis.call("get", self._key(key))
                if state is not None:
                    return Claim.DONE if state == b"done" else Claim.PENDING
        except RedisUnavailable as exc:
            self._unavailable(exc)
            return Claim.NEW
        if self._failing:
            self.log.info("de-dup window reachable again")
            self._failing = False
        return Claim.NEW

    async def done(self, key: str) -> None:
        try:
            await self.redis.write("set", self._key(key), "done", px=_ms(self.window))
        except RedisUnavailable as exc:
            self._unavailable(exc)  # the pending mark expires; this process remembers it
            await self.unwritten.done(key)

    async def release(self, key: str) -> None:
        try:
            await self.redis.call("delete", self._key(key))
        except RedisUnavailable as exc:
            self._unavailable(exc)  # the pending mark expires after pending_for seconds

    async def close(self) -> None:
        await self.redis.close()


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class TtlMemory:
    """Key → value for a while (``ttl`` s on ``clock``), at most ``size`` (oldest forgotten)."""

    def __init__(self, ttl: float, size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.size = size
        self.clock = clock
        self._items: dict[str, tuple[Any, float]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def put(self, key: str, value: Any) -> None:
        self._items.pop(key, None)
        self._items[key] = (value, self.clock() + self.ttl)
        while len(self._items) > self.size:
            del self._items[next(iter(self._items))]

    def get(self, key: str) -> Any:
        found = self._items.get(key)
        if found is None:
            return None
        if found[1] <= self.clock():
            del self._items[key]
            return None
        return found[0]

    def forget(self, matches: Any) -> None:
        """Drop every entry whose value ``matches(value)``."""
        for key in [k for k, (v, _) in self._items.items() if matches(v)]:
            del self._items[key]
