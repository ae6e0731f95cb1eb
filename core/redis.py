"""The one supported way for a gateway to keep its own keys beside a ``redis://`` layer.

MQTT's run-time subscriptions, the scheduler's lease and Slack's de-dup window live in the Redis
the layer already uses, so an integration needs no second Redis setting and every replica sees
the same keys. :func:`layer_redis` gives a gateway a :class:`LayerRedis` for the layer, or
``None`` when the layer is not Redis-backed (memory://, a custom layer): the gateway then keeps
that state in memory and says so.

House rules:

* **Own connections, not the layer's.** :class:`LayerRedis` opens its own small pool to the
  layer's first host, from the layer's public settings (``hosts``, ``prefix``), never through
  channels_redis internals (``layer.connection(0)``): the layer's pool and its options (no
  socket timeout, for idle ``BZPOPMIN``) stay the layer's, and a store call cannot starve a
  receive. A sharded layer (several hosts) keeps these keys on the first host.
* **Keys under the layer's prefix**: ``{prefix}:gateways:{protocol}:{name}:{what}``, so
  ``layer.flush()`` and a shared Redis with other prefixes behave as for the layer's own keys.
* **Bounded calls**: each call has a socket timeout (``timeout``, 5 s) and every Redis or
  network error is a :class:`RedisUnavailable` with a one-line reason.
* **Closed by the gateway** (:meth:`LayerRedis.close` in its ``close()``).
"""

from __future__ import annotations

from typing import Any, Final

from channels_redis.core import RedisChannelLayer
from redis import asyncio as aioredis
from redis.exceptions import RedisError

from core.types import ChannelLayer

__all__ = ["STORE_TIMEOUT", "LayerRedis", "RedisUnavailable", "layer_redis"]

#: seconds for one call (connect, command, answer)
STORE_TIMEOUT: Final = 5.0


class RedisUnavailable(Exception):
    """A call failed: Redis down, timed out, or refused it. The text says which key and why."""


class LayerRedis:
    """A ``redis.asyncio.Redis`` for one integration's keys next to its layer's."""

    def __init__(self, client: aioredis.Redis, prefix: str, description: str) -> None:
        #: the client; use :meth:`call` (errors as :class:`RedisUnavailable`) or use it directly
        self.client = client
        #: every key of this integration starts with it
        self.prefix = prefix
        #: for logs: the host, never the password
        self.description = description

    def key(self, what: str) -> str:
        """``{layer prefix}:gateways:{protocol}:{name}:{what}``."""
        return f"{self.prefix}{what}"

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``client.<method>(*args)``; Redis and network errors become :class:`RedisUnavailable`."""
        try:
            return await getattr(self.client, method)(*args, **kwargs)
        except (RedisError, OSError) as exc:  # OSError: TimeoutError, ConnectionError
            text = str(exc) or type(exc).__name__
            raise RedisUnavailable(f"Redis at {self.description}: {method}: {text}") from exc

    async def close(self) -> None:
        """Close the connections. Idempotent."""
        await self.client.aclose()


def layer_redis(
    layer: ChannelLayer, protocol: str, name: str, *, timeout: float = STORE_TIMEOUT
) -> LayerRedis | None:
    """A :class:`LayerRedis` beside ``layer``, or ``None`` when ``layer`` is not Redis-backed.

    Connects lazily: nothing is opened until the first call.
    """
    from core.streams import StreamsChannelLayer

    if not isinstance(layer, RedisChannelLayer | StreamsChannelLayer):
        return None
    host = dict(layer.hosts[0])
    address = host.pop("address", None)
    if address is None or "master_name" in host:
        return None  # a sentinel or host/port layer: not a layout this suite sets up
    options = {k: v for k, v in host.items() if k not in ("socket_timeout", "retry_on_timeout")}
    options.update(socket_timeout=timeout, socket_connect_timeout=timeout)
    client = aioredis.Redis.from_url(address, **options)
    kwargs = client.connection_pool.connection_kwargs
    where = f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
    return LayerRedis(client, f"{layer.prefix}:gateways:{protocol}:{name}:", where)
