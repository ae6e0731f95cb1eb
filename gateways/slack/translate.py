"""Pure Slack translation: Slack's payloads → layer messages, commands → Web API calls.

No I/O and no asyncio: ``connection.py`` hands in what Slack sent (a Socket Mode envelope's
text, an Events API body with its headers), the gateway puts what comes out on the layer.
House rules (Slack's documented wire format):

* **Socket Mode envelopes** are JSON objects with ``type``: ``hello`` (the connection is usable),
  ``disconnect`` (with ``reason``: ``warning``, ``refresh_requested``, ``link_disabled``…: open a
  new connection), and ``events_api`` / ``slash_commands`` / ``interactive``, which carry an
  ``envelope_id`` and a ``payload`` and are acknowledged by sending ``{"envelope_id": …}`` back
  (:func:`ack`). Anything else is reported as :class:`Unknown`, never an exception.
* **The Events API** posts the same payloads over HTTP: JSON (``url_verification``,
  ``event_callback``) or a form (slash commands: ``command=…``; interactivity:
  ``payload=<json>``). Requests are signed: ``X-Slack-Signature: v0=<hex HMAC-SHA256 of
  "v0:{X-Slack-Request-Timestamp}:{body}">``; :func:`check_timestamp` refuses missing, malformed
  and stale timestamps (the HMAC itself is slack_sdk's ``SignatureVerifier``).
* **Event ids**: an ``event_callback``'s ``event_id`` is the message ``id`` and the de-dup key
  (a retried delivery carries the same one); slash commands and interactivity use their
  ``trigger_id``. Socket Mode envelopes without an event id de-duplicate on ``envelope_id``.
* **Edits and deletes** are ``message`` events with a ``subtype``: ``message_changed`` carries
  the new message under ``message`` (``text`` is the new text, ``previous_text`` the old one),
  ``message_deleted`` the ``deleted_ts`` (``text`` is ``""``, ``previous_text`` the old one).
* **channel_type** is one vocabulary on every event: ``channel`` (public), ``group`` (private),
  ``im``, ``mpim``, as Slack's ``message`` events say it. ``member_joined_channel`` and
  ``member_left_channel`` carry only the id's letter (``C``, ``G``), which does not tell a
  private channel created since March 2021 from a public one, so :func:`from_event_callback`
  leaves their ``channel_type`` ``None`` for the gateway to fill in (what earlier messages said,
  or ``conversations.info``, read by :func:`channel_type_of`).
* **Commands** are checked here (types, lengths, Slack's ``ts`` format) and become a
  :class:`ApiCall` (method name + arguments for slack_sdk's ``api_call``) or a
  :class:`Respond` (a POST to a ``response_url``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qs

__all__ = [
    "ACK_TYPES",
    "ApiCall",
    "Control",
    "Envelope",
    "Inbound",
    "InvalidCommand",
    "InvalidPayload",
    "Respond",
    "Unknown",
    "ack",
    "channel_type_of",
    "check_timestamp",
    "from_event_callback",
    "from_interactive",
    "from_slash_command",
    "parse_delete",
    "parse_envelope",
    "parse_http_body",
    "parse_react",
    "parse_respond",
    "parse_send",
    "parse_update",
]

#: Socket Mode envelope types that carry a payload and want an acknowledgement
ACK_TYPES: Final = frozenset({"events_api", "slash_commands", "interactive"})
#: chat.postMessage's documented limit for ``text``
MAX_TEXT: Final = 40_000
#: Block Kit: at most 50 blocks in a message
MAX_BLOCKS: Final = 50
_TS = re.compile(r"^\d{1,12}\.\d{1,9}$")
_FILE_KEYS = ("id", "name", "title", "mimetype", "filetype", "size", "url_private", "permalink")


class InvalidCommand(ValueError):
    """A command's keys are wrong; the text names the key."""


class InvalidPayload(ValueError):
    """What Slack sent (or claims to have sent) cannot be read; the text says why."""


# -- inbound ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inbound:
    """One layer message: ``slack.<event>`` with ``keys``; ``id`` also serves de-duplication."""

    event: str
    id: str | None
    keys: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Envelope:
    """A Socket Mode envelope that carries a payload and is acknowledged by ``envelope_id``."""

    type: str
    envelope_id: str
    payload: dict[str, Any]
    retry_attempt: int = 0


@dataclass(frozen=True)
class Control:
    """``hello`` or ``disconnect`` (``reason``); nothing to acknowledge."""

    type: str
    reason: str = ""


@dataclass(frozen=True)
class Unknown:
    """A frame that is not a known envelope: logged and counted, never acknowledged."""

    problem: str


def parse_envelope(text: str | bytes) -> Envelope | Control | Unknown:
    """One Socket Mode WebSocket frame."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        return Unknown(f"not JSON: {exc}")
    if not isinstance(data, dict):
        return Unknown("not a JSON object")
    kind = data.get("type")
    if kind in ("hello", "disconnect"):
        return Control(kind, str(data.get("reason") or ""))
    if kind not in ACK_TYPES:
        return Unknown(f"unknown envelope type {kind!r}")
    envelope_id, payload = data.get("envelope_id"), data.get("payload")
    if not isinstance(envelope_id, str) or not envelope_id:
        return Unknown(f"{kind} envelope without an envelope_id")
    if not isinstance(payload, dict):
        return Unknown(f"{kind} envelope {envelope_id} without a payload object")
    retry = data.get("retry_attempt")
    return Envelope(kind, envelope_id, payload, retry if isinstance(retry, int) else 0)


def ack(envelope_id: str) -> str:
    """The Socket Mode acknowledgement of one envelope."""
    return json.dumps({"envelope_id": envelope_id})


def check_timestamp(value: str | None, now: float, max_age: float) -> str | None:
    """Why ``X-Slack-Request-Timestamp`` is refused (``None``: fresh enough)."""
    if value is None:
        return "missing X-Slack-Request-Timestamp"
    try:
        stamp = int(value)
    except ValueError:
        return "malformed X-Slack-Request-Timestamp"
    if abs(now - stamp) > max_age:
        return f"X-Slack-Request-Timestamp is {now - stamp:.0f} s off (limit {max_age:g} s)"
    return None


def parse_http_body(body: bytes, content_type: str) -> tuple[str, dict[str, Any]]:
    """An Events API request body → (kind, payload).

    ``kind`` is ``url_verification``, ``event_callback``, ``app_rate_limited`` (or another JSON
    ``type``), ``slash_commands`` or ``interactive``.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidPayload(
            f"body is not UTF-8 (byte 0x{body[exc.start]:02x} at offset {exc.start})"
        ) from None
    if content_type.startswith("application/x-www-form-urlencoded"):
        form = {k: v[0] for k, v in parse_qs(text, keep_blank_values=True).items()}
        if "payload" in form:
            try:
                payload = json.loads(form["payload"])
            except ValueError:
                raise InvalidPayload("payload= is not JSON") from None
            if not isinstance(payload, dict):
                raise InvalidPayload("payload= is not a JSON object")
            return "interactive", payload
        if "command" in form:
            return "slash_commands", dict(form)
        raise InvalidPayload("a form without command= or payload=")
    try:
        data = json.loads(text)
    except ValueError:
        raise InvalidPayload("body is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise InvalidPayload("body is not a JSON object with a type")
    return str(data["type"]), data


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _files(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        return []
    return [
        {k: f.get(k) for k in _FILE_KEYS if f.get(k) is not None}
        for f in value
        if isinstance(f, dict)
    ]


def _message_keys(event: Mapping[str, Any], own: tuple[str | None, str | None]) -> dict[str, Any]:
    subtype = _str(event.get("subtype"))
    inner: Mapping[str, Any] = event
    previous: Mapping[str, Any] = {}
    if subtype in ("message_changed", "message_deleted"):
        inner_value = event.get("message")
        inner = inner_value if isinstance(inner_value, dict) else {}
        previous_value = event.get("previous_message")
        previous = previous_value if isinstance(previous_value, dict) else {}
    if subtype == "message_deleted":
        user = _str(previous.get("user"))
        bot_id = _str(previous.get("bot_id"))
        text, ts = "", _str(event.get("deleted_ts"))
        thread_ts = _str(previous.get("thread_ts"))
        files: list[dict[str, Any]] = []
    else:
        user, bot_id = _str(inner.get("user")), _str(inner.get("bot_id"))
        text, ts = _str(inner.get("text")) or "", _str(inner.get("ts"))
        thread_ts, files = _str(inner.get("thread_ts")), _files(inner.get("files"))
    own_user, own_bot = own
    return {
        "channel": _str(event.get("channel")),
        "channel_type": _str(event.get("channel_type")),
        "user": user,
        "bot_id": bot_id,
        "text": text,
        "ts": ts,
        "thread_ts": thread_ts,
        "subtype": subtype,
        "files": files,
        "previous_text": _str(previous.get("text")) if previous else None,
        "event_ts": _str(event.get("event_ts")),
        "self": bool((own_user and user == own_user) or (own_bot and bot_id == own_bot)),
    }


def from_event_callback(
    body: Mapping[str, Any], own: tuple[str | None, str | None] = (None, None)
) -> Inbound:
    """An ``event_callback`` (Events API body, or a Socket Mode ``events_api`` payload).

    ``own`` is the app's (bot user id, bot id) from ``auth.test``, for ``slack.message``'s
    ``self``. Raises :class:`InvalidPayload` when there is no ``event`` object.
    """
    event = body.get("event")
    if not isinstance(event, dict):
        raise InvalidPayload("event_callback without an event object")
    event_id = _str(body.get("event_id"))
    common: dict[str, Any] = {"team": _str(body.get("team_id")), "event_time": None}
    event_time = body.get("event_time")
    if isinstance(event_time, int | float) and not isinstance(event_time, bool):
        common["event_time"] = event_time
    kind = event.get("type")
    if kind == "message":
        return Inbound("message", event_id, {**common, **_message_keys(event, own)})
    if kind == "app_mention":
        keys = {
            "channel": _str(event.get("channel")),
            "user": _str(event.get("user")),
            "text": _str(event.get("text")) or "",
            "ts": _str(event.get("ts")),
            "thread_ts": _str(event.get("thread_ts")),
            "files": _files(event.get("files")),
        }
        return Inbound("mention", event_id, {**common, **keys})
    if kind in ("member_joined_channel", "member_left_channel"):
        keys = {
            "channel": _str(event.get("channel")),
            "user": _str(event.get("user")),
            # Slack's letter (C, G) is the id's first letter, not the type: the gateway fills it
            "channel_type": None,
            "inviter": _str(event.get("inviter")),
        }
        name = "joined" if kind == "member_joined_channel" else "left"
        return Inbound(name, event_id, {**common, **keys})
    if kind in ("reaction_added", "reaction_removed"):
        item_value = event.get("item")
        item: Mapping[str, Any] = item_value if isinstance(item_value, dict) else {}
        keys = {
            "action": "added" if kind == "reaction_added" else "removed",
            "reaction": _str(event.get("reaction")),
            "user": _str(event.get("user")),
            "item_user": _str(event.get("item_user")),
            "item_type": _str(item.get("type")),
            "channel": _str(item.get("channel")),
            "ts": _str(item.get("ts")),
        }
        return Inbound("reaction", event_id, {**common, **keys})
    return Inbound("event", event_id, {**common, "event_type": _str(kind), "event": dict(event)})


def channel_type_of(conversation: Any) -> str | None:
    """A ``conversations.info`` conversation object → ``channel_type`` (``None``: not one).

    ``is_group`` marks private channels created before March 2021, ``is_private`` every private
    conversation, so both mean ``group``; DMs are checked first (they are private too).
    """
    if not isinstance(conversation, dict):
        return None
    if conversation.get("is_im") is True:
        return "im"
    if conversation.get("is_mpim") is True:
        return "mpim"
    if conversation.get("is_private") is True or conversation.get("is_group") is True:
        return "group"
    if conversation.get("is_channel") is True:
        return "channel"
    return None


def from_slash_command(form: Mapping[str, Any]) -> Inbound:
    """A slash command (form fields over HTTP, the same keys in a Socket Mode payload)."""
    trigger_id = _str(form.get("trigger_id"))
    keys = {
        "command": _str(form.get("command")),
        "text": _str(form.get("text")) or "",
        "user": _str(form.get("user_id")),
        "user_name": _str(form.get("user_name")),
        "channel": _str(form.get("channel_id")),
        "channel_name": _str(form.get("channel_name")),
        "team": _str(form.get("team_id")),
        "response_url": _str(form.get("response_url")),
        "trigger_id": trigger_id,
        "api_app_id": _str(form.get("api_app_id")),
    }
    if keys["command"] is None:
        raise InvalidPayload("slash command without command")
    return Inbound("command", trigger_id, keys)


def _id_of(value: Any) -> str | None:
    return _str(value.get("id")) if isinstance(value, dict) else None


def from_interactive(payload: Mapping[str, Any]) -> Inbound:
    """An interactivity payload (block_actions, view_submission, shortcut, …)."""
    response_url = _str(payload.get("response_url"))
    urls = payload.get("response_urls")
    if response_url is None and isinstance(urls, list) and urls and isinstance(urls[0], dict):
        response_url = _str(urls[0].get("response_url"))
    view = payload.get("view")
    callback_id = _str(payload.get("callback_id"))
    if callback_id is None and isinstance(view, dict):
        callback_id = _str(view.get("callback_id"))
    actions = payload.get("actions")
    trigger_id = _str(payload.get("trigger_id"))
    keys = {
        "kind": _str(payload.get("type")),
        "user": _id_of(payload.get("user")),
        "channel": _id_of(payload.get("channel")),
        "team": _id_of(payload.get("team")),
        "response_url": response_url,
        "trigger_id": trigger_id,
        "callback_id": callback_id,
        "actions": actions if isinstance(actions, list) else [],
        "payload": dict(payload),
    }
    return Inbound("action", trigger_id, keys)


# -- commands ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiCall:
    """A Web API call: ``method`` (``chat.postMessage``), JSON ``args``; paced by ``channel``."""

    method: str
    args: dict[str, Any]
    channel: str | None = None


@dataclass(frozen=True)
class Respond:
    """A POST of ``body`` (JSON) to a slash command's or an action's ``response_url``."""

    url: str
    body: dict[str, Any]


def _required_str(body: Mapping[str, Any], key: str, limit: int = 255) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InvalidCommand(f"{key!r} must be a non-empty string")
    if len(value) > limit or any(c.isspace() for c in value):
        raise InvalidCommand(f"{key!r} must be at most {limit} characters without spaces")
    return value


def _ts(body: Mapping[str, Any], key: str, *, required: bool) -> str | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not _TS.match(value):
        raise InvalidCommand(f"{key!r} must be a Slack timestamp like '1700000000.000100'")
    return value


def _content(body: Mapping[str, Any], *, required: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    text, blocks = body.get("text"), body.get("blocks")
    if text is not None:
        if not isinstance(text, str):
            raise InvalidCommand("'text' must be a string")
        if len(text) > MAX_TEXT:
            raise InvalidCommand(f"'text' is {len(text)} characters (Slack's limit: {MAX_TEXT})")
        out["text"] = text
    if blocks is not None:
        if not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks):
            raise InvalidCommand("'blocks' must be a list of Block Kit objects")
        if len(blocks) > MAX_BLOCKS:
            raise InvalidCommand(f"'blocks' has {len(blocks)} blocks (Slack's limit: {MAX_BLOCKS})")
        out["blocks"] = blocks
    if required and not out.get("text") and not out.get("blocks"):
        raise InvalidCommand("'text' or 'blocks' is required")
    return out


def _flag(body: Mapping[str, Any], key: str) -> bool | None:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise InvalidCommand(f"{key!r} must be true or false")
    return value


def parse_send(body: Mapping[str, Any]) -> ApiCall:
    """``slack.send``: ``channel``, ``text`` / ``blocks``, ``thread_ts``, ``reply_broadcast``."""
    channel = _required_str(body, "channel")
    args: dict[str, Any] = {"channel": channel, **_content(body, required=True)}
    thread_ts = _ts(body, "thread_ts", required=False)
    if thread_ts is not None:
        args["thread_ts"] = thread_ts
    broadcast = _flag(body, "reply_broadcast")
    if broadcast is not None:
        args["reply_broadcast"] = broadcast
    return ApiCall("chat.postMessage", args, channel)


def parse_update(body: Mapping[str, Any]) -> ApiCall:
    """``slack.update``: ``channel``, ``ts``, new ``text`` and/or ``blocks``."""
    channel = _required_str(body, "channel")
    ts = _ts(body, "ts", required=True)
    return ApiCall(
        "chat.update", {"channel": channel, "ts": ts, **_content(body, required=True)}, channel
    )


def parse_delete(body: Mapping[str, Any]) -> ApiCall:
    """``slack.delete``: ``channel``, ``ts``."""
    channel = _required_str(body, "channel")
    return ApiCall(
        "chat.delete", {"channel": channel, "ts": _ts(body, "ts", required=True)}, channel
    )


def parse_react(body: Mapping[str, Any]) -> ApiCall:
    """``slack.react``: ``channel``, ``ts``, ``name`` (``thumbsup``, ``:thumbsup:``), ``remove``."""
    channel = _required_str(body, "channel")
    ts = _ts(body, "ts", required=True)
    name = _required_str(body, "name", 100).strip(":")
    if not name or ":" in name:
        raise InvalidCommand("'name' must be an emoji name such as 'thumbsup'")
    method = "reactions.remove" if _flag(body, "remove") else "reactions.add"
    return ApiCall(method, {"channel": channel, "timestamp": ts, "name": name}, channel)


def parse_respond(body: Mapping[str, Any], allowed_prefix: str) -> Respond:
    """``slack.respond``: ``response_url``, ``text``/``blocks``, ``response_type``,
    ``replace_original``, ``delete_original``, ``thread_ts``."""
    url = body.get("response_url")
    if not isinstance(url, str) or not url.startswith(allowed_prefix):
        raise InvalidCommand(f"'response_url' must be a URL starting with {allowed_prefix}")
    delete = _flag(body, "delete_original")
    out: dict[str, Any] = _content(body, required=not delete)
    response_type = body.get("response_type")
    if response_type is not None:
        if response_type not in ("ephemeral", "in_channel"):
            raise InvalidCommand("'response_type' must be 'ephemeral' or 'in_channel'")
        out["response_type"] = response_type
    for key in ("replace_original", "delete_original"):
        flag = _flag(body, key)
        if flag is not None:
            out[key] = flag
    thread_ts = _ts(body, "thread_ts", required=False)
    if thread_ts is not None:
        out["thread_ts"] = thread_ts
    return Respond(url, out)
