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
* :class:`EventsApiClient` posts signed Events API requests (``X-Slack-Signature`` v0) the way
  Slack does, with knobs to get the signature, the timestamp or the headers wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from aiohttp import ClientSession, WSMsgType, web

from core.testing.base import HOST, WAIT, free_port

__all__ = ["EventsApiClient", "FakeSlack", "SlackCall", "event_callback", "sign"]

BOT_USER = "U0BOT"
BOT_ID = "B0BOT"
TEAM = "T0TEAM"
APP = "A0APP"


@dataclass
class SlackCall:
    """One Web API call as the fake received it."""

    method: str
    args: dict[str, Any]
    token: str | None
    content_type: str


@dataclass
class _Socket:
    ws: web.WebSocketResponse
    silent: bool = False
    closed: asyncio.Event = field(default_factory=asyncio.Event)


def event_callback(event: Mapping[str, Any], event_id: str | None = None) -> dict[str, Any]:
    """The documented ``event_callback`` wrapper around one event."""
    return {
        "token": "verification-token",
        "team_id": TEAM,
        "api_app_id": APP,
        "event": dict(event),
        "type": "event_callback",
        "event_id": event_id or f"Ev{uuid.uuid4().hex[:10].upper()}",
        "event_time": int(time.time()),
        "authorizations": [
            {"enterprise_id": None, "team_id": TEAM, "user_id": BOT_USER, "is_bot": True}
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
    ) -> None:
        self.bot_token = bot_token
        self.app_token = app_token
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
    def hooks_url(self) -> str:
        """What the gateway's ``slack.response_url_prefix`` is set to."""
        return f"{self.base_url}/hooks/"

    async def start(self, port: int | None = None) -> FakeSlack:
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._api)
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
        call = SlackCall(method, args, token, content_type)
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
        if token != self.bot_token:
            return _slack_error("invalid_auth")
        handler = getattr(self, "_m_" + method.replace(".", "_"), None)
        if handler is None:
            return _slack_error("unknown_method")
        result: web.Response = handler(args)
        return result

    def _m_auth_test(self, args: dict[str, Any]) -> web.Response:
        return _slack_ok(
            url="https://example.slack.com/",
            team="Example",
            user="gatewaybot",
            team_id=TEAM,
            user_id=BOT_USER,
            bot_id=BOT_ID,
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

    async def send_event(self, event: Mapping[str, Any], event_id: str | None = None) -> str:
        """An ``events_api`` envelope around ``event``; returns its ``envelope_id``."""
        return await self.send_envelope(
            "events_api",
            event_callback(event, event_id),
            accepts_response_payload=False,
            retry_attempt=0,
            retry_reason="",
        )

    async def send_slash_command(
        self, command: str, text: str = "", *, user: str = "U0ALICE", channel: str = "C0GENERAL"
    ) -> str:
        """A ``slash_commands`` envelope; returns its ``envelope_id``."""
        payload = {
            "token": "verification-token",
            "team_id": TEAM,
            "team_domain": "example",
            "channel_id": channel,
            "channel_name": "general",
            "user_id": user,
            "user_name": "alice",
            "command": command,
            "text": text,
            "api_app_id": APP,
            "is_enterprise_install": "false",
            "response_url": self.response_url(),
            "trigger_id": f"{next(self._ts)}.1.{uuid.uuid4().hex[:8]}",
        }
        return await self.send_envelope("slash_commands", payload, accepts_response_payload=True)

    async def send_interactive(self, payload: Mapping[str, Any]) -> str:
        """An ``interactive`` envelope; returns its ``envelope_id``."""
        return await self.send_envelope(
            "interactive", dict(payload), accepts_response_payload=False
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
        self, event: Mapping[str, Any], event_id: str | None = None, **kw: Any
    ) -> tuple[int, str]:
        """An ``event_callback`` around ``event``."""
        return await self.post(json.dumps(event_callback(event, event_id)).encode(), **kw)

    async def slash_command(self, fields: Mapping[str, str], **kw: Any) -> tuple[int, str]:
        return await self.post(
            urlencode(fields).encode(), content_type="application/x-www-form-urlencoded", **kw
        )

    async def interactive(self, payload: Mapping[str, Any], **kw: Any) -> tuple[int, str]:
        body = urlencode({"payload": json.dumps(payload)}).encode()
        return await self.post(body, content_type="application/x-www-form-urlencoded", **kw)
