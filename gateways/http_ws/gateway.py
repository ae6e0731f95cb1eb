"""``HttpWsGateway``: the ASGI bridge uvicorn serves, between browsers and the channel layer.

Each WebSocket gets its own reply channel (``layer.new_channel``): ``websocket.connect`` /
``.receive`` / ``.disconnect`` go to the route's inbound channel in the order they happened, and
whatever consumers send to the reply channel (``websocket.accept`` / ``.send`` / ``.close``,
directly or through a group) is carried out on that socket. A configured HTTP path becomes one
``http.request`` with its own reply channel, answered by ``http.response`` (504 when nothing
comes in ``response_timeout``); a webhook path is checked (HMAC) and answered 202 at once.
Every other path goes to the in-process ASGI application (``--app``), or gets 404.

Push-back (DESIGN §3): when the layer does not take an event within ``publish_timeout``, HTTP
answers 503 and a WebSocket closes with 1013 (try again later); a handshake gets 503.
Nothing is parsed here: uvicorn speaks HTTP and WebSocket, :mod:`.translate` maps its ASGI
events to layer messages and back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from core.envelope import new_event
from core.layers import import_object
from core.service import (
    LAYER_ERRORS,
    Backoff,
    EventRefused,
    Gateway,
    StartupError,
    cancel_and_wait,
)
from core.types import ChannelLayer
from gateways.http_ws.config import HttpWsGatewayConfig
from gateways.http_ws.connection import UvicornServer
from gateways.http_ws.translate import (
    CLOSE,
    InvalidReply,
    disconnect_keys,
    header,
    http_request_keys,
    http_response_body,
    http_response_start,
    match_path,
    origin_allowed,
    receive_keys,
    signature_valid,
    websocket_connect_keys,
    websocket_reply,
)

__all__ = ["HttpWsGateway"]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

#: seconds sockets get to finish their closing handshake at shutdown
CLOSE_WAIT = 3.0
#: how often reply-channel buffers of finished connections are swept (channels_redis keeps a
#: buffer for every ``!`` channel a message arrives on, also after its receiver left)
SWEEP_INTERVAL = 30.0


@dataclass(eq=False)
class _Socket:
    """One bridged WebSocket."""

    reply_channel: str
    send: Send
    last_activity: float
    accepted: bool = False
    closing: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)


class HttpWsGateway(Gateway[HttpWsGatewayConfig]):
    """uvicorn + a bridge per integration; the gateway object is the ASGI application."""

    protocol = "http_ws"
    config_model = HttpWsGatewayConfig

    def __init__(self, config: HttpWsGatewayConfig, layer: ChannelLayer) -> None:
        super().__init__(config, layer)
        self.settings = config.http_ws
        #: the in-process ASGI application for every path that is not bridged
        self.application: Any = None
        self.server = UvicornServer(self.settings, self)
        self._ws_paths = [r.path for r in self.settings.websocket]
        self._http_paths = [r.path for r in self.settings.http]
        self._hook_paths = [r.path for r in self.settings.webhooks]
        self._secrets = [
            r.secret.get_secret_value().encode() if r.secret else b""
            for r in self.settings.webhooks
        ]
        self._sockets: set[_Socket] = set()
        self._live_channels: set[str] = set()
        self._requests = 0
        self._requests_idle = asyncio.Event()
        self._requests_idle.set()
        self._sweeper: asyncio.Task[None] | None = None
        self._local_prefix = f"{self.name}."

    def serve_application(self, application: Any) -> None:
        """Serve every path that is not bridged with ``application`` (``--app``)."""
        self.application = application

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        if self.application is None and self.settings.app:
            try:
                self.application = import_object(self.settings.app)
            except (ValueError, ImportError) as exc:
                raise StartupError(f"http_ws.app {self.settings.app!r}: {exc}") from exc
        try:
            await self.server.start()
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {self.settings.host}:{self.settings.port}: {exc.strerror}"
            ) from exc
        self.metrics.connected.set(1)
        self._sweeper = asyncio.create_task(self._sweep())

    async def drain(self) -> None:
        self.server.stop_accepting()
        await self._requests_idle.wait()

    async def close(self) -> None:
        sockets = list(self._sockets)
        for sock in sockets:
            await self._close(sock, 1001, "server shutting down")
        if sockets:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(s.done.wait() for s in sockets)), CLOSE_WAIT
                )
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        await self.server.close(CLOSE_WAIT)
        self.metrics.connected.set(0)

    def readiness(self) -> list[str]:
        return [] if self.server.listening else ["HTTP server not listening"]

    # -- ASGI ---------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    def _event(self, type_: str, reply_channel: str, **keys: Any) -> dict[str, Any]:
        return new_event(type_, gateway=self.name, reply_channel=reply_channel, **keys)

    async def _publish(self, message: dict[str, Any], channel: str) -> bool:
        """``publish()`` within ``publish_timeout``; raises :class:`EventRefused` as it does."""
        return await self.publish(message, timeout=self.settings.publish_timeout, channel=channel)

    async def _new_reply_channel(self) -> str:
        # channels_redis serves every "!" channel of a process from ONE list, named by the part
        # before "!": keep channels' default prefix (a second one is a list nobody polls while
        # the first one's receiver holds the lock: a 504 for every request). The part after "!"
        # names this integration, so the sweep can tell our channels from a consumer's.
        channel = await self.layer.new_channel()
        return channel.replace("!", f"!{self._local_prefix}", 1)

    async def _next_reply(self, channel: str) -> dict[str, Any]:
        """The next message on a reply channel, waiting through layer outages."""
        backoff = Backoff(0.1, 2.0)
        while True:
            try:
                message = await self.layer.receive(channel)
            except LAYER_ERRORS as exc:
                self.metrics.retry("layer_receive")
                self.log.debug("%s: receive on %s failed: %r", self.name, channel, exc)
                await asyncio.sleep(backoff.next())
                continue
            if isinstance(message, dict):
                return message

    # -- WebSocket ----------------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        connect = await receive()
        if connect.get("type") != "websocket.connect":
            return
        index = match_path(self._ws_paths, scope["path"])
        if index is None:
            if self.application is not None:
                await self.application(scope, _replay(connect, receive), send)
            else:
                await send({"type": CLOSE, "code": 1000, "reason": ""})  # 403
            return
        peer = (scope.get("client") or ["?"])[0]
        if not origin_allowed(scope.get("headers", []), self.settings.allowed_origins):
            self.metrics.error("origin_refused")
            origin = header(scope.get("headers", []), b"origin") or b""
            self.log.warning(
                "%s: refused WebSocket from %s: origin %r not allowed",
                self.name,
                peer,
                origin.decode("latin-1")[:100],
            )
            await send({"type": CLOSE, "code": 1000, "reason": ""})  # 403
            return
        if self.stopping:
            await _refuse(scope, send, 503, b"shutting down\n")
            return
        if len(self._sockets) >= self.settings.max_connections:
            # uvicorn's limit_concurrency does not count WebSocket upgrades: this is the cap
            self.metrics.error("connection_cap")
            self.log.warning(
                "%s: refused a WebSocket from %s: %d open (max_connections)",
                self.name,
                peer,
                len(self._sockets),
            )
            await _refuse(scope, send, 503, b"too many connections\n")
            return
        channel = self.settings.websocket[index].channel or self.config.inbound_channel
        loop = asyncio.get_running_loop()
        reply = await self._new_reply_channel()
        sock = _Socket(reply, send, loop.time())
        self._sockets.add(sock)
        self._live_channels.add(reply)
        try:
            event = self._event("websocket.connect", reply, **websocket_connect_keys(scope))
            try:
                accepted = await self._publish(event, channel)
            except EventRefused:
                await _refuse(scope, send, 431, b"request headers too large\n")
                return
            if not accepted:
                await _refuse(scope, send, 503, b"busy, try again later\n")
                return
            if await self._handshake(sock, scope):
                await self._converse(sock, receive, channel)
        finally:
            self._sockets.discard(sock)
            self._live_channels.discard(reply)
            sock.done.set()

    async def _handshake(self, sock: _Socket, scope: Scope) -> bool:
        """Carry out the consumer's answer to ``websocket.connect``; True once accepted."""
        try:
            answer = await asyncio.wait_for(
                self._next_reply(sock.reply_channel), self.settings.connect_timeout
            )
        except TimeoutError:
            self.metrics.error("connect_timeout")
            self.log.warning(
                "%s: closed %s: websocket.connect unanswered after %.0f s",
                self.name,
                scope["path"],
                self.settings.connect_timeout,
            )
            await _refuse(scope, sock.send, 504, b"no consumer answered\n")
            return False
        try:
            events = websocket_reply(answer, accepted=False)
        except InvalidReply as exc:
            self.metrics.error("invalid_reply")
            self.log.warning("%s: invalid answer to websocket.connect: %s", self.name, exc)
            await _refuse(scope, sock.send, 500, b"invalid answer from the consumer\n")
            return False
        for event in events:
            await sock.send(event)
        if events[-1]["type"] == CLOSE:
            return False  # refused by the consumer: uvicorn answered 403
        sock.accepted = True
        return True

    async def _converse(self, sock: _Socket, receive: Receive, channel: str) -> None:
        outbound = asyncio.create_task(self._outbound(sock))
        idle = asyncio.create_task(self._idle_watch(sock))
        try:
            while True:
                event = await receive()
                sock.last_activity = asyncio.get_running_loop().time()
                if event["type"] == "websocket.disconnect":
                    await self._disconnected(sock, channel, event)
                    return
                if event["type"] != "websocket.receive" or sock.closing:
                    continue
                message = self._event(
                    "websocket.receive", sock.reply_channel, **receive_keys(event)
                )
                try:
                    accepted = await self._publish(message, channel)
                except EventRefused:
                    await self._close(sock, 1009, "message too big for the layer")
                    continue
                if not accepted:
                    # the layer is full or down: the client may retry later (RFC 6455 1013)
                    self.log.warning(
                        "%s: closing a WebSocket with 1013: layer did not take its message",
                        self.name,
                    )
                    await self._close(sock, 1013, "try again later")
        finally:
            await cancel_and_wait(outbound, idle)

    async def _disconnected(self, sock: _Socket, channel: str, event: dict[str, Any]) -> None:
        sock.closing = True
        keys = disconnect_keys(event.get("code"), str(event.get("reason") or ""))
        message = self._event("websocket.disconnect", sock.reply_channel, **keys)
        if not await self._publish(message, channel):
            # the consumer will not hear of it; its groups expire in the layer (group_expiry)
            self.metrics.dropped("disconnect_unsent")
            self.log.warning(
                "%s: websocket.disconnect for %s not delivered: layer unavailable",
                self.name,
                sock.reply_channel,
            )

    async def _outbound(self, sock: _Socket) -> None:
        while True:
            message = await self._next_reply(sock.reply_channel)
            sock.last_activity = asyncio.get_running_loop().time()
            try:
                events = websocket_reply(message, accepted=True)
            except InvalidReply as exc:
                self.metrics.error("invalid_reply")
                self.log.warning("%s: ignored an invalid reply: %s", self.name, exc)
                continue
            for event in events:
                if event["type"] == CLOSE:
                    if sock.closing:
                        continue
                    sock.closing = True
                if not await _send(sock.send, event):
                    return

    async def _idle_watch(self, sock: _Socket) -> None:
        loop = asyncio.get_running_loop()
        limit = self.settings.idle_timeout
        while not sock.closing:
            remaining = sock.last_activity + limit - loop.time()
            if remaining <= 0:
                self.log.info("%s: closing a WebSocket idle for %.0f s", self.name, limit)
                await self._close(sock, 1001, "idle timeout")
                return
            await asyncio.sleep(remaining)

    async def _close(self, sock: _Socket, code: int, reason: str) -> None:
        if sock.closing or not sock.accepted:
            return
        sock.closing = True
        await _send(sock.send, {"type": CLOSE, "code": code, "reason": reason})

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.sweep()

    def sweep(self) -> int:
        """Drop the buffers channels_redis keeps for our reply channels that are finished.

        channels_redis buffers a message for a ``!`` channel nobody receives on any more for
        the life of the process (a 504'd request's late answer, a ``group_send`` to a socket
        whose consumer never called ``group_discard``). Only channels this integration made
        are touched, never a consumer's. Returns how many buffers were dropped.
        """
        buffers = getattr(self.layer, "receive_buffer", None)
        if not isinstance(buffers, dict):
            return 0
        marker = f"!{self._local_prefix}"
        stale = [
            name for name in list(buffers) if marker in name and name not in self._live_channels
        ]
        for name in stale:
            buffers.pop(name, None)
        if stale:
            self.metrics.dropped("reply_to_closed", len(stale))
            self.log.debug("%s: swept %d stale reply buffers", self.name, len(stale))
        return len(stale)

    # -- HTTP ---------------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        hook = match_path(self._hook_paths, path)
        route = None if hook is not None else match_path(self._http_paths, path)
        if hook is None and route is None:
            if self.application is not None:
                await self.application(scope, receive, send)
            else:
                await _respond(send, 404, b"not found\n")
            return
        self._requests += 1
        self._requests_idle.clear()
        try:
            if self.stopping:
                await _respond(send, 503, b"shutting down\n")
                return
            body = await self._read_body(scope, receive)
            if body is None:
                self.metrics.error("body_too_large")
                await _respond(send, 413, b"request body too large\n")
                return
            if hook is not None:
                await self._webhook(scope, send, hook, body)
            else:
                assert route is not None
                await self._request(scope, send, route, body)
        finally:
            self._requests -= 1
            if self._requests == 0:
                self._requests_idle.set()

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole request body, or None when it is over ``max_body_size``."""
        limit = self.settings.max_body_size
        length = header(scope.get("headers", []), b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > limit:
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await receive()
            if event["type"] != "http.request":
                return b"".join(chunks)  # the client left; the answer goes nowhere
            chunk = event.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not event.get("more_body", False):
                return b"".join(chunks)

    async def _webhook(self, scope: Scope, send: Send, index: int, body: bytes) -> None:
        route = self.settings.webhooks[index]
        headers = scope.get("headers", [])
        name = route.header.lower().encode("latin-1")
        if not signature_valid(route.signature, self._secrets[index], headers, body, name):
            self.metrics.error("bad_signature")
            self.log.warning(
                "%s: refused webhook %s from %s: %s signature",
                self.name,
                scope["path"],
                (scope.get("client") or ["?"])[0],
                "missing" if header(headers, name) is None else "bad",
            )
            await _respond(send, 401, b"invalid signature\n")
            return
        channel = route.channel or self.config.inbound_channel
        event = self._event(
            "http.webhook", self.config.command_channel, **http_request_keys(scope, body)
        )
        try:
            accepted = await self._publish(event, channel)
        except EventRefused:
            await _respond(send, 413, b"request too large\n")
            return
        if accepted:
            await _respond(send, 202, b"accepted\n")
        else:
            await _respond(send, 503, b"busy, try again later\n", retry_after=True)

    async def _request(self, scope: Scope, send: Send, index: int, body: bytes) -> None:
        channel = self.settings.http[index].channel or self.config.inbound_channel
        reply = await self._new_reply_channel()
        self._live_channels.add(reply)
        try:
            event = self._event("http.request", reply, **http_request_keys(scope, body))
            try:
                accepted = await self._publish(event, channel)
            except EventRefused:
                await _respond(send, 413, b"request too large\n")
                return
            if not accepted:
                await _respond(send, 503, b"busy, try again later\n", retry_after=True)
                return
            await self._respond_from(reply, scope, send)
        finally:
            self._live_channels.discard(reply)

    async def _respond_from(self, reply: str, scope: Scope, send: Send) -> None:
        timeout = self.settings.response_timeout
        try:
            answer = await asyncio.wait_for(self._next_reply(reply), timeout)
        except TimeoutError:
            self.metrics.error("response_timeout")
            self.log.warning(
                "%s: 504 for %s %s: no http.response within %.0f s",
                self.name,
                scope.get("method"),
                scope["path"],
                timeout,
            )
            await _respond(send, 504, b"no response from the application\n")
            return
        try:
            events = http_response_start(answer)
        except InvalidReply as exc:
            self.metrics.error("invalid_reply")
            self.log.warning("%s: 502 for %s: %s", self.name, scope["path"], exc)
            await _respond(send, 502, b"invalid response from the application\n")
            return
        for event in events:
            await send(event)
        more = bool(events[-1]["more_body"])
        while more:
            try:
                chunk = http_response_body(await asyncio.wait_for(self._next_reply(reply), timeout))
            except (TimeoutError, InvalidReply) as exc:
                # the status is sent: cutting the connection is the only honest signal left
                self.metrics.error("response_incomplete")
                self.log.warning(
                    "%s: cut the response to %s short: %s",
                    self.name,
                    scope["path"],
                    exc or "no http.response.body in time",
                )
                raise _IncompleteResponse from None
            await send(chunk)
            more = chunk["more_body"]


class _IncompleteResponse(Exception):
    """Raised into uvicorn so it drops the connection of a response cut short."""


def _replay(first: dict[str, Any], receive: Receive) -> Receive:
    """``receive`` that gives ``first`` again before the rest (we read the connect event)."""
    pending = [first]

    async def again() -> dict[str, Any]:
        return pending.pop() if pending else await receive()

    return again


async def _send(send: Send, event: dict[str, Any]) -> bool:
    """``send(event)``; False when the client has gone (uvicorn raises on a closed socket)."""
    try:
        await send(event)
    except (OSError, RuntimeError):
        return False
    return True


async def _respond(send: Send, status: int, body: bytes, *, retry_after: bool = False) -> None:
    headers = [(b"content-type", b"text/plain; charset=utf-8")]
    if retry_after:
        headers.append((b"retry-after", b"5"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _refuse(scope: Scope, send: Send, status: int, body: bytes) -> None:
    """Refuse a WebSocket handshake with ``status`` where uvicorn can, else a plain 403."""
    if "websocket.http.response" in scope.get("extensions", {}):
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8")],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": CLOSE, "code": 1000, "reason": ""})
