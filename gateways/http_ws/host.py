"""Unchanged Channels applications behind gateway-http-ws, run by ``manage.py runworker``.

The gateway holds the browsers' sockets; a worker runs the project's ASGI application for them,
the way Daphne would in its own process: one application instance per socket or request, with
the real ASGI scope (path, headers, cookies, client, subprotocols …), so the application's own
``URLRouter`` fills ``url_route``, its ``AuthMiddlewareStack`` loads the session and the user,
``self.send`` reaches the socket, and each instance gets a ``channel_name`` of its own from the
layer for ``group_add`` / ``group_send``. Generic consumers (``AsyncWebsocketConsumer``,
``JsonWebsocketConsumer``, ``AsyncHttpConsumer``) and plain Django views work unchanged.

How it is switched on:

* **Automatically**: ``manage.py runworker CHANNEL`` (and ``gateways run FILE --app``) hosts the
  application on every channel it was given that the application's ``ChannelNameRouter`` does not
  route (or all of them, when ``ProtocolTypeRouter`` has no ``"channel"`` entry), as long as the
  application has a ``"websocket"`` or ``"http"`` entry (:func:`host_unrouted`).
* **Explicitly**, for a channel that should host another application than the project's::

      "channel": ChannelNameRouter({"admin-ws": BridgeHost(admin_application)})

How one channel is hosted (:class:`BridgeHost`; one host per channel and worker process):

* the route's channel (shared by every worker that serves it: whoever is free takes a connect)
  carries ``websocket.connect`` and ``http.request`` / ``http.webhook``; each starts an
  application instance;
* the host answers a connect from a channel of its own (``host``, from ``new_channel()``), named
  in every message it sends the gateway; the gateway sends the socket's later events there, so
  every event of a socket reaches the instance that holds it (sticky) — also with several
  workers on one channel;
* it tells each gateway which sockets it holds and which of their events the application has
  handled (``http_ws.heartbeat``, every ``heartbeat`` s, and ``acked`` on every message), so the
  gateway can replay what was not handled when this worker stops;
* when the worker stops (SIGTERM: ``ConsumerWorker.drain`` cancels the host), each instance ends
  with ``websocket.disconnect`` code 1012 once it has finished the event in hand, and the host
  sends ``http_ws.release``: the gateway re-binds the socket to another worker, which runs
  ``connect`` again with the original scope (the client's socket stays open). HTTP requests in
  progress get ``release_grace`` seconds to finish;
* a gateway that stops answering heartbeats for twice its ``worker_timeout`` is taken for gone:
  its instances end with code 1006 (their ``disconnect`` runs, so they leave their groups).

An application that raises is logged with its traceback; the socket is refused with 500 (before
accept) or closed with 1011, a request answered 500, as Daphne and uvicorn do, instead of leaving
the client waiting for the gateway's timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from channels import DEFAULT_CHANNEL_LAYER
from channels.exceptions import ChannelFull
from channels.layers import get_channel_layer

from core.config import MAX_EVENT_PAYLOAD
from core.metrics import GatewayMetrics
from core.receiving import ChannelReader
from core.retry import LAYER_ERRORS, describe_error, send_command
from gateways.http_ws.translate import (
    ABORT,
    ACCEPT,
    ACK,
    ALIVE,
    CLOSE,
    HEARTBEAT,
    RELEASE,
    SEND,
    InvalidEvent,
    InvalidReply,
    asgi_scope,
    body_parts,
    response_head,
    websocket_answer,
)

__all__ = ["BridgeHost", "host_unrouted", "routed_channels"]

log = logging.getLogger("gateway.http_ws")

Message = dict[str, Any]
Application = Callable[[Message, Any, Any], Awaitable[None]]

#: bytes of one response body part at most (one layer message each, under the 1 MB limit)
BODY_PART = 512 * 1024
#: seconds an application gets to end after its ``websocket.disconnect`` / ``http.disconnect``
#: (Daphne's ``application_close_timeout``)
APPLICATION_CLOSE_TIMEOUT = 10.0
#: seconds a stopping worker gives its instances (the event in hand, requests in progress)
RELEASE_GRACE = 10.0
#: seconds between heartbeats until a gateway says how often it wants them
HEARTBEAT_INTERVAL = 1.0
#: sockets and requests listed in one heartbeat at most (a message stays far under 1 MB)
HEARTBEAT_BATCH = 2000
#: sockets and requests one host holds at most; more are refused (503)
MAX_HELD = 100_000
#: events one socket's instance may have waiting (the gateway sends at most its replay window)
MAILBOX = 10_000
#: seconds the host waits for room on a gateway's reply channel before it drops a message
SEND_TIMEOUT = 30.0


def routed_channels(application: Any) -> frozenset[str] | None:
    """The channels ``application``'s ``ChannelNameRouter`` routes; empty when its
    ``ProtocolTypeRouter`` has no ``"channel"`` entry; None when that cannot be told."""
    mapping = getattr(application, "application_mapping", None)
    if not isinstance(mapping, dict):
        return None
    router = mapping.get("channel")
    if router is None:
        return frozenset()
    names = getattr(router, "application_mapping", None)
    return frozenset(names) if isinstance(names, dict) else None


def host_unrouted(application: Any) -> Any:
    """``application``, with every channel its ``ChannelNameRouter`` does not route hosting its
    ``websocket`` / ``http`` entries for gateway-http-ws (:class:`BridgeHost`).

    ``manage.py runworker`` and ``gateways run --app`` wrap the project's application with it.
    An application whose routing cannot be inspected (not a ``ProtocolTypeRouter``), or with
    neither a ``websocket`` nor an ``http`` entry, is returned unchanged.
    """
    routed = routed_channels(application)
    mapping = getattr(application, "application_mapping", {})
    if routed is None or not ({"websocket", "http"} & set(mapping)):
        return application
    host = BridgeHost(application)

    async def hosting(scope: Message, receive: Any, send: Any) -> None:
        if scope.get("type") == "channel" and scope.get("channel") not in routed:
            await host(scope, receive, send)
        else:
            await application(scope, receive, send)

    hosting.hosted_application = application  # type: ignore[attr-defined]
    return hosting


class BridgeHost:
    """The ASGI application of a worker channel that hosts ``application`` for the bridge.

    ``application`` defaults to the project's ``ASGI_APPLICATION``; it is called with
    ``websocket`` and ``http`` scopes (a ``ProtocolTypeRouter`` picks its entry). ``alias`` is
    the channel layer the instances use (channels' ``DEFAULT_CHANNEL_LAYER``);
    ``release_grace`` the seconds instances get when the worker stops.
    """

    def __init__(
        self,
        application: Any = None,
        *,
        alias: str = DEFAULT_CHANNEL_LAYER,
        release_grace: float = RELEASE_GRACE,
    ) -> None:
        self.application = application
        self.alias = alias
        self.release_grace = release_grace

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        if scope.get("type") != "channel":
            raise ValueError("BridgeHost serves channel scopes (runworker, ChannelNameRouter)")
        application = self.application
        if application is None:
            from channels.routing import get_default_application

            application = get_default_application()
        layer = get_channel_layer(self.alias)
        if layer is None:
            raise ValueError(f"no channel layer {self.alias!r}: the bridge needs one")
        await _Host(application, layer, str(scope["channel"]), self.release_grace).run(receive)


@dataclass
class _Gateway:
    """A gateway process whose sockets this host holds."""

    last_answer: float
    timeout: float


class _Held:
    """One socket or request this host runs an application instance for."""

    def __init__(self, host: _Host, message: Message, scope: Message) -> None:
        self.host = host
        self.kind: str = scope["type"]
        self.reply: str = message["reply_channel"]
        #: the token of this binding (the id of the connect or request)
        self.bind: str = message["id"]
        #: the gateway's control channel (heartbeats), if it has one
        self.gateway: str | None = message.get("control") if message.get("control") else None
        self.scope = scope
        self.discard = message.get("type") == "http.webhook"  # answered 202 already
        window = message.get("window")
        self.ack_every = max(1, window // 2) if isinstance(window, int) else 16
        self.events: deque[tuple[int | None, Message]] = deque()
        self.wakeup = asyncio.Event()
        #: the last event to give the application (its disconnect), once it is ending
        self.final: Message | None = None
        #: seq of the event the application holds; the highest it finished; the highest told
        self.in_hand: int | None = None
        self.handled = 0
        self.reported = 0
        self.last_seq = 0
        self.accepted = False
        self.closed = False
        self.head: tuple[int, list[list[bytes]]] | None = None
        self.started = False
        self.complete = False
        #: why the instance is ending: released (worker stops), orphaned (gateway silent),
        #: gone (the gateway says the socket is not ours), or None
        self.ending: str | None = None
        #: messages for the client go nowhere any more
        self.detached = False
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.acking = False
        if self.kind == "websocket":
            self.events.append((None, {"type": "websocket.connect"}))
            seq = message.get("seq")  # a re-bind: the events after it follow
            self.last_seq = self.handled = self.reported = seq if isinstance(seq, int) else 0
        else:
            body = message.get("body", b"")
            request = {"type": "http.request", "body": body, "more_body": False}
            self.events.append((None, request))

    def describe(self) -> str:
        return f"{self.kind} {self.scope.get('path')!s:.200}"

    # -- what the application calls

    async def receive(self) -> Message:
        if self.in_hand is not None:  # asking for the next event: the last one is handled
            self.handled, self.in_hand = self.in_hand, None
            if self.handled - self.reported >= self.ack_every:
                self.host.acknowledge(self)
        while True:
            if self.final is not None:
                event, self.final = self.final, None
                self.events.clear()
                return event
            if self.events:
                self.in_hand, event = self.events.popleft()
                if event["type"] in ("websocket.disconnect", "http.disconnect"):
                    self.closing_time()
                return event
            self.wakeup.clear()
            await self.wakeup.wait()

    async def send(self, event: Message) -> None:
        if self.kind == "websocket":
            await self._send_websocket(event)
        else:
            await self._send_http(event)

    async def _send_websocket(self, event: Message) -> None:
        answer = websocket_answer(event)  # InvalidReply reaches the application, as a server's
        kind = answer["type"]
        if kind == ACCEPT:
            if self.accepted or self.closed:
                return
            self.accepted = True
        elif kind == SEND:
            if self.closed:
                return
            self.accepted = True  # a send before the accept accepts (the gateway's spec)
            data = answer.get("text") or answer.get("bytes") or b""
            size = len(data)
            if isinstance(data, str) and size * 4 > MAX_EVENT_PAYLOAD:
                size = len(data.encode())  # UTF-8 may take up to 4 bytes a character
            if size > MAX_EVENT_PAYLOAD:
                self.host.metrics.dropped("frame_too_large")
                log.warning(
                    "%s: the application sent a %d-byte frame, over what the layer carries: "
                    "closing with 1009",
                    self.describe(),
                    size,
                )
                answer = {"type": CLOSE, "code": 1009, "reason": "message too big"}
                self.closed = True
        else:
            if self.closed:
                return
            self.closed = True
        if not self.detached:
            await self.host.to_gateway(self, answer)

    async def _send_http(self, event: Message) -> None:
        kind = event.get("type")
        if kind == "http.response.start":
            if self.head is not None:
                raise RuntimeError("http.response.start sent twice")
            self.head = response_head(event)
            return
        if kind != "http.response.body":
            raise InvalidReply(f"unexpected ASGI message {str(kind)[:60]!r} on an HTTP request")
        if self.head is None:
            raise RuntimeError("http.response.body before http.response.start")
        if self.complete:
            raise RuntimeError("http.response.body after the response was complete")
        more = bool(event.get("more_body", False))
        parts = body_parts(event.get("body", b""), BODY_PART)
        for number, part in enumerate(parts):
            more_after = more or number < len(parts) - 1
            if not self.started:
                status, headers = self.head
                message: Message = {
                    "type": "http.response",
                    "status": status,
                    "headers": headers,
                    "body": part,
                    "more_body": more_after,
                }
                self.started = True
                if self.discard and status >= 400:
                    log.warning(
                        "%s: the application answered a webhook %d", self.describe(), status
                    )
            else:
                message = {"type": "http.response.body", "body": part, "more_body": more_after}
            if not (self.discard or self.detached):
                await self.host.to_gateway(self, message)
        if not more:
            self.complete = True
            # ASGI: once the response is out, the next receive() says the request is over
            self.final = {"type": "http.disconnect"}
            self.wakeup.set()
            self.closing_time()

    # -- what the host calls

    def deliver(self, message: Message) -> None:
        """A socket event from the gateway, for the application's next ``receive()``."""
        if self.ending is not None:
            return
        seq = message.get("seq")
        if isinstance(seq, int):
            if seq <= self.last_seq:
                self.host.metrics.dropped("duplicate_event")
                return
            if seq != self.last_seq + 1:
                log.warning(
                    "%s: events %d to %d never arrived", self.describe(), self.last_seq + 1, seq - 1
                )
            self.last_seq = seq
        if message["type"] == "websocket.receive":
            text = message.get("text")
            if text is not None:
                event: Message = {"type": "websocket.receive", "text": text}
            else:
                event = {"type": "websocket.receive", "bytes": message.get("bytes") or b""}
        else:
            event = {
                "type": "websocket.disconnect",
                "code": message.get("code", 1005),
                "reason": message.get("reason") or "",
            }
            # the socket is gone at the gateway: what the instance sends now goes nowhere
            self.detached = True
        if len(self.events) >= MAILBOX:
            self.host.metrics.dropped("mailbox_full")
            log.warning(
                "%s: dropped an event: %d waiting for the application", self.describe(), MAILBOX
            )
            return
        self.events.append((seq if isinstance(seq, int) else None, event))
        self.wakeup.set()

    def end(self, reason: str, event: Message, timeout: float = APPLICATION_CLOSE_TIMEOUT) -> None:
        """Give the application ``event`` (its disconnect) next, and cancel it if it has not
        ended ``timeout`` s later. ``reason``: released (the worker stops), orphaned (its
        gateway is silent) or gone (the gateway says the socket is not this worker's)."""
        if self.ending is not None or self.task is None or self.task.done():
            return
        self.ending = reason
        self.detached = reason in ("gone", "orphaned")
        self.final = event
        self.wakeup.set()
        self.closing_time(timeout)

    def closing_time(self, timeout: float = APPLICATION_CLOSE_TIMEOUT) -> None:
        if self.timer is None and self.task is not None:
            self.timer = asyncio.get_running_loop().call_later(timeout, self.task.cancel)


class _Host:
    """One hosted channel in one worker process (see the module docstring)."""

    def __init__(self, application: Any, layer: Any, inbound: str, release_grace: float) -> None:
        self.application = application
        self.layer = layer
        self.inbound = inbound
        self.release_grace = release_grace
        self.channel = ""
        self.held: dict[str, _Held] = {}
        self.gateways: dict[str, _Gateway] = {}
        #: seconds between heartbeats: the shortest any gateway asked for
        self.interval: float | None = None
        self.metrics = GatewayMetrics("worker")
        self._background: set[asyncio.Task[Any]] = set()

    async def run(self, receive: Callable[[], Awaitable[Message]]) -> None:
        self.channel = await self.layer.new_channel()
        name = getattr(self.application, "__qualname__", type(self.application).__name__)
        log.info(
            "hosting %s on %r for gateway-http-ws (sockets stick to %s)",
            name,
            self.inbound,
            self.channel,
        )
        tasks = [
            asyncio.create_task(self._read_own_channel()),
            asyncio.create_task(self._heartbeats()),
        ]
        try:
            while True:
                message = await receive()
                try:
                    self._take(message)
                except Exception as exc:
                    self.metrics.error("host")
                    log.error(
                        "bridge host on %r: %s", self.inbound, describe_error(exc), exc_info=exc
                    )
        finally:
            try:
                await asyncio.shield(self._release_all())
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    # -- new sockets and requests (the route's channel)

    def _take(self, message: Message) -> None:
        kind = message.get("type")
        if kind not in ("websocket.connect", "http.request", "http.webhook"):
            self.metrics.dropped("not_bridged")
            log.warning(
                "channel %r hosts an application for gateway-http-ws: ignored a %.60r message",
                self.inbound,
                kind,
            )
            return
        reply, bind = message.get("reply_channel"), message.get("id")
        if not isinstance(reply, str) or not isinstance(bind, str):
            self.metrics.dropped("not_bridged")
            log.warning("channel %r: ignored a %s without reply_channel or id", self.inbound, kind)
            return
        try:
            scope = asgi_scope(message)
        except InvalidEvent as exc:
            self.metrics.error("invalid_event")
            log.warning("channel %r: cannot host a %s: %s", self.inbound, kind, exc)
            self._refuse(message, 1011, 500)
            return
        old = self.held.get(reply)
        if old is not None:  # re-bound to this same worker: the new binding wins
            old.end("gone", {"type": "websocket.disconnect", "code": 1006, "reason": ""})
        elif len(self.held) >= MAX_HELD:
            self.metrics.error("host_full")
            log.warning("channel %r: refused a %s: %d held (the cap)", self.inbound, kind, MAX_HELD)
            self._refuse(message, 1013, 503)
            return
        self._track_gateway(message)
        held = _Held(self, message, scope)
        self.held[reply] = held
        held.task = asyncio.create_task(self._run_instance(held))

    def _refuse(self, message: Message, code: int, status: int) -> None:
        if message.get("type") == "websocket.connect":
            answer: Message = {"type": CLOSE, "code": code, "reason": ""}
        elif message.get("type") == "http.request":
            answer = {"type": "http.response", "status": status, "body": b""}
        else:
            return
        self._spawn(self._send_quietly(str(message["reply_channel"]), answer))

    def _track_gateway(self, message: Message) -> None:
        control = message.get("control")
        if not isinstance(control, str) or not control:
            return
        timeout = message.get("worker_timeout")
        timeout = float(timeout) if isinstance(timeout, int | float) and timeout > 0 else 5.0
        beat = message.get("heartbeat")
        if isinstance(beat, int | float) and beat > 0:
            self.interval = min(self.interval or float(beat), float(beat))
        if control not in self.gateways:
            now = asyncio.get_running_loop().time()
            self.gateways[control] = _Gateway(now, 2 * timeout)

    async def _run_instance(self, held: _Held) -> None:
        outcome = "returned"
        try:
            await self.application(held.scope, held.receive, held.send)
        except asyncio.CancelledError:
            outcome = "cancelled"
        except Exception as exc:
            outcome = "failed"
            self.metrics.error("application")
            log.error(
                "the application failed on %s: %s",
                held.describe(),
                describe_error(exc),
                exc_info=exc,
            )
        finally:
            if held.timer is not None:
                held.timer.cancel()
            if self.held.get(held.reply) is held:
                del self.held[held.reply]
        await self._finished(held, outcome)

    async def _finished(self, held: _Held, outcome: str) -> None:
        """Tell the gateway what it must know after an instance ended."""
        if held.ending in ("released", "orphaned"):
            # the instance's own messages went first: the gateway re-binds after them
            release = {"type": RELEASE}
            await self.to_gateway(held, release, quiet=True)
            return
        if held.detached or held.discard:
            return
        if held.kind == "websocket":
            if held.closed:
                return
            if not held.accepted or outcome == "failed":
                if outcome != "failed":
                    log.warning("%s: the application ended without accepting", held.describe())
                answer: Message = {"type": CLOSE, "code": 1011, "reason": ""}
            else:
                answer = {"type": CLOSE, "code": 1000, "reason": ""}
            await self.to_gateway(held, answer, quiet=True)
        elif not held.complete:
            if held.started:
                await self.to_gateway(held, {"type": ABORT}, quiet=True)
            else:
                if outcome != "failed":
                    log.warning("%s: the application ended without a response", held.describe())
                status = 503 if outcome == "cancelled" else 500
                answer = {"type": "http.response", "status": status, "body": b""}
                await self.to_gateway(held, answer, quiet=True)

    # -- talking to the gateway

    async def to_gateway(self, held: _Held, message: Message, *, quiet: bool = False) -> None:
        message["bind"] = held.bind
        message["host"] = self.channel
        message["acked"] = held.handled
        held.reported = held.handled
        try:
            await send_command(self.layer, held.reply, message, timeout=SEND_TIMEOUT)
        except Exception as exc:
            self.metrics.dropped("reply_undelivered")
            # quiet: the last word of an ending instance, to a gateway that may be gone
            log.log(
                logging.INFO if quiet else logging.WARNING,
                "%s: a %s for the gateway was not delivered: %s",
                held.describe(),
                message["type"],
                describe_error(exc),
            )

    def acknowledge(self, held: _Held) -> None:
        """Tell the gateway how far the application got (it frees its replay buffer)."""
        if held.acking or held.detached:
            return
        held.acking = True

        async def ack() -> None:
            try:
                await self.to_gateway(held, {"type": ACK}, quiet=True)
            finally:
                held.acking = False

        self._spawn(ack())

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_quietly(self, channel: str, message: Message) -> None:
        try:
            await send_command(self.layer, channel, message, timeout=SEND_TIMEOUT)
        except Exception as exc:
            log.warning("could not answer %s: %s", channel, describe_error(exc))

    # -- this host's own channel: socket events, heartbeat answers

    async def _read_own_channel(self) -> None:
        reader = ChannelReader(
            self.layer,
            self.channel,
            log=log,
            label=f"bridge host on {self.inbound!r}",
            on_layer=self._layer_state,
        )
        while True:
            message = await reader.receive()
            try:
                self._arrived(message)
            except Exception as exc:
                self.metrics.error("host")
                log.error("bridge host on %r: %s", self.inbound, describe_error(exc), exc_info=exc)

    def _arrived(self, message: Message) -> None:
        kind = message.get("type")
        if kind in ("websocket.receive", "websocket.disconnect"):
            held = self.held.get(str(message.get("reply_channel")))
            if held is None or held.bind != message.get("bind"):
                # for an instance that ended, or a binding the gateway has replaced
                self.metrics.dropped("stale_event")
                return
            held.deliver(message)
        elif kind == ALIVE:
            gateway = self.gateways.get(str(message.get("gateway")))
            if gateway is not None:
                gateway.last_answer = asyncio.get_running_loop().time()
            for reply, bind in message.get("gone") or []:
                held = self.held.get(reply)
                if held is not None and held.bind == bind:
                    held.end("gone", _disconnect(held, 1006))
        else:
            self.metrics.dropped("not_bridged")
            log.warning("bridge host on %r: ignored a %.60r message", self.inbound, kind)

    def _layer_state(self, ok: bool) -> None:
        if not ok:  # our own receives fail: a gateway's silence says nothing now
            self._grace()

    def _grace(self) -> None:
        now = asyncio.get_running_loop().time()
        for gateway in self.gateways.values():
            gateway.last_answer = now

    async def _heartbeats(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            interval = self.interval or HEARTBEAT_INTERVAL
            await asyncio.sleep(interval)
            held_by: dict[str, list[list[Any]]] = {}
            for held in self.held.values():
                if held.gateway is not None and not (held.detached or held.discard):
                    held_by.setdefault(held.gateway, []).append(
                        [held.reply, held.bind, held.handled]
                    )
                    held.reported = held.handled
            for control, entries in held_by.items():
                for start in range(0, len(entries), HEARTBEAT_BATCH):
                    beat = {
                        "type": HEARTBEAT,
                        "host": self.channel,
                        "held": entries[start : start + HEARTBEAT_BATCH],
                    }
                    try:
                        # a busy gateway's channel may be full for a moment: retry, briefly
                        await send_command(self.layer, control, beat, timeout=interval)
                    except LAYER_ERRORS as exc:
                        # full or unreachable: a dead gateway's channel fills up too, so only
                        # an outage (not a full channel) pauses the silence check
                        if not isinstance(exc, ChannelFull):
                            self._grace()
                        log.debug("heartbeat to %s failed: %r", control, exc)
                        break
            now = loop.time()
            for control, gateway in list(self.gateways.items()):
                if control not in held_by:
                    del self.gateways[control]  # nothing of it held any more
                elif now - gateway.last_answer > gateway.timeout:
                    del self.gateways[control]
                    orphans = [h for h in self.held.values() if h.gateway == control]
                    self.metrics.error("gateway_lost")
                    log.warning(
                        "gateway %s answered no heartbeat for %.0f s: ending its %d "
                        "socket(s) and request(s)",
                        control,
                        now - gateway.last_answer,
                        len(orphans),
                    )
                    for held in orphans:
                        held.end("orphaned", _disconnect(held, 1006))

    # -- stopping

    async def _release_all(self) -> None:
        """The worker stops: every instance finishes what it holds and ends; the gateways
        re-bind the sockets to other workers."""
        held = list(self.held.values())
        if not held:
            return
        sockets = [h for h in held if h.kind == "websocket"]
        log.info(
            "bridge host on %r stopping: releasing %d socket(s), finishing %d request(s)",
            self.inbound,
            len(sockets),
            len(held) - len(sockets),
        )
        for entry in sockets:
            event = {"type": "websocket.disconnect", "code": 1012, "reason": "worker restart"}
            entry.end("released", event, timeout=self.release_grace)
        tasks = [h.task for h in held if h.task is not None]
        _done, pending = await asyncio.wait(tasks, timeout=self.release_grace)
        for task in pending:
            task.cancel()
        if pending:
            log.warning(
                "bridge host on %r: %d instance(s) still busy after %.0f s: cancelled",
                self.inbound,
                len(pending),
                self.release_grace,
            )
            await asyncio.wait(pending, timeout=5)
        if self._background:
            await asyncio.wait(set(self._background), timeout=5)


def _disconnect(held: _Held, code: int) -> Message:
    if held.kind == "websocket":
        return {"type": "websocket.disconnect", "code": code, "reason": ""}
    return {"type": "http.disconnect"}
