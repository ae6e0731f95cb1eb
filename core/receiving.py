"""The one retrying receive loop: what the gateway command loop and the consumer worker share.

Both read a channel for as long as the process lives, and both used to die of the same two
things (issue 14):

* a layer error (Redis restarted, a timeout) escaping ``receive()``: retried here with capped,
  jittered backoff, and reported through ``on_layer`` so readiness can say the layer is down;
* an entry that cannot be decoded (bytes that are not msgpack written straight into Redis, a
  message another serializer wrote): channels_redis pops it, then raises from ``deserialize``.
  It is gone from Redis at that point, so retrying cannot help: it is logged once with its
  channel, counted, and skipped.

Anything else that ``receive()`` raises is treated like an undecodable entry (logged, counted,
skipped); after ten in a row with backoff, so a persistent bug in a layer logs once a retry
instead of spinning.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from core.retry import LAYER_ERRORS, Backoff, describe_error
from core.types import ChannelLayer, Message

__all__ = ["ChannelReader"]


class ChannelReader:
    """Receives from one channel, retrying layer errors and skipping undecodable entries.

    ``label`` prefixes log lines (the integration name, or ``"worker"``); ``on_layer(ok)`` is
    called with ``False`` after a failed receive and ``True`` after a good one; ``count(kind)``
    is called with ``"layer_receive"`` for each retry and ``"undecodable"`` for each skipped
    entry, for the caller's metrics.
    """

    def __init__(
        self,
        layer: ChannelLayer,
        channel: str,
        *,
        log: logging.Logger,
        label: str,
        on_layer: Callable[[bool], None] | None = None,
        count: Callable[[str], None] | None = None,
        receive: Callable[[str], Any] | None = None,
        receive_nowait: Callable[[str], Any] | None = None,
    ) -> None:
        self.layer = layer
        #: the layer call that receives (``layer.receive`` unless given, e.g. ``receive_with_ack``)
        self._receive = receive if receive is not None else layer.receive
        #: the layer's call for what it has fetched already (``None``: nothing at hand)
        self._receive_nowait = receive_nowait
        self.channel = channel
        self.log = log
        self.label = label
        self.on_layer = on_layer
        self.count = count
        #: entries skipped because they could not be decoded
        self.skipped = 0
        self._backoff = Backoff(0.2, 10.0)

    def _counted(self, kind: str) -> None:
        if self.count is not None:
            self.count(kind)

    def _layer_state(self, ok: bool) -> None:
        if self.on_layer is not None:
            self.on_layer(ok)

    def receive_nowait(self) -> Any:
        """What the layer has fetched already for the channel, at once; ``None`` when nothing
        (or the layer has no such call: ``receive_nowait`` not given). Never raises for
        Redis: it reads no socket."""
        if self._receive_nowait is None:
            return None
        return self._receive_nowait(self.channel)

    async def receive(self) -> Message:
        """The next message on the channel; waits (and retries) as long as it takes.

        Cancelling it loses nothing: core.streams keeps what it fetched buffered (and pending in
        Redis, so it is redelivered if the process ends first), channels_redis keeps a popped
        entry in its backup set until the next receive, and the in-memory layer hands out
        nothing to a cancelled waiter.
        """
        bad_in_a_row = 0
        while True:
            try:
                message = await self._receive(self.channel)
            except asyncio.CancelledError:
                raise
            except LAYER_ERRORS as exc:
                self._layer_state(False)
                self._counted("layer_receive")
                delay = self._backoff.next()
                self.log.warning(
                    "%s: receive on %r failed (%s); retrying in %.1f s",
                    self.label,
                    self.channel,
                    describe_error(exc),
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            except Exception as exc:
                # the layer popped the entry and could not decode it: it is gone, skip it
                self.skipped += 1
                self._counted("undecodable")
                self.log.error(
                    "%s: skipped an undecodable message on %r (%s)",
                    self.label,
                    self.channel,
                    describe_error(exc)[:200],
                )
                bad_in_a_row += 1
                if bad_in_a_row > 10:  # not a few junk entries: something keeps failing
                    await asyncio.sleep(self._backoff.next())
                continue
            self._backoff.reset()
            self._layer_state(True)
            return message
