"""Resolve a layer path (DESIGN §3) into a channel layer instance.

| value                            | layer                                                   |
|----------------------------------|---------------------------------------------------------|
| ``redis://host:6379/0``          | :class:`core.streams.StreamsChannelLayer` on that host  |
| ``rediss://…``                   | the same over TLS                                       |
| ``redis://…?layer=channels_redis`` | :class:`RedisChannelLayer` (channels_redis, patched)  |
| ``redis+streams://…``            | the streams layer, explicitly (``rediss+streams://``)   |
| ``redis+cluster://h:p,h:p/``     | the streams layer on a Redis Cluster (``rediss+cluster``) |
| ``memory://``                    | ``channels.layers.InMemoryChannelLayer`` (one process)  |
| ``django`` / ``django:ALIAS``    | ``channels.layers.get_channel_layer(ALIAS)``            |
| ``package.module:attr``          | a layer instance or a zero-argument factory             |

Redis and memory URLs take ``capacity``, ``expiry`` (and, for Redis, ``prefix``) as query
parameters: ``redis://localhost:6379/0?capacity=1000&expiry=120``. ``redis+streams://`` paths
also take ``redelivery_timeout`` (seconds), ``batch``, ``group_expiry``,
``max_deliveries``, ``durability`` (``async`` or ``replicated``) and ``durability_timeout``
(seconds, may be fractional); their ``expiry`` defaults to none (see core/streams.py).
``redis+cluster://`` paths name any of the cluster's nodes (comma-separated; a password in
the first applies to all) and take the same options; docs/redis.md compares the set-ups.

redis-py 8 gives every connection a 5 s socket timeout, so an idle ``receive()`` raises
``TimeoutError`` and kills a receive loop; the host dict therefore sets ``socket_timeout=None``
(tests/core/test_layers.py idles a receive past 5 s on a real Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from channels_redis.core import RedisChannelLayer as _ChannelsRedisLayer
from redis import asyncio as aioredis
from redis import exceptions as redis_errors

from core.logs import describe_layer, redact
from core.retry import describe_error
from core.types import ChannelLayer

__all__ = [
    "LayerPathError",
    "RedisChannelLayer",
    "channel_layer_settings",
    "close_layer",
    "import_object",
    "is_memory_layer",
    "probe_layer",
    "resolve_layer",
]

#: seconds to wait for a TCP connection to Redis before a send counts as "layer unreachable"
REDIS_CONNECT_TIMEOUT = 3.0
#: connections per Redis host for sends; more callers wait for one (see create_pool)
REDIS_POOL_SIZE = 20
#: seconds a caller waits for a free connection before a ``ConnectionError`` (a layer error)
REDIS_POOL_TIMEOUT = 30.0
#: connections per Redis host for receives (one per concurrent receive; never waited for)
RECEIVE_POOL_SIZE = 10_000


# channels_redis 4.x: put messages a receiver popped but never confirmed back in the queue
_RESTORE_BACKUP = """
    local backed_up = redis.call('ZRANGE', ARGV[2], 0, -1, 'WITHSCORES')
    for i = #backed_up, 1, -2 do
        redis.call('ZADD', ARGV[1], backed_up[i], backed_up[i - 1])
    end
    redis.call('DEL', ARGV[2])
"""


# pop the oldest message and copy it to the backup set in one atomic step
_POP_TO_BACKUP = """
    local popped = redis.call('ZPOPMIN', KEYS[1])
    if popped[1] == nil then
        return nil
    end
    redis.call('ZADD', KEYS[2], popped[2], popped[1])
    return popped[1]
"""


_REDIS_DOWN = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)


class LayerPathError(ValueError):
    """The layer path is malformed or names nothing usable. The message is one line."""

    @classmethod
    def of(cls, path: str, reason: str) -> LayerPathError:
        """The error for ``path``, shown with its password replaced.

        The message reaches stderr and logs: ``redis://:S3cret@…?capacity=abc`` printed the
        password in clear (issue 14, item 4).
        """
        return cls(redact(f"invalid layer path {describe_layer(path)!r}: {reason}"))


def _int_param(path: str, name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise LayerPathError.of(path, f"{name} must be an integer") from None
    if value <= 0:
        raise LayerPathError.of(path, f"{name} must be positive")
    return value


def _redis_layer(path: str, *, streams: bool = False) -> ChannelLayer:
    try:
        parts = urlsplit(path)
    except ValueError as exc:  # "Invalid IPv6 URL" escaped as a traceback
        raise LayerPathError.of(path, str(exc)) from None
    if not parts.hostname:
        raise LayerPathError.of(path, "no host")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise LayerPathError.of(path, "bad port") from None
    query = parse_qsl(parts.query)
    for key, value in query:
        if key == "layer":
            if value not in ("streams", "channels_redis"):
                raise LayerPathError.of(path, "layer must be 'streams' or 'channels_redis'")
            streams = value == "streams"
    options, kept = _layer_options(path, query, streams=streams)
    if streams:
        scheme = parts.scheme.lower().partition("+")[0]
        address = urlunsplit(parts._replace(scheme=scheme, query=urlencode(kept)))
        from core.streams import StreamsChannelLayer

        return StreamsChannelLayer(hosts=[{"address": address}], **options)
    address = urlunsplit(parts._replace(query=urlencode(kept)))
    return RedisChannelLayer(hosts=[_redis_host(address)], **options)


_STREAMS_INT_OPTIONS = ("redelivery_timeout", "batch", "group_expiry", "max_deliveries")


def _durability_param(path: str, key: str, value: str) -> str | float:
    from core.streams import DURABILITY

    if key == "durability":
        if value not in DURABILITY:
            raise LayerPathError.of(path, f"durability must be one of {', '.join(DURABILITY)}")
        return value
    try:
        seconds = float(value)
    except ValueError:
        raise LayerPathError.of(path, f"{key} must be a number of seconds") from None
    if not 0 < seconds < 3600:
        raise LayerPathError.of(path, f"{key} must be positive (seconds)")
    return seconds


def _cluster_layer(path: str) -> ChannelLayer:
    """``redis+cluster://[user:password@]h1:p1,h2:p2[/][?options]``: the streams layer on a
    Redis Cluster whose startup nodes these are (one reachable node is enough)."""
    scheme, _, rest = path.partition("://")
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    database, _, query = tail.partition("?")
    if database not in ("", "/", "/0"):
        raise LayerPathError.of(path, "a Redis Cluster has database 0 only")
    userinfo, at, nodes = authority.rpartition("@")
    if not nodes:
        raise LayerPathError.of(path, "no host")
    options, kept = _layer_options(path, parse_qsl(query), streams=True)
    base = scheme.lower().partition("+")[0]
    suffix = f"/?{urlencode(kept)}" if kept else ""
    urls: list[str] = []
    for node in nodes.split(","):
        url = f"{base}://{userinfo}{at}{node}"
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - validates the port
        except ValueError:
            raise LayerPathError.of(path, f"bad node {node!r}") from None
        if not parts.hostname:
            raise LayerPathError.of(path, f"bad node {node!r}")
        urls.append(url + suffix)
    from core.streams import StreamsChannelLayer

    return StreamsChannelLayer(hosts=[{"cluster": urls}], **options)


def _layer_options(
    path: str, query: list[tuple[str, str]], *, streams: bool
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The layer's options in a path's query, and the rest (redis-py URL options)."""
    options: dict[str, Any] = {}
    kept: list[tuple[str, str]] = []
    for key, value in query:
        if key == "layer":
            continue
        if key in ("capacity", "expiry") or (streams and key in _STREAMS_INT_OPTIONS):
            options[key] = _int_param(path, key, value)
        elif key == "prefix":
            options[key] = value
        elif key in ("durability", "durability_timeout"):
            if not streams:
                raise LayerPathError.of(path, f"{key} needs the streams layer")
            options[key] = _durability_param(path, key, value)
        else:
            kept.append((key, value))  # redis-py URL options (ssl_cert_reqs, …)
    return options, kept


#: what a plain ``redis://`` path gives: ``"streams"`` or ``"channels_redis"``
REDIS_DEFAULT = "streams"


class RedisChannelLayer(_ChannelsRedisLayer):  # type: ignore[misc]
    """channels_redis' layer, minus one way to lose a message when Redis goes away.

    ``redis://`` layer paths resolve to it, and it is the ``BACKEND`` that
    :func:`channel_layer_settings` gives Django. channels_redis' receive pops a message
    (BZPOPMIN) and copies it to a backup set (ZADD) in a second round trip; if Redis dies between
    the two, the ZADD raises and the message, already removed from Redis and already in our
    hands, is thrown away with the error (one lost mail in tests/gateways/email/test_faults.py).
    Here it is returned anyway: losing the backup only loses protection against our own crash.
    The private methods replaced here pin channels_redis (tests/core/test_channels_redis_pin.py).
    """

    def create_pool(self, index: int) -> Any:
        """The pool for sends (and everything but receiving): bounded, and it *waits*.

        redis-py 8 caps the default pool at 100 connections and raises ``MaxConnectionsError``
        beyond; before 8 it opened a connection per concurrent call without limit. Either way
        each concurrent sender got its own round trip in flight, so with N senders every
        round trip of the one receiver waited behind N others: 10 senders 823 msg/s, 50
        senders 95 msg/s, 100 senders an error (issue 6). A bounded pool that queues callers
        keeps at most ``max_connections`` commands in flight; receiving has a pool of its own
        (:meth:`_receive_connection`) so it never queues behind senders.
        """
        host = dict(self.hosts[index])
        if "address" not in host:  # sentinel hosts: channels_redis' own pool
            return super().create_pool(index)
        address = host.pop("address")
        host.setdefault("max_connections", REDIS_POOL_SIZE)
        host.setdefault("timeout", REDIS_POOL_TIMEOUT)
        return aioredis.BlockingConnectionPool.from_url(address, **host)

    def _receive_connection(self, index: int) -> Any:
        """A client for receiving on host ``index``, on a pool that senders do not use.

        A receive holds its connection while BZPOPMIN waits, so this pool must not make it
        wait for one: it is unbounded in practice (one connection per concurrent receive).
        It lives beside channels_redis' own client in this event loop's ``RedisLoopLayer``,
        which closes it with the rest (``close_pools``, loop close).
        """
        self.connection(index)  # creates this loop's RedisLoopLayer
        loop_layer = self._layers[asyncio.get_running_loop()]
        key = ("receive", index)
        client = loop_layer._connections.get(key)
        if client is None:
            host = dict(self.hosts[index])
            host.pop("timeout", None)
            host["max_connections"] = RECEIVE_POOL_SIZE
            if "address" in host:
                pool = aioredis.ConnectionPool.from_url(host.pop("address"), **host)
            else:
                pool = super().create_pool(index)
            client = loop_layer._connections[key] = aioredis.Redis(connection_pool=pool)
        return client

    async def _brpop_with_clean(self, index: int, channel: str, timeout: int) -> Any:
        backup = self._backup_channel_name(channel)
        connection = self._receive_connection(index)
        await connection.eval(_RESTORE_BACKUP, 0, channel, backup)
        # A waiting message is popped and backed up in one step: if Redis dies before the
        # reply reaches us, the message is in the backup set and the next receive restores
        # it (a BZPOPMIN whose reply is lost is lost: one mail in 20 runs of test_faults.py).
        # Only a message that arrives while we block still goes through BZPOPMIN.
        member = await connection.eval(_POP_TO_BACKUP, 2, channel, backup)
        if member is not None:
            return member
        result = await connection.bzpopmin(channel, timeout=timeout)
        if result is None:
            return None
        _, member, score = result
        with contextlib.suppress(*_REDIS_DOWN):  # the message is ours now: see above
            await connection.zadd(backup, {member: float(score)})
        return member

    async def _clean_receive_backup(self, index: int, channel: str) -> None:
        # runs as a fire-and-forget task: an error would only be "never retrieved" noise, and
        # with Redis down there is no backup to clean anyway
        # on the receive pool: receive_single holds the channel's lock until this is done
        with contextlib.suppress(*_REDIS_DOWN):
            await self._receive_connection(index).zpopmin(self._backup_channel_name(channel))


def _redis_host(address: str) -> dict[str, Any]:
    return {
        "address": address,
        # redis-py 8 defaults to a 5 s read timeout, which kills an idle receive()
        "socket_timeout": None,
        "socket_connect_timeout": REDIS_CONNECT_TIMEOUT,
        "retry_on_timeout": False,
    }


def channel_layer_settings(path: str) -> dict[str, Any]:
    """A ``CHANNEL_LAYERS["default"]`` entry for Django settings from a layer path.

    Use it so ``runworker`` gets the same Redis options as the gateways (above all
    ``socket_timeout=None``)::

        CHANNEL_LAYERS = {"default": channel_layer_settings(os.environ["GATEWAYS_LAYER"])}
    """
    from channels.layers import InMemoryChannelLayer

    layer = resolve_layer(path)
    if isinstance(layer, InMemoryChannelLayer):
        return {
            "BACKEND": "channels.layers.InMemoryChannelLayer",
            "CONFIG": {"capacity": layer.capacity, "expiry": layer.expiry},
        }
    from core.streams import StreamsChannelLayer

    if isinstance(layer, StreamsChannelLayer):
        return {
            "BACKEND": "core.streams.StreamsChannelLayer",
            "CONFIG": {
                "hosts": layer.hosts,
                "capacity": layer.capacity,
                "expiry": layer.expiry,
                "prefix": layer.prefix,
                "group_expiry": layer.group_expiry,
                "redelivery_timeout": layer.redelivery_timeout,
                "batch": layer.batch,
                "max_deliveries": layer.max_deliveries,
                "durability": layer.durability,
                "durability_timeout": layer.durability_timeout,
            },
        }
    if not isinstance(layer, RedisChannelLayer):
        raise LayerPathError.of(
            path, "only redis://, redis+streams://, redis+cluster:// and memory:// fit here"
        )
    return {
        "BACKEND": "core.layers.RedisChannelLayer",
        "CONFIG": {
            "hosts": [_redis_host(h["address"]) for h in layer.hosts],
            "capacity": layer.capacity,
            "expiry": layer.expiry,
            "prefix": layer.prefix,
        },
    }


def _memory_layer(path: str) -> ChannelLayer:
    try:
        parts = urlsplit(path)
    except ValueError as exc:
        raise LayerPathError.of(path, str(exc)) from None
    if parts.netloc or parts.path not in ("", "/"):
        raise LayerPathError.of(path, "memory:// takes no host or path")
    options: dict[str, Any] = {}
    for key, value in parse_qsl(parts.query):
        if key not in ("capacity", "expiry"):
            raise LayerPathError.of(path, f"unknown option {key!r}")
        options[key] = _int_param(path, key, value)
    from channels.layers import InMemoryChannelLayer

    layer: ChannelLayer = InMemoryChannelLayer(**options)
    return layer


def _django_layer(path: str) -> ChannelLayer:
    alias = path.partition(":")[2] or None
    if not os.environ.get("DJANGO_SETTINGS_MODULE"):
        raise LayerPathError.of(path, "DJANGO_SETTINGS_MODULE is not set")
    import django
    from django.apps import apps
    from django.conf import settings

    try:
        # django.apps must be imported by name: with settings configured by someone else, the
        # submodule may not be loaded yet (AttributeError: module 'django' has no attribute 'apps')
        if not settings.configured or not apps.ready:
            django.setup()
        from channels.layers import DEFAULT_CHANNEL_LAYER, get_channel_layer

        layer: ChannelLayer | None = get_channel_layer(alias or DEFAULT_CHANNEL_LAYER)
    except Exception as exc:
        raise LayerPathError.of(path, str(exc)) from None
    if layer is None:
        raise LayerPathError.of(path, f"CHANNEL_LAYERS has no {alias or 'default'!r} entry")
    return layer


def import_object(path: str) -> Any:
    """The object ``package.module:attr.sub`` names; ``ValueError`` with the reason if none."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError("expected package.module:attr")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(str(exc)) from None
    return target


def _raised(exc: BaseException) -> str:
    """``Type: message`` on one line, cut to 300 characters (it goes into a one-line error)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split()).removesuffix(":")
    return text if len(text) <= 300 else text[:300] + "…"


def _import_layer(path: str) -> ChannelLayer:
    attr = path.partition(":")[2]
    # whatever the module or the factory raises (issue 21, item 17: a RuntimeError at import
    # was a 40-line traceback, exit 1, the path in clear) is one line and exit 2; SystemExit
    # too, so a module that calls sys.exit() cannot choose the binary's exit code
    try:
        target = import_object(path)
    except ValueError as exc:
        raise LayerPathError.of(path, str(exc)) from None
    except (Exception, SystemExit) as exc:
        raise LayerPathError.of(path, f"importing it raised {_raised(exc)}") from None
    if callable(target) and not hasattr(target, "send"):
        try:
            target = target()
        except (Exception, SystemExit) as exc:
            raise LayerPathError.of(path, f"{attr}() raised {_raised(exc)}") from None
    if not all(hasattr(target, name) for name in ("send", "receive", "new_channel")):
        raise LayerPathError.of(path, f"{attr} is not a channel layer")
    # groups are optional in channels (core.types): the three checked above are what is needed
    return cast(ChannelLayer, target)


def resolve_layer(path: str) -> ChannelLayer:
    """Return the channel layer a layer path names, without connecting to anything.

    Raises :class:`LayerPathError` with a one-line message naming ``path`` when it is invalid.
    """
    path = path.strip()
    scheme = path.partition("://")[0].lower() if "://" in path else ""
    if scheme in ("redis", "rediss"):
        return _redis_layer(path, streams=REDIS_DEFAULT == "streams")
    if scheme in ("redis+streams", "rediss+streams"):
        return _redis_layer(path, streams=True)
    if scheme in ("redis+cluster", "rediss+cluster"):
        return _cluster_layer(path)
    if scheme == "memory":
        return _memory_layer(path)
    if scheme:
        raise LayerPathError.of(path, f"unknown scheme {scheme!r}")
    if path == "django" or path.startswith("django:"):
        return _django_layer(path)
    if ":" in path:
        return _import_layer(path)
    raise LayerPathError.of(
        path,
        "expected redis://…, redis+streams://…, redis+cluster://…, memory://, django[:ALIAS] "
        "or package.module:attr",
    )


def is_memory_layer(layer: ChannelLayer) -> bool:
    """True for a layer that only works inside one process."""
    from channels.layers import InMemoryChannelLayer

    return isinstance(layer, InMemoryChannelLayer)


async def probe_layer(layer: ChannelLayer) -> str | None:
    """``None`` when the layer answers, else why it does not (one line).

    Only Redis-backed layers can be asked (a PING to every host); others count as up.
    """
    connection = getattr(layer, "connection", None)
    hosts = getattr(layer, "hosts", None)
    if connection is None or not hosts:
        return None
    try:
        for index in range(len(hosts)):
            await asyncio.wait_for(connection(index).ping(), REDIS_CONNECT_TIMEOUT + 1)
    except (*_REDIS_DOWN, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return None


async def close_layer(layer: ChannelLayer, log: logging.Logger) -> None:
    """Close the layer's connections at the end of a process (a gateway's or a worker's).

    On ``core.streams`` this writes the acknowledgements still queued (batched for 10 ms; lost
    with the event loop, their messages came back as duplicates after a restart) and hands back
    what was fetched but not handled. A layer without ``close_pools`` is left as it is; one
    that does not close within 5 s is warned about on ``log``, never raised.
    """
    close = getattr(layer, "close_pools", None)
    if close is None:
        return
    try:
        await asyncio.wait_for(close(), 5)
    except Exception as exc:
        log.warning("layer: not closed cleanly (%s)", describe_error(exc))
