"""The only I/O of the Slack gateway: slack_sdk's Web API client, the Socket Mode WebSocket and
the Events API's HTTP server.

* :class:`SlackWebApi` — slack_sdk's ``AsyncWebClient`` (and ``AsyncWebhookClient`` for
  ``response_url``) on one aiohttp session, with slack_sdk's own retry handlers: 429 answers are
  retried after their ``Retry-After``, connection errors with exponential backoff. ``ok: false``
  becomes :class:`SlackApiFailed` carrying Slack's error code.
* :class:`SocketModeConnection` — a :class:`core.client.ReconnectingClient`. Each attempt runs
  ``auth.test`` (bot token) and ``apps.connections.open`` (app token) through the Web API
  client, opens the WebSocket URL that returns (``websockets``) and waits for ``hello``. A
  refused token (``invalid_auth``, ``not_authed``, …) is fatal on the first attempt (exit 3).
  One reader per socket hands every envelope to the gateway and sends the acknowledgement only
  when the gateway says the layer took it. A ``disconnect`` envelope opens the replacement
  first, then closes the old socket; envelopes that were not acknowledged on it are redelivered
  by Slack, so none is lost. Silent sockets are found by the core watchdog (ping, then drop).

  slack_sdk's own ``SocketModeClient`` classes are not used: they reconnect on their own
  (fixed delay, forever, also after ``invalid_auth``), queue frames without a bound and hide a
  lost connection from the caller, which would fight :mod:`core.client`.
* :class:`EventsApiServer` — an aiohttp server on the configured path: bodies over the limit are
  413 before they are read; the signature (slack_sdk's ``SignatureVerifier``, over the body's
  bytes) and timestamp are checked before anything else (401); a signed body that cannot be
  read is 400; ``url_verification`` is answered; the gateway decides the rest: 200 (with a JSON
  answer when a consumer gave one, :class:`~gateways.slack.translate.Ack`) or 503. With
  ``slack.oauth`` it also serves the install flow's two GET paths (the gateway answers them as
  :class:`HttpAnswer`); in Socket Mode it serves only those.

Acknowledgements carry a consumer's answer where Slack takes one: the Socket Mode frame
``{"envelope_id", "payload"}`` (an envelope with ``accepts_response_payload``), the HTTP 200's
JSON body.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.async_handler import AsyncRetryHandler
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
)
from slack_sdk.http_retry.builtin_interval_calculators import BackoffRetryIntervalCalculator
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.http_retry.state import RetryState
from slack_sdk.signature import SignatureVerifier
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.frames import CloseCode

from core.client import ClientListener, ConnectFailed, ReconnectingClient
from core.retry import Backoff, cancel_and_wait, describe_error
from core.service import EventBuffer, Gateway
from gateways.slack.config import SlackConfig
from gateways.slack.translate import (
    Ack,
    Control,
    Envelope,
    InvalidPayload,
    Unknown,
    ack,
    check_timestamp,
    is_ssl_check,
    parse_envelope,
    parse_http_body,
)

__all__ = [
    "FATAL_ERRORS",
    "EventsApiServer",
    "HttpAnswer",
    "OAuthRequest",
    "SlackApiFailed",
    "SlackListener",
    "SlackUnreachable",
    "SlackWebApi",
    "SocketModeConnection",
]

#: the close code websockets sends when a frame is over ``max_size`` (slack.max_frame_size)
TOO_BIG = CloseCode.MESSAGE_TOO_BIG

#: Web API error codes that mean "this token will not work": no retry loop on start-up
FATAL_ERRORS = frozenset(
    {
        "invalid_auth",
        "not_authed",
        "account_inactive",
        "token_revoked",
        "token_expired",
        "no_permission",
        "missing_scope",
        "not_allowed_token_type",
        "invalid_token",
    }
)


#: slack_sdk writes request and response bodies at DEBUG when its logger's own level allows it;
#: oauth.v2.access's bodies hold the client secret and tokens, so its client logs at INFO at most
_QUIET = logging.getLogger("gateway.slack.oauth")
_QUIET.setLevel(logging.INFO)


class SlackApiFailed(Exception):
    """Slack answered ``ok: false``; ``error`` is its error code (``channel_not_found``)."""

    def __init__(self, method: str, error: str) -> None:
        super().__init__(f"{method}: {error}")
        self.method = method
        self.error = error


class SlackUnreachable(Exception):
    """No answer from Slack (connection refused, timed out) after the retries."""


@dataclass(frozen=True)
class OAuthRequest:
    """A GET of the OAuth install flow, as the gateway sees it."""

    path: str
    query: Mapping[str, str]
    cookies: Mapping[str, str]


@dataclass(frozen=True)
class HttpAnswer:
    """What the gateway answers an :class:`OAuthRequest` with (``location``: a redirect)."""

    status: int
    text: str = ""
    content_type: str = "text/html"
    location: str | None = None
    cookies: Mapping[str, str] = field(default_factory=dict)


class SlackListener(ClientListener, Protocol):
    """What the gateway hears from the Slack side (on the event loop)."""

    async def slack_envelope(
        self, envelope: Envelope, handed_over: Callable[[], None]
    ) -> Ack | None:
        """A Socket Mode envelope; an :class:`Ack` acknowledges it (the layer took it), ``None``
        leaves it to Slack's redelivery. ``handed_over()`` frees its handling slot once the
        layer has it (waiting for a consumer's answer takes no slot)."""

    async def slack_request(self, kind: str, payload: dict[str, Any], retry: int) -> Ack | None:
        """A verified Events API request; an :class:`Ack` answers 200, ``None`` 503."""

    async def slack_oauth(self, request: OAuthRequest) -> HttpAnswer:
        """A GET of ``slack.oauth``'s install or redirect path."""

    def slack_bad_input(self, problem: str) -> None:
        """Something Slack (or someone claiming to be Slack) sent was refused."""

    def slack_frame_too_large(self, problem: str) -> None:
        """A Socket Mode frame over ``max_frame_size`` closed the connection (1009)."""


class _CountingRateLimit(AsyncRateLimitErrorRetryHandler):
    """slack_sdk's 429 handler (it sleeps Retry-After), with each retry logged and counted."""

    def __init__(self, gateway: Gateway[Any], max_retry_count: int) -> None:
        super().__init__(max_retry_count=max_retry_count)
        self.gateway = gateway

    async def prepare_for_next_attempt_async(
        self,
        *,
        state: RetryState,
        request: HttpRequest,
        response: HttpResponse | None = None,
        error: Exception | None = None,
    ) -> None:
        after = (
            (response.headers.get("retry-after") or response.headers.get("Retry-After") or ["?"])
            if response
            else ["?"]
        )
        self.gateway.metrics.retry("rate_limited")
        self.gateway.log.warning(
            "%s: Slack answered 429 to %s; retrying after Retry-After: %s s",
            self.gateway.name,
            request.url.rsplit("/", 1)[-1],
            after[0],
        )
        await super().prepare_for_next_attempt_async(
            state=state, request=request, response=response, error=error
        )


class SlackWebApi:
    """The Web API (bot token) and ``response_url`` POSTs on one aiohttp session."""

    def __init__(self, gateway: Gateway[Any], settings: SlackConfig) -> None:
        self.gateway = gateway
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None
        self._client: AsyncWebClient | None = None
        self._oauth: AsyncWebClient | None = None
        retry = settings.retry
        self._handlers: list[AsyncRetryHandler] = [
            AsyncConnectionErrorRetryHandler(
                max_retry_count=retry.connection_errors,
                interval_calculator=BackoffRetryIntervalCalculator(backoff_factor=retry.backoff),
            ),
            _CountingRateLimit(gateway, retry.rate_limited),
        ]

    def _web(self) -> AsyncWebClient:
        if self._client is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout)
            )
            bot_token = self.settings.bot_token
            self._client = AsyncWebClient(
                # None with slack.oauth: each call names its installation's token
                token=bot_token.get_secret_value() if bot_token is not None else None,
                base_url=self.settings.api_url,
                session=self._session,
                timeout=int(self.settings.timeout),
                retry_handlers=self._handlers,
                logger=logging.getLogger("gateway.slack.sdk"),
            )
        return self._client

    async def call(
        self,
        method: str,
        args: Mapping[str, Any] | None = None,
        *,
        token: str | None = None,
        read: bool = False,
    ) -> dict[str, Any]:
        """``method`` with JSON ``args`` (``read``: a GET with them in the query string, as
        Slack's read methods such as ``conversations.info`` want them): Slack's answer, or
        :class:`SlackApiFailed` (ok: false)."""
        client = self._web()
        body = dict(args or {})
        if token is not None:
            body["token"] = token  # slack_sdk sends it as the Bearer token instead
        try:
            if read:
                response = await client.api_call(method, http_verb="GET", params=body)
            else:
                response = await client.api_call(method, json=body)
        except SlackApiError as exc:
            data = exc.response.data
            error = data.get("error") if isinstance(data, dict) else None
            raise SlackApiFailed(method, str(error or f"HTTP {exc.response.status_code}")) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise SlackUnreachable(f"{method}: {describe_error(exc)}") from None
        data = response.data
        return dict(data) if isinstance(data, dict) else {}

    async def oauth_access(self, client_id: str, client_secret: str, **args: str) -> dict[str, Any]:
        """``oauth.v2.access`` (the client credentials as HTTP Basic authentication, as Slack
        asks): an authorization ``code``, or ``grant_type=refresh_token``. Its own client, whose
        logger never writes bodies (they hold tokens) whatever the log level."""
        self._web()
        if self._oauth is None:
            self._oauth = AsyncWebClient(
                base_url=self.settings.api_url,
                session=self._session,
                timeout=int(self.settings.timeout),
                retry_handlers=self._handlers,
                logger=_QUIET,
            )
        # slack_sdk's oauth_v2_access builds aiohttp's BasicAuth, deprecated since aiohttp 3.14
        # (a DeprecationWarning on every install and refresh): the header is written here
        credentials = base64.b64encode(f"{client_id}:{client_secret}".encode()).decode()
        try:
            response = await self._oauth.api_call(
                "oauth.v2.access",
                data=dict(args),
                headers={"Authorization": f"Basic {credentials}"},
            )
        except SlackApiError as exc:
            data = exc.response.data
            error = data.get("error") if isinstance(data, dict) else None
            raise SlackApiFailed(
                "oauth.v2.access", str(error or f"HTTP {exc.response.status_code}")
            ) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise SlackUnreachable(f"oauth.v2.access: {describe_error(exc)}") from None
        data = response.data
        return dict(data) if isinstance(data, dict) else {}

    async def respond(self, url: str, body: dict[str, Any]) -> None:
        """POST ``body`` to a ``response_url``; :class:`SlackApiFailed` unless Slack says 200."""
        self._web()
        webhook = AsyncWebhookClient(
            url,
            session=self._session,
            timeout=int(self.settings.timeout),
            retry_handlers=self._handlers,
        )
        try:
            response = await webhook.send_dict(body)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise SlackUnreachable(f"response_url: {describe_error(exc)}") from None
        if response.status_code != 200:
            raise SlackApiFailed(
                "response_url", f"HTTP {response.status_code}: {response.body[:200]}"
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        self._session = self._client = self._oauth = None


class SocketModeConnection(ReconnectingClient):
    """Slack's Socket Mode WebSocket, kept up by core; see the module docstring."""

    listener: SlackListener

    def __init__(
        self,
        gateway: Gateway[Any],
        settings: SlackConfig,
        api: SlackWebApi,
        *,
        listener: SlackListener,
        events: EventBuffer,
    ) -> None:
        super().__init__(
            gateway,
            server="Slack Socket Mode",
            listener=listener,
            events=events,
            backoff=Backoff(settings.reconnect_initial, settings.reconnect_maximum),
            connect_timeout=settings.connect_timeout,
            idle_timeout=settings.ping_interval,
        )
        self.settings = settings
        self.api = api
        #: what auth.test said about us (team, user_id, bot_id …), once it passed
        self.identity: dict[str, Any] = {}
        self._socket: ClientConnection | None = None
        self._readers: set[asyncio.Task[None]] = set()
        self._in_flight: set[asyncio.Task[None]] = set()
        #: readers waiting for a free handling slot now (see _slot)
        self._slot_waits = 0
        self._lost_reason: asyncio.Future[str] | None = None
        self._replacing: asyncio.Task[None] | None = None

    # -- ReconnectingClient hooks -------------------------------------------------------------

    async def _connect(self) -> Mapping[str, Any]:
        identity: dict[str, Any] = {}
        if self.settings.bot_token is not None:  # slack.oauth: no one bot token to test
            try:
                identity = await self.api.call("auth.test")
            except SlackApiFailed as exc:
                raise ConnectFailed(
                    f"auth.test: {exc.error}", fatal=exc.error in FATAL_ERRORS
                ) from None
            except SlackUnreachable as exc:
                raise ConnectFailed(str(exc)) from None
        self.identity = identity
        self._lost_reason = asyncio.get_running_loop().create_future()
        self._socket = await self._open_socket()
        self._start_reader(self._socket)
        return {
            "team": identity.get("team_id"),
            "user": identity.get("user_id"),
            "bot_id": identity.get("bot_id"),
        }

    async def _open_socket(self) -> ClientConnection:
        """apps.connections.open → the WebSocket → ``hello``."""
        assert self.settings.app_token is not None
        try:
            opened = await self.api.call(
                "apps.connections.open", token=self.settings.app_token.get_secret_value()
            )
        except SlackApiFailed as exc:
            raise ConnectFailed(
                f"apps.connections.open: {exc.error}", fatal=exc.error in FATAL_ERRORS
            ) from None
        except SlackUnreachable as exc:
            raise ConnectFailed(str(exc)) from None
        url = opened.get("url")
        if not isinstance(url, str):
            raise ConnectFailed("apps.connections.open answered without a url")
        try:
            # websockets' max_size defaults to 1 MiB, the layer's own limit: an envelope whose
            # event was over it closed the connection (1009) on every redelivery instead of
            # being acknowledged as too_large (issue 21, item 11)
            socket = await connect(
                url,
                ping_interval=None,
                max_size=self.settings.max_frame_size,
                open_timeout=self.connect_timeout,
            )
        except (OSError, WebSocketException, TimeoutError) as exc:
            raise ConnectFailed(f"WebSocket: {describe_error(exc)}") from None
        try:
            while True:
                frame = await socket.recv()
                self.heard()
                parsed = parse_envelope(frame)
                if isinstance(parsed, Control) and parsed.type == "hello":
                    return socket
                # nothing but hello comes first on a new socket; anything else is not acked,
                # so Slack redelivers it
                self.listener.slack_bad_input(f"before hello: {_describe(parsed)}")
        except BaseException as exc:
            await socket.close()
            if isinstance(exc, ConnectionClosed):
                raise ConnectFailed(
                    f"WebSocket closed before hello: {describe_error(exc)}"
                ) from None
            raise

    async def _wait_lost(self) -> str:
        assert self._lost_reason is not None
        return await asyncio.shield(self._lost_reason)

    async def _disconnect(self) -> None:
        if self._replacing is not None:
            self._replacing.cancel()
            self._replacing = None
        socket, self._socket = self._socket, None
        readers, self._readers = set(self._readers), set()
        # An envelope not acknowledged yet is redelivered by Slack. Its hand-off is left to end
        # (within ack_timeout) unless the gateway stops: cancelled, a layer send whose reply was
        # on its way had still added the event, and the redelivery added it again; finishing,
        # it marks the id done or lets the redelivery follow it (SlackGateway._deliver).
        handlers = set(self._in_flight) if self.gateway.stopping else set()
        await cancel_and_wait(*readers, *handlers)
        if socket is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(socket.close(), 2)

    async def _probe(self) -> None:
        if self._slot_waits:
            self.heard()  # a reader waits for a free slot: see _slot
            return
        socket = self._socket
        if socket is None:
            return
        waiter = await socket.ping()

        def pong(_: asyncio.Future[float]) -> None:
            if not _.cancelled() and _.exception() is None:
                self.heard()

        asyncio.ensure_future(waiter).add_done_callback(pong)

    def _abort(self, reason: str) -> None:
        self._resolve_lost(reason)
        socket = self._socket
        if socket is not None and socket.transport is not None:
            socket.transport.abort()

    def _resolve_lost(self, reason: str) -> None:
        if self._lost_reason is not None and not self._lost_reason.done():
            self._lost_reason.set_result(reason)

    # -- readers --------------------------------------------------------------------------------

    def _start_reader(self, socket: ClientConnection) -> None:
        task = asyncio.create_task(self._read(socket), name=f"{self.name}-socket")
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    async def _read(self, socket: ClientConnection) -> None:
        reason = "the server closed the WebSocket"
        # envelopes are handled concurrently (the layer and the de-dup window are round trips)
        # up to max_in_flight per socket; then the reader waits, and Slack holds the rest
        slots = asyncio.Semaphore(self.settings.max_in_flight)
        try:
            async for frame in socket:
                self.heard()
                parsed = parse_envelope(frame)
                if isinstance(parsed, Envelope):
                    await self._slot(slots)
                    task = asyncio.create_task(self._handle(socket, parsed, slots))
                    self._in_flight.add(task)
                    task.add_done_callback(self._in_flight.discard)
                elif isinstance(parsed, Control):
                    if parsed.type == "disconnect":
                        self._replace(socket, parsed.reason)
                else:
                    self.listener.slack_bad_input(parsed.problem)
        except ConnectionClosed as exc:
            reason = f"WebSocket closed: {describe_error(exc)}"
            if exc.rcvd is None and exc.sent is not None and exc.sent.code == TOO_BIG:
                self.listener.slack_frame_too_large(exc.sent.reason)
        except OSError as exc:
            reason = describe_error(exc)
        if socket is self._socket:
            self._resolve_lost(reason)

    async def _slot(self, slots: asyncio.Semaphore) -> None:
        """Wait for a free handling slot; meanwhile the watchdog counts the socket as heard.

        While the reader waits, frames wait unread in the socket and, once websockets' queue is
        full, so do the answers to our pings: that silence is our backlog (the layer slow or
        down), not a dead server. The watchdog judged it one and dropped a working connection
        in the middle of every Redis outage longer than 2 x ping_interval (:meth:`_probe`). It
        judges again once a slot is free and the reader waits on the socket, so a connection
        that died meanwhile is found at most one hand-off (ack_timeout) later.
        """
        if not slots.locked():
            await slots.acquire()
            return
        self._slot_waits += 1
        try:
            await slots.acquire()
        finally:
            self._slot_waits -= 1

    async def _handle(
        self, socket: ClientConnection, envelope: Envelope, slots: asyncio.Semaphore
    ) -> None:
        held = True

        def handed_over() -> None:
            nonlocal held
            if held:
                held = False
                slots.release()

        try:
            answer = await self.listener.slack_envelope(envelope, handed_over)
            if answer is not None:
                payload = answer.payload if envelope.accepts_response_payload else None
                await socket.send(ack(envelope.envelope_id, payload))
        except (ConnectionClosed, OSError):
            pass  # not acknowledged: Slack redelivers it on the next connection
        except Exception:
            self.log.exception("%s: error handling envelope %s", self.name, envelope.envelope_id)
        finally:
            handed_over()

    async def drain(self) -> None:
        """Wait for the envelopes being handled now (their acks go out)."""
        if self._in_flight:
            await asyncio.wait(set(self._in_flight))

    def _replace(self, old: ClientConnection, reason: str) -> None:
        """Slack asked us to move (``disconnect``): new socket first, then close the old one."""
        if old is not self._socket or self._replacing is not None:
            return
        self.log.info("%s: Slack sent disconnect (%s); opening a new connection", self.name, reason)

        async def replace() -> None:
            try:
                socket = await asyncio.wait_for(self._open_socket(), self.connect_timeout)
            except Exception as exc:
                self._replacing = None
                self._abort(f"disconnect ({reason}), and no new connection: {describe_error(exc)}")
                return
            self._socket = socket
            self._start_reader(socket)
            self._replacing = None
            self.gateway.metrics.retry("replace")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(old.close(), 2)

        self._replacing = asyncio.create_task(replace(), name=f"{self.name}-replace")


class _BytesSignatureVerifier(SignatureVerifier):
    """slack_sdk's ``SignatureVerifier``, over the body's bytes as Slack signs them.

    slack_sdk decodes a bytes body as UTF-8 before hashing it: a correctly signed body that is
    not UTF-8 raised ``UnicodeDecodeError`` and was answered 401 "invalid signature" instead of
    400 (issue 21, item 13). Its ``is_valid`` also refuses any timestamp more than 300 s off,
    whatever ``events_api.max_age`` says; :func:`check_timestamp` is the one age check here.
    """

    def generate_signature(self, *, timestamp: str, body: str | bytes) -> str | None:
        raw = body if isinstance(body, bytes) else body.encode()
        base = b"v0:" + timestamp.encode() + b":" + raw
        return "v0=" + hmac.new(self.signing_secret.encode(), base, hashlib.sha256).hexdigest()

    def signed(self, body: bytes, timestamp: str, signature: str) -> bool:
        """``signature`` is Slack's HMAC of ``v0:{timestamp}:{body}`` (constant time)."""
        expected = self.generate_signature(timestamp=timestamp, body=body) or ""
        # bytes: a header with non-ASCII characters is a mismatch, not a TypeError
        return hmac.compare_digest(expected.encode(), signature.encode("utf-8", "surrogateescape"))


def _describe(parsed: Envelope | Control | Unknown) -> str:
    if isinstance(parsed, Envelope):
        return f"{parsed.type} envelope {parsed.envelope_id}"
    if isinstance(parsed, Control):
        return f"{parsed.type} ({parsed.reason})"
    return parsed.problem


class EventsApiServer:
    """The Events API Request URL: signed POSTs in, 200 / 401 / 413 / 503 out; and, with
    ``slack.oauth``, the install flow's GETs (``events=False``: only those, for Socket Mode)."""

    def __init__(
        self,
        settings: SlackConfig,
        listener: SlackListener,
        log: logging.Logger,
        *,
        events: bool = True,
    ) -> None:
        self.settings = settings
        self.listener = listener
        self.log = log
        self.events = events
        self.verifier: _BytesSignatureVerifier | None = None
        if events:
            assert settings.signing_secret is not None
            self.verifier = _BytesSignatureVerifier(settings.signing_secret.get_secret_value())
        self.port: int | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Listen; ``OSError`` when the port is taken."""
        options = self.settings.events_api
        app = web.Application(client_max_size=options.max_body_size)
        if self.events:
            app.router.add_post(options.path, self._handle)
        if self.settings.oauth is not None:
            app.router.add_get(self.settings.oauth.install_path, self._oauth)
            app.router.add_get(self.settings.oauth.redirect_path, self._oauth)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, options.host, options.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        address = runner.addresses[0]
        self.port = int(address[1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        options = self.settings.events_api
        if request.content_length is not None and request.content_length > options.max_body_size:
            self.listener.slack_bad_input(
                f"a {request.content_length} byte body (limit {options.max_body_size})"
            )
            return web.Response(status=413, text="request body too large")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            self.listener.slack_bad_input(f"a body over {options.max_body_size} bytes")
            return web.Response(status=413, text="request body too large")
        if is_ssl_check(body, request.headers.get("Content-Type", "")):
            return web.Response(status=200)  # as Bolt does, before the signature
        stamp = request.headers.get("X-Slack-Request-Timestamp")
        signature = request.headers.get("X-Slack-Signature")
        problem = check_timestamp(stamp, time.time(), options.max_age)
        if problem is None and signature is None:
            problem = "missing X-Slack-Signature"
        assert self.verifier is not None
        if (
            problem is None
            and stamp is not None
            and signature is not None
            and not self.verifier.signed(body, stamp, signature)
        ):
            problem = "bad X-Slack-Signature"
        if problem is not None:
            self.listener.slack_bad_input(f"unsigned request from {request.remote}: {problem}")
            return web.Response(status=401, text="invalid request signature")
        try:
            kind, payload = parse_http_body(body, request.headers.get("Content-Type", ""))
        except InvalidPayload as exc:
            self.listener.slack_bad_input(f"signed request from {request.remote}: {exc}")
            return web.Response(status=400, text=str(exc))
        if kind == "url_verification":
            return web.json_response({"challenge": payload.get("challenge")})
        retry = request.headers.get("X-Slack-Retry-Num", "0")
        answer = await self.listener.slack_request(
            kind, payload, int(retry) if retry.isdigit() else 0
        )
        if answer is None:
            return web.Response(status=503, text="not taken now; retry later")
        if answer.payload is not None:
            return web.json_response(answer.payload)
        return web.Response(status=200)

    async def _oauth(self, request: web.Request) -> web.StreamResponse:
        answer = await self.listener.slack_oauth(
            OAuthRequest(request.path, dict(request.query), dict(request.cookies))
        )
        headers = {"Cache-Control": "no-store"}
        if answer.location is not None:
            headers["Location"] = answer.location
        response = web.Response(
            status=answer.status,
            text=answer.text,
            content_type=answer.content_type,
            headers=headers,
        )
        oauth = self.settings.oauth
        secure = bool(oauth and (oauth.redirect_uri or "").startswith("https://"))
        for name, value in answer.cookies.items():
            if value:
                response.set_cookie(
                    name,
                    value,
                    max_age=int(oauth.state_ttl) if oauth else None,
                    path="/",
                    httponly=True,
                    secure=secure,
                    samesite="Lax",
                )
            else:
                response.del_cookie(name, path="/")
        return response
