"""A local stand-in for Slack that speaks its documented wire format, for tests and benchmarks.

The gateway knows it only by its base URL (``slack.api_url: {fake.api_url}``):

* **Web API** ``POST|GET /api/<method>``: the token as ``Authorization: Bearer`` or a ``token``
  field; arguments as JSON, a form or the query string, as Slack accepts them. Answers are
  Slack's JSON (``{"ok": true, …}`` / ``{"ok": false, "error": "channel_not_found"}``) for
  ``auth.test``, ``apps.connections.open`` (app token only; the URL points at this server's
  own Socket Mode endpoint), ``chat.postMessage``, ``chat.update``, ``chat.delete``,
  ``reactions.add``, ``reactions.remove`` and ``conversations.info`` (public channels
  ``C0GENERAL`` and ``C0RANDOM``; private ``C0SECRET``, created "after March 2021", and the
  older ``G0LEGACY``; the group DM ``G0MPDM`` and the DM ``D0ALICE``).
  :meth:`FakeSlack.rate_limit` makes the next calls of a method answer ``429`` with
  ``Retry-After``.
* **Socket Mode** ``GET /socket/<ticket>`` (WebSocket): ``hello`` on connect; :meth:`send_event`,
  :meth:`send_slash_command`, :meth:`send_interactive` (:meth:`send_envelope`: any) push the
  documented envelopes and record acknowledgements by ``envelope_id``; :meth:`send_disconnect`
  asks the client to move; :meth:`go_silent` stops answering anything (pings included) without
  closing. Like Slack, envelopes not acknowledged are redelivered on the next connection
  (``retry_attempt`` + 1), when :meth:`redeliver` is called, or, after :meth:`auto_redeliver`,
  once they went unacknowledged for a while (Slack: about 3 s); after
  :attr:`~FakeSlack.max_retries` redeliveries Slack gives up on one (:attr:`FakeSlack.abandoned`).
  Frames of any size are sent (Slack documents no limit); :attr:`FakeSlack.close_codes` records
  how each connection ended (``1009``: a frame was too big for the client).
* **response_url** ``POST /hooks/<n>``: bodies recorded in :attr:`FakeSlack.responses`.
* **Acknowledgements with an answer**: an envelope's acknowledgement ``{"envelope_id",
  "payload"}`` is recorded in :attr:`FakeSlack.ack_payloads`. Slash commands are sent with
  ``accepts_response_payload: true``, so are ``view_submission`` and ``block_suggestion``
  payloads (whose answers Slack only takes there); other interactivity ``false``.
* **Views**: ``views.open`` / ``views.push`` take a ``trigger_id`` this fake issued
  (:meth:`FakeSlack.trigger`; every slash command and interaction it sends carries a fresh one)
  once, within 3 s (``invalid_trigger_id``, ``exchanged_trigger_id``, ``expired_trigger_id``);
  ``views.update`` a known ``view_id`` / ``external_id`` (``not_found``, ``hash_conflict``);
  ``views.publish`` a ``user_id`` and a ``home`` view. Views are in :attr:`FakeSlack.views`,
  Home tabs in :attr:`FakeSlack.home_views`.
* **Many workspaces**: :meth:`FakeSlack.add_team` adds a workspace with its own bot user; every
  bot token belongs to one (:attr:`FakeSlack.tokens`) and each call is recorded with it
  (:attr:`SlackCall.team`). The OAuth v2 flow: ``GET /oauth/v2/authorize`` plays the user
  who approves the install into the workspace :meth:`FakeSlack.install_into` names (or denies
  it) and redirects to the ``redirect_uri`` with a ``code`` (single use, 10 minutes) and the
  ``state``; ``oauth.v2.access`` takes the client credentials as HTTP Basic authentication (or
  form fields) and exchanges the code for a bot token, or with ``grant_type=refresh_token`` a
  refresh token for a new token pair (the refresh token is then revoked). With
  :attr:`FakeSlack.rotation` set, tokens expire that many seconds after they were issued
  (``token_expired``), and come with a refresh token.
* **Workflow functions**: :meth:`FakeSlack.function_executed` builds a ``function_executed``
  event with its own ``bot_access_token``; ``functions.completeSuccess`` /
  ``functions.completeError`` take it (or the workspace's bot token) once per execution
  (``function_execution_not_found``, ``execution_not_in_running_state``); outcomes are in
  :attr:`FakeSlack.function_outcomes`.
* :class:`EventsApiClient` posts signed Events API requests (``X-Slack-Signature`` v0) the way
  Slack does, with knobs to get the signature, the timestamp or the headers wrong.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import itertools
import json
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from aiohttp import ClientSession, WSMsgType, web

from core.testing.base import HOST, WAIT, free_port

__all__ = [
    "ANSWERED_IN_ACK",
    "EventsApiClient",
    "FakeSlack",
    "SlackCall",
    "Team",
    "Token",
    "event_callback",
    "sign",
]

BOT_USER = "U0BOT"
BOT_ID = "B0BOT"
TEAM = "T0TEAM"
APP = "A0APP"
#: interactivity whose answer only the acknowledgement can carry: sent accepting one
ANSWERED_IN_ACK = frozenset({"view_submission", "block_suggestion"})


#: seconds a trigger_id can be exchanged for a view; an OAuth code, exchanged for a token
TRIGGER_FOR = 3.0
CODE_FOR = 600.0


@dataclass
class SlackCall:
    """One Web API call as the fake received it (``team``: whose token it carried)."""

    method: str
    args: dict[str, Any]
    token: str | None
    content_type: str
    team: str | None = None


@dataclass
class Team:
    """A workspace the app can be installed in, with its bot user."""

    id: str
    name: str
    bot_user: str
    bot_id: str


@dataclass
class Token:
    """A bot token: its workspace and when it expires (epoch seconds; ``None``: never)."""

    team: str
    expires_at: float | None = None
    refresh_token: str | None = None


@dataclass
class _Socket:
    ws: web.WebSocketResponse
    silent: bool = False
    closed: asyncio.Event = field(default_factory=asyncio.Event)


def event_callback(
    event: Mapping[str, Any],
    event_id: str | None = None,
    *,
    team: str = TEAM,
    bot_user: str = BOT_USER,
) -> dict[str, Any]:
    """The documented ``event_callback`` wrapper around one event, for workspace ``team``
    (whose installation's bot user is ``bot_user``)."""
    return {
        "token": "verification-token",
        "team_id": team,
        "api_app_id": APP,
        "event": dict(event),
        "type": "event_callback",
        "event_id": event_id or f"Ev{uuid.uuid4().hex[:10].upper()}",
        "event_time": int(time.time()),
        "authorizations": [
            {
                "enterprise_id": None,
                "team_id": team,
                "user_id": bot_user,
                "is_bot": True,
                "is_enterprise_install": False,
            }
        ],
        "is_ext_shared_channel": False,
        "event_context": "4-eyJldCI6Im1lc3NhZ2UifQ",
    }


def sign(secret: str, body: bytes, timestamp: int | str) -> str:
    """``v0=`` + hex HMAC-SHA256 of ``v0:{timestamp}:{body}`` (Slack's request signature)."""
    base = b"v0:" + str(timestamp).encode() + b":" + body
    return "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()


class FakeSlack:
    """Web API + Socket Mode + response_url on one loopback port; see the module docstring."""

    def __init__(
        self,
        *,
        bot_token: str = "xoxb-test-token",
        app_token: str = "xapp-test-token",
        channels: tuple[str, ...] = ("C0GENERAL", "C0RANDOM"),
        client_id: str = "1111.2222",
        client_secret: str = "fake-client-secret",
    ) -> None:
        self.bot_token = bot_token
        self.app_token = app_token
        #: the app's OAuth credentials (Basic Information)
        self.client_id = client_id
        self.client_secret = client_secret
        #: workspaces by id; the default one holds ``bot_token``
        self.teams: dict[str, Team] = {TEAM: Team(TEAM, "Example", BOT_USER, BOT_ID)}
        #: every bot token and its workspace
        self.tokens: dict[str, Token] = {bot_token: Token(TEAM)}
        #: seconds tokens issued from now on live (token rotation; None: they do not expire)
        self.rotation: float | None = None
        #: where the authorize page sends the browser when the app gave no redirect_uri
        self.redirect_url: str | None = None
        #: (team, installing user, approve?) of the next install at the authorize page
        self._next_install: tuple[str, str, bool] | None = None
        #: OAuth code → (team, user, redirect_uri, scopes, expiry, used)
        self._codes: dict[str, list[Any]] = {}
        #: refresh tokens handed out and not used yet → the token they refresh
        self._refresh_tokens: dict[str, str] = {}
        #: trigger_id → [issued at (monotonic), team, user, exchanged?]
        self.triggers: dict[str, list[Any]] = {}
        #: view id → the view as Slack keeps it (with ``user``)
        self.views: dict[str, dict[str, Any]] = {}
        #: (team, user) → the Home tab view published last
        self.home_views: dict[tuple[str, str], dict[str, Any]] = {}
        #: function_execution_id → {"token", "team", "state"}
        self.function_executions: dict[str, dict[str, Any]] = {}
        #: function_execution_id → ("success", outputs) or ("error", error)
        self.function_outcomes: dict[str, tuple[str, Any]] = {}
        #: envelope_id → the payload its (first) acknowledgement carried, None for none
        self.ack_payloads: dict[str, dict[str, Any] | None] = {}
        #: every acknowledgement in order: (envelope_id, its payload or None)
        self.acked_with: list[tuple[str, dict[str, Any] | None]] = []
        #: conversation id → its flags in conversations.info (Slack's conversation object)
        self.conversations: dict[str, dict[str, bool]] = {
            **{channel: _conversation("public") for channel in channels},
            "C0SECRET": _conversation("private"),
            "G0LEGACY": _conversation("legacy_private"),
            "G0MPDM": _conversation("mpim"),
            "D0ALICE": _conversation("im"),
        }
        self.channels = set(self.conversations)
        self.port: int | None = None
        #: every Web API call, in order
        self.calls: list[SlackCall] = []
        #: envelope_id → the envelope, while it waits for its acknowledgement
        self.pending: dict[str, dict[str, Any]] = {}
        #: envelope ids in the order their acknowledgements arrived (repeats kept)
        self.acks: list[str] = []
        #: envelope_id → time.monotonic() when it was first sent / first acknowledged
        self.sent_at: dict[str, float] = {}
        self.acked_at: dict[str, float] = {}
        #: bodies posted to response_url
        self.responses: list[dict[str, Any]] = []
        #: messages by (channel, ts)
        self.messages: dict[tuple[str, str], dict[str, Any]] = {}
        self.reactions: set[tuple[str, str, str]] = set()
        self.sockets: list[_Socket] = []
        self.connections_opened = 0
        #: the WebSocket close code of each connection that ended, in order
        self.close_codes: list[int | None] = []
        #: redeliveries of one envelope before Slack gives up on it (None: never)
        self.max_retries: int | None = None
        #: envelope_id → the envelope Slack gave up on after max_retries redeliveries
        self.abandoned: dict[str, dict[str, Any]] = {}
        #: envelope_id → time.monotonic() of its latest delivery
        self._delivered: dict[str, float] = {}
        self._limits: dict[str, list[int]] = {}
        #: the workspace of the call being answered
        self._caller = TEAM
        self._ts = itertools.count(1)
        self._hooks = itertools.count(1)
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Future[None]] = set()
        #: seconds each Web API call takes to arrive (network latency that varies per call)
        self.delay: Callable[[SlackCall], float] | None = None

    # -- life cycle ---------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def api_url(self) -> str:
        """What the gateway's ``slack.api_url`` is set to."""
        return f"{self.base_url}/api/"

    @property
    def authorize_url(self) -> str:
        """What the gateway's ``slack.oauth.authorize_url`` is set to."""
        return f"{self.base_url}/oauth/v2/authorize"

    @property
    def hooks_url(self) -> str:
        """What the gateway's ``slack.response_url_prefix`` is set to."""
        return f"{self.base_url}/hooks/"

    async def start(self, port: int | None = None) -> FakeSlack:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_get("/oauth/v2/authorize", self._authorize)
        app.router.add_get("/socket/{ticket}", self._socket)
        app.router.add_post("/hooks/{n}", self._hook)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        self.port = port or self.port or free_port()
        await web.TCPSite(self._runner, HOST, self.port).start()
        return self

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for socket in self.sockets:
            if not socket.ws.closed:
                await socket.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Any, timeout: float = WAIT, what: str = "") -> Any:
        """Wait until ``predicate()`` is truthy (re-checked whenever the fake saw something)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (result := predicate()):
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"fake Slack: timed out waiting for {what or predicate}")
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(remaining, 0.5))
        return result

    # -- Web API ------------------------------------------------------------------------------

    def rate_limit(self, method: str, *, retry_after: int = 1, times: int = 1) -> None:
        """The next ``times`` calls of ``method`` get ``429`` with ``Retry-After: retry_after``."""
        self._limits[method] = [retry_after, times]

    def calls_of(self, method: str) -> list[SlackCall]:
        return [c for c in self.calls if c.method == method]

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        args: dict[str, Any] = dict(request.query)
        content_type = request.content_type
        if request.method == "POST":
            if content_type == "application/json":
                raw = await request.text()
                body = json.loads(raw) if raw.strip() else {}
                if not isinstance(body, dict):
                    return _slack_error("invalid_json")
                args.update(body)
            elif content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
                args.update(dict(await request.post()))
        token = args.pop("token", None)
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            token = header[len("Bearer ") :]
        if method == "oauth.v2.access":
            return self._oauth_access(args, header)
        found = self.tokens.get(token or "")
        call = SlackCall(method, args, token, content_type, found.team if found else None)
        if self.delay is not None:  # the request is still on its way
            await asyncio.sleep(self.delay(call))
        self.calls.append(call)
        self._notify()
        limit = self._limits.get(method)
        if limit is not None and limit[1] > 0:
            limit[1] -= 1
            return web.json_response(
                {"ok": False, "error": "ratelimited"},
                status=429,
                headers={"Retry-After": str(limit[0])},
            )
        if not token:
            return _slack_error("not_authed")
        if method == "apps.connections.open":
            if token.startswith("xoxb-"):
                return _slack_error("not_allowed_token_type")
            if token != self.app_token:
                return _slack_error("invalid_auth")
            ticket = uuid.uuid4().hex
            return _slack_ok(url=f"ws://{HOST}:{self.port}/socket/{ticket}")
        if method.startswith("functions.complete"):
            return self._m_functions_complete(method, args, token)
        if found is None:
            return _slack_error("invalid_auth")
        if found.expires_at is not None and found.expires_at <= time.time():
            return _slack_error("token_expired")
        handler = getattr(self, "_m_" + method.replace(".", "_"), None)
        if handler is None:
            return _slack_error("unknown_method")
        self._caller = found.team
        result: web.Response = handler(args)
        return result

    def _m_auth_test(self, args: dict[str, Any]) -> web.Response:
        team = self.teams[self._caller]
        return _slack_ok(
            url=f"https://{team.name.lower()}.slack.com/",
            team=team.name,
            user="gatewaybot",
            team_id=team.id,
            user_id=team.bot_user,
            bot_id=team.bot_id,
            is_enterprise_install=False,
        )

    def _channel(self, args: dict[str, Any]) -> str | None:
        channel = args.get("channel")
        return channel if isinstance(channel, str) and channel in self.channels else None

    def _m_chat_postMessage(self, args: dict[str, Any]) -> web.Response:
        channel = self._channel(args)
        if channel is None:
            return _slack_error("channel_not_found")
        if not args.get("text") and not args.get("blocks"):
            return _slack_error("no_text")
        ts = f"{1700000000 + next(self._ts)}.000100"
        message = {"type": "message", "user": BOT_USER, "bot_id": BOT_ID, "ts": ts, **args}
        message.pop("channel", None)
        self.messages[(channel, ts)] = message
        return _slack_ok(channel=channel, ts=ts, message=message)

    def _m_chat_update(self, args: dict[str, Any]) -> web.Response:
        channel = self._channel(args)
        if channel is None:
            return _slack_error("channel_not_found")
        ts = str(args.get("ts"))
        if (channel, ts) not in self.messages:
            return _slack_error("message_not_found")
        self.messages[(channel, ts)].update({k: v for k, v in args.items() if k != "channel"})
        return _slack_ok(channel=channel, ts=ts, text=args.get("text", ""))

    def _m_chat_delete(self, args: dict[str, Any]) -> web.Response:
        channel = self._channel(args)
        if channel is None:
            return _slack_error("channel_not_found")
        ts = str(args.get("ts"))
        if self.messages.pop((channel, ts), None) is None:
            return _slack_error("message_not_found")
        return _slack_ok(channel=channel, ts=ts)

    def _m_reactions_add(self, args: dict[str, Any]) -> web.Response:
        channel = self._channel(args)
        if channel is None:
            return _slack_error("channel_not_found")
        key = (channel, str(args.get("timestamp")), str(args.get("name")))
        if (key[0], key[1]) not in self.messages:
            return _slack_error("message_not_found")
        if key in self.reactions:
            return _slack_error("already_reacted")
        self.reactions.add(key)
        return _slack_ok()

    def _m_reactions_remove(self, args: dict[str, Any]) -> web.Response:
        key = (str(args.get("channel")), str(args.get("timestamp")), str(args.get("name")))
        if key not in self.reactions:
            return _slack_error("no_reaction")
        self.reactions.discard(key)
        return _slack_ok()

    def _m_conversations_info(self, args: dict[str, Any]) -> web.Response:
        channel = self._channel(args)
        if channel is None:
            return _slack_error("channel_not_found")
        return _slack_ok(channel={"id": channel, "name": channel.lower(), "created": 1360782804,
                                  **self.conversations[channel]})  # fmt: skip

    # -- views ----------------------------------------------------------------------------------

    def trigger(self, user: str = "U0ALICE", team: str = TEAM) -> str:
        """A new ``trigger_id`` for ``user`` (what an interaction of theirs carries)."""
        trigger = f"{next(self._ts)}.{int(time.time())}.{secrets.token_hex(8)}"
        self.triggers[trigger] = [time.monotonic(), team, user, False]
        return trigger

    def _exchange(self, args: dict[str, Any]) -> tuple[list[Any] | None, str | None]:
        """The trigger of a views.open / views.push, or the error Slack answers."""
        trigger = args.get("trigger_id")
        found = self.triggers.get(trigger) if isinstance(trigger, str) else None
        if found is None or found[1] != self._caller:
            return None, "invalid_trigger_id"
        if found[3]:
            return None, "exchanged_trigger_id"
        if time.monotonic() - found[0] > TRIGGER_FOR:
            return None, "expired_trigger_id"
        found[3] = True
        return found, None

    def _view_arg(self, args: dict[str, Any], kinds: tuple[str, ...]) -> dict[str, Any] | None:
        view = args.get("view")
        if isinstance(view, str):  # "A view payload. This must be a JSON-encoded string."
            with contextlib.suppress(ValueError):
                view = json.loads(view)
        if not isinstance(view, dict) or view.get("type") not in kinds:
            return None
        if not isinstance(view.get("blocks"), list):
            return None
        return view

    def _keep_view(
        self, view: dict[str, Any], user: str, view_id: str | None = None
    ) -> dict[str, Any]:
        kept: dict[str, Any] = {
            "id": view_id or f"V{secrets.token_hex(5).upper()}",
            "team_id": self._caller,
            "type": view["type"],
            "blocks": view["blocks"],
            "private_metadata": view.get("private_metadata", ""),
            "callback_id": view.get("callback_id", ""),
            "state": {"values": {}},
            "hash": f"{time.time():.6f}.{secrets.token_hex(4)}",
            "clear_on_close": view.get("clear_on_close", False),
            "notify_on_close": view.get("notify_on_close", False),
            "external_id": view.get("external_id", ""),
            "app_id": APP,
            "bot_id": self.teams[self._caller].bot_id,
            **{k: view[k] for k in ("title", "submit", "close") if k in view},
        }
        kept["root_view_id"] = kept["id"]
        self.views[kept["id"]] = {**kept, "user": user}
        self._notify()
        return kept

    def open_view(self, view: dict[str, Any], user: str = "U0ALICE", team: str = TEAM) -> str:
        """A view open for ``user`` as if the app had opened it; its id."""
        self._caller = team
        return str(self._keep_view(view, user)["id"])

    def _m_views_open(self, args: dict[str, Any]) -> web.Response:
        view = self._view_arg(args, ("modal",))
        if view is None:
            return _slack_error("invalid_arguments")
        trigger, error = self._exchange(args)
        if trigger is None:
            return _slack_error(error or "invalid_trigger_id")
        return _slack_ok(view=self._keep_view(view, trigger[2]))

    def _m_views_push(self, args: dict[str, Any]) -> web.Response:
        return self._m_views_open(args)

    def _m_views_update(self, args: dict[str, Any]) -> web.Response:
        view = self._view_arg(args, ("modal", "home"))
        if view is None:
            return _slack_error("invalid_arguments")
        found = None
        if isinstance(args.get("view_id"), str):
            found = self.views.get(args["view_id"])
        elif isinstance(args.get("external_id"), str):
            found = next(
                (v for v in self.views.values() if v["external_id"] == args["external_id"]), None
            )
        if found is None or found["team_id"] != self._caller:
            return _slack_error("not_found")
        if args.get("hash") is not None and args["hash"] != found["hash"]:
            return _slack_error("hash_conflict")
        return _slack_ok(view=self._keep_view(view, found["user"], found["id"]))

    def _m_views_publish(self, args: dict[str, Any]) -> web.Response:
        view = self._view_arg(args, ("home",))
        user = args.get("user_id")
        if view is None or not isinstance(user, str):
            return _slack_error("invalid_arguments")
        kept = self._keep_view(view, user)
        self.home_views[(self._caller, user)] = kept
        return _slack_ok(view=kept)

    # -- workflow functions -------------------------------------------------------------------

    def function_executed(
        self, callback_id: str, inputs: Mapping[str, Any], *, team: str = TEAM
    ) -> dict[str, Any]:
        """A documented ``function_executed`` event (for :meth:`send_event` or
        :meth:`EventsApiClient.event`), with a ``bot_access_token`` of its own."""
        execution = f"Fx{secrets.token_hex(5).upper()}"
        token = f"xwfp-{team}-{secrets.token_hex(12)}"
        self.function_executions[execution] = {"token": token, "team": team, "state": "running"}
        return {
            "type": "function_executed",
            "function": {
                "id": f"Fn{secrets.token_hex(5).upper()}",
                "callback_id": callback_id,
                "title": callback_id.replace("_", " ").title(),
                "description": "",
                "type": "app",
                "input_parameters": [],
                "output_parameters": [],
                "app_id": APP,
                "date_created": 1694727597,
                "date_updated": 1698947481,
                "date_deleted": 0,
            },
            "inputs": dict(inputs),
            "function_execution_id": execution,
            "workflow_execution_id": f"Wx{secrets.token_hex(5).upper()}",
            "event_ts": f"{time.time():.6f}",
            "bot_access_token": token,
        }

    def _m_functions_complete(self, method: str, args: dict[str, Any], token: Any) -> web.Response:
        execution = self.function_executions.get(str(args.get("function_execution_id")))
        bot = self.tokens.get(token or "")
        if execution is None:
            return _slack_error("function_execution_not_found")
        if token != execution["token"] and (bot is None or bot.team != execution["team"]):
            return _slack_error("access_denied")
        if execution["state"] != "running":
            return _slack_error("execution_not_in_running_state")
        execution["state"] = "completed"
        outcome = (
            ("success", args.get("outputs"))
            if method == "functions.completeSuccess"
            else ("error", args.get("error"))
        )
        self.function_outcomes[str(args["function_execution_id"])] = outcome
        self._notify()
        return _slack_ok()

    # -- many workspaces: OAuth ----------------------------------------------------------------

    def add_team(self, team_id: str, name: str) -> Team:
        """A workspace the app can be installed in (not installed yet)."""
        number = len(self.teams) + 1
        team = self.teams[team_id] = Team(team_id, name, f"U0BOT{number}", f"B0BOT{number}")
        return team

    def install_into(self, team: str, *, user: str = "U0ADMIN", approve: bool = True) -> None:
        """The next visit of the authorize page is ``user`` installing the app into ``team``
        (``approve=False``: they cancel; Slack redirects with ``error=access_denied``)."""
        self._next_install = (team, user, approve)

    def tokens_of(self, team: str) -> list[str]:
        """The bot tokens issued for ``team`` (also expired ones), oldest first."""
        return [token for token, found in self.tokens.items() if found.team == team]

    def _issue(self, team: str) -> tuple[str, Token]:
        """A new bot token for ``team`` (expiring, with a refresh token, under rotation)."""
        if self.rotation is None:
            token = f"xoxb-{team}-{secrets.token_hex(12)}"
            found = Token(team)
        else:
            token = f"xoxe.xoxb-1-{team}-{secrets.token_hex(12)}"
            refresh = f"xoxe-1-{team}-{secrets.token_hex(12)}"
            found = Token(team, time.time() + self.rotation, refresh)
            self._refresh_tokens[refresh] = token
        self.tokens[token] = found
        return token, found

    async def _authorize(self, request: web.Request) -> web.Response:
        query = request.query
        redirect = query.get("redirect_uri") or self.redirect_url
        if query.get("client_id") != self.client_id or not redirect:
            return web.Response(status=400, text="invalid client_id or redirect_uri")
        if self._next_install is None:
            return web.Response(status=400, text="fake Slack: call install_into() first")
        team, user, approve = self._next_install
        self._next_install = None
        answer: dict[str, str] = {"state": query.get("state", "")}
        if approve:
            code = f"{next(self._ts)}.{secrets.token_hex(16)}"
            self._codes[code] = [
                team,
                user,
                query.get("redirect_uri"),
                query.get("scope", ""),
                time.monotonic() + CODE_FOR,
                False,
            ]
            answer["code"] = code
        else:
            answer["error"] = "access_denied"
        separator = "&" if "?" in redirect else "?"
        raise web.HTTPFound(f"{redirect}{separator}{urlencode(answer)}")

    def _client(self, args: dict[str, Any], header: str) -> str | None:
        """Why the client credentials are refused (``None``: they are the app's)."""
        client_id, secret = args.get("client_id"), args.get("client_secret")
        if header.startswith("Basic "):
            with contextlib.suppress(ValueError):
                decoded = base64.b64decode(header[len("Basic ") :]).decode()
                client_id, _, secret = decoded.partition(":")
        if client_id != self.client_id:
            return "invalid_client_id"
        if secret != self.client_secret:
            return "bad_client_secret"
        return None

    def _oauth_access(self, args: dict[str, Any], header: str) -> web.Response:
        self.calls.append(SlackCall("oauth.v2.access", dict(args), None, "", None))
        self._notify()
        refused = self._client(args, header)
        if refused is not None:
            return _slack_error(refused)
        if args.get("grant_type") == "refresh_token":
            old = self._refresh_tokens.pop(str(args.get("refresh_token")), None)
            if old is None:
                return _slack_error("invalid_refresh_token")
            team = self.tokens[old].team
            token, found = self._issue(team)
            return self._token_answer(team, token, found, {})
        if args.get("grant_type") not in (None, "authorization_code"):
            return _slack_error("invalid_grant_type")
        code = self._codes.get(str(args.get("code")))
        if code is None or code[5] or code[4] < time.monotonic():
            return _slack_error("invalid_code")
        if code[2] is not None and args.get("redirect_uri") != code[2]:
            return _slack_error("bad_redirect_uri")
        code[5] = True
        team = code[0]
        token, found = self._issue(team)
        return self._token_answer(
            team, token, found, {"scope": code[3], "authed_user": {"id": code[1]}}
        )

    def _token_answer(
        self, team: str, token: str, found: Token, extra: dict[str, Any]
    ) -> web.Response:
        answer: dict[str, Any] = {
            "access_token": token,
            "token_type": "bot",
            "scope": "chat:write,commands",
            "bot_user_id": self.teams[team].bot_user,
            "app_id": APP,
            "team": {"id": team, "name": self.teams[team].name},
            "enterprise": None,
            "is_enterprise_install": False,
            **extra,
        }
        if found.refresh_token is not None and found.expires_at is not None:
            answer["refresh_token"] = found.refresh_token
            answer["expires_in"] = round(found.expires_at - time.time())
        return _slack_ok(**answer)

    # -- response_url -------------------------------------------------------------------------

    def response_url(self) -> str:
        return f"{self.hooks_url}{next(self._hooks)}"

    async def _hook(self, request: web.Request) -> web.Response:
        self.responses.append(await request.json())
        self._notify()
        return web.Response(text="ok")

    # -- Socket Mode --------------------------------------------------------------------------

    @property
    def open_sockets(self) -> list[_Socket]:
        return [s for s in self.sockets if not s.ws.closed and not s.closed.is_set()]

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        socket = _Socket(ws)
        self.sockets.append(socket)
        self.connections_opened += 1
        await ws.send_json(
            {
                "type": "hello",
                "num_connections": len(self.open_sockets),
                "debug_info": {"host": "fake-slack", "approximate_connection_time": 18060},
                "connection_info": {"app_id": APP},
            }
        )
        # like Slack: what was not acknowledged is delivered again on the new connection
        for envelope in self._again():
            await ws.send_json(envelope)
        self._notify()
        try:
            async for frame in ws:
                if socket.silent:
                    continue
                if frame.type == WSMsgType.PING:
                    await ws.pong(frame.data)
                elif frame.type == WSMsgType.TEXT:
                    data = json.loads(frame.data)
                    envelope_id = data.get("envelope_id") if isinstance(data, dict) else None
                    if isinstance(envelope_id, str):
                        self.acks.append(envelope_id)
                        self.acked_at.setdefault(envelope_id, time.monotonic())
                        payload = data.get("payload")
                        payload = payload if isinstance(payload, dict) else None
                        self.ack_payloads.setdefault(envelope_id, payload)
                        self.acked_with.append((envelope_id, payload))
                        self.pending.pop(envelope_id, None)
                        self._notify()
        finally:
            socket.closed.set()
            self.close_codes.append(ws.close_code)
            self._notify()
        return ws

    def _current(self) -> _Socket:
        sockets = self.open_sockets
        if not sockets:
            raise RuntimeError("fake Slack: no open Socket Mode connection")
        return sockets[-1]

    async def send_envelope(self, kind: str, payload: dict[str, Any], **extra: Any) -> str:
        """Any envelope of ``kind`` around ``payload``; returns its ``envelope_id``."""
        envelope_id = str(uuid.uuid4())
        envelope = {"envelope_id": envelope_id, "type": kind, "payload": payload, **extra}
        self.pending[envelope_id] = envelope
        self.sent_at[envelope_id] = self._delivered[envelope_id] = time.monotonic()
        await self._current().ws.send_json(envelope)
        return envelope_id

    async def send_event(
        self, event: Mapping[str, Any], event_id: str | None = None, *, team: str = TEAM
    ) -> str:
        """An ``events_api`` envelope around ``event`` in workspace ``team``; returns its
        ``envelope_id``."""
        return await self.send_envelope(
            "events_api",
            event_callback(event, event_id, team=team, bot_user=self.teams[team].bot_user),
            accepts_response_payload=False,
            retry_attempt=0,
            retry_reason="",
        )

    def slash_command(
        self,
        command: str,
        text: str = "",
        *,
        user: str = "U0ALICE",
        channel: str = "C0GENERAL",
        team: str = TEAM,
    ) -> dict[str, str]:
        """The documented fields of a slash command (a form over HTTP, a Socket Mode payload),
        with a fresh ``trigger_id`` and ``response_url``."""
        return {
            "token": "verification-token",
            "team_id": team,
            "team_domain": self.teams[team].name.lower(),
            "channel_id": channel,
            "channel_name": "general",
            "user_id": user,
            "user_name": "alice",
            "command": command,
            "text": text,
            "api_app_id": APP,
            "is_enterprise_install": "false",
            "response_url": self.response_url(),
            "trigger_id": self.trigger(user, team),
        }

    async def send_slash_command(
        self,
        command: str,
        text: str = "",
        *,
        user: str = "U0ALICE",
        channel: str = "C0GENERAL",
        team: str = TEAM,
    ) -> str:
        """A ``slash_commands`` envelope; returns its ``envelope_id``."""
        payload = self.slash_command(command, text, user=user, channel=channel, team=team)
        return await self.send_envelope("slash_commands", payload, accepts_response_payload=True)

    async def send_interactive(
        self, payload: Mapping[str, Any], *, accepts_response_payload: bool | None = None
    ) -> str:
        """An ``interactive`` envelope; returns its ``envelope_id``. ``accepts_response_payload``
        defaults to what Slack sends for the payload's type (true for ``view_submission`` and
        ``block_suggestion``, whose answers only an acknowledgement carries)."""
        if accepts_response_payload is None:
            accepts_response_payload = payload.get("type") in ANSWERED_IN_ACK
        return await self.send_envelope(
            "interactive", dict(payload), accepts_response_payload=accepts_response_payload
        )

    def _interaction(self, kind: str, user: str, team: str, **keys: Any) -> dict[str, Any]:
        """The fields every documented interaction payload has."""
        return {
            "type": kind,
            "team": {"id": team, "domain": self.teams[team].name.lower()},
            "user": {"id": user, "username": "alice", "name": "alice", "team_id": team},
            "api_app_id": APP,
            "token": "verification-token",
            "is_enterprise_install": False,
            "enterprise": None,
            **keys,
        }

    def view_submission(
        self,
        view_id: str,
        values: Mapping[str, Any],
        *,
        user: str = "U0ALICE",
        team: str = TEAM,
    ) -> dict[str, Any]:
        """A ``view_submission`` of the view ``view_id`` (as opened through this fake) with the
        inputs' ``state.values``."""
        view = {k: v for k, v in self.views[view_id].items() if k != "user"}
        view["state"] = {"values": dict(values)}
        return self._interaction(
            "view_submission",
            user,
            team,
            trigger_id=self.trigger(user, team),
            view=view,
            response_urls=[],
        )

    def block_suggestion(
        self,
        action_id: str,
        value: str,
        *,
        block_id: str = "block",
        view_id: str | None = None,
        user: str = "U0ALICE",
        team: str = TEAM,
    ) -> dict[str, Any]:
        """A ``block_suggestion`` (an external select asks for options; ``value`` is what the
        user typed), in the view ``view_id`` if given."""
        keys: dict[str, Any] = {"action_id": action_id, "block_id": block_id, "value": value}
        if view_id is not None:
            keys["view"] = {k: v for k, v in self.views[view_id].items() if k != "user"}
            keys["container"] = {"type": "view", "view_id": view_id}
        return self._interaction("block_suggestion", user, team, **keys)

    def block_actions(
        self,
        actions: list[dict[str, Any]],
        *,
        channel: str | None = "C0GENERAL",
        view_id: str | None = None,
        user: str = "U0ALICE",
        team: str = TEAM,
    ) -> dict[str, Any]:
        """A ``block_actions`` payload (a button pressed …) in a message or in a view."""
        keys: dict[str, Any] = {"trigger_id": self.trigger(user, team), "actions": actions}
        if view_id is not None:
            keys["view"] = {k: v for k, v in self.views[view_id].items() if k != "user"}
            keys["container"] = {"type": "view", "view_id": view_id}
        else:
            keys["channel"] = {"id": channel, "name": "general"}
            keys["container"] = {"type": "message", "message_ts": "1700000000.000100"}
            keys["response_url"] = self.response_url()
        return self._interaction("block_actions", user, team, **keys)

    def shortcut(
        self, callback_id: str, *, user: str = "U0ALICE", team: str = TEAM
    ) -> dict[str, Any]:
        """A global ``shortcut`` payload."""
        return self._interaction(
            "shortcut",
            user,
            team,
            callback_id=callback_id,
            trigger_id=self.trigger(user, team),
            action_ts=f"{time.time():.6f}",
        )

    async def send_disconnect(
        self, reason: str = "refresh_requested", close_after: float = 1.0
    ) -> None:
        """``disconnect`` on the current socket, which is closed once the client moved or after
        ``close_after`` s (Slack closes it a few seconds later)."""
        socket = self._current()
        opened = self.connections_opened
        await socket.ws.send_json(
            {"type": "disconnect", "reason": reason, "debug_info": {"host": "fake-slack"}}
        )

        async def close_later() -> None:
            with contextlib.suppress(TimeoutError):
                await self.wait_for(lambda: self.connections_opened > opened, close_after)
            await socket.ws.close()

        task = asyncio.ensure_future(close_later())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def send_raw(self, text: str) -> None:
        await self._current().ws.send_str(text)

    def go_silent(self) -> None:
        """The current socket stays open but says nothing and answers nothing (pings neither)."""
        self._current().silent = True

    def _again(self, older_than: float | None = None) -> list[dict[str, Any]]:
        """The unacknowledged envelopes to deliver again now (delivered over ``older_than`` s
        ago), each with ``retry_attempt`` + 1; those over ``max_retries`` are abandoned."""
        now = time.monotonic()
        again = []
        for envelope_id, envelope in list(self.pending.items()):
            if older_than is not None and now - self._delivered[envelope_id] < older_than:
                continue
            attempt = int(envelope.get("retry_attempt", 0)) + 1
            if self.max_retries is not None and attempt > self.max_retries:
                self.abandoned[envelope_id] = self.pending.pop(envelope_id)
                self._notify()
                continue
            envelope["retry_attempt"] = attempt
            envelope["retry_reason"] = "timeout"
            self._delivered[envelope_id] = now
            again.append(envelope)
        return again

    async def redeliver(self) -> None:
        """Send every unacknowledged envelope again (``retry_attempt`` + 1)."""
        socket = self._current()
        for envelope in self._again():
            await socket.ws.send_json(envelope)

    def auto_redeliver(self, after: float = 3.0) -> None:
        """From now on, like Slack: an envelope unacknowledged ``after`` seconds after its latest
        delivery is delivered again on the current connection (until :meth:`stop`)."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(after / 4)
                sockets = self.open_sockets
                if not sockets:
                    continue
                for envelope in self._again(older_than=after):
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        await sockets[-1].ws.send_json(envelope)

        task = asyncio.ensure_future(loop())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait_ack(self, envelope_id: str, timeout: float = WAIT) -> None:
        await self.wait_for(lambda: envelope_id in self.acks, timeout, f"ack of {envelope_id}")


def _conversation(kind: str) -> dict[str, bool]:
    """The type flags of a conversation object: private channels created before March 2021
    are ``is_group`` (ids starting with G), later ones ``is_channel`` and ``is_private``."""
    return {
        "is_channel": kind in ("public", "private"),
        "is_group": kind == "legacy_private",
        "is_im": kind == "im",
        "is_mpim": kind == "mpim",
        "is_private": kind != "public",
    }


def _slack_ok(**keys: Any) -> web.Response:
    return web.json_response({"ok": True, **keys})


def _slack_error(error: str) -> web.Response:
    # Slack answers errors with HTTP 200 and ok: false
    return web.json_response({"ok": False, "error": error})


class EventsApiClient:
    """Posts Events API requests to ``url`` signed with ``secret``, as Slack does."""

    def __init__(self, url: str, secret: str) -> None:
        self.url = url
        self.secret = secret
        self._session: ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def post(
        self,
        body: bytes,
        *,
        content_type: str = "application/json",
        timestamp: int | None = None,
        signature: str | None = None,
        retry_num: int | None = None,
        headers: Mapping[str, str] | None = None,
        omit: tuple[str, ...] = (),
    ) -> tuple[int, str]:
        """POST ``body``; ``(status, text)``. ``signature`` overrides the right one; ``omit``
        leaves out headers (``X-Slack-Signature``, ``X-Slack-Request-Timestamp``)."""
        if self._session is None:
            self._session = ClientSession()
        stamp = int(time.time()) if timestamp is None else timestamp
        sent = {
            "Content-Type": content_type,
            "X-Slack-Request-Timestamp": str(stamp),
            "X-Slack-Signature": signature or sign(self.secret, body, stamp),
            **(headers or {}),
        }
        if retry_num is not None:
            sent["X-Slack-Retry-Num"] = str(retry_num)
            sent["X-Slack-Retry-Reason"] = "http_timeout"
        for name in omit:
            sent.pop(name, None)
        async with self._session.post(self.url, data=body, headers=sent) as response:
            return response.status, await response.text()

    async def event(
        self,
        event: Mapping[str, Any],
        event_id: str | None = None,
        *,
        team: str = TEAM,
        bot_user: str = BOT_USER,
        **kw: Any,
    ) -> tuple[int, str]:
        """An ``event_callback`` around ``event`` in workspace ``team``."""
        body = event_callback(event, event_id, team=team, bot_user=bot_user)
        return await self.post(json.dumps(body).encode(), **kw)

    async def slash_command(self, fields: Mapping[str, str], **kw: Any) -> tuple[int, str]:
        return await self.post(
            urlencode(fields).encode(), content_type="application/x-www-form-urlencoded", **kw
        )

    async def interactive(self, payload: Mapping[str, Any], **kw: Any) -> tuple[int, str]:
        body = urlencode({"payload": json.dumps(payload)}).encode()
        return await self.post(body, content_type="application/x-www-form-urlencoded", **kw)
