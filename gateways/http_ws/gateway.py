"""``HttpWsGateway``: the ASGI bridge uvicorn serves, between browsers and the channel layer.

Each WebSocket gets its own reply channel (``layer.new_channel``): ``websocket.connect`` goes to
the route's inbound channel, and whatever consumers send to the reply channel
(``websocket.accept`` / ``.send`` / ``.close``, directly or through a group) is carried out on that
socket. A configured HTTP path becomes one ``http.request`` with its own reply channel, answered
by ``http.response`` (504 when nothing comes in ``response_timeout``); a webhook path is checked
(HMAC) and answered 202 at once. Every other path goes to the in-process ASGI application
(``--app``), or gets 404.

Two kinds of consumer answer a socket, and the first answer tells them apart:

* **A consumer written to the gateway's message spec** answers the connect with a plain
  ``websocket.accept``: the socket's later events go to the route's channel, as the connect did.
* **A worker hosting an unchanged Channels application** (:mod:`.consumers`) answers with the
  connect's ``id`` as ``bind`` and its *host channel*: the socket is bound to that worker
  (sticky), and its later events go to the host channel, numbered (``seq``). The gateway keeps
  each socket's unconfirmed events (``replay_buffer``) until the worker reports them handled
  (``acked`` on its messages, its heartbeats). When the worker stops (``http_ws.release``, sent
  on SIGTERM) or goes silent for ``worker_timeout`` (killed), the socket is *re-bound*: the
  original connect goes to the route's channel again (``rebind: true``), the worker that takes
  it runs the application's ``connect`` with the original scope, its accept is swallowed (the
  client's socket never closed), and the unconfirmed events are replayed to it, in order.

Push-back (DESIGN §3): when the layer does not take an event within ``publish_timeout``, HTTP
answers 503 and a WebSocket closes with 1013 (try again later); a handshake gets 503.
Nothing is parsed here: uvicorn speaks HTTP and WebSocket, :mod:`.translate` maps its ASGI
events to layer messages and back.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from core.envelope import new_event
from core.layers import import_object
from core.retry import (
    LAYER_ERRORS,
    Backoff,
    StartupError,
    cancel_and_wait,
    describe_error,
    send_command,
)
from core.service import EventRefused, Gateway, listen
from core.types import ChannelLayer
from gateways.http_ws.config import HttpWsGatewayConfig
from gateways.http_ws.connection import UvicornServer
from gateways.http_ws.translate import (
    ABORT,
    ACCEPT,
    ACK,
    ALIVE,
    CLOSE,
    HEARTBEAT,
    LOST,
    RELEASE,
    InvalidReply,
    disconnect_keys,
    header,
    http_request_keys,
    http_response_body,
    http_response_start,
    match_path,
    origin_allowed,
    receive_keys,
    refusal_status,
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
#: how often reply-channel buffers of finished connections are swept (both Redis layers keep a
#: buffer for every ``!`` channel a message arrives on, also after its receiver left; on
#: core.streams its entries also count against the process stream's capacity until dropped)
SWEEP_INTERVAL = 2.0
#: bytes of unconfirmed events a socket keeps for a replay (at least one event always fits)
REPLAY_BYTES = 512 * 1024
#: sockets (and requests) listed in one heartbeat answer at most
GONE_BATCH = 2000


@dataclass(eq=False)
class _Socket:
    """One bridged WebSocket."""

    reply_channel: str
    send: Send
    last_activity: float
    #: the route's inbound channel: connects (and a spec consumer's events) go there
    route: str
    #: the ``websocket.connect`` keys, sent again when the socket is re-bound
    connect: dict[str, Any]
    accepted: bool = False
    closing: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)
    # -- hosted (sticky) sockets; see the module docstring
    #: id of the connect the current binding answers (its token); None for a spec consumer
    bind: str | None = None
    #: the host channel of the worker holding the socket; None while being re-bound
    host: str | None = None
    hosted: bool = False
    seq: int = 0
    #: events sent but not yet reported handled: (seq, size, message)
    unacked: deque[tuple[int, int, dict[str, Any]]] = field(default_factory=deque)
    unacked_bytes: int = 0
    #: set while the next event may go (bound, room in the replay buffer, or closing)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    #: set once the worker holding the socket got its replay (events may follow)
    rebound: asyncio.Event = field(default_factory=asyncio.Event)
    rebinder: asyncio.Task[None] | None = None


@dataclass(eq=False)
class _Request:
    """One bridged HTTP request, while a worker may still answer it."""

    reply_channel: str
    #: id of its ``http.request`` event (the token a hosting worker's heartbeat names)
    bind: str
    host: str | None = None


@dataclass(eq=False)
class _Host:
    """A worker's host channel, and what is bound to it."""

    last_seen: float
    peers: set[str] = field(default_factory=set)


class _Tally:
    """Counts something that can happen in floods and logs it in one line a second."""

    def __init__(self, report: Callable[[int], None]) -> None:
        self.report = report
        self.count = 0

    def add(self) -> None:
        if self.count == 0:
            asyncio.get_running_loop().call_later(1.0, self._flush)
        self.count += 1

    def _flush(self) -> None:
        count, self.count = self.count, 0
        self.report(count)


class HttpWsGateway(Gateway[HttpWsGatewayConfig]):
    """uvicorn + a bridge per integration; the gateway object is the ASGI application."""

    protocol = "http_ws"
    config_model = HttpWsGatewayConfig

    def __init__(self, config: HttpWsGatewayConfig, layer: ChannelLayer) -> None:
        super().__init__(config, layer)
        self.settings = config.http_ws
        #: the in-process ASGI application for every path that is not bridged
        self.application: Any = None
        self.server = UvicornServer(self.settings, self, self._header_timed_out)
        self._ws_paths = [r.path for r in self.settings.websocket]
        self._http_paths = [r.path for r in self.settings.http]
        self._hook_paths = [r.path for r in self.settings.webhooks]
        self._secrets = [
            r.secret.get_secret_value().encode() if r.secret else b""
            for r in self.settings.webhooks
        ]
        self._sockets: set[_Socket] = set()
        self._app_websockets = 0
        self._live_channels: set[str] = set()
        self._requests = 0
        self._requests_idle = asyncio.Event()
        self._requests_idle.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._local_prefix = f"{self.name}."
        #: hosted sockets and requests by reply channel; workers' host channels
        self._peers: dict[str, _Socket | _Request] = {}
        self._hosts: dict[str, _Host] = {}
        #: where workers send heartbeats (this process's own channel)
        self.control_channel: str | None = None
        self._host_grace = 0.0
        self._last_heartbeat = 0.0
        self._header_timeouts = _Tally(self._report_header_timeouts)
        self._rebinds = _Tally(self._report_rebinds)
        self._stale = _Tally(self._report_stale)

    def serve_application(self, application: Any) -> None:
        """Serve every path that is not bridged with ``application`` (``--app``)."""
        self.application = application

    def worker_application(self, application: Any) -> Any:
        """``application`` as an in-process worker (``gateways run --app``) should run it: route
        channels without a ``ChannelNameRouter`` route host the application (.consumers)."""
        from gateways.http_ws.host import host_unrouted

        return host_unrouted(application)

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        if self.application is None and self.settings.app:
            try:
                self.application = import_object(self.settings.app)
            except (ValueError, ImportError) as exc:
                raise StartupError(f"http_ws.app {self.settings.app!r}: {exc}") from exc
        self.control_channel = await self._new_reply_channel()
        self._live_channels.add(self.control_channel)
        await listen(self.server.start, self.settings.host, self.settings.port)
        self.metrics.connected.set(1)
        self._tasks = [
            asyncio.create_task(self._sweep()),
            asyncio.create_task(self._control_loop(self.control_channel)),
            asyncio.create_task(self._watch_workers()),
        ]

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
        await cancel_and_wait(*self._tasks)
        await self.server.close(CLOSE_WAIT)
        self.metrics.connected.set(0)

    def readiness(self) -> list[str]:
        return [] if self.server.listening else ["HTTP server not listening"]

    def _header_timed_out(self) -> None:
        self.metrics.error("header_timeout")
        self._header_timeouts.add()

    def _report_header_timeouts(self, count: int) -> None:
        self.log.info(
            "%s: closed %d connection(s) that sent no complete request head within %.0f s "
            "(header_timeout)",
            self.name,
            count,
            self.settings.header_timeout,
        )

    def _report_stale(self, count: int) -> None:
        self.log.info(
            "%s: dropped %d message(s) from workers that no longer hold their socket (stale_reply)",
            self.name,
            count,
        )

    def _report_rebinds(self, count: int) -> None:
        self.log.info("%s: re-binding %d socket(s) to another worker", self.name, count)

    # -- ASGI ---------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    def _event(self, type_: str, reply_channel: str, **keys: Any) -> dict[str, Any]:
        return new_event(type_, gateway=self.name, reply_channel=reply_channel, **keys)

    def _bridge_keys(self) -> dict[str, Any]:
        """What a connect or request tells a hosting worker about this gateway."""
        timeout = self.settings.worker_timeout
        return {
            "control": self.control_channel,
            "heartbeat": timeout / 4,
            "worker_timeout": timeout,
            "window": self.settings.replay_buffer,
        }

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

    def _websocket_cap_reached(self, peer: str) -> bool:
        open_now = len(self._sockets) + self._app_websockets
        if open_now < self.settings.max_websockets:
            return False
        self.metrics.error("websocket_cap")
        self.log.warning(
            "%s: refused a WebSocket from %s: %d open (max_websockets)", self.name, peer, open_now
        )
        return True

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        connect = await receive()
        if connect.get("type") != "websocket.connect":
            return
        peer = (scope.get("client") or ["?"])[0]
        index = match_path(self._ws_paths, scope["path"])
        if index is None:
            if self.application is None:
                await send({"type": CLOSE, "code": 1000, "reason": ""})  # 403
            elif self._websocket_cap_reached(peer):
                await _refuse(scope, send, 503, b"too many connections\n")
            else:
                self._app_websockets += 1
                try:
                    await self.application(scope, _replay(connect, receive), send)
                finally:
                    self._app_websockets -= 1
            return
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
        if self._websocket_cap_reached(peer):
            await _refuse(scope, send, 503, b"too many connections\n")
            return
        route = self.settings.websocket[index].channel or self.config.inbound_channel
        loop = asyncio.get_running_loop()
        reply = await self._new_reply_channel()
        keys = {**websocket_connect_keys(scope), "channel": route}
        sock = _Socket(reply, send, loop.time(), route, keys)
        self._sockets.add(sock)
        self._live_channels.add(reply)
        try:
            event = self._event(
                "websocket.connect", reply, **keys, **self._bridge_keys(), rebind=False
            )
            # registered before the worker can name it in a heartbeat
            sock.bind = event["id"]
            self._peers[reply] = sock
            try:
                accepted = await self._publish(event, route)
            except EventRefused:
                await _refuse(scope, send, 431, b"request headers too large\n")
                return
            if not accepted:
                await _refuse(scope, send, 503, b"busy, try again later\n")
                return
            if await self._handshake(sock, scope):
                await self._converse(sock, receive)
        finally:
            sock.closing = True
            sock.ready.set()
            if sock.rebinder is not None:
                await cancel_and_wait(sock.rebinder)
            self._unbind(sock)
            self._peers.pop(reply, None)
            self._sockets.discard(sock)
            self._finished(reply)
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
        host = answer.get("host")
        hosted = answer.get("bind") == sock.bind and isinstance(host, str)
        try:
            events = websocket_reply(answer, accepted=False)
        except InvalidReply as exc:
            self.metrics.error("invalid_reply")
            self.log.warning("%s: invalid answer to websocket.connect: %s", self.name, exc)
            await _refuse(scope, sock.send, 500, b"invalid answer from the consumer\n")
            return False
        if events[-1]["type"] == CLOSE:
            status = refusal_status(events[-1]["code"])
            if status == 403:
                await sock.send(events[-1])  # refused by the consumer: uvicorn answers 403
            else:
                await _refuse(scope, sock.send, status, b"the application failed\n")
            return False
        if hosted:
            assert isinstance(host, str)
            sock.hosted = True
            await self._bind(sock, host)
        else:
            sock.bind = None  # a consumer of the gateway's spec: events follow the connect
            self._peers.pop(sock.reply_channel, None)
        for event in events:
            await sock.send(event)
        sock.accepted = True
        self._update_ready(sock)
        return True

    async def _converse(self, sock: _Socket, receive: Receive) -> None:
        outbound = asyncio.create_task(self._outbound(sock))
        idle = asyncio.create_task(self._idle_watch(sock))
        try:
            while True:
                event = await receive()
                sock.last_activity = asyncio.get_running_loop().time()
                if event["type"] == "websocket.disconnect":
                    await self._disconnected(sock, event)
                    return
                if event["type"] != "websocket.receive" or sock.closing:
                    continue
                message = self._event(
                    "websocket.receive",
                    sock.reply_channel,
                    **receive_keys(event),
                    path=sock.connect["path"],
                    channel=sock.route,
                )
                await self._forward(sock, message)
        finally:
            await cancel_and_wait(outbound, idle)

    async def _forward(self, sock: _Socket, message: dict[str, Any]) -> None:
        """Hand one client event to the consumer: the route's channel for a spec consumer, the
        host channel of the worker holding the socket (numbered, kept for a replay) if hosted.

        Waits while the socket is being re-bound or its replay buffer is full (the client is
        not read meanwhile: TCP pushes back).
        """
        target = sock.route
        if sock.hosted:
            while not sock.ready.is_set():
                await sock.ready.wait()
            if sock.closing or sock.host is None:
                return
            target = sock.host
            sock.seq += 1
            message["seq"] = sock.seq
            message["bind"] = sock.bind
            size = len(message.get("text") or message.get("bytes") or b"")
            sock.unacked.append((sock.seq, size, message))
            sock.unacked_bytes += size
            self._update_ready(sock)
        while True:
            try:
                accepted = await self._publish(message, target)
            except EventRefused:
                await self._close(sock, 1009, "message too big for the layer")
                return
            if accepted or sock.closing:
                return
            if sock.hosted and self._layer_ok:
                if sock.host != target:
                    return  # re-bound meanwhile: the replay to the new worker carries it
                self.metrics.retry("worker_full")
                if self._silent(target):
                    # a dead worker fills its channel before the watchdog gives up on it:
                    # move the socket now (the replay carries this event); one socket at a
                    # time, as each finds the channel full, not all of them at once
                    self._start_rebind(sock)
                    return
                continue  # a busy worker: wait (the client is not read: TCP pushes back)
            break
        # the layer is full or down: the client may retry later (RFC 6455 1013)
        self.log.warning(
            "%s: closing a WebSocket with 1013: layer did not take its message", self.name
        )
        await self._close(sock, 1013, "try again later")

    async def _disconnected(self, sock: _Socket, event: dict[str, Any]) -> None:
        sock.closing = True
        sock.ready.set()
        keys = disconnect_keys(event.get("code"), str(event.get("reason") or ""))
        message = self._event(
            "websocket.disconnect",
            sock.reply_channel,
            **keys,
            path=sock.connect["path"],
            channel=sock.route,
        )
        target = sock.route
        if sock.hosted:
            if sock.host is None:
                return  # being re-bound: a worker that takes it hears it is gone (heartbeat)
            target = sock.host
            sock.seq += 1
            message.update(seq=sock.seq, bind=sock.bind)
        if not await self._publish(message, target):
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
            if sock.hosted and not await self._from_host(sock, message):
                continue
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
                    sock.ready.set()
                if not await _send(sock.send, event):
                    return

    # -- hosted sockets: binding, acknowledgements, re-binding -------------------------------

    async def _from_host(self, sock: _Socket, message: dict[str, Any]) -> bool:
        """Bookkeeping for a message on a hosted socket's reply channel; True when it is for
        the client (``websocket.send`` / ``.close``), False when it was the bridge's own."""
        kind = message.get("type")
        if kind == LOST:
            if sock.host is not None and message.get("host") == sock.host:
                self._start_rebind(sock)
            return False
        if message.get("bind") != sock.bind:
            # from a worker that no longer holds the socket (it was re-bound meanwhile)
            self.metrics.dropped("stale_reply")
            self._stale.add()
            return False
        acked = message.get("acked")
        if isinstance(acked, int):
            self._ack(sock, acked)
        if kind == RELEASE:
            self._start_rebind(sock)
            return False
        if kind == ACK:
            return False
        if sock.host is None and kind != CLOSE:
            host = message.get("host")
            if not isinstance(host, str):
                self.metrics.error("invalid_reply")
                self.log.warning("%s: a worker's answer to a re-bind names no host", self.name)
                return False
            await self._bind(sock, host)
            return kind != ACCEPT  # the client's socket is open: the accept is swallowed
        return True

    async def _bind(self, sock: _Socket, host: str) -> None:
        """Send the socket's events to ``host`` from now on, its unconfirmed ones first."""
        sock.host = host
        info = self._hosts.get(host)
        if info is None:
            info = self._hosts[host] = _Host(asyncio.get_running_loop().time())
        info.peers.add(sock.reply_channel)
        bind = sock.bind
        for _seq, _size, message in list(sock.unacked):
            if not await self._publish({**message, "bind": bind}, host):
                await self._close(sock, 1013, "try again later")
                return
            if sock.bind != bind:
                return  # re-bound again meanwhile: that binding replays
        if sock.unacked:
            self.metrics.retry("replayed")
        # only now may new events go: they must not overtake the replayed ones
        sock.rebound.set()
        self._update_ready(sock)

    def _silent(self, host: str) -> bool:
        """Whether ``host`` missed its last two heartbeats."""
        info = self._hosts.get(host)
        quiet = asyncio.get_running_loop().time() - info.last_seen if info else float("inf")
        return quiet > self.settings.worker_timeout / 2

    def _unbind(self, sock: _Socket) -> None:
        if sock.host is not None and (info := self._hosts.get(sock.host)) is not None:
            info.peers.discard(sock.reply_channel)
        sock.host = None

    def _ack(self, sock: _Socket, acked: int) -> None:
        unacked = sock.unacked
        while unacked and unacked[0][0] <= acked:
            sock.unacked_bytes -= unacked.popleft()[1]
        self._update_ready(sock)

    def _update_ready(self, sock: _Socket) -> None:
        room = not sock.unacked or (
            len(sock.unacked) < self.settings.replay_buffer and sock.unacked_bytes < REPLAY_BYTES
        )
        bound = sock.host is not None and sock.rebound.is_set()
        if sock.closing or not sock.hosted or (bound and room):
            sock.ready.set()
        else:
            sock.ready.clear()

    def _start_rebind(self, sock: _Socket) -> None:
        """Look for another worker for ``sock`` (its worker stopped or went silent)."""
        if sock.closing:
            return
        self._unbind(sock)
        sock.bind = uuid.uuid4().hex
        sock.rebound.clear()
        self._update_ready(sock)
        if sock.rebinder is not None:
            sock.rebinder.cancel()
        sock.rebinder = asyncio.create_task(self._rebind(sock))

    async def _rebind(self, sock: _Socket) -> None:
        self.metrics.retry("rebind")
        self._rebinds.add()
        # the events after ``seq`` follow: those the last worker did not report handled
        handled = sock.unacked[0][0] - 1 if sock.unacked else sock.seq
        event = self._event(
            "websocket.connect",
            sock.reply_channel,
            id=sock.bind,
            **sock.connect,
            **self._bridge_keys(),
            rebind=True,
            seq=handled,
        )
        if not await self._publish(event, sock.route):
            self.log.warning("%s: closing a socket with 1013: could not re-bind it", self.name)
            await self._close(sock, 1013, "try again later")
            return
        try:
            await asyncio.wait_for(sock.rebound.wait(), self.settings.rebind_timeout)
        except TimeoutError:
            self.metrics.error("rebind_timeout")
            self.log.warning(
                "%s: closing a socket on %s with 1012: no worker took it within %.0f s",
                self.name,
                sock.connect["path"],
                self.settings.rebind_timeout,
            )
            await self._close(sock, 1012, "service restart")

    async def _control_loop(self, channel: str) -> None:
        """Workers' heartbeats: who is alive, what each one holds and has handled."""
        reader = self.channel_reader(channel)
        while True:
            message = await reader.receive()
            if isinstance(message, dict) and message.get("type") == HEARTBEAT:
                try:
                    await self._heartbeat(message)
                except (KeyError, TypeError, ValueError) as exc:
                    self.metrics.error("invalid_heartbeat")
                    self.log.warning("%s: ignored a bad heartbeat: %s", self.name, exc)
            else:
                self.metrics.error("invalid_reply")
                self.log.warning(
                    "%s: ignored a %.60r message on the control channel",
                    self.name,
                    message.get("type") if isinstance(message, dict) else message,
                )

    async def _heartbeat(self, message: dict[str, Any]) -> None:
        host = message["host"]
        if not isinstance(host, str):
            raise TypeError("host must be a string")
        now = asyncio.get_running_loop().time()
        self._last_heartbeat = now
        info = self._hosts.get(host)
        if info is None:
            info = self._hosts[host] = _Host(now)
        info.last_seen = now
        gone: list[list[str]] = []
        for reply, bind, acked in message["held"]:
            peer = self._peers.get(reply)
            if peer is None or peer.bind != bind:
                gone.append([reply, bind])
            elif isinstance(peer, _Socket):
                if peer.host == host and isinstance(acked, int):
                    self._ack(peer, acked)
            elif peer.host is None:
                peer.host = host
                info.peers.add(reply)
        for start in range(0, max(1, len(gone)), GONE_BATCH):
            answer = {
                "type": ALIVE,
                "gateway": self.control_channel,
                "gone": gone[start : start + GONE_BATCH],
            }
            try:
                await self.layer.send(host, answer)
            except LAYER_ERRORS as exc:
                self.log.debug("%s: heartbeat answer to %s failed: %r", self.name, host, exc)

    async def _watch_workers(self) -> None:
        """Re-bind the sockets (and fail the requests) of workers that stopped sending
        heartbeats, unless the layer itself is what kept the heartbeats away (it refuses
        events and no worker's heartbeat got through lately)."""
        loop = asyncio.get_running_loop()
        timeout = self.settings.worker_timeout
        while True:
            await asyncio.sleep(timeout / 4)
            now = loop.time()
            if not self._layer_ok and now - self._last_heartbeat > timeout / 2:
                # nothing gets through: the silence may be the layer's, not the workers'
                self._host_grace = now
                continue
            for host, info in list(self._hosts.items()):
                if now - max(info.last_seen, self._host_grace) <= timeout:
                    continue
                del self._hosts[host]
                if not info.peers:
                    continue
                self.metrics.error("worker_lost")
                self.log.warning(
                    "%s: the worker behind %s sent no heartbeat for %.0f s: moving its %d "
                    "socket(s) and request(s)",
                    self.name,
                    host,
                    now - info.last_seen,
                    len(info.peers),
                )
                # through each reply channel, behind what the worker sent before it went quiet
                lost = {"type": LOST, "host": host}
                sends = [send_command(self.layer, reply, lost, timeout=5) for reply in info.peers]
                for failed in await asyncio.gather(*sends, return_exceptions=True):
                    if isinstance(failed, Exception):
                        self.log.warning(
                            "%s: could not move a socket or request: %s",
                            self.name,
                            describe_error(failed),
                        )

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
        sock.ready.set()
        await _send(sock.send, {"type": CLOSE, "code": code, "reason": reason})

    def _finished(self, reply: str) -> None:
        """Nobody receives on ``reply`` any more: drop what is buffered for it now."""
        self._live_channels.discard(reply)
        buffers = getattr(self.layer, "receive_buffer", None)
        if isinstance(buffers, dict) and buffers.get(reply):
            self.metrics.dropped("reply_to_closed", len(buffers.pop(reply, None) or ()))

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
        if hook is None and route is None and self.application is None:
            await _respond(send, 404, b"not found\n")
            return
        if self._requests >= self.settings.max_requests:
            self.metrics.error("request_cap")
            self.log.warning(
                "%s: 503 for %s %s: %d requests in progress (max_requests)",
                self.name,
                scope.get("method"),
                path,
                self._requests,
            )
            await _respond(send, 503, b"too many requests in progress\n", retry_after=True)
            return
        self._requests += 1
        self._requests_idle.clear()
        try:
            if hook is None and route is None:
                await self.application(scope, receive, send)
                return
            if self.stopping:
                await _respond(send, 503, b"shutting down\n")
                return
            if hook is not None and scope.get("method") != "POST":
                await _respond(send, 405, b"webhooks take POST\n", extra=[(b"allow", b"POST")])
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
            "http.webhook",
            self.config.command_channel,
            **http_request_keys(scope, body),
            channel=channel,
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
        request: _Request | None = None
        try:
            event = self._event(
                "http.request",
                reply,
                **http_request_keys(scope, body),
                channel=channel,
                **self._bridge_keys(),
            )
            request = _Request(reply, event["id"])
            self._peers[reply] = request
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
            self._finished(reply)
            self._peers.pop(reply, None)
            host = request.host if request is not None else None
            if host is not None and (info := self._hosts.get(host)) is not None:
                info.peers.discard(reply)

    async def _answer(self, reply: str, timeout: float) -> dict[str, Any]:
        """The next answer on ``reply`` within ``timeout``; a worker's ``http_ws.abort`` and
        the watchdog's ``http_ws.lost`` raise :class:`_NoAnswer`."""
        message = await asyncio.wait_for(self._next_reply(reply), timeout)
        if message.get("type") == ABORT:
            raise _NoAnswer(500, "the application failed")
        if message.get("type") == LOST:
            raise _NoAnswer(502, "the worker handling it stopped")
        return message

    async def _respond_from(self, reply: str, scope: Scope, send: Send) -> None:
        timeout = self.settings.response_timeout
        try:
            answer = await self._answer(reply, timeout)
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
        except _NoAnswer as failed:
            self.metrics.error("worker_lost" if failed.status == 502 else "app_failed")
            self.log.warning(
                "%s: %d for %s %s: %s",
                self.name,
                failed.status,
                scope.get("method"),
                scope["path"],
                failed.reason,
            )
            await _respond(send, failed.status, f"{failed.reason}\n".encode())
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
                chunk = http_response_body(await self._answer(reply, timeout))
            except (TimeoutError, InvalidReply, _NoAnswer) as exc:
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


class _NoAnswer(Exception):
    """No answer will come for a request: ``status`` and ``reason`` for the client."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


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


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    *,
    retry_after: bool = False,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [(b"content-type", b"text/plain; charset=utf-8"), *(extra or [])]
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
