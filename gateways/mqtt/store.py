"""Where run-time subscriptions live between restarts.

With a channels_redis layer they are a Redis hash next to the layer's own keys, written and read
through the layer's own connection (``layer.connection(0)``, a ``redis.asyncio.Redis``), so they
need no second Redis setting and reach every replica of the integration:

    {prefix}:gateways:mqtt:{name}:subscriptions   field ["filter", "channel"] → {"qos": 1, …}

Any other layer keeps them in memory only, for the life of the process.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from gateways.mqtt.translate import Route

__all__ = ["RedisSubscriptionStore", "StoreError", "SubscriptionStore", "open_store"]

#: seconds for one Redis call; the layer's connections have no socket timeout of their own
STORE_TIMEOUT = 5.0

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


class RedisSubscriptionStore(SubscriptionStore):
    """A Redis hash reached through a channels_redis layer's own connection pool."""

    persistent = True

    def __init__(self, layer: Any, key: str) -> None:
        self.layer = layer
        self.key = key
        self.description = f"Redis hash {key!r}"

    async def _call(self, method: str, *args: Any) -> Any:
        from redis.exceptions import RedisError

        try:
            connection = self.layer.connection(0)
            return await asyncio.wait_for(
                getattr(connection, method)(self.key, *args), STORE_TIMEOUT
            )
        except (RedisError, OSError, TimeoutError) as exc:
            text = str(exc) or type(exc).__name__
            raise StoreError(f"{self.description}: {text}") from exc

    @staticmethod
    def _field(filter_: str, channel: str) -> str:
        return json.dumps([filter_, channel], ensure_ascii=False)

    async def load(self) -> list[Route]:
        raw: dict[bytes, bytes] = await self._call("hgetall")
        routes = []
        for field, value in raw.items():
            try:
                filter_, channel = json.loads(field)
                routes.append(Route.from_record(filter_, channel, json.loads(value)))
            except (ValueError, TypeError, AttributeError):
                log.warning("%s: skipping a corrupt entry %r", self.description, field[:200])
        return routes

    async def save(self, route: Route) -> None:
        await self._call(
            "hset", self._field(route.filter, route.channel), json.dumps(route.to_record())
        )

    async def delete(self, filter_: str, channel: str) -> None:
        await self._call("hdel", self._field(filter_, channel))


def open_store(layer: Any, name: str, *, enabled: bool = True) -> SubscriptionStore:
    """The Redis store when ``layer`` is a channels_redis ``RedisChannelLayer``, else memory."""
    if enabled:
        try:
            from channels_redis.core import RedisChannelLayer
        except ImportError:  # pragma: no cover - channels_redis is a dependency
            return SubscriptionStore()
        if isinstance(layer, RedisChannelLayer):
            return RedisSubscriptionStore(
                layer, f"{layer.prefix}:gateways:mqtt:{name}:subscriptions"
            )
    return SubscriptionStore()
