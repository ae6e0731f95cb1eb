"""Catch gateways and workers on different Redis layers: one WARNING instead of silence.

A ``redis://`` layer path gives the streams layer (:mod:`core.streams`: a Redis stream per
channel), while a Django project configured the way every Channels project is
(``channels_redis.core.RedisChannelLayer`` in ``CHANNEL_LAYERS``) reads channels_redis' sorted
sets on the same Redis. Neither side sees the other's messages and nothing fails: the gateway
only stalls once ``capacity`` messages wait, and then names the wrong cause (issue 29). Each
side checks what it can see, every third of :func:`check_after` seconds:

* :class:`StreamsReadCheck`, in a gateway on the streams layer: for every channel it sent
  events to, is anything reading them? Suspect when the oldest message not yet fetched by the
  stream's group has waited ``after`` seconds and no consumer of the group fetched anything
  for that long (``XINFO GROUPS`` / ``XINFO CONSUMERS``, the entry after the group's last
  delivered id). A consumer still holding fetched messages (a slow handler) counts as reading
  for ``redelivery_timeout`` more seconds. The group exists as soon as the stream does
  (core.streams creates both), so "no group" says nothing.
* :class:`ChannelsRedisCheck`, in a :class:`core.worker.ConsumerWorker` on the streams layer:
  does a channel it reads have messages in channels_redis' format (the sorted set
  ``{prefix}{channel}``, channels_redis 4.2 and 4.3's key) whose oldest stays unread for
  ``after`` seconds? channels_redis receivers pop the oldest first, so one that stays put is
  read by nobody. Compared by the member itself, not by its timestamp: no clocks compared.

Either way: one WARNING per channel naming both layers and the fix, the reason on ``/readyz``
until it clears (then one INFO line), and ``gateway_layer_unread_channels`` counts such
channels. On any other layer the checks do nothing. ``GATEWAYS_LAYER_CHECK_AFTER`` sets
``after`` (seconds, default :data:`DEFAULT_AFTER`; ``0`` turns the checks off); for the worker
check it must stay under channels_redis' ``expiry`` (60 s), which drops older messages.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import Gauge

from core.metrics import REGISTRY
from core.types import ChannelLayer

if TYPE_CHECKING:
    from core.streams import StreamsChannelLayer

__all__ = [
    "DEFAULT_AFTER",
    "ENV_AFTER",
    "ChannelsRedisCheck",
    "StreamsReadCheck",
    "check_after",
]

#: seconds a channel may go unread before the checks speak
DEFAULT_AFTER: Final = 30.0
#: the environment variable that sets it
ENV_AFTER: Final = "GATEWAYS_LAYER_CHECK_AFTER"
#: channels one check looks at at most (a gateway's inbound channels, a worker's channels)
MAX_CHANNELS: Final = 1000
#: seconds one look may take; a slow or unreachable Redis skips it (the layer probe says so)
LOOK_TIMEOUT: Final = 5.0

_UNREAD = Gauge(
    "gateway_layer_unread_channels",
    "Channels whose messages nothing reads on this process's layer (a layer mismatch?)",
    ["gateway"],
    registry=REGISTRY,
)

_logged_bad_env = False


def check_after() -> float:
    """``GATEWAYS_LAYER_CHECK_AFTER`` in seconds (default 30, 0: off); a bad value is logged
    once and the default used."""
    global _logged_bad_env
    raw = os.environ.get(ENV_AFTER, "").strip()
    if not raw:
        return DEFAULT_AFTER
    try:
        value = float(raw)
        if value < 0 or value != value:
            raise ValueError
    except ValueError:
        if not _logged_bad_env:
            _logged_bad_env = True
            logging.getLogger("gateway.layer").error(
                "%s=%r is not a number of seconds; using %g", ENV_AFTER, raw[:40], DEFAULT_AFTER
            )
        return DEFAULT_AFTER
    return value


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entry_ms(entry_id: Any) -> int:
    return int(_text(entry_id).partition("-")[0])


class _Check:
    """What both checks share: when to look, and one WARNING per channel and episode."""

    #: the short form of the fix, in the /readyz reason
    hint = ""

    def __init__(
        self, label: str, layer: ChannelLayer, log: logging.Logger, *, after: float | None = None
    ) -> None:
        self.label = label
        self.log = log
        self.after = check_after() if after is None else after
        from core.streams import StreamsChannelLayer  # imported here: only a streams layer loads it

        self.layer: StreamsChannelLayer | None = (
            layer if isinstance(layer, StreamsChannelLayer) else None
        )
        #: False on any layer but the streams layer, or with the checks turned off
        self.active = self.layer is not None and self.after > 0
        #: seconds between two looks
        self.interval = max(0.2, min(self.after / 3, 10.0))
        self._next = 0.0
        #: channel → its /readyz reason, while it is suspect
        self._suspect: dict[str, str] = {}
        self._gauge = _UNREAD.labels(label)

    def reasons(self) -> list[str]:
        """The /readyz reasons: one line per channel nothing reads (empty: none)."""
        return list(self._suspect.values())

    async def poll(self, channels: Iterable[str] = ()) -> None:
        """Look again if the interval passed (returns at once otherwise); never raises."""
        if not self.active:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._next:
            return
        self._next = loop.time() + self.interval
        wanted = sorted({c for c in self._channels(channels) if "!" not in c})[:MAX_CHANNELS]
        if not wanted:
            return
        try:
            found = await asyncio.wait_for(self._look(wanted), LOOK_TIMEOUT)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis unreachable: readiness says so already
            self.log.debug("%s: layer check skipped: %s", self.label, exc)
            return
        self._update(wanted, found)

    def _channels(self, given: Iterable[str]) -> Iterable[str]:
        return given

    async def _look(self, channels: list[str]) -> dict[str, tuple[str, str]]:
        """channel → (WARNING text, /readyz reason) for each channel that looks unread."""
        raise NotImplementedError

    def _update(self, looked_at: list[str], found: Mapping[str, tuple[str, str]]) -> None:
        for channel, (warning, reason) in found.items():
            if channel not in self._suspect:
                self.log.warning("%s: %s", self.label, warning)
            self._suspect[channel] = reason
        for channel in [c for c in self._suspect if c in looked_at and c not in found]:
            del self._suspect[channel]
            self.log.info("%s: channel %r is read again on this layer", self.label, channel)
        self._gauge.set(len(self._suspect))


class StreamsReadCheck(_Check):
    """A gateway on the streams layer: is every channel it sends to read by a streams consumer?

    :meth:`sent` records the channels (``Gateway`` calls it for each accepted event).
    """

    def __init__(
        self, label: str, layer: ChannelLayer, log: logging.Logger, *, after: float | None = None
    ) -> None:
        super().__init__(label, layer, log, after=after)
        self._sent: set[str] = set()

    def sent(self, channel: str) -> None:
        """``channel`` got an event: look at it from now on (process-local ones never)."""
        known = channel in self._sent or len(self._sent) >= MAX_CHANNELS
        if self.active and "!" not in channel and not known:
            self._sent.add(channel)

    def _channels(self, given: Iterable[str]) -> Iterable[str]:
        return [*self._sent, *given]

    async def _look(self, channels: list[str]) -> dict[str, tuple[str, str]]:
        from core.streams import GROUP

        layer = self.layer
        assert layer is not None
        after_ms = self.after * 1000
        # a consumer holding fetched messages is reading, slowly, until the layer would hand
        # them to another one anyway
        holding_ms = (layer.redelivery_timeout + self.after) * 1000
        by_host: dict[int, list[tuple[str, str]]] = {}
        for channel in channels:
            index, key = layer._where(channel)
            by_host.setdefault(index, []).append((channel, key))
        found: dict[str, tuple[str, str]] = {}
        for index, items in by_host.items():
            client = layer.connection(index)
            # Redis' clock, asked on its own: a Redis Cluster pipeline refuses TIME (no key)
            seconds, micros = await client.time()
            now_ms = int(seconds) * 1000 + int(micros) // 1000
            pipe = client.pipeline(transaction=False)
            for _channel, key in items:
                pipe.xlen(key)
                pipe.xinfo_groups(key)
                pipe.xinfo_consumers(key, GROUP)
            replies = await pipe.execute(raise_on_error=False)
            unread: list[tuple[str, str, int, str]] = []
            for position, (channel, key) in enumerate(items):
                length, groups, consumers = replies[3 * position : 3 + 3 * position]
                if isinstance(length, Exception) or not length or isinstance(groups, Exception):
                    continue  # no stream: nothing waits
                group = next(
                    (_dict(g) for g in groups if _text(_dict(g).get("name")) == GROUP), None
                )
                pending = int(group.get("pending", 0)) if group else 0
                waiting = int(length) - pending
                if waiting <= 0:
                    continue
                readers = [] if isinstance(consumers, Exception) else [_dict(c) for c in consumers]
                if any(
                    int(c.get("idle", 0)) < after_ms
                    or (int(c.get("pending", 0)) and int(c.get("idle", 0)) < holding_ms)
                    for c in readers
                ):
                    continue
                last = _text(group.get("last-delivered-id", "0-0")) if group else "0-0"
                unread.append((channel, key, waiting, last))
            if not unread:
                continue
            pipe = client.pipeline(transaction=False)
            for _channel, key, _waiting, last in unread:
                pipe.xrange(key, min=f"({last}", max="+", count=1)
            oldest = await pipe.execute(raise_on_error=False)
            for (channel, key, waiting, _last), entries in zip(unread, oldest, strict=True):
                if isinstance(entries, Exception) or not entries:
                    continue
                age = (now_ms - _entry_ms(entries[0][0])) / 1000
                if age * 1000 >= after_ms:
                    found[channel] = self._describe(channel, key, waiting, age)
        return found

    def _describe(self, channel: str, key: str, waiting: int, age: float) -> tuple[str, str]:
        warning = (
            f"nothing on the streams layer has read channel {channel!r} for {age:.0f} s while "
            f"{waiting} message(s) wait in its Redis stream {key!r}. This gateway writes the "
            "streams layer (core.streams.StreamsChannelLayer); workers on channels_redis "
            "(channels_redis.core.RedisChannelLayer in CHANNEL_LAYERS) read another format on "
            "the same Redis and never see these messages. Use one layer on both sides: start "
            "the gateway with --layer 'redis://…?layer=channels_redis', or give the workers "
            "the streams layer with CHANNEL_LAYERS = {'default': "
            "core.layers.channel_layer_settings('redis://…')} in Django settings. If no "
            f"worker runs for it yet: manage.py runworker {channel}"
        )
        reason = (
            f"channel {channel!r}: {waiting} message(s) unread on the streams layer for "
            f"{age:.0f} s (workers on channels_redis? use ?layer=channels_redis or "
            "channel_layer_settings(); see the log)"
        )
        return warning, reason


class ChannelsRedisCheck(_Check):
    """A worker on the streams layer: do its channels fill up in channels_redis' format?"""

    def __init__(
        self, label: str, layer: ChannelLayer, log: logging.Logger, *, after: float | None = None
    ) -> None:
        super().__init__(label, layer, log, after=after)
        #: channel → (digest of its oldest channels_redis message, when first seen oldest)
        self._oldest: dict[str, tuple[bytes, float]] = {}

    async def _look(self, channels: list[str]) -> dict[str, tuple[str, str]]:
        layer = self.layer
        assert layer is not None
        now = asyncio.get_running_loop().time()
        by_host: dict[int, list[tuple[str, str]]] = {}
        for channel in channels:
            # channels_redis' key for a channel, and its host: the same CRC32 ring as ours
            by_host.setdefault(layer._where(channel)[0], []).append(
                (channel, f"{layer.prefix}{channel}")
            )
        found: dict[str, tuple[str, str]] = {}
        for index, items in by_host.items():
            pipe = layer.connection(index).pipeline(transaction=False)
            for _channel, key in items:
                pipe.type(key)
                pipe.zcard(key)
                pipe.zrange(key, 0, 0)
            replies = await pipe.execute(raise_on_error=False)
            for position, (channel, key) in enumerate(items):
                kind, count, oldest = replies[3 * position : 3 * position + 3]
                if _text(kind) != "zset" or isinstance(count, Exception) or not count or not oldest:
                    self._oldest.pop(channel, None)
                    continue
                digest = hashlib.blake2b(oldest[0], digest_size=16).digest()
                seen = self._oldest.get(channel)
                if seen is None or seen[0] != digest:
                    self._oldest[channel] = seen = (digest, now)
                age = now - seen[1]
                if age >= self.after:
                    found[channel] = self._describe(channel, key, int(count), age)
        return found

    def _describe(self, channel: str, key: str, count: int, age: float) -> tuple[str, str]:
        warning = (
            f"messages for channel {channel!r} wait in channels_redis' format (Redis key "
            f"{key!r}, {count} message(s), the oldest unread for {age:.0f} s) while this "
            "worker reads the streams layer (core.streams.StreamsChannelLayer): the gateway "
            "that sends them runs on channels_redis (?layer=channels_redis), and this worker "
            "never sees them. Use one layer on both sides: drop ?layer=channels_redis from "
            "the gateway's layer path, or give the workers channels_redis with "
            "CHANNEL_LAYERS = {'default': core.layers.channel_layer_settings("
            "'redis://…?layer=channels_redis')} in Django settings"
        )
        reason = (
            f"channel {channel!r}: {count} message(s) wait in channels_redis' format, unread "
            f"for {age:.0f} s, while this worker reads the streams layer (drop "
            "?layer=channels_redis from the gateway; see the log)"
        )
        return warning, reason


def _dict(value: Any) -> dict[str, Any]:
    """An XINFO reply entry as a dict with str keys (redis-py parses it; RESP3 or not)."""
    if isinstance(value, Mapping):
        return {_text(k): v for k, v in value.items()}
    items = list(value)
    return {_text(k): v for k, v in zip(items[::2], items[1::2], strict=False)}
