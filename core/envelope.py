"""The message envelope of DESIGN §4: inbound events, commands and results.

Inbound events carry ``type``, ``gateway``, ``id``, ``time`` and ``reply_channel`` besides their
own keys. Commands carry ``type`` and may carry ``id`` and ``result_channel``; the gateway answers
``{"type": "<proto>.result", "id", "ok", "error", …}`` on the result channel when one was given.

Everything here is pure: no I/O, no asyncio.
"""

from __future__ import annotations

import time as _time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from core.config import MAX_MESSAGE_BYTES

__all__ = [
    "MAX_MESSAGE_BYTES",
    "Command",
    "CommandError",
    "check_payload",
    "encoded_size",
    "new_event",
    "parse_command",
    "result_message",
]


class CommandError(ValueError):
    """A command is malformed, unknown or cannot be carried out. The text goes to the caller."""


def new_event(
    type_: str,
    *,
    gateway: str,
    reply_channel: str,
    id: str | None = None,
    time: float | None = None,
    **keys: Any,
) -> dict[str, Any]:
    """Build an inbound event with the envelope keys first and the event's own keys after."""
    return {
        "type": type_,
        "gateway": gateway,
        "id": id or uuid.uuid4().hex,
        "time": _time.time() if time is None else time,
        "reply_channel": reply_channel,
        **keys,
    }


@dataclass(frozen=True)
class Command:
    """A validated command: its ``type``, the caller's ``id``, where to answer, and its keys."""

    type: str
    id: str | None = None
    result_channel: str | None = None
    body: Mapping[str, Any] = field(default_factory=dict)

    @property
    def action(self) -> str:
        """``send`` for ``email.send`` (the handler is the one registered for :attr:`type`)."""
        return self.type.split(".", 1)[1].replace(".", "_")


def parse_command(message: Any, protocol: str) -> Command:
    """Validate the envelope of a command for ``protocol``; raise :class:`CommandError`.

    The keys specific to the command are validated by the gateway's own handler.
    """
    if not isinstance(message, Mapping):
        raise CommandError(f"command must be a dict, got {type(message).__name__}")
    type_ = message.get("type")
    if not isinstance(type_, str) or not type_:
        raise CommandError("command has no 'type'")
    prefix, dot, action = type_.partition(".")
    if prefix != protocol or not dot or not action.replace(".", "_").isidentifier():
        raise CommandError(f"unknown command type {type_!r} for the {protocol} gateway")
    id_ = message.get("id")
    if id_ is not None and not isinstance(id_, str | int):
        raise CommandError("'id' must be a string or an integer")
    result_channel = message.get("result_channel")
    if result_channel is not None and (not isinstance(result_channel, str) or not result_channel):
        raise CommandError("'result_channel' must be a non-empty string")
    body = {k: v for k, v in message.items() if k not in ("type", "id", "result_channel")}
    return Command(
        type=type_,
        id=None if id_ is None else str(id_),
        result_channel=result_channel,
        body=body,
    )


def result_message(
    protocol: str, command_id: str | None, *, ok: bool, error: str | None = None, **extra: Any
) -> dict[str, Any]:
    """The ``<proto>.result`` answer to a command."""
    return {"type": f"{protocol}.result", "id": command_id, "ok": ok, "error": error, **extra}


def check_payload(value: Any, path: str = "message") -> None:
    """Raise ``TypeError`` naming the key path if ``value`` is not msgpack-safe (DESIGN §3)."""
    if value is None or isinstance(value, str | bytes | bool | int | float):
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_payload(item, f"{path}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{path}: key {key!r} is not a string")
            check_payload(item, f"{path}.{key}")
        return
    raise TypeError(f"{path}: {type(value).__name__} is not msgpack-safe")


def encoded_size(message: Any) -> int:
    """Bytes of ``message`` packed as channels_redis packs it (msgpack, ``use_bin_type``).

    Raises ``TypeError`` naming the key path when it is not msgpack-safe (DESIGN §3).
    """
    try:
        return len(msgpack.packb(message, use_bin_type=True))
    except (TypeError, ValueError, OverflowError) as exc:
        check_payload(message)  # names the key path where it can
        raise TypeError(str(exc)) from None
