"""Where run-time subscriptions live between restarts.

With a Redis layer they are a Redis hash next to the layer's own keys, reached through
:mod:`core.redis` (the layer's host and prefix, connections of its own), so they need no second
Redis setting and reach every replica of the integration:

    {prefix}:gateways:mqtt:{name}:subscriptions   field ["filter", "channel"] → {"qos": 1, …}

(on a Redis Cluster ``mqtt:{name}`` is the keys' hash tag, e.g.
``asgi:gateways:{mqtt:sensors}:subscriptions``: :mod:`core.redis`).
With the layer's ``durability="replicated"`` a change counts only once a replica has it: else
``mqtt.subscribe``/``mqtt.unsubscribe`` answer an error (the change may still be on the master;
the command can be sent again).

Any other layer keeps them in memory only, for the life of the process.
"""

from __future__ import annotations

import json
import logging

from core.redis import LayerRedis, RedisUnavailable, layer_redis
from core.types import ChannelLayer
from gateways.mqtt.translate import Route

__all__ = ["RedisSubscriptionStore", "StoreError", "SubscriptionStore", "open_store"]

log = logging.getLogger("gateway.mqtt")


class StoreError(Exception):
    """The store could not be read or written; the text says why."""


class SubscriptionStore:
    """No persistence: run-time subscriptions last as long as the process."""

    persistent = False
    description = "memory"

    async def load(self) -> list[Route]:
        return []

    async def save(self, route: Route) -> None:
        return None

    async def delete(self, filter_: str, channel: str) -> None:
        return None

    async def close(self) -> None:
        return None


class RedisSubscriptionStore(SubscriptionStore):
    """A Redis hash beside a Redis layer (:mod:`core.redis`)."""

    persistent = True

    def __init__(self, redis: LayerRedis) -> None:
        self.redis = redis
        self.key = redis.key("subscriptions")
        self.description = f"Redis hash {self.key!r}"

    async def _call(self, method: str, *args: str, write: bool = False) -> object:
        """``write``: a change a command answers (with the layer's ``durability="replicated"``
        it counts only once a replica has it: else a :class:`StoreError`)."""
        try:
            if write:
                return await self.redis.write(method, self.key, *args)
            return await self.redis.call(method, self.key, *args)
        except RedisUnavailable as exc:
            raise StoreError(f"{self.description}: {exc}") from exc

    @staticmethod
    def _field(filter_: str, channel: str) -> str:
        return json.dumps([filter_, channel], ensure_ascii=False)

    async def load(self) -> list[Route]:
        raw = await self._call("hgetall")
        assert isinstance(raw, dict)
        routes = []
        for field, value in raw.items():
            try:
                filter_, channel = json.loads(field)
                routes.append(Route.from_record(filter_, channel, json.loads(value)))
            except (ValueError, TypeError, AttributeError):
                log.warning("%s: skipping a corrupt entry %r", self.description, field[:200])
        return routes

    async def save(self, route: Route) -> None:
        field = self._field(route.filter, route.channel)
        await self._call("hset", field, json.dumps(route.to_record()), write=True)

    async def delete(self, filter_: str, channel: str) -> None:
        await self._call("hdel", self._field(filter_, channel), write=True)

    async def close(self) -> None:
        await self.redis.close()


def open_store(layer: ChannelLayer, name: str, *, enabled: bool = True) -> SubscriptionStore:
    """The Redis store when ``layer`` is Redis-backed, else memory."""
    redis = layer_redis(layer, "mqtt", name) if enabled else None
    return RedisSubscriptionStore(redis) if redis is not None else SubscriptionStore()
