"""Django-side helpers for the Slack gateway: typed commands, checked before they leave, and a
generic consumer that answers in one call.

    from gateways.slack.consumers import SlackConsumer

    class TeamConsumer(SlackConsumer):
        async def slack_mention(self, message):
            await self.reply("On it!", thread=True)     # slack.send in the mention's thread
            await self.react("eyes")

        async def slack_command(self, message):
            await self.reply("Ticket #42 is open")      # slack.respond (only the asker sees it)

Builders (``slack_send``, ``slack_update``, ``slack_delete``, ``slack_react``, ``slack_respond``)
return the command dict and raise :class:`core.consumers.InvalidCommand` for anything the
gateway would refuse (no text nor blocks, a ``ts`` that is not one, 51 blocks …), using the
gateway's own parsers (``translate.parse_*``). Whether a ``response_url`` starts with the
gateway's ``slack.response_url_prefix`` is the gateway's check. :class:`SlackCommands` sends
them; ``wait=True`` returns the ``slack.result`` (``channel``, ``ts`` of the message). The keys
are those of ``gateways/slack/README.md``; the guide is ``docs/consumers.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
from gateways.slack.translate import (
    parse_delete,
    parse_react,
    parse_respond,
    parse_send,
    parse_update,
)

__all__ = [
    "VALIDATORS",
    "SlackCommands",
    "SlackConsumer",
    "slack_delete",
    "slack_react",
    "slack_respond",
    "slack_send",
    "slack_update",
]

ResponseType = Literal["ephemeral", "in_channel"]
Blocks = Sequence[Mapping[str, Any]]

#: every command the Slack gateway takes, with the gateway's own check of its keys
VALIDATORS: dict[str, Validator] = {
    "slack.send": parse_send,
    "slack.update": parse_update,
    "slack.delete": parse_delete,
    "slack.react": parse_react,
    # any http(s) URL here: the gateway checks it against its own slack.response_url_prefix
    "slack.respond": lambda body: parse_respond(body, "http"),
}


def _checked(type_: str, id: CommandId | None, result_channel: str | None, **keys: Any) -> Message:
    return SlackCommands.check(command(type_, id=id, result_channel=result_channel, **keys))


def _blocks(blocks: Blocks | None) -> list[dict[str, Any]] | None:
    return None if blocks is None else [dict(b) for b in blocks]


def slack_send(
    channel: str,
    text: str | None = None,
    *,
    blocks: Blocks | None = None,
    thread_ts: str | None = None,
    reply_broadcast: bool | None = None,
    id: CommandId | None = None,
    result_channel: str | None = None,
) -> Message:
    """``slack.send`` (chat.postMessage): ``text`` and/or ``blocks`` to a channel id, in the
    thread of ``thread_ts`` if given."""
    return _checked(
        "slack.send",
        id,
        result_channel,
        channel=channel,
        text=text,
        blocks=_blocks(blocks),
        thread_ts=thread_ts,
        reply_broadcast=reply_broadcast,
    )


def slack_update(
    channel: str,
    ts: str,
    text: str | None = None,
    *,
    blocks: Blocks | None = None,
    id: CommandId | None = None,
    result_channel: str | None = None,
) -> Message:
    """``slack.update`` (chat.update): new ``text`` and/or ``blocks`` for the message ``ts``."""
    return _checked(
        "slack.update",
        id,
        result_channel,
        channel=channel,
        ts=ts,
        text=text,
        blocks=_blocks(blocks),
    )


def slack_delete(
    channel: str, ts: str, *, id: CommandId | None = None, result_channel: str | None = None
) -> Message:
    """``slack.delete`` (chat.delete) of the message ``ts``."""
    return _checked("slack.delete", id, result_channel, channel=channel, ts=ts)


def slack_react(
    channel: str,
    ts: str,
    name: str,
    *,
    remove: bool | None = None,
    id: CommandId | None = None,
    result_channel: str | None = None,
) -> Message:
    """``slack.react``: add (``remove=True``: remove) the emoji ``name`` (``thumbsup``) on the
    message ``ts``."""
    return _checked(
        "slack.react", id, result_channel, channel=channel, ts=ts, name=name, remove=remove
    )


def slack_respond(
    response_url: str,
    text: str | None = None,
    *,
    blocks: Blocks | None = None,
    response_type: ResponseType | None = None,
    replace_original: bool | None = None,
    delete_original: bool | None = None,
    thread_ts: str | None = None,
    id: CommandId | None = None,
    result_channel: str | None = None,
) -> Message:
    """``slack.respond``: answer a slash command or an action through its ``response_url``
    (Slack's default ``response_type`` is ``ephemeral``: only the person who asked sees it)."""
    return _checked(
        "slack.respond",
        id,
        result_channel,
        response_url=response_url,
        text=text,
        blocks=_blocks(blocks),
        response_type=response_type,
        replace_original=replace_original,
        delete_original=delete_original,
        thread_ts=thread_ts,
    )


class SlackCommands(Commands):
    """Send Slack commands to one integration's command channel (``NAME.send``, every event's
    ``reply_channel``).

    Every method checks its command first (:class:`~core.consumers.InvalidCommand`, nothing
    sent) and returns ``None``, or with ``wait=True`` the ``slack.result``
    (:class:`~core.consumers.CommandFailed` with Slack's own error code, e.g.
    ``channel_not_found``, :class:`~core.consumers.ResultTimeout` after ``timeout`` seconds).
    """

    protocol = "slack"
    validators = VALIDATORS

    async def send(
        self,
        channel: str,
        text: str | None = None,
        *,
        blocks: Blocks | None = None,
        thread_ts: str | None = None,
        reply_broadcast: bool | None = None,
        id: CommandId | None = None,
        result_channel: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`slack_send`; the result has ``channel`` and ``ts``."""
        message = slack_send(
            channel,
            text,
            blocks=blocks,
            thread_ts=thread_ts,
            reply_broadcast=reply_broadcast,
            id=id,
            result_channel=result_channel,
        )
        return await self.submit(message, wait=wait, timeout=timeout)

    async def update(
        self,
        channel: str,
        ts: str,
        text: str | None = None,
        *,
        blocks: Blocks | None = None,
        id: CommandId | None = None,
        result_channel: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`slack_update`."""
        message = slack_update(
            channel, ts, text, blocks=blocks, id=id, result_channel=result_channel
        )
        return await self.submit(message, wait=wait, timeout=timeout)

    async def delete(
        self,
        channel: str,
        ts: str,
        *,
        id: CommandId | None = None,
        result_channel: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`slack_delete`."""
        message = slack_delete(channel, ts, id=id, result_channel=result_channel)
        return await self.submit(message, wait=wait, timeout=timeout)

    async def react(
        self,
        channel: str,
        ts: str,
        name: str,
        *,
        remove: bool | None = None,
        id: CommandId | None = None,
        result_channel: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`slack_react`."""
        message = slack_react(
            channel, ts, name, remove=remove, id=id, result_channel=result_channel
        )
        return await self.submit(message, wait=wait, timeout=timeout)

    async def respond(
        self,
        response_url: str,
        text: str | None = None,
        *,
        blocks: Blocks | None = None,
        response_type: ResponseType | None = None,
        replace_original: bool | None = None,
        delete_original: bool | None = None,
        thread_ts: str | None = None,
        id: CommandId | None = None,
        result_channel: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`slack_respond`."""
        message = slack_respond(
            response_url,
            text,
            blocks=blocks,
            response_type=response_type,
            replace_original=replace_original,
            delete_original=delete_original,
            thread_ts=thread_ts,
            id=id,
            result_channel=result_channel,
        )
        return await self.submit(message, wait=wait, timeout=timeout)


class SlackConsumer(GatewayConsumer):
    """A consumer of Slack events (``slack_message``, ``slack_command`` … as in any consumer)
    that answers in one call: :meth:`reply`, :meth:`react`; :attr:`slack` sends any command."""

    commands_class = SlackCommands

    @property
    def slack(self) -> SlackCommands:
        """:class:`SlackCommands` to the integration the current event came from."""
        return SlackCommands(self.channel_layer, self.reply_channel())

    async def reply(
        self,
        text: str | None = None,
        *,
        blocks: Blocks | None = None,
        thread: bool = False,
        response_type: ResponseType | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """Answer the current event.

        A slash command or an action (they carry a ``response_url``) is answered with
        ``slack.respond`` (``response_type``: ``ephemeral``, Slack's default, or
        ``in_channel``); anything else with ``slack.send`` to its channel, in its thread when it
        is in one, or starting one under it with ``thread=True``.
        """
        event = self.current("reply")
        url = event.get("response_url")
        if event.get("type") in ("slack.command", "slack.action") and isinstance(url, str):
            return await self.slack.respond(
                url,
                text,
                blocks=blocks,
                response_type=response_type,
                wait=wait,
                timeout=timeout,
            )
        channel = event.get("channel")
        if not isinstance(channel, str):
            raise InvalidCommand(f"nothing to answer in a {event.get('type')!r} event")
        thread_ts = event.get("thread_ts") or (event.get("ts") if thread else None)
        return await self.slack.send(
            channel, text, blocks=blocks, thread_ts=thread_ts, wait=wait, timeout=timeout
        )

    async def react(
        self,
        name: str,
        *,
        remove: bool | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """Add (``remove=True``: remove) the emoji ``name`` on the current event's message."""
        event = self.current("react")
        channel, ts = event.get("channel"), event.get("ts")
        if not isinstance(channel, str) or not isinstance(ts, str):
            raise InvalidCommand(f"a {event.get('type')!r} event has no message to react to")
        return await self.slack.react(channel, ts, name, remove=remove, wait=wait, timeout=timeout)
