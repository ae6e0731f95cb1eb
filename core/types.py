"""The channel layer as the suite uses it: a typing ``Protocol``, so ``layer`` is never ``Any``.

channels' ``BaseChannelLayer`` is untyped and has no common base with every layer a layer path
can name (``package.module:attr`` may give any object with these methods), so core describes
the part it relies on structurally. ``channels_redis.core.RedisChannelLayer``,
``channels.layers.InMemoryChannelLayer``, :class:`core.layers.RedisChannelLayer` and
:class:`core.streams.StreamsChannelLayer` all satisfy it; ``isinstance(obj, ChannelLayer)``
checks the method names only.

Beyond channels' API a layer may have optional capabilities, each a ``Protocol`` of its own that
callers check once with ``isinstance`` (:class:`BatchSendingLayer`: ``send_many``;
:class:`AcknowledgingLayer`: ``receive_with_ack`` and what goes with it). Only
:class:`core.streams.StreamsChannelLayer` has them; code written against them works on every
other layer without them.

Groups are optional in channels (a layer may raise ``NotImplementedError``); they are in the
protocol because both layers the suite ships with have them, and callers already treat
``NotImplementedError`` / ``AttributeError`` from them as "no groups here".
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard, overload, runtime_checkable

if TYPE_CHECKING:
    from core.streams import AckToken

__all__ = [
    "CHANNEL_NAME",
    "CHANNEL_NAME_RULE",
    "AcknowledgingLayer",
    "BatchSendingLayer",
    "ChannelLayer",
    "Message",
    "check_channel_name",
    "is_channel_name",
]

#: a layer message: msgpack-safe keys and values (DESIGN §3)
Message = dict[str, Any]

#: what channels accepts as a channel name (channels.layers.BaseChannelLayer.channel_name_regex)
#: less the process-specific ``!`` names, which die with their process
CHANNEL_NAME = re.compile(r"^[a-zA-Z\d\-_.]+$")
#: what :func:`check_channel_name` says of a name it refuses
CHANNEL_NAME_RULE = "must be letters, digits, '-', '_' or '.', under 100 characters"


def is_channel_name(value: object) -> TypeGuard[str]:
    """Whether ``value`` names a channel a worker can listen on (channels wants under 100
    characters). The one check behind every channel name in YAML and in commands."""
    return isinstance(value, str) and CHANNEL_NAME.match(value) is not None and len(value) < 100


@overload
def check_channel_name(value: str) -> str: ...
@overload
def check_channel_name(value: None) -> None: ...
def check_channel_name(value: str | None) -> str | None:
    """``value`` (``None`` passes) if :func:`is_channel_name`, else ``ValueError`` with
    :data:`CHANNEL_NAME_RULE`: a pydantic validator as it is."""
    if value is not None and not is_channel_name(value):
        raise ValueError(CHANNEL_NAME_RULE)
    return value


@runtime_checkable
class ChannelLayer(Protocol):
    """What a gateway needs from a channel layer (channels' layer API, typed)."""

    async def send(self, channel: str, message: Message) -> None:
        """Put ``message`` on ``channel``; raises ``ChannelFull`` when it is at capacity."""

    async def receive(self, channel: str) -> Message:
        """The next message on ``channel``, waiting for one."""

    async def new_channel(self, prefix: str = "specific.") -> str:
        """A new process-specific channel name (``prefix`` + ``!`` + a random part)."""

    async def group_add(self, group: str, channel: str) -> None:
        """Add ``channel`` to ``group``."""

    async def group_discard(self, group: str, channel: str) -> None:
        """Remove ``channel`` from ``group``."""

    async def group_send(self, group: str, message: Message) -> None:
        """Send ``message`` to every channel of ``group`` (full members are skipped)."""


@runtime_checkable
class BatchSendingLayer(Protocol):
    """A layer that takes a run of messages in one round trip (``core.streams``)."""

    async def send_many(self, messages: Sequence[tuple[str, Message]]) -> int:
        """Send ``(channel, message)`` pairs in order; how many, from the front, were added
        (fewer than all when a channel is full)."""
        ...


@runtime_checkable
class AcknowledgingLayer(Protocol):
    """A layer that delivers at least once (``core.streams``): what ``receive_with_ack`` hands out
    stays pending until it is acknowledged, and is delivered again if it never is.

    :class:`core.worker.ConsumerWorker` uses all of it: it acknowledges a message after its
    handler, holds what waits in the process, and counts a redelivered one before its handler.
    """

    async def receive_with_ack(self, channel: str) -> tuple[Message, AckToken]:
        """The next message on ``channel`` and the token that acknowledges it."""
        ...

    def receive_with_ack_nowait(self, channel: str) -> tuple[Message, AckToken] | None:
        """What was fetched already for ``channel``, at once; ``None`` when nothing is."""
        ...

    def ack(self, token: AckToken) -> Awaitable[Any]:
        """Acknowledge a delivered message (queued at once; await to know it reached Redis)."""
        ...

    def hold(self, token: AckToken) -> None:
        """Keep a message claimed while it waits in this process before its handler."""
        ...

    def release(self, token: AckToken) -> bool:
        """End a :meth:`hold` as the handler takes it; ``False`` if another worker claimed it."""
        ...

    async def begin(self, token: AckToken, message: Message) -> int | None:
        """Count a redelivered message's hand-out; ``None`` when it was dead-lettered instead."""
        ...
