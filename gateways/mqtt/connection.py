"""The only module that talks to paho-mqtt: one broker connection, driven by the asyncio loop.

paho runs without a thread of its own. Its socket callbacks put the socket into the event loop:
readable → ``loop_read()``; writable while paho has output queued → ``loop_write()``; and a
``loop.call_later`` timer → ``loop_misc()`` (keep-alive pings and the ping timeout). The one
blocking step, opening the socket (DNS, TCP, TLS handshake, WebSocket upgrade), runs in a worker
thread through ``reconnect()``. Nothing else touches the client while it runs, and the socket
callbacks it fires from that thread are handed to the loop thread.

:class:`MqttConnection` is a :class:`core.client.ReconnectingClient`: the base class retries
(capped, jittered backoff, reset once a connection stayed up), decides on the first attempt
whether the gateway starts at all (the broker or TLS said no: bad credentials, an untrusted
certificate → exit 3; a broker that is merely down is retried while ``/readyz`` says why), puts
``mqtt.connect`` / ``mqtt.disconnect`` in the gateway's buffer and tells the gateway. One paho
client serves every attempt (``reconnect()``), so what paho queued for the broker (outgoing QoS
1/2 publishes) is sent again on the next connection. paho's keep-alive, not the base class's
watchdog, finds a silent broker.

The socket is read whenever it is readable, never paused: a stalled layer once made the gateway
stop reading, the broker's PINGRESP went unread, the keep-alive expired and the reconnect lost the
session. :meth:`ReconnectingClient.restart` is the one deliberate disconnect (``_hang_up``: a
clean DISCONNECT that keeps the session and publishes no will, then an immediate reconnect).
Messages that arrive with the CONNACK (a resumed session's queue follows it at once, often in
the same read) are handed to the gateway only after the base class told it of the connection,
so ``mqtt.connect`` and the gateway's per-connection reset come first.

Received QoS 1/2 messages are acknowledged only when the gateway calls :meth:`ack` (paho
``manual_ack``), and only on the connection they arrived on: a redelivery after a reconnect has
its own acknowledgement. The exception is QoS 2 in a resumed session, where paho swallows the
repeated PUBREL, so the PUBCOMP for the packet id is sent on the new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import secrets
import socket
import ssl
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, Protocol

from paho.mqtt.client import (
    MQTT_CLEAN_START_FIRST_ONLY,
    Client,
    ConnectFlags,
    DisconnectFlags,
    MQTTMessage,
    MQTTv5,
    MQTTv311,
    error_string,
)
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from core.client import ClientListener, ClientState, ConnectFailed, ReconnectingClient
from core.logs import clip
from core.retry import Backoff, describe_error
from core.service import EventBuffer, Gateway
from gateways.mqtt.config import MqttConfig
from gateways.mqtt.translate import new_properties, topic_of

__all__ = [
    "ClientIdClaim",
    "ConnectionLost",
    "MqttConnection",
    "MqttListener",
    "NotConnected",
    "QueueFull",
    "claim_client_id",
]

#: how often loop_misc() runs: keep-alive pings are due at most this late
MISC_INTERVAL: Final = 1.0
#: packets read per readable event before other work gets a turn
READ_BATCH: Final = 64
#: seconds to wait for our DISCONNECT (and the will on stop) to leave
CLOSE_TIMEOUT: Final = 5.0
#: MQTT framing around topic + payload: fixed header, lengths, packet id and modest properties
PACKET_OVERHEAD: Final = 1024
#: CONNACK refusals that can fix themselves (the broker is overloaded or going away)
_TRANSIENT_REFUSALS: Final = frozenset(
    {
        "Server unavailable",
        "Server busy",
        "Quota exceeded",
        "Connection rate exceeded",
        "Server moved",
        "Use another server",
        "Unspecified error",
        "Implementation specific error",
    }
)


class ConnectionLost(Exception):
    """The connection closed before the broker answered."""


class NotConnected(Exception):
    """There is no connection to the broker right now."""


class QueueFull(Exception):
    """paho's outgoing queue (``mqtt.max_queued``) is full."""


class _PahoClient(Client):
    """paho's ``Client``, remembering the sockets a connection attempt opens.

    When a TLS or WebSocket handshake fails, paho 2.2 drops the half-open socket and leaves it to
    the garbage collector (``Client._create_socket``): a file descriptor held until then and a
    ``ResourceWarning`` per failed attempt. :meth:`close_strays` closes them at once.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opened: list[socket.socket] = []

    def _create_socket_connection(self) -> socket.socket:
        sock = super()._create_socket_connection()
        self.opened.append(sock)
        # paho leaves Nagle's algorithm on: a PUBACK written while the last one is still
        # unacknowledged by TCP waits for that ACK (up to the peer's delayed-ACK timer), and the
        # broker sends nothing past receive_maximum meanwhile (issue 20: a default mosquitto,
        # whose queue for us is 1,000, dropped half of a 10,000-message burst)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def close_strays(self) -> None:
        """Close every socket of the last attempt that did not become the connection."""
        current = self.socket()
        keep = current.fileno() if current is not None else -1
        for sock in self.opened:
            if sock.fileno() != keep:
                sock.close()
        self.opened.clear()


class _TrackingContext(ssl.SSLContext):
    """An ``SSLContext`` that adds each socket it wraps to ``opened`` (see :class:`_PahoClient`)."""

    opened: list[socket.socket]

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        sock = super().wrap_socket(*args, **kwargs)
        self.opened.append(sock)
        return sock


@dataclass
class ClientIdClaim:
    """A client id, and the lock that keeps it this process's own (see
    :func:`claim_client_id`; ``None`` for an id from the YAML). :meth:`release` at close."""

    client_id: str
    lock: IO[str] | None = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.close()  # the flock goes with it
            self.lock = None


def claim_client_id(name: str) -> ClientIdClaim:
    """The default client id: ``NAME-HOSTNAME``, then ``-2``, ``-3`` … for more processes.

    Stable across restarts, so the persistent session (and what the broker queued for it) is
    found again. Two processes of one integration on one host must not share an id (the broker
    would hand the session back and forth), so each holds an ``flock`` on a file named after its
    id in the temporary directory; the lock goes with the process, and the claim returned here
    must be kept (not released) for as long as the id is in use.
    """
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", os.uname().nodename) or "host"
    base = f"{name}-{host}"
    directory = Path(tempfile.gettempdir()) / f"channels-gateways-{os.getuid()}"
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
    except OSError:
        return ClientIdClaim(base)
    for n in range(1, 100):
        client_id = base if n == 1 else f"{base}-{n}"
        digest = hashlib.sha256(client_id.encode()).hexdigest()[:32]
        try:
            handle = open(directory / f"mqtt-{digest}.lock", "a")  # noqa: SIM115 (kept open)
        except OSError:
            return ClientIdClaim(base)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        return ClientIdClaim(client_id, handle)
    return ClientIdClaim(f"{base}-{secrets.token_hex(4)}")


class MqttListener(ClientListener, Protocol):
    """What the gateway hears from the connection (always on the event loop thread).

    ``client_connected`` gets the ``mqtt.connect`` keys of the base class's event
    (``session_present``, ``protocol``).
    """

    def mqtt_message(self, message: MQTTMessage, generation: int) -> None:
        """A received message; ``generation`` names the connection to acknowledge it on."""


def _readable_now(sock: Any) -> bool:
    """Whether a read would return data now, without waiting for the selector."""
    # TLS (and paho's WebSocket wrapper) may hold decrypted bytes the selector cannot see
    pending = getattr(sock, "pending", None)
    if callable(pending):
        return int(pending()) > 0
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True  # let paho's read see the error and close the connection


class MqttConnection(ReconnectingClient):
    """One MQTT client session on the running event loop; see the module docstring."""

    listener: MqttListener

    def __init__(
        self,
        gateway: Gateway[Any],
        settings: MqttConfig,
        *,
        client_id: str,
        listener: MqttListener,
        events: EventBuffer,
    ) -> None:
        super().__init__(
            gateway,
            server=settings.broker,
            listener=listener,
            events=events,
            backoff=Backoff(settings.reconnect.initial, settings.reconnect.maximum),
            # paho bounds the socket and _connect the CONNACK, each by connect_timeout (their
            # errors say which step failed); this limit only catches a hang beyond both
            connect_timeout=2 * settings.connect_timeout + CLOSE_TIMEOUT,
        )
        self.settings = settings
        self.client_id = client_id
        #: counts sockets; a message is acknowledged on the socket it came from
        self.generation = 0
        #: the broker resumed a session on the current connection
        self.session_present = False
        #: the broker's limits from CONNACK (MQTT 5)
        self.max_qos = 2
        self.retain_available = True
        self.subscription_identifiers = True
        self._client: _PahoClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._fd: int | None = None
        self._writing = False
        self._flush_pending = False
        #: between a successful CONNACK and the socket closing: packets may be sent
        self._session_up = False
        self._close_reason: str | None = None
        self._misc: asyncio.TimerHandle | None = None
        self._connack: asyncio.Future[ReasonCode] | None = None
        self._closed = asyncio.Event()
        self._closed.set()
        #: messages that came with the CONNACK, before the gateway was told (module docstring)
        self._early: list[tuple[MQTTMessage, int]] = []
        self._publishes: dict[int, tuple[asyncio.Future[ReasonCode], int]] = {}
        self._requests: dict[int, asyncio.Future[list[ReasonCode]]] = {}

    # -- set-up -------------------------------------------------------------------------------

    def _tls_context(self, opened: list[socket.socket]) -> ssl.SSLContext:
        tls = self.settings.tls
        assert tls is not None
        # what ssl.create_default_context() does, on a context that tracks its sockets
        context = _TrackingContext(ssl.PROTOCOL_TLS_CLIENT)
        context.opened = opened
        try:
            if tls.ca_file:
                context.load_verify_locations(cafile=tls.ca_file)
            else:
                context.load_default_certs(ssl.Purpose.SERVER_AUTH)
            if tls.cert_file:
                password = tls.key_password.get_secret_value() if tls.key_password else None
                context.load_cert_chain(tls.cert_file, tls.key_file, password=password)
        except (OSError, ssl.SSLError) as exc:
            raise ConnectFailed(f"TLS set-up failed: {describe_error(exc)}", fatal=True) from exc
        if not tls.verify:
            self.log.warning(
                "%s: TLS certificate verification is OFF for %s: anyone on the path can read "
                "and change this connection",
                self.name,
                self.settings.broker,
            )
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def _connect_properties(self) -> Properties | None:
        settings = self.settings
        if not settings.mqtt5:
            return None
        props = new_properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = settings.session_expiry_seconds
        props.ReceiveMaximum = settings.receive_maximum
        # the broker never sends a packet this large (MQTT 5 §3.1.2.11.4): refused at the source
        props.MaximumPacketSize = settings.max_payload + PACKET_OVERHEAD
        return props

    def _make_client(self) -> _PahoClient:
        settings = self.settings
        client = _PahoClient(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=None if settings.mqtt5 else settings.clean_start,
            protocol=MQTTv5 if settings.mqtt5 else MQTTv311,
            transport=settings.transport,
            # else paho calls the blocking reconnect() itself when a 3.1.1 broker refuses
            reconnect_on_failure=False,
            manual_ack=True,
        )
        client.enable_logger(logging.getLogger("gateway.mqtt.paho"))
        client.connect_timeout = settings.connect_timeout
        client.max_inflight_messages_set(settings.max_inflight)
        client.max_queued_messages_set(settings.max_queued)
        if settings.username is not None:
            password = settings.password.get_secret_value() if settings.password else None
            client.username_pw_set(settings.username, password)
        if settings.transport == "websockets":
            client.ws_set_options(
                path=settings.websocket.path, headers=dict(settings.websocket.headers) or None
            )
        if settings.tls is not None:
            client.tls_set_context(self._tls_context(client.opened))
            if not settings.tls.verify:
                client.tls_insecure_set(True)
        if settings.will is not None:
            will = settings.will
            client.will_set(will.topic, will.payload.encode(), will.qos, will.retain)
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_suback
        client.on_unsubscribe = self._on_suback
        if settings.mqtt5:
            clean_start: Any = MQTT_CLEAN_START_FIRST_ONLY if settings.clean_start else False
        else:
            clean_start = MQTT_CLEAN_START_FIRST_ONLY  # 3.1.1: clean_session above decides
        client.connect_async(
            settings.host,
            settings.broker_port,
            settings.keepalive,
            clean_start=clean_start,
            properties=self._connect_properties(),
        )
        return client

    @property
    def client(self) -> _PahoClient:
        if self._client is None:
            raise NotConnected("the connection was never opened")
        return self._client

    def event_keys(self) -> dict[str, Any]:
        return {"broker": self.server, "client_id": self.client_id}

    # -- ReconnectingClient hooks -------------------------------------------------------------

    async def _connect(self) -> Mapping[str, Any]:
        """One attempt: open the socket in a thread, then wait for CONNACK."""
        loop = asyncio.get_running_loop()
        if self._client is None:  # one client for every attempt (see the module docstring)
            self._loop = loop
            self._loop_thread = threading.get_ident()
            self._client = self._make_client()
        self._closed.clear()
        self._close_reason = None
        self._connack = connack = loop.create_future()
        try:
            await self._open_socket(self._client)
            try:
                reason = await asyncio.wait_for(
                    asyncio.shield(connack), self.settings.connect_timeout
                )
            except TimeoutError:
                self._abort("no CONNACK")
                raise ConnectFailed(
                    f"no CONNACK within {self.settings.connect_timeout:g} s"
                ) from None
            except ConnectionLost as exc:
                raise ConnectFailed(str(exc)) from None
        finally:
            self._connack = None
            if self._fd is None:
                self._closed.set()
        if reason.is_failure:
            self._abort("refused")
            name = reason.getName()
            raise ConnectFailed(
                f"the broker refused the connection: {name}",
                fatal=name not in _TRANSIENT_REFUSALS,
            )
        return {"session_present": self.session_present, "protocol": self.settings.protocol}

    async def _wait_lost(self) -> str:
        # the gateway knows of the connection now: what came with the CONNACK goes first
        early, self._early = self._early, []
        for message, generation in early:
            self._deliver(message, generation)
        await self._closed.wait()
        return self._close_reason or "connection closed"

    async def _disconnect(self) -> None:
        """On close: the will if ``will.on_stop``, DISCONNECT; in every case drop the socket."""
        closing = self.state is ClientState.CLOSED
        client = self._client
        if client is not None and self._session_up and closing:
            will = self.settings.will
            if will is not None and will.on_stop:
                with contextlib.suppress(Exception):
                    _, done = self.publish(will.topic, will.payload.encode(), will.qos, will.retain)
                    await asyncio.wait_for(asyncio.shield(done), CLOSE_TIMEOUT)
            if self._session_up:
                client.disconnect()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), CLOSE_TIMEOUT)
        self._abort("connection closed")
        if closing:
            for future, _ in self._publishes.values():
                if not future.done():
                    future.set_exception(ConnectionLost("the gateway stopped"))
                    future.exception()  # retrieved: nobody may be waiting any more
            self._publishes.clear()

    def _hang_up(self, reason: str) -> None:
        """For :meth:`restart`: a clean DISCONNECT, then the base class reconnects at once.

        Reason code 0 keeps the session, and what the broker holds in it, and publishes no
        will; the broker then sends every QoS 1/2 message of the session that was not
        acknowledged again (MQTT 5 §4.4, 3.1.1 §4.4): how the gateway fetches what it left
        with the broker during a stall.
        """
        if self._session_up and self._client is not None:
            self._close_reason = reason
            self._client.disconnect()

    async def _open_socket(self, client: _PahoClient) -> None:
        """DNS, TCP, TLS and WebSocket handshakes, then CONNECT: paho's blocking part."""
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(None, client.reconnect)
        try:
            await asyncio.shield(job)
        except asyncio.CancelledError:
            # the thread cannot be interrupted: let it finish, then drop what it opened
            with contextlib.suppress(Exception):
                await job
            self._abort("gateway stopped")
            raise
        except ssl.SSLCertVerificationError as exc:
            raise ConnectFailed(
                f"TLS: the broker's certificate is not trusted ({exc.verify_message})",
                fatal=True,
            ) from exc
        except ssl.SSLError as exc:
            raise ConnectFailed(f"TLS: {exc.reason or exc}", fatal=True) from exc
        except (OSError, ValueError) as exc:
            raise ConnectFailed(describe_error(exc)) from exc
        finally:
            client.close_strays()

    def _abort(self, reason: str) -> None:
        """Drop the socket without the DISCONNECT handshake."""
        client = self._client
        if client is not None and client.socket() is not None:
            self._close_reason = self._close_reason or reason
            client._sock_close()  # paho has no public call that closes without DISCONNECT

    # -- the socket in the event loop ---------------------------------------------------------

    def _in_loop(self, callback: Callable[..., None], *args: Any) -> None:
        if threading.get_ident() == self._loop_thread:
            callback(*args)
        else:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(callback, *args)

    def _on_socket_open(self, client: Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._watch, sock)

    def _watch(self, sock: Any) -> None:
        current = self._client.socket() if self._client is not None else None
        if current is None or current is not sock:
            return  # already closed again
        assert self._loop is not None
        setsockopt = getattr(current, "setsockopt", None)  # paho's WebSocket wrapper has none
        if setsockopt is not None:
            # small packets (acks, a consumer's publish) leave now, not after the broker's ACK
            with contextlib.suppress(OSError):
                setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.generation += 1
        self._fd = current.fileno()
        self._writing = False
        self._loop.add_reader(self._fd, self._readable)
        self._misc = self._loop.call_later(MISC_INTERVAL, self._run_misc)

    def _on_socket_close(self, client: Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._unwatch, sock.fileno())

    def _unwatch(self, fd: int) -> None:
        if fd != self._fd or self._loop is None:
            return
        self._loop.remove_reader(fd)
        self._loop.remove_writer(fd)
        self._fd = None
        self._writing = False
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None
        self._session_up = False
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(ConnectionLost(self._close_reason or "connection closed"))
        lost = ConnectionLost("the connection closed before the broker answered")
        for future in self._requests.values():
            if not future.done():
                future.set_exception(lost)
                future.exception()
        self._requests.clear()
        for mid, (sent, qos) in list(self._publishes.items()):
            if qos == 0:  # paho resends QoS 1/2 after a reconnect, but drops QoS 0
                del self._publishes[mid]
                if not sent.done():
                    sent.set_exception(lost)
                    sent.exception()
        self._closed.set()

    def _on_register_write(self, client: Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._want_write, sock.fileno())

    def _want_write(self, fd: int) -> None:
        # write on the next loop pass rather than through the selector: the socket is almost
        # always writable, and the acks of one pass leave together without two epoll_ctl calls
        if fd == self._fd and not self._writing and not self._flush_pending and self._loop:
            self._flush_pending = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        fd = self._fd
        if fd is None or self._writing or self._loop is None:
            return
        self._writable()
        if fd == self._fd and not self._writing and self.client.want_write():
            self._loop.add_writer(fd, self._writable)  # the kernel buffer is full: wait for it
            self._writing = True

    def _on_unregister_write(self, client: Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._done_writing, sock.fileno())

    def _done_writing(self, fd: int) -> None:
        if fd == self._fd and self._writing and self._loop is not None:
            self._loop.remove_writer(fd)
            self._writing = False

    def _readable(self) -> None:
        # Never paused: the gateway's own pushback must not keep PINGRESP unread (a stalled
        # layer once stopped the reading, the keep-alive expired, and the reconnect threw the
        # session and every unacknowledged message away). The gateway bounds what it holds.
        client = self.client
        try:
            # paho reads one packet per call; read on while the socket has more, so a burst
            # costs one selector round instead of one per message
            for _ in range(READ_BATCH):
                rc = client.loop_read()
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    self._close_reason = self._close_reason or error_string(rc).rstrip(".")
                    return
                sock = client.socket()
                if sock is None or not _readable_now(sock):
                    return
            assert self._loop is not None
            self._loop.call_soon(self._readable)  # let other work run, then go on
        except Exception:
            self.log.exception("%s: error while reading from the broker", self.name)
            self._abort("internal error while reading")

    def _writable(self) -> None:
        try:
            rc = self.client.loop_write()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._close_reason = self._close_reason or error_string(rc).rstrip(".")
        except Exception:
            self.log.exception("%s: error while writing to the broker", self.name)
            self._abort("internal error while writing")

    def _run_misc(self) -> None:
        self._misc = None
        if self._fd is None:
            return
        try:
            self.client.loop_misc()
        except Exception:
            self.log.exception("%s: error in the keep-alive timer", self.name)
            self._abort("internal error in the keep-alive timer")
        if self._fd is not None and self._loop is not None:
            self._misc = self._loop.call_later(MISC_INTERVAL, self._run_misc)

    # -- paho callbacks -----------------------------------------------------------------------

    def _on_connect(
        self,
        client: Client,
        userdata: Any,
        flags: ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if self._connack is not None and not self._connack.done():
            self._connack.set_result(reason)
        if reason.is_failure:
            return
        self._session_up = True
        self.session_present = bool(flags.session_present)
        if properties is not None:
            self.max_qos = int(getattr(properties, "MaximumQoS", 2))
            self.retain_available = bool(getattr(properties, "RetainAvailable", 1))
            self.subscription_identifiers = bool(
                getattr(properties, "SubscriptionIdentifierAvailable", 1)
            )

    def _on_disconnect(
        self,
        client: Client,
        userdata: Any,
        flags: DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if flags.is_disconnect_packet_from_server:
            self._close_reason = f"the broker disconnected us: {reason.getName()}"
        elif reason.getName() == "Keep alive timeout":
            self._close_reason = "no answer from the broker within the keep-alive interval"
        elif self._close_reason is None and reason.is_failure:
            self._close_reason = "connection lost"

    def _on_message(self, client: Client, userdata: Any, message: MQTTMessage) -> None:
        if self.state is ClientState.CONNECTING or self._early:
            self._early.append((message, self.generation))  # after the CONNACK: see _wait_lost
        else:
            self._deliver(message, self.generation)

    def _deliver(self, message: MQTTMessage, generation: int) -> None:
        try:
            self.listener.mqtt_message(message, generation)
        except Exception:
            topic = clip(topic_of(message))
            self.log.exception("%s: error handling a message on %s", self.name, topic)

    def _on_publish(
        self,
        client: Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        entry = self._publishes.pop(mid, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result(reason)

    def _on_suback(
        self,
        client: Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        future = self._requests.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(list(reasons))

    # -- operations ---------------------------------------------------------------------------

    def _future(self) -> asyncio.Future[Any]:
        assert self._loop is not None
        return self._loop.create_future()

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> tuple[int, asyncio.Future[ReasonCode]]:
        """Send a PUBLISH; the future resolves with the PUBACK/PUBCOMP reason (QoS 0: written).

        Raises :class:`NotConnected` or :class:`QueueFull`.
        """
        if not self._session_up:
            raise NotConnected(self.last_error or "not connected")
        info = self.client.publish(topic, payload, qos, retain, properties)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise QueueFull(f"{self.settings.max_queued} messages already wait for the broker")
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise NotConnected(error_string(info.rc))
        future: asyncio.Future[ReasonCode] = self._future()
        self._publishes[info.mid] = (future, qos)
        return info.mid, future

    def subscribe(
        self,
        filter_: str,
        qos: int,
        *,
        identifier: int | None = None,
        no_local: bool = False,
        retain_as_published: bool = False,
        retain_handling: int = 0,
    ) -> asyncio.Future[list[ReasonCode]]:
        """Send one SUBSCRIBE; the future resolves with the SUBACK reason codes."""
        if not self._session_up:
            raise NotConnected(self.last_error or "not connected")
        client = self.client
        if self.settings.mqtt5:
            options = SubscribeOptions(qos, no_local, retain_as_published, retain_handling)
            props = None
            if identifier is not None and self.subscription_identifiers:
                props = new_properties(PacketTypes.SUBSCRIBE)
                props.SubscriptionIdentifier = identifier
            rc, mid = client.subscribe(filter_, options=options, properties=props)
        else:
            rc, mid = client.subscribe(filter_, qos)
        return self._request(rc, mid)

    def unsubscribe(self, filter_: str) -> asyncio.Future[list[ReasonCode]]:
        """Send one UNSUBSCRIBE; the future resolves with the UNSUBACK reason codes."""
        if not self._session_up:
            raise NotConnected(self.last_error or "not connected")
        rc, mid = self.client.unsubscribe(filter_)
        return self._request(rc, mid)

    def _request(self, rc: MQTTErrorCode, mid: int | None) -> asyncio.Future[list[ReasonCode]]:
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise NotConnected(error_string(rc))
        future: asyncio.Future[list[ReasonCode]] = self._future()
        self._requests[mid] = future
        return future

    def ack(self, mid: int, qos: int, generation: int) -> bool:
        """Acknowledge a received QoS 1/2 message; ``False`` if it can no longer be."""
        if qos == 0 or not self._session_up:
            return False
        if generation != self.generation and not (qos == 2 and self.session_present):
            return False  # the broker redelivers it on this connection, with its own ack
        return self.client.ack(mid, qos) == MQTTErrorCode.MQTT_ERR_SUCCESS
