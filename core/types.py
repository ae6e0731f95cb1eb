"""The channel layer as the suite uses it: a typing ``Protocol``, so ``layer`` is never ``Any``.

channels' ``BaseChannelLayer`` is untyped and has no common base with every layer a layer path
can name (``package.module:attr`` may give any object with these methods), so core describes
the part it relies on structurally. ``channels_redis.core.RedisChannelLayer``,
``channels.layers.InMemoryChannelLayer``, :class:`core.layers.RedisChannelLayer` and
:class:`core.streams.StreamsChannelLayer` all satisfy it; ``isinstance(obj, ChannelLayer)``
checks the method names only.

Groups are optional in channels (a layer may raise ``NotImplementedError``); they are in the
protocol because both layers the suite ships with have them, and callers already treat
``NotImplementedError`` / ``AttributeError`` from them as "no groups here".
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["ChannelLayer", "Message"]

#: a layer message: msgpack-safe keys and values (DESIGN §3)
Message = dict[str, Any]


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
