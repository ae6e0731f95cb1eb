"""The one supported way for a gateway to keep its own keys beside a Redis layer.

MQTT's run-time subscriptions, the scheduler's state and lease, Slack's de-dup window and
installations and the IRC gateway's lease live in the Redis the layer already uses, so an
integration needs no second Redis setting and every replica sees the same keys.
:func:`layer_redis` gives a gateway a :class:`LayerRedis` for the layer, or ``None`` when the
layer is not Redis-backed (memory://, a custom layer): the gateway then keeps that state in
memory (the scheduler: in a local SQLite file) and says so.

House rules:

* **Own connections, not the layer's.** :class:`LayerRedis` opens its own small pool, from the
  layer's public settings (``hosts``, ``prefix``, ``durability``, ``durability_timeout``), never
  through the layer's connections: the layer's pool and its options (no socket timeout, for
  idle fetches) stay the layer's, and a store call cannot starve a receive.
* **The layer's topology** (its first host; a sharded layer keeps these keys on the first):
  a ``redis://`` address; Sentinel hosts (``{"sentinels": […], "master_name": …}``: the master
  the Sentinels name, found again on every new connection, so a failover moves the keys' client
  to the promoted replica); or a Redis Cluster (``{"cluster": [urls]}``, ``redis+cluster://``):
  a ``RedisCluster`` client that follows ``MOVED``/``ASK``.
* **Keys under the layer's prefix**: ``{prefix}:gateways:{protocol}:{name}:{what}``, so
  ``layer.flush()`` and a shared Redis with other prefixes behave as for the layer's own keys.
  On a Redis Cluster the integration's part is a hash tag
  (``asgi:gateways:{scheduler:nightly}:lease``), so every key of one integration is in one hash
  slot and each store's scripts and multi-key calls stay valid (on plain Redis and Sentinel the
  names have no braces: moving a deployment to a cluster starts these keys afresh).
* **Durability** (the layer's ``durability="replicated"``, the streams layer's option):
  :meth:`LayerRedis.write` and :meth:`LayerRedis.script` with ``durable=True`` are the writes
  that precede an acknowledgement; each is followed by ``WAIT 1 <durability_timeout>`` on the
  connection that made it (on a cluster: on the master of the key's slot, in the same
  pipeline), and raises :class:`NotReplicated` (a :class:`RedisUnavailable`) when no replica
  confirmed it in time. The write may still be on the master: the caller treats it as not
  accepted, as when the answer to a write is lost.
* **Bounded calls**: each call has a socket timeout (``timeout``, 5 s) and every Redis or
  network error is a :class:`RedisUnavailable` with a one-line reason.
* **Closed by the gateway** (:meth:`LayerRedis.close` in its ``close()``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final, cast

from channels_redis.core import RedisChannelLayer
from redis import asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.commands.core import AsyncScript
from redis.exceptions import RedisClusterException, RedisError

from core.streams import cluster_startup
from core.types import ChannelLayer

__all__ = ["STORE_TIMEOUT", "LayerRedis", "NotReplicated", "RedisUnavailable", "layer_redis"]

#: seconds for one call (connect, command, answer)
STORE_TIMEOUT: Final = 5.0

#: what a call raises when Redis cannot answer it (OSError: timeouts, refused connections;
#: RedisClusterException: a cluster with no reachable node or an uncovered slot)
_ERRORS: Final = (RedisError, OSError, RedisClusterException)


class RedisUnavailable(Exception):
    """A call failed: Redis down, timed out, or refused it. The text says which key and why."""


class NotReplicated(RedisUnavailable):
    """``durability="replicated"``: the master took the write and no replica confirmed it
    within ``durability_timeout`` (``WAIT 1``). It is not accepted; it may still be on the
    master (and lost by a failover)."""


class LayerRedis:
    """A ``redis.asyncio.Redis`` (or ``RedisCluster``) for one integration's keys next to its
    layer's."""

    def __init__(
        self,
        client: Any,
        prefix: str,
        description: str,
        *,
        cluster: bool = False,
        durability_timeout: float | None = None,
        closing: Sequence[Any] = (),
    ) -> None:
        #: the client (``redis.asyncio.Redis``, or ``RedisCluster`` on a cluster); use
        #: :meth:`call` (errors as :class:`RedisUnavailable`) or use it directly
        self.client = client
        #: every key of this integration starts with it (on a cluster: with its hash tag)
        self.prefix = prefix
        #: for logs: the host, never the password
        self.description = description
        #: the client is a ``RedisCluster``
        self.cluster = cluster
        #: seconds a durable write waits for a replica; ``None``: no waiting (``async``)
        self.durability_timeout = durability_timeout
        self._closing = list(closing)

    @property
    def replicated(self) -> bool:
        """Durable writes wait for a replica (the layer's ``durability="replicated"``)."""
        return self.durability_timeout is not None

    def key(self, what: str) -> str:
        """``{layer prefix}:gateways:{protocol}:{name}:{what}`` (on a cluster the
        ``{protocol}:{name}`` part is the keys' hash tag)."""
        return f"{self.prefix}{what}"

    def _unavailable(self, what: str, exc: BaseException) -> RedisUnavailable:
        text = " ".join((str(exc) or type(exc).__name__).split())
        return RedisUnavailable(f"Redis at {self.description}: {what}: {text}")

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``client.<method>(*args)``; Redis and network errors become :class:`RedisUnavailable`."""
        try:
            return await getattr(self.client, method)(*args, **kwargs)
        except _ERRORS as exc:
            raise self._unavailable(method, exc) from exc

    async def write(self, method: str, key: str, *args: Any, **kwargs: Any) -> Any:
        """``client.<method>(key, *args)``, a write that precedes an acknowledgement: with
        ``durability="replicated"`` it is accepted only once a replica has it (else
        :class:`NotReplicated`)."""
        if not self.replicated:
            return await self.call(method, key, *args, **kwargs)
        return await self._durably(method, key, lambda p: getattr(p, method)(key, *args, **kwargs))

    async def script(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any], *, durable: bool
    ) -> Any:
        """Run a script registered on :attr:`client` (``register_script``); ``durable``: a write
        that precedes an acknowledgement, as :meth:`write`."""
        if durable and self.replicated:
            code = cast(str, script.script)
            return await self._durably(
                "script", keys[0], lambda p: p.eval(code, len(keys), *keys, *args)
            )
        try:
            return await script(keys=list(keys), args=list(args))
        except _ERRORS as exc:
            raise self._unavailable("script", exc) from exc

    async def _durably(self, what: str, key: str, queue: Callable[[Any], Any]) -> Any:
        """``queue`` (one write) then ``WAIT 1 <ms>`` in one pipeline: one connection (on a
        cluster, the one to the master of ``key``'s slot), so the WAIT covers the write."""
        assert self.durability_timeout is not None
        timeout_ms = max(1, round(self.durability_timeout * 1000))
        node: ClusterNode | None = None
        try:
            pipe = self.client.pipeline(transaction=False)
            queue(pipe)
            if self.cluster:
                await self.client.initialize()
                node = self.client.get_node_from_key(key)
                pipe.execute_command("WAIT", 1, timeout_ms, target_nodes=node)
            else:
                pipe.execute_command("WAIT", 1, timeout_ms)
            answer, replicas = await pipe.execute()
        except _ERRORS as exc:
            raise self._unavailable(what, exc) from exc
        if isinstance(replicas, dict):  # a cluster client's answer by node
            replicas = sum(int(v) for v in replicas.values())
        if int(replicas) < 1:
            why = f"no replica confirmed it within durability_timeout={self.durability_timeout:g}s"
        elif node is not None and self.client.get_node_from_key(key).name != node.name:
            why = "its hash slot moved to another master while it was written"
        else:
            return answer
        raise NotReplicated(
            f"Redis at {self.description}: {what}: the write is not replicated ({why}); "
            "not accepted"
        )

    async def close(self) -> None:
        """Close the connections. Idempotent."""
        await self.client.aclose()
        for client in self._closing:
            await client.aclose()


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
    durable = getattr(layer, "durability", "async") == "replicated"
    kwargs: dict[str, Any] = {
        "durability_timeout": float(getattr(layer, "durability_timeout", 1.0)) if durable else None
    }
    prefix = f"{layer.prefix}:gateways:{protocol}:{name}:"
    for option in ("socket_timeout", "retry_on_timeout", "timeout"):
        host.pop(option, None)
    bounded: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if "cluster" in host:
        client, where = _cluster_client(host, bounded)
        prefix = f"{layer.prefix}:gateways:{{{protocol}:{name}}}:"
        return LayerRedis(client, prefix, where, cluster=True, **kwargs)
    if "master_name" in host:
        master = host.pop("master_name")
        sentinels = host.pop("sentinels")
        sentinel_kwargs = {**bounded, **(host.pop("sentinel_kwargs", None) or {})}
        # redis-py types these from 8.2 on and not before (as core.streams does)
        sentinel = cast(Any, Sentinel)(sentinels, sentinel_kwargs=sentinel_kwargs)
        client = sentinel.master_for(master, redis_class=aioredis.Redis, **host, **bounded)
        nodes = ",".join(f"{h}:{p}" for h, p in sentinels)
        where = f"Sentinel master {master!r} via {nodes}"
        return LayerRedis(client, prefix, where, closing=sentinel.sentinels, **kwargs)
    address = host.pop("address", None)
    if address is not None:
        plain = aioredis.Redis.from_url(address, **host, **bounded)
    else:  # host=…, port=… keys
        plain = aioredis.Redis(**host, **bounded)
    options = plain.connection_pool.connection_kwargs
    where = f"{options.get('host', '?')}:{options.get('port', '?')}/{options.get('db', 0)}"
    return LayerRedis(plain, prefix, where, **kwargs)


def _cluster_client(host: dict[str, Any], bounded: dict[str, Any]) -> tuple[RedisCluster, str]:
    """A ``RedisCluster`` for a cluster host (the startup nodes ``redis://h:p``, ``"h:p"`` or
    ``(h, p)``; the first URL's password and TLS apply to every node, as in core.streams) and
    its description."""
    nodes, options = cluster_startup(host)
    where = "Cluster " + ",".join(f"{node.host}:{node.port}" for node in nodes)
    return cast(Any, RedisCluster)(startup_nodes=nodes, **(bounded | options)), where
