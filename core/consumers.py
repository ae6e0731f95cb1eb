"""Helpers for the Django side: commands checked before they leave, results awaited, and the base
of the generic consumers.

Under ``manage.py runworker`` a consumer that raises loses every message already queued for it
(channels' worker prefetches). A plain ``channel_layer.send`` raises ``ChannelFull`` as soon as a
gateway's command channel holds ``capacity`` messages, which happens whenever consumers produce
commands faster than the transport carries them out. :func:`send_command` waits for room instead,
with backoff, up to a deadline, and only then raises.

Each gateway has typed builders for its commands in ``gateways/<proto>/consumers.py``
(``irc_send(target, text)``, ``mqtt_publish(topic, payload, qos=1)`` …) and a :class:`Commands`
subclass that sends them (``IrcCommands(layer, channel).send(target, text)``). The builders
check a command with the gateway's own parser (its pure ``translate.py``), so a command the
gateway would refuse raises :class:`InvalidCommand` in the consumer and nothing is sent. A check
that depends on the gateway's YAML (MQTT 3.1.1 vs 5, the Slack ``response_url_prefix``, whether
``irc.raw`` is allowed, the relay's ``from_address``) is left to the gateway: a builder never
refuses what the gateway could accept.

``wait=True`` makes a command carry a fresh result channel of its own (``layer.new_channel()``)
and returns the gateway's ``<proto>.result`` once it came, raises :class:`CommandFailed` (with
the gateway's ``error``) on ``ok: false``, and :class:`ResultTimeout` when none came in time.
The handler waits meanwhile: under ``runworker`` the other messages of its channel wait too.

:class:`GatewayConsumer` is the base of the generic consumers (``IrcConsumer``,
``EmailConsumer`` …): an ``AsyncConsumer`` whose handlers are named after events as always, and
which knows the event being handled, so an answer is one call (``await self.reply(text)``).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from channels.consumer import AsyncConsumer

from core.envelope import CommandError, check_payload, parse_command
from core.retry import send_command
from core.types import ChannelLayer

__all__ = [
    "CommandFailed",
    "CommandId",
    "Commands",
    "GatewayConsumer",
    "InvalidCommand",
    "Message",
    "ResultTimeout",
    "Validator",
    "command",
    "send_command",
    "validate",
]

log = logging.getLogger("gateway.consumers")

#: a command or event as it travels on the layer
Message = dict[str, Any]
#: a gateway's check of a command's own keys (``translate.parse_send`` …); raises ValueError
Validator = Callable[[Mapping[str, Any]], object]
#: the caller's ``id`` of a command (echoed as a string in the result)
CommandId = str | int

#: how long a send waits for room, and ``wait=True`` for the result, by default (seconds)
TIMEOUT = 30.0


class InvalidCommand(ValueError):
    """A command its gateway would refuse, found before anything was sent."""


class CommandFailed(Exception):
    """The gateway answered ``ok: false``: :attr:`error` is its reason, :attr:`result` the whole
    ``<proto>.result``."""

    def __init__(self, command_type: str, result: Mapping[str, Any]) -> None:
        self.command_type = command_type
        self.result = dict(result)
        self.id: str | None = result.get("id")
        self.error: str | None = result.get("error")
        super().__init__(f"{command_type} (id={self.id}) failed: {self.error}")


class ResultTimeout(TimeoutError):
    """No ``<proto>.result`` came in time. The command may still be carried out later."""


def command(
    type_: str, *, id: CommandId | None = None, result_channel: str | None = None, **keys: Any
) -> Message:
    """A command dict: ``type``, every key whose value is not ``None``, ``id``, ``result_channel``.

    Not checked: see :func:`validate`.
    """
    message: Message = {"type": type_}
    message.update((k, v) for k, v in keys.items() if v is not None)
    if id is not None:
        message["id"] = id
    if result_channel is not None:
        message["result_channel"] = result_channel
    return message


def validate(
    message: Mapping[str, Any], protocol: str | None, validators: Mapping[str, Validator]
) -> Message:
    """``message`` as a dict if its gateway would take it; raise :class:`InvalidCommand` if not.

    The envelope is checked as every gateway checks it (:func:`core.envelope.parse_command`:
    ``type``, ``id``, ``result_channel``), the command's own keys by the gateway's validator for
    its type, and the whole message must be msgpack-safe (DESIGN §3). ``protocol`` ``None``
    (the HTTP/WebSocket bridge, whose answers are ``websocket.*`` and ``http.*``) skips the
    envelope check.
    """
    type_ = message.get("type")
    body: Mapping[str, Any] = message
    if protocol is not None:
        try:
            body = parse_command(message, protocol).body
        except CommandError as exc:
            raise InvalidCommand(str(exc)) from None
    validator = validators.get(type_) if isinstance(type_, str) else None
    if validator is None:
        known = ", ".join(sorted(validators))
        raise InvalidCommand(f"unknown command {type_!r} (this gateway takes {known})")
    if protocol is None:
        body = {k: v for k, v in message.items() if k != "type"}
    try:
        validator(body)
    except ValueError as exc:
        raise InvalidCommand(f"{type_}: {exc}") from exc
    try:
        check_payload(dict(message), str(type_))
    except TypeError as exc:
        raise InvalidCommand(str(exc)) from None
    return dict(message)


class Commands:
    """Send one gateway's commands to one channel, each checked first.

    ``channel`` is where the gateway reads them: an event's ``reply_channel`` (answers to that
    event), or the integration's command channel (``NAME.send``). Subclasses set
    :attr:`protocol` and :attr:`validators` and add a typed method per command. ``timeout`` is
    how long a send may wait for room on a full channel (and, with ``wait=True``, for the
    result) before it raises.
    """

    #: the ``<proto>`` of ``<proto>.result``; ``None`` for the HTTP/WebSocket bridge
    protocol: ClassVar[str | None]
    #: command type → the gateway's check of its keys
    validators: ClassVar[Mapping[str, Validator]]
    #: whether the gateway answers with ``<proto>.result`` (``wait=True``)
    results: ClassVar[bool] = True

    def __init__(
        self, channel_layer: ChannelLayer, channel: str, *, timeout: float = TIMEOUT
    ) -> None:
        self.channel_layer = channel_layer
        self.channel = channel
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"<{type(self).__name__} → {self.channel!r}>"

    @classmethod
    def check(cls, message: Mapping[str, Any]) -> Message:
        """``message`` as a dict if the gateway would take it, else :class:`InvalidCommand`."""
        return validate(message, cls.protocol, cls.validators)

    async def submit(
        self, message: Mapping[str, Any], *, wait: bool = False, timeout: float | None = None
    ) -> Message | None:
        """Check ``message`` and send it; with ``wait``, return the gateway's result.

        Without ``wait`` it returns ``None`` once the layer took the command (a
        ``result_channel`` in it still gets the result there). With ``wait`` it returns the
        ``<proto>.result`` (``ok: true``), or raises :class:`CommandFailed` or
        :class:`ResultTimeout`. Layer errors (``ChannelFull`` after ``timeout``, Redis down)
        propagate as they are.
        """
        checked = self.check(message)
        limit = self.timeout if timeout is None else timeout
        if not wait:
            await send_command(self.channel_layer, self.channel, checked, timeout=limit)
            return None
        if not self.results:
            raise InvalidCommand(f"{checked['type']} has no result to wait for")
        if "result_channel" in checked:
            raise InvalidCommand("wait=True receives the result itself: leave result_channel out")
        return await self._request(checked, limit)

    async def _request(self, message: Message, timeout: float) -> Message:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        layer = self.channel_layer
        channel = await layer.new_channel()
        ident = str(message.setdefault("id", uuid.uuid4().hex))
        message["result_channel"] = channel
        expected = f"{self.protocol}.result"
        try:
            await send_command(layer, self.channel, message, timeout=timeout)
            while True:
                remaining = deadline - loop.time()
                try:
                    if remaining <= 0:
                        raise TimeoutError
                    answer = await asyncio.wait_for(layer.receive(channel), remaining)
                except TimeoutError:
                    raise ResultTimeout(
                        f"no {expected} for {message['type']} (id={ident}) within {timeout:g} s; "
                        "it may still be carried out"
                    ) from None
                if answer.get("type") == expected and answer.get("id") == ident:
                    break
                log.warning(
                    "ignoring %.60r on the result channel of %s (id=%s)",
                    answer.get("type"),
                    message["type"],
                    ident,
                )
        finally:
            _forget(layer, channel)
        if not answer.get("ok"):
            raise CommandFailed(str(message["type"]), answer)
        return answer


def _forget(layer: ChannelLayer, channel: str) -> None:
    """Drop what a layer buffered for a result channel nobody reads any more."""
    buffers = getattr(layer, "receive_buffer", None)
    if isinstance(buffers, dict):
        buffers.pop(channel, None)


class GatewayConsumer(AsyncConsumer):  # type: ignore[misc]
    """An ``AsyncConsumer`` that knows the event it is handling, so it can answer in one call.

    Handlers are named after events as in any consumer (``irc_receive`` for ``irc.receive``);
    while one runs, :attr:`event` is its message. :meth:`commands` sends commands to the
    gateway that sent it (its ``reply_channel``), or to :attr:`command_channel` outside an
    event that has one. Subclasses (one per gateway) set :attr:`commands_class` and add
    ``reply()`` and the like.
    """

    commands_class: ClassVar[type[Commands]]
    #: where commands go when the event being handled has no ``reply_channel`` (or none is
    #: being handled): the integration's command channel, e.g. ``"ops-irc.send"``
    command_channel: ClassVar[str | None] = None
    #: the message whose handler is running, else ``None``
    event: Message | None = None

    async def dispatch(self, message: Message) -> None:
        self.event = message
        try:
            await super().dispatch(message)
        finally:
            self.event = None

    def current(self, what: str) -> Message:
        """The event being handled; a clear error outside a handler."""
        if self.event is None:
            raise InvalidCommand(f"{what}() answers the event being handled, and there is none")
        return self.event

    def reply_channel(self) -> str:
        """Where commands go now: the current event's ``reply_channel``, else
        :attr:`command_channel`."""
        event = self.event or {}
        channel = event.get("reply_channel") or self.command_channel
        if not isinstance(channel, str):
            raise InvalidCommand(
                "no channel to send commands to: the event being handled has no reply_channel "
                f"(set command_channel on {type(self).__name__})"
            )
        return channel

    def commands(self) -> Commands:
        """Commands to the gateway the current event came from (see the class docstring)."""
        return self.commands_class(self.channel_layer, self.reply_channel())
