"""The de-dup window: event ids already handed to the layer, so a retried delivery is not.

With a Redis layer the window is Redis keys next to the layer's own, reached through
:mod:`core.redis` (the layer's host and prefix), so a restarted gateway and every replica see
the same ids:

    {prefix}:gateways:slack:{name}:seen:{event id}   "1", expiring after dedup.window seconds

Any other layer keeps an in-memory window bounded by ``dedup.max_entries`` (the oldest id is
forgotten first).

The protocol is claim / release: :meth:`DedupWindow.claim` marks an id as taken and says
whether it was new (Redis ``SET NX EX``, atomic across replicas); when the layer then does not
take the event, :meth:`DedupWindow.release` forgets it again so Slack's redelivery is handled.
When Redis cannot answer, an id counts as new: a duplicate is better than a lost event.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

from core.metrics import GatewayMetrics
from core.redis import LayerRedis, RedisUnavailable

__all__ = ["DedupWindow", "RedisDedupWindow"]


class DedupWindow:
    """In memory: at most ``max_entries`` ids, each for ``window`` seconds."""

    description = "memory"

    def __init__(self, window: float, max_entries: int) -> None:
        self.window = window
        self.max_entries = max_entries
        self._seen: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    async def claim(self, key: str) -> bool:
        """``True`` when ``key`` was not seen within the window (it is now)."""
        now = time.monotonic()
        while self._seen:
            oldest, expires = next(iter(self._seen.items()))
            if expires > now and len(self._seen) < self.max_entries:
                break
            del self._seen[oldest]
        if key in self._seen:
            return False
        self._seen[key] = now + self.window
        return True

    async def release(self, key: str) -> None:
        self._seen.pop(key, None)

    async def close(self) -> None:
        return None


class RedisDedupWindow(DedupWindow):
    """Redis keys with a TTL beside a Redis layer (:mod:`core.redis`)."""

    def __init__(
        self, redis: LayerRedis, window: float, metrics: GatewayMetrics, log: logging.Logger
    ) -> None:
        super().__init__(window, 1)
        self.redis = redis
        self.metrics = metrics
        self.log = log
        self.description = f"Redis keys {redis.key('seen:')}*"
        self._failing = False
        #: ids whose release failed (Redis down): still new for this process
        self._unreleased: set[str] = set()

    def _key(self, key: str) -> str:
        return self.redis.key(f"seen:{key}")

    async def claim(self, key: str) -> bool:
        if key in self._unreleased:
            # our own claim outlived a failed hand-off: the redelivery is new
            try:
                await self.redis.call("delete", self._key(key))
            except RedisUnavailable:
                return True
            self._unreleased.discard(key)
        try:
            new = await self.redis.call(
                "set", self._key(key), "1", nx=True, px=max(1, int(self.window * 1000))
            )
        except RedisUnavailable as exc:
            self.metrics.error("dedup_unavailable")
            if not self._failing:
                self.log.warning("de-dup window unavailable (%s); events pass unchecked", exc)
            self._failing = True
            return True
        if self._failing:
            self.log.info("de-dup window reachable again")
            self._failing = False
        return bool(new)

    async def release(self, key: str) -> None:
        try:
            await self.redis.call("delete", self._key(key))
        except RedisUnavailable:
            self.metrics.error("dedup_unavailable")
            if len(self._unreleased) < 100_000:
                self._unreleased.add(key)

    async def close(self) -> None:
        await self.redis.close()
