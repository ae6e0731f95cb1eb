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
* **Interactivity** payloads become one typed event per documented ``type``
  (:data:`INTERACTIVE`: ``block_actions`` → ``slack.block_actions``, ``block_suggestion`` →
  ``slack.options``, ``view_submission``, ``view_closed``, ``shortcut``, ``message_action``);
  any other type stays the generic ``slack.action``. ``event_callback`` events with a documented
  payload of their own are typed too (:data:`TYPED_EVENTS`: ``app_home_opened``, the assistant
  thread events, ``function_executed``); the rest is ``slack.event``.
* **Workspaces**: every inbound event carries ``team`` and ``enterprise`` (Enterprise Grid) as
  Slack gave them (:func:`route_of`), so a command can name the workspace whose token it needs.
  ``function_executed``'s ``bot_access_token`` is a secret: it is kept out of the event
  (:attr:`Inbound.secret`).
* **Answers inside the acknowledgement**: a Socket Mode envelope with
  ``accepts_response_payload: true`` is acknowledged ``{"envelope_id", "payload"}``
  (:func:`ack`), an HTTP request with a JSON body; :func:`parse_ack` checks what a consumer's
  ``slack.ack`` carries against the event it answers (``response_action`` for
  ``view_submission``, ``options`` / ``option_groups`` for ``block_suggestion``, an immediate
  message for a slash command).
* **Commands** are checked here (types, lengths, Slack's ``ts`` format, view objects) and become
  a :class:`ApiCall` (method name + arguments for slack_sdk's ``api_call``) or a
  :class:`Respond` (a POST to a ``response_url``).
* **OAuth**: :func:`authorize_url` is where the install flow sends the browser;
  :func:`installation_from_oauth` and :func:`refreshed` read ``oauth.v2.access``'s answers into
  an :class:`Installation` (its tokens left out of its ``repr``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Final
from urllib.parse import parse_qs, urlencode

__all__ = [
    "ACK_TYPES",
    "ANSWERABLE",
    "INTERACTIVE",
    "TYPED_EVENTS",
    "Ack",
    "ApiCall",
    "Control",
    "Envelope",
    "Inbound",
    "Installation",
    "InvalidCommand",
    "InvalidPayload",
    "Respond",
    "Route",
    "Unknown",
    "ack",
    "authorize_url",
    "channel_type_of",
    "check_timestamp",
    "from_event_callback",
    "from_interactive",
    "from_slash_command",
    "installation_from_oauth",
    "installation_key",
    "is_ssl_check",
    "own_ids",
    "parse_ack",
    "parse_delete",
    "parse_envelope",
    "parse_function_complete",
    "parse_function_fail",
    "parse_http_body",
    "parse_react",
    "parse_respond",
    "parse_route",
    "parse_send",
    "parse_update",
    "parse_views_open",
    "parse_views_publish",
    "parse_views_push",
    "parse_views_update",
    "refreshed",
    "route_of",
]

#: Socket Mode envelope types that carry a payload and want an acknowledgement
ACK_TYPES: Final = frozenset({"events_api", "slash_commands", "interactive"})
#: chat.postMessage's documented limit for ``text``
MAX_TEXT: Final = 40_000
#: Block Kit: at most 50 blocks in a message, 100 in a view (modal or Home tab)
MAX_BLOCKS: Final = 50
MAX_VIEW_BLOCKS: Final = 100
#: a modal's title, submit and close texts (plain_text); a view's private_metadata, callback_id
MAX_MODAL_TEXT: Final = 24
MAX_METADATA: Final = 3000
MAX_ID: Final = 255
#: external select answers: options (or option groups) per answer, and their texts
MAX_OPTIONS: Final = 100
MAX_OPTION_TEXT: Final = 75
MAX_OPTION_VALUE: Final = 150
#: interactivity payload type → the event it becomes (``slack.<event>``); others: slack.action
INTERACTIVE: Final = {
    "block_actions": "block_actions",
    "block_suggestion": "options",
    "view_submission": "view_submission",
    "view_closed": "view_closed",
    "shortcut": "shortcut",
    "message_action": "message_action",
}
#: event_callback event types with a typed event of their own (besides message & co)
TYPED_EVENTS: Final = frozenset(
    {
        "app_home_opened",
        "assistant_thread_started",
        "assistant_thread_context_changed",
        "function_executed",
    }
)
#: events whose acknowledgement can carry an answer, and the keys of ``slack.ack`` for each
ANSWERABLE: Final = {
    "slack.view_submission": ("response_action", "errors", "view"),
    "slack.options": ("options", "option_groups"),
    "slack.command": ("text", "blocks", "response_type"),
}
_ANSWER_KEYS: Final = {key: event for event, keys in ANSWERABLE.items() for key in keys}
_TS = re.compile(r"^\d{1,12}\.\d{1,9}$")
_FILE_KEYS = ("id", "name", "title", "mimetype", "filetype", "size", "url_private", "permalink")


class InvalidCommand(ValueError):
    """A command's keys are wrong; the text names the key."""


class InvalidPayload(ValueError):
    """What Slack sent (or claims to have sent) cannot be read; the text says why."""


# -- inbound ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inbound:
    """One layer message: ``slack.<event>`` with ``keys``; ``id`` also serves de-duplication.

    ``secret`` is what the event carried that must not reach the layer: ``function_executed``'s
    ``bot_access_token`` (the gateway keeps it for that execution's ``slack.function_*``).
    """

    event: str
    id: str | None
    keys: dict[str, Any] = field(default_factory=dict)
    secret: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Envelope:
    """A Socket Mode envelope that carries a payload and is acknowledged by ``envelope_id``;
    ``accepts_response_payload``: the acknowledgement may carry an answer (:func:`ack`)."""

    type: str
    envelope_id: str
    payload: dict[str, Any]
    retry_attempt: int = 0
    accepts_response_payload: bool = False


@dataclass(frozen=True)
class Ack:
    """Acknowledge: with ``payload`` (an answer, :func:`parse_ack`) or empty (``None``)."""

    payload: dict[str, Any] | None = None


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
    return Envelope(
        kind,
        envelope_id,
        payload,
        retry if isinstance(retry, int) and not isinstance(retry, bool) else 0,
        data.get("accepts_response_payload") is True,
    )


def ack(envelope_id: str, payload: Mapping[str, Any] | None = None) -> str:
    """The Socket Mode acknowledgement of one envelope, with an answer when ``payload`` is given
    (only for an envelope that ``accepts_response_payload``)."""
    frame: dict[str, Any] = {"envelope_id": envelope_id}
    if payload is not None:
        frame["payload"] = dict(payload)
    return json.dumps(frame)


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


def is_ssl_check(body: bytes, content_type: str) -> bool:
    """Slack's ``ssl_check=1`` form: it checks the Request URL's certificate and wants a 200
    (sent unsigned to slash command URLs; nothing in it reaches the layer)."""
    if not content_type.startswith("application/x-www-form-urlencoded") or len(body) > 1024:
        return False
    form = parse_qs(body.decode("utf-8", "replace"))
    return form.get("ssl_check") == ["1"] and "command" not in form and "payload" not in form


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


#: (enterprise id, team id) of a workspace; either may be ``None``
Route = tuple[str | None, str | None]


def _authorization(body: Mapping[str, Any]) -> Mapping[str, Any]:
    """The first of an ``event_callback``'s ``authorizations`` (the installation it is for)."""
    found = body.get("authorizations")
    if isinstance(found, list) and found and isinstance(found[0], dict):
        first: Mapping[str, Any] = found[0]
        return first
    return {}


def route_of(kind: str, payload: Mapping[str, Any]) -> Route:
    """The workspace a payload comes from: ``(enterprise_id, team_id)``, as Slack gave them.

    ``kind`` as :func:`parse_http_body` says it (``event_callback``, ``events_api``,
    ``slash_commands``, ``interactive``). An org-wide install's events name the enterprise and
    the workspace inside it; a team install's only the team.
    """
    if kind in ("event_callback", "events_api"):
        enterprise = _str(payload.get("enterprise_id")) or _str(
            _authorization(payload).get("enterprise_id")
        )
        team = _str(payload.get("team_id")) or _str(_authorization(payload).get("team_id"))
        return enterprise, team
    if kind == "slash_commands":
        return _str(payload.get("enterprise_id")), _str(payload.get("team_id"))
    team = _id_of(payload.get("team"))
    user = payload.get("user")
    if team is None and isinstance(user, dict):
        team = _str(user.get("team_id"))
    return _id_of(payload.get("enterprise")), team


def own_ids(body: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(bot user id, bot id) of the installation an ``event_callback`` was sent to, as far as
    its ``authorizations`` say (the bot user only: Slack names no bot id there)."""
    found = _authorization(body)
    if found.get("is_bot") is True:
        return _str(found.get("user_id")), None
    return None, None


def _dict(value: Any) -> dict[str, Any] | None:
    return dict(value) if isinstance(value, dict) else None


def _typed_event(kind: str, event: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The keys of an event in :data:`TYPED_EVENTS`, and its secret (see :class:`Inbound`)."""
    if kind == "app_home_opened":
        view = _dict(event.get("view"))
        return {
            "user": _str(event.get("user")),
            "channel": _str(event.get("channel")),
            "tab": _str(event.get("tab")),
            "view": view,
            "view_id": _str(view.get("id")) if view else None,
            "event_ts": _str(event.get("event_ts")),
        }, None
    if kind in ("assistant_thread_started", "assistant_thread_context_changed"):
        thread = _dict(event.get("assistant_thread")) or {}
        return {
            "user": _str(thread.get("user_id")),
            "channel": _str(thread.get("channel_id")),
            "thread_ts": _str(thread.get("thread_ts")),
            "context": _dict(thread.get("context")) or {},
            "event_ts": _str(event.get("event_ts")),
        }, None
    # function_executed
    function = _dict(event.get("function")) or {}
    return {
        "function_execution_id": _str(event.get("function_execution_id")),
        "workflow_execution_id": _str(event.get("workflow_execution_id")),
        "callback_id": _str(function.get("callback_id")),
        "function": function,
        "inputs": _dict(event.get("inputs")) or {},
        "event_ts": _str(event.get("event_ts")),
    }, _str(event.get("bot_access_token"))


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
    enterprise, team = route_of("event_callback", body)
    common: dict[str, Any] = {"team": team, "enterprise": enterprise, "event_time": None}
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
    if kind in TYPED_EVENTS:
        keys, secret = _typed_event(kind, event)
        return Inbound(kind, event_id, {**common, **keys}, secret)
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
    enterprise, team = route_of("slash_commands", form)
    keys = {
        "command": _str(form.get("command")),
        "text": _str(form.get("text")) or "",
        "user": _str(form.get("user_id")),
        "user_name": _str(form.get("user_name")),
        "channel": _str(form.get("channel_id")),
        "channel_name": _str(form.get("channel_name")),
        "team": team,
        "enterprise": enterprise,
        "response_url": _str(form.get("response_url")),
        "trigger_id": trigger_id,
        "api_app_id": _str(form.get("api_app_id")),
    }
    if keys["command"] is None:
        raise InvalidPayload("slash command without command")
    return Inbound("command", trigger_id, keys)


def _id_of(value: Any) -> str | None:
    return _str(value.get("id")) if isinstance(value, dict) else None


def _values(view: Mapping[str, Any] | None) -> dict[str, Any]:
    """A view's ``state.values`` (block_id → action_id → the element's value)."""
    state = view.get("state") if view else None
    values = state.get("values") if isinstance(state, dict) else None
    return dict(values) if isinstance(values, dict) else {}


def _interactive_keys(kind: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """The keys a typed interactivity event adds to those every one carries."""
    view = _dict(payload.get("view"))
    view_keys = {
        "view_id": _str(view.get("id")) if view else None,
        "private_metadata": _str(view.get("private_metadata")) if view else None,
    }
    if kind == "block_actions":
        container = _dict(payload.get("container")) or {}
        state = _dict(payload.get("state"))
        return {
            **view_keys,
            "message_ts": _str(container.get("message_ts")),
            "values": _values(view) if view else _values({"state": state} if state else None),
        }
    if kind == "view_submission":
        return {
            **view_keys,
            "values": _values(view),
            "hash": _str(view.get("hash")) if view else None,
            "external_id": _str(view.get("external_id")) if view else None,
        }
    if kind == "view_closed":
        return {**view_keys, "is_cleared": payload.get("is_cleared") is True}
    if kind == "message_action":
        message = _dict(payload.get("message"))
        return {"message_ts": _str(message.get("ts")) if message else None, "message": message}
    if kind == "block_suggestion":
        return {
            "view_id": view_keys["view_id"],
            "action_id": _str(payload.get("action_id")),
            "block_id": _str(payload.get("block_id")),
            "value": _str(payload.get("value")) or "",
        }
    return {}  # shortcut: callback_id and trigger_id, which every one carries


def from_interactive(payload: Mapping[str, Any]) -> Inbound:
    """An interactivity payload: ``slack.block_actions``, ``slack.view_submission``,
    ``slack.view_closed``, ``slack.shortcut``, ``slack.message_action``, ``slack.options``
    (``block_suggestion``), or ``slack.action`` for any other ``type``."""
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
    user = payload.get("user")
    enterprise, team = route_of("interactive", payload)
    kind = _str(payload.get("type"))
    keys = {
        "kind": kind,
        "user": _id_of(user),
        "user_name": _str(user.get("username") or user.get("name"))
        if isinstance(user, dict)
        else None,
        "channel": _id_of(payload.get("channel")),
        "team": team,
        "enterprise": enterprise,
        "response_url": response_url,
        "trigger_id": trigger_id,
        "callback_id": callback_id,
        "actions": actions if isinstance(actions, list) else [],
        "payload": dict(payload),
    }
    event = INTERACTIVE.get(kind or "")
    if event is None:
        return Inbound("action", trigger_id, keys)
    assert kind is not None
    return Inbound(event, trigger_id, {**keys, **_interactive_keys(kind, payload)})


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


def _identifier(value: Any, key: str, limit: int = MAX_ID) -> str:
    if not isinstance(value, str) or not value or len(value) > limit:
        raise InvalidCommand(f"{key!r} must be a non-empty string of at most {limit} characters")
    if any(c.isspace() for c in value):
        raise InvalidCommand(f"{key!r} must contain no spaces")
    return value


def parse_route(body: Mapping[str, Any]) -> Route:
    """The workspace a command names (``enterprise``, ``team``; each optional): whose token it
    goes out with when the app is installed in several (``slack.oauth``)."""
    route = []
    for key in ("enterprise", "team"):
        value = body.get(key)
        route.append(None if value is None else _identifier(value, key, 64))
    return route[0], route[1]


# -- views ------------------------------------------------------------------------------------


def _plain_text(value: Any, key: str, limit: int) -> dict[str, Any]:
    if (
        not isinstance(value, dict)
        or value.get("type") != "plain_text"
        or not isinstance(value.get("text"), str)
        or not value["text"]
    ):
        raise InvalidCommand(f"{key!r} must be a plain_text object with a text")
    if len(value["text"]) > limit:
        raise InvalidCommand(f"{key!r} is {len(value['text'])} characters (Slack's limit: {limit})")
    return dict(value)


def _view(value: Any, kinds: tuple[str, ...]) -> dict[str, Any]:
    """A view object (modal or Home tab) as Slack's view reference describes it."""
    if not isinstance(value, dict):
        raise InvalidCommand("'view' must be a view object")
    kind = value.get("type")
    if kind not in kinds:
        raise InvalidCommand(f"'view' must be of type {' or '.join(map(repr, kinds))}")
    blocks = value.get("blocks")
    if not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks):
        raise InvalidCommand("'view.blocks' must be a list of Block Kit objects")
    if len(blocks) > MAX_VIEW_BLOCKS:
        raise InvalidCommand(
            f"'view.blocks' has {len(blocks)} blocks (Slack's limit: {MAX_VIEW_BLOCKS})"
        )
    if kind == "modal":
        _plain_text(value.get("title"), "view.title", MAX_MODAL_TEXT)
        for key in ("submit", "close"):
            if value.get(key) is not None:
                _plain_text(value[key], f"view.{key}", MAX_MODAL_TEXT)
        if value.get("submit") is None and any(b.get("type") == "input" for b in blocks):
            raise InvalidCommand("'view.submit' is required with an input block")
    for key, limit in (("callback_id", MAX_ID), ("external_id", MAX_ID)):
        if value.get(key) is not None:
            _identifier(value[key], f"view.{key}", limit)
    metadata = value.get("private_metadata")
    if metadata is not None and (not isinstance(metadata, str) or len(metadata) > MAX_METADATA):
        raise InvalidCommand(f"'view.private_metadata' must be a string of at most {MAX_METADATA}")
    return dict(value)


def _trigger(body: Mapping[str, Any]) -> dict[str, str]:
    """``trigger_id`` or ``interactivity_pointer``: exactly one (Slack takes either)."""
    given = {k: body[k] for k in ("trigger_id", "interactivity_pointer") if body.get(k) is not None}
    if len(given) != 1:
        raise InvalidCommand("exactly one of 'trigger_id' and 'interactivity_pointer' is required")
    ((key, value),) = given.items()
    return {key: _identifier(value, key)}


def parse_views_open(body: Mapping[str, Any]) -> ApiCall:
    """``slack.views_open``: a modal ``view`` for the user of ``trigger_id`` (valid for 3 s
    after the interaction that gave it) or ``interactivity_pointer``."""
    return ApiCall("views.open", {**_trigger(body), "view": _view(body.get("view"), ("modal",))})


def parse_views_push(body: Mapping[str, Any]) -> ApiCall:
    """``slack.views_push``: a modal ``view`` on top of the open one (a stack of at most 3)."""
    return ApiCall("views.push", {**_trigger(body), "view": _view(body.get("view"), ("modal",))})


def _hash(body: Mapping[str, Any], args: dict[str, Any]) -> dict[str, Any]:
    if body.get("hash") is not None:
        args["hash"] = _identifier(body["hash"], "hash")
    return args


def parse_views_update(body: Mapping[str, Any]) -> ApiCall:
    """``slack.views_update``: replace the view ``view_id`` or ``external_id`` (exactly one);
    ``hash`` (optional) makes Slack refuse it when the view changed meanwhile."""
    given = {k: body[k] for k in ("view_id", "external_id") if body.get(k) is not None}
    if len(given) != 1:
        raise InvalidCommand("exactly one of 'view_id' and 'external_id' is required")
    ((key, value),) = given.items()
    args = {key: _identifier(value, key), "view": _view(body.get("view"), ("modal", "home"))}
    return ApiCall("views.update", _hash(body, args))


def parse_views_publish(body: Mapping[str, Any]) -> ApiCall:
    """``slack.views_publish``: the Home tab ``view`` of ``user_id``; ``hash`` optional."""
    args = {
        "user_id": _identifier(body.get("user_id"), "user_id"),
        "view": _view(body.get("view"), ("home",)),
    }
    return ApiCall("views.publish", _hash(body, args))


# -- workflow functions -----------------------------------------------------------------------


def parse_function_complete(body: Mapping[str, Any]) -> ApiCall:
    """``slack.function_complete``: the custom function ``function_execution_id`` succeeded
    with ``outputs`` (an object matching the function's output parameters)."""
    outputs = body.get("outputs")
    if not isinstance(outputs, dict) or not all(isinstance(k, str) for k in outputs):
        raise InvalidCommand("'outputs' must be an object")
    execution = _identifier(body.get("function_execution_id"), "function_execution_id")
    return ApiCall(
        "functions.completeSuccess", {"function_execution_id": execution, "outputs": outputs}
    )


def parse_function_fail(body: Mapping[str, Any]) -> ApiCall:
    """``slack.function_fail``: the custom function failed; ``error`` is shown to the user."""
    execution = _identifier(body.get("function_execution_id"), "function_execution_id")
    error = body.get("error")
    if not isinstance(error, str) or not error.strip():
        raise InvalidCommand("'error' must be a non-empty string")
    return ApiCall("functions.completeError", {"function_execution_id": execution, "error": error})


# -- answers inside the acknowledgement --------------------------------------------------------


def _option(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidCommand(f"{key!r} must be an option object")
    # a select menu's options are plain_text (mrkdwn is for checkboxes and radio buttons)
    _plain_text(value.get("text"), f"{key}.text", MAX_OPTION_TEXT)
    option_value = value.get("value")
    if not isinstance(option_value, str) or len(option_value) > MAX_OPTION_VALUE:
        raise InvalidCommand(f"{key}.value must be a string of at most {MAX_OPTION_VALUE}")
    return dict(value)


def _options(value: Any, key: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise InvalidCommand(f"{key!r} must be a list")
    if len(value) > MAX_OPTIONS:
        raise InvalidCommand(f"{key!r} has {len(value)} entries (Slack's limit: {MAX_OPTIONS})")
    return [_option(option, f"{key}[{i}]") for i, option in enumerate(value)]


def _options_answer(body: Mapping[str, Any]) -> dict[str, Any]:
    if body.get("options") is not None and body.get("option_groups") is not None:
        raise InvalidCommand("give 'options' or 'option_groups', not both")
    if body.get("options") is not None:
        return {"options": _options(body["options"], "options")}
    groups = body["option_groups"]
    if not isinstance(groups, list) or len(groups) > MAX_OPTIONS:
        raise InvalidCommand(f"'option_groups' must be a list of at most {MAX_OPTIONS} groups")
    checked = []
    for i, group in enumerate(groups):
        if not isinstance(group, dict):
            raise InvalidCommand(f"'option_groups[{i}]' must be an option group object")
        _plain_text(group.get("label"), f"option_groups[{i}].label", MAX_OPTION_TEXT)
        _options(group.get("options"), f"option_groups[{i}].options")
        checked.append(dict(group))
    return {"option_groups": checked}


def _view_answer(body: Mapping[str, Any]) -> dict[str, Any]:
    action = body.get("response_action")
    if action == "errors":
        errors = body.get("errors")
        if (
            not isinstance(errors, dict)
            or not errors
            or not all(isinstance(k, str) and k for k in errors)
            or not all(isinstance(v, str) and v for v in errors.values())
        ):
            raise InvalidCommand("'errors' must map block_id to an error text")
        if body.get("view") is not None:
            raise InvalidCommand("response_action 'errors' takes no 'view'")
        return {"response_action": "errors", "errors": dict(errors)}
    if action in ("update", "push"):
        if body.get("errors") is not None:
            raise InvalidCommand(f"response_action {action!r} takes no 'errors'")
        return {"response_action": action, "view": _view(body.get("view"), ("modal",))}
    if action == "clear":
        if body.get("errors") is not None or body.get("view") is not None:
            raise InvalidCommand("response_action 'clear' takes neither 'errors' nor 'view'")
        return {"response_action": "clear"}
    raise InvalidCommand("'response_action' must be 'errors', 'update', 'push' or 'clear'")


def parse_ack(body: Mapping[str, Any], event: str | None = None) -> dict[str, Any] | None:
    """``slack.ack``: what the acknowledgement of ``event`` (its type, ``slack.view_submission``
    …; ``None``: any answerable one) carries; ``None`` for an empty acknowledgement.

    * ``slack.view_submission``: ``response_action`` ``errors`` (with ``errors``: block_id →
      text), ``update`` / ``push`` (with a modal ``view``) or ``clear``;
    * ``slack.options`` (``block_suggestion``): ``options`` or ``option_groups`` (≤ 100);
    * ``slack.command``: an immediate message, ``text`` and/or ``blocks`` and
      ``response_type`` (``ephemeral``, Slack's default, or ``in_channel``).
    """
    given = {_ANSWER_KEYS[k] for k in _ANSWER_KEYS if body.get(k) is not None}
    if not given:
        return None

    def keys_for(kind: str) -> str:
        return ", ".join(repr(k) for k in ANSWERABLE[kind] if body.get(k) is not None)

    if len(given) > 1:
        parts = [f"{keys_for(kind)} answer a {kind}" for kind in sorted(given)]
        raise InvalidCommand("an answer is for one kind of event: " + "; ".join(parts))
    (kind,) = given
    if event is not None and kind != event:
        keys = ", ".join(repr(k) for k in ANSWERABLE.get(event, ()))
        raise InvalidCommand(
            f"a {event} is answered with {keys or 'nothing'}, not with {keys_for(kind)}"
        )
    if kind == "slack.view_submission":
        return _view_answer(body)
    if kind == "slack.options":
        return _options_answer(body)
    answer = _content(body, required=True)
    response_type = body.get("response_type")
    if response_type is not None:
        if response_type not in ("ephemeral", "in_channel"):
            raise InvalidCommand("'response_type' must be 'ephemeral' or 'in_channel'")
        answer["response_type"] = response_type
    return answer


# -- OAuth ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Installation:
    """The app installed in one workspace (or org-wide in an enterprise): what
    ``oauth.v2.access`` answered. Tokens stay out of ``repr``.

    ``bot_token_expires_at`` (epoch seconds) and ``bot_refresh_token`` are set when the app
    uses token rotation.
    """

    team_id: str | None
    enterprise_id: str | None
    is_enterprise_install: bool
    bot_token: str = field(repr=False)
    bot_user_id: str | None = None
    bot_id: str | None = None
    bot_scopes: str = ""
    bot_refresh_token: str | None = field(default=None, repr=False)
    bot_token_expires_at: float | None = None
    team_name: str | None = None
    enterprise_name: str | None = None
    app_id: str | None = None
    installer_user_id: str | None = None
    installed_at: float = 0.0

    @property
    def key(self) -> str:
        """Where the store keeps it (:func:`installation_key`)."""
        return installation_key(
            self.enterprise_id, None if self.is_enterprise_install else self.team_id
        )

    def expires_in(self, now: float) -> float | None:
        """Seconds the bot token has left at ``now`` (``None``: it does not expire)."""
        return None if self.bot_token_expires_at is None else self.bot_token_expires_at - now

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> Installation:
        """What :meth:`to_json` wrote; :class:`InvalidPayload` for anything else."""
        try:
            data = json.loads(text)
            return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        except (ValueError, TypeError, AttributeError) as exc:
            raise InvalidPayload(f"not an installation: {type(exc).__name__}") from None


def installation_key(enterprise_id: str | None, team_id: str | None) -> str:
    """``{enterprise id or -}:{team id or -}``: an org-wide install is ``E…:-``, a workspace
    ``-:T…`` (``E…:T…`` inside an enterprise)."""
    return f"{enterprise_id or '-'}:{team_id or '-'}"


def authorize_url(
    base: str, client_id: str, scopes: list[str], state: str, redirect_uri: str | None
) -> str:
    """Slack's OAuth v2 authorize URL for the "Add to Slack" redirect."""
    query = {"client_id": client_id, "scope": ",".join(scopes), "state": state}
    if redirect_uri is not None:
        query["redirect_uri"] = redirect_uri
    return f"{base}?{urlencode(query)}"


def _expiry(answer: Mapping[str, Any], now: float) -> float | None:
    expires_in = answer.get("expires_in")
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
        return now + float(expires_in)
    return None


def installation_from_oauth(answer: Mapping[str, Any], now: float) -> Installation:
    """``oauth.v2.access``'s answer to an authorization code → :class:`Installation`.

    Raises :class:`InvalidPayload` when it holds no bot token (the app asked for no bot
    scopes) or names no workspace.
    """
    token = _str(answer.get("access_token"))
    if answer.get("token_type") not in (None, "bot") or not token:
        raise InvalidPayload("oauth.v2.access gave no bot token (are bot scopes requested?)")
    team, enterprise = _dict(answer.get("team")) or {}, _dict(answer.get("enterprise")) or {}
    is_enterprise = answer.get("is_enterprise_install") is True
    if not _str(team.get("id")) and not (is_enterprise and _str(enterprise.get("id"))):
        raise InvalidPayload("oauth.v2.access names no workspace")
    user = _dict(answer.get("authed_user")) or {}
    return Installation(
        team_id=_str(team.get("id")),
        enterprise_id=_str(enterprise.get("id")),
        is_enterprise_install=is_enterprise,
        bot_token=token,
        bot_user_id=_str(answer.get("bot_user_id")),
        bot_scopes=_str(answer.get("scope")) or "",
        bot_refresh_token=_str(answer.get("refresh_token")),
        bot_token_expires_at=_expiry(answer, now),
        team_name=_str(team.get("name")),
        enterprise_name=_str(enterprise.get("name")),
        app_id=_str(answer.get("app_id")),
        installer_user_id=_str(user.get("id")),
        installed_at=now,
    )


def refreshed(installation: Installation, answer: Mapping[str, Any], now: float) -> Installation:
    """``installation`` with the tokens of ``oauth.v2.access``'s answer to
    ``grant_type=refresh_token`` (a new access token and a new refresh token: the old refresh
    token is revoked). :class:`InvalidPayload` when either is missing."""
    token, refresh = _str(answer.get("access_token")), _str(answer.get("refresh_token"))
    if not token or not refresh:
        raise InvalidPayload("oauth.v2.access (refresh_token) gave no access or refresh token")
    return replace(
        installation,
        bot_token=token,
        bot_refresh_token=refresh,
        bot_token_expires_at=_expiry(answer, now),
    )
