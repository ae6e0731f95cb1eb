"""Django-side helpers for the IRC gateway: typed commands, checked before they leave, and a
generic consumer that answers in one call.

    from gateways.irc.consumers import IrcConsumer

    class TicketBot(IrcConsumer):
        async def irc_receive(self, message):
            if message["plain"] == "!ping":
                await self.reply("pong")          # to the channel, or to the sender privately

Builders (``irc_send``, ``irc_join`` …) return the command dict and raise
:class:`core.consumers.InvalidCommand` for anything the gateway would refuse (a CR in a text, a
bad channel name …), using the gateway's own parsers (``translate.parse_*``).
:class:`IrcCommands` sends them; ``wait=True`` returns the ``irc.result`` (``lines``: how many
lines the text took). The keys are those of ``gateways/irc/README.md``; the guide is
``docs/consumers.md``.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from core.consumers import (
    CommandId,
    Commands,
    GatewayConsumer,
    InvalidCommand,
    Message,
    Validator,
    command,
)
from gateways.irc.translate import (
    parse_join,
    parse_nick,
    parse_part,
    parse_raw,
    parse_send,
    parse_topic,
)

__all__ = [
    "VALIDATORS",
    "IrcCommands",
    "IrcConsumer",
    "irc_join",
    "irc_nick",
    "irc_part",
    "irc_raw",
    "irc_send",
    "irc_topic",
    "reply_target",
]

log = logging.getLogger("gateway.consumers")

SendKind = Literal["message", "action", "notice"]

#: every command the IRC gateway takes, with the gateway's own check of its keys
VALIDATORS: dict[str, Validator] = {
    "irc.send": parse_send,
    "irc.join": parse_join,
    "irc.part": parse_part,
    "irc.topic": parse_topic,
    "irc.nick": parse_nick,
    "irc.raw": parse_raw,  # the gateway also needs irc.raw_commands: true
}


def _checked(type_: str, id: CommandId | None, result_channel: str | None, **keys: Any) -> Message:
    return IrcCommands.check(command(type_, id=id, result_channel=result_channel, **keys))


def irc_send(
    target: str,
    text: str,
    *,
    kind: SendKind = "message",
    id: CommandId | None = None,
    result_channel: str | None = None,
) -> Message:
    """``irc.send``: ``text`` to a channel or a nick, as a message, an action or a notice."""
    return _checked("irc.send", id, result_channel, target=target, text=text, kind=kind)


def irc_join(
    channel: str,
    key: str | None = None,
    *,
    id: CommandId | None = None,
    result_channel: str | None = None,
) -> Message:
    """``irc.join``: join ``channel`` (with its ``key``); rejoined after every reconnect."""
    return _checked("irc.join", id, result_channel, channel=channel, key=key)


def irc_part(
    channel: str,
    reason: str | None = None,
    *,
    id: CommandId | None = None,
    result_channel: str | None = None,
) -> Message:
    """``irc.part``: leave ``channel``; it is not rejoined any more."""
    return _checked("irc.part", id, result_channel, channel=channel, reason=reason)


def irc_topic(
    channel: str, topic: str, *, id: CommandId | None = None, result_channel: str | None = None
) -> Message:
    """``irc.topic``: set ``channel``'s topic (``""`` clears it)."""
    return _checked("irc.topic", id, result_channel, channel=channel, topic=topic)


def irc_nick(
    nick: str, *, id: CommandId | None = None, result_channel: str | None = None
) -> Message:
    """``irc.nick``: the nick the gateway holds (and reclaims) from now on."""
    return _checked("irc.nick", id, result_channel, nick=nick)


def irc_raw(
    line: str, *, id: CommandId | None = None, result_channel: str | None = None
) -> Message:
    """``irc.raw``: one raw line; the gateway refuses it unless ``irc.raw_commands: true``."""
    return _checked("irc.raw", id, result_channel, line=line)


class IrcCommands(Commands):
    """Send IRC commands to ``channel``: an event's ``reply_channel`` (the connection it came
    from) or the integration's command channel (``NAME.send``).

    Every method checks its command first (:class:`~core.consumers.InvalidCommand`, nothing
    sent) and returns ``None``, or with ``wait=True`` the ``irc.result`` once the last line was
    written to the server (:class:`~core.consumers.CommandFailed` on ``ok: false``,
    :class:`~core.consumers.ResultTimeout` after ``timeout`` seconds).
    """

    protocol = "irc"
    validators = VALIDATORS

    async def send(
        self,
        target: str,
        text: str,
        *,
        kind: SendKind = "message",
        id: CommandId | None = None,
        result_channel: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`irc_send`; the result has ``lines``."""
        message = irc_send(target, text, kind=kind, id=id, result_channel=result_channel)
        return await self.submit(message, wait=wait, timeout=timeout)

    async def join(
        self,
        channel: str,
        key: str | None = None,
        *,
        id: CommandId | None = None,
        result_channel: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`irc_join`."""
        message = irc_join(channel, key, id=id, result_channel=result_channel)
        return await self.submit(message, wait=wait, timeout=timeout)

    async def part(
        self,
        channel: str,
        reason: str | None = None,
        *,
        id: CommandId | None = None,
        result_channel: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`irc_part`."""
        message = irc_part(channel, reason, id=id, result_channel=result_channel)
        return await self.submit(message, wait=wait, timeout=timeout)

    async def topic(
        self,
        channel: str,
        topic: str,
        *,
        id: CommandId | None = None,
        result_channel: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`irc_topic`."""
        message = irc_topic(channel, topic, id=id, result_channel=result_channel)
        return await self.submit(message, wait=wait, timeout=timeout)

    async def nick(
        self,
        nick: str,
        *,
        id: CommandId | None = None,
        result_channel: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`irc_nick`."""
        message = irc_nick(nick, id=id, result_channel=result_channel)
        return await self.submit(message, wait=wait, timeout=timeout)

    async def raw(
        self,
        line: str,
        *,
        id: CommandId | None = None,
        result_channel: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`irc_raw`."""
        message = irc_raw(line, id=id, result_channel=result_channel)
        return await self.submit(message, wait=wait, timeout=timeout)


def reply_target(event: Message) -> str:
    """Where an answer to ``event`` goes: the sender of a private message, the channel a message
    or a join, part, kick, topic or invite happened in, the new nick of someone renamed."""
    type_ = event.get("type")
    if type_ == "irc.receive":
        target = event.get("nick") if event.get("private") else event.get("target")
    elif type_ == "irc.nick" and not event.get("self"):
        target = event.get("new")
    else:
        target = event.get("channel")
    if not isinstance(target, str) or not target:
        raise InvalidCommand(f"nothing to answer in a {type_!r} event")
    return target


class IrcConsumer(GatewayConsumer):
    """A consumer of IRC events (``irc_receive``, ``irc_joined`` … as in any consumer) that
    answers in one call: :meth:`reply`; :attr:`irc` sends any other command."""

    commands_class = IrcCommands

    @property
    def irc(self) -> IrcCommands:
        """:class:`IrcCommands` to the connection the current event came from."""
        return IrcCommands(self.channel_layer, self.reply_channel())

    async def reply(
        self,
        text: str,
        *,
        kind: SendKind = "message",
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """Answer the current event: in its channel, or privately to its sender.

        A notice, or our own line (``self``: with ``echo-message``), is never answered
        (RFC 2812 3.3.2: automatic replies to a NOTICE make bots loop); that returns ``None``
        and sends nothing.
        """
        event = self.current("reply")
        if event.get("type") == "irc.receive" and (
            event.get("kind") == "notice" or event.get("self")
        ):
            log.debug("not answering %s: a notice or our own line", event.get("id"))
            return None
        return await self.irc.send(reply_target(event), text, kind=kind, wait=wait, timeout=timeout)
