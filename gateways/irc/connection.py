"""The only I/O of the IRC gateway: the ``irc`` library's asyncio connection, kept up by core.

How the two fit together: :class:`IrcConnection` is a :class:`core.client.ReconnectingClient`
(backoff, watchdog, ``irc.connect`` / ``irc.disconnect``, readiness) whose ``_connect`` hook
builds a fresh ``irc.client_aio`` reactor and connection for every attempt. The library does the
socket (its asyncio ``Protocol``), parsing (tags, prefix, numerics → named events, CTCP), PING
answers and the ``send_raw`` checks (no newline, 512 bytes). What the library's
``AioConnection`` does not do is done here instead of it:

* **Capability negotiation first.** ``connect()`` sends ``NICK``/``USER`` at once, so a server
  completes registration before a ``CAP LS`` that follows could suspend it. :meth:`_Connection.
  open` opens the transport the same way, then sends ``CAP LS 302`` before ``PASS``/``NICK``/
  ``USER`` (IRCv3 capability negotiation), then SASL (PLAIN, EXTERNAL) on the ACK. The server's
  ``CAP LS`` is bounded (:data:`MAX_CAP_LINES` lines, :data:`MAX_CAPS` capabilities; issue 21,
  item 3: an endless continuation took 1.8 GB in 20 s).
* **Reading is paced and pushed back** (issue 21, item 5). The library parsed a whole read
  (up to 256 KiB, thousands of lines) in one callback and read on while the event buffer
  overflowed. Here lines are split off the socket data, at most :data:`LINES_PER_TURN` are
  handled per turn of the event loop, and reading from the socket pauses while lines wait for
  their turn and while the gateway's event buffer is full: TCP pushes the server back, no event
  is dropped for want of room, and the loop answers /healthz in between.
* **Lines that are not UTF-8** are decoded with the configured fallback, counted, never dropped
  (the library's default buffer raises ``UnicodeDecodeError`` out of ``data_received``).
* **One bad line never kills the connection**: a line the library cannot parse is logged (once
  per :data:`core.logs.RepeatFilter` interval, with a count), counted and skipped; an
  unterminated line over :data:`MAX_PENDING_BYTES` drops the connection instead of memory.
* **A server that does not read is dropped** (issue 21, item 2: the library writes a PONG per
  PING into an unbounded buffer, 58 → 639 MB in 40 s). Above :data:`WRITE_HIGH_WATER` bytes
  unsent, the gateway's own lines wait and ``/readyz`` says so; above :data:`MAX_WRITE_BUFFER`
  the connection is dropped, logged, counted and reconnected with a backoff its length does not
  reset.
* **Secrets stay out of the logs** (issue 21, item 15): every line is written here, not by the
  library's ``send_raw`` (which logs it raw at DEBUG: the SASL payload is the password in
  base64); the DEBUG line shows it through :func:`translate.loggable`, and the payload is
  registered for redaction as well.

The library's rate limiter is never used (it sleeps); the gateway paces with :mod:`core.pacer`.
Facts go to the gateway through :class:`IrcListener`; the gateway decides (rejoin, reclaim).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from collections.abc import Awaitable, Mapping
from typing import Any, Final, Protocol

from irc.client import Event, ServerNotConnectedError
from irc.client_aio import AioConnection, AioReactor, IrcProtocol
from irc.connection import AioFactory

from core.client import ConnectFailed, ReconnectingClient
from core.logs import clip, register_secret
from core.retry import Backoff, describe_error
from core.service import EventBuffer, Gateway
from gateways.irc.config import IrcConfig
from gateways.irc.translate import (
    cap_request,
    casemapping,
    default_username,
    loggable,
    nick_candidates,
    parse_cap_ls,
    refused_for_configuration,
    same_nick,
    sasl_payload,
)

__all__ = [
    "LINES_PER_TURN",
    "MAX_CAPS",
    "MAX_CAP_LINES",
    "MAX_PENDING_BYTES",
    "MAX_WRITE_BUFFER",
    "WRITE_HIGH_WATER",
    "IrcConnection",
    "IrcListener",
    "NotConnected",
]

#: an unterminated line longer than this ends the connection (tags 8 KiB + 512 is the legal most)
MAX_PENDING_BYTES: Final = 64 * 1024
#: lines handled in one turn of the event loop; the rest wait for the next turn, reading paused
LINES_PER_TURN: Final = 100
#: bytes sent but not yet taken by the server above which our own lines wait (asyncio's
#: write flow control) and /readyz is red
WRITE_HIGH_WATER: Final = 64 * 1024
#: bytes sent but not yet taken by the server above which the connection is dropped
MAX_WRITE_BUFFER: Final = 1024 * 1024
#: CAP LS lines (302 continuations) and capabilities one registration takes at most
MAX_CAP_LINES: Final = 32
MAX_CAPS: Final = 512
#: how many nicks registration tries before giving up (nick, alternates, nick1, nick2, …)
NICK_TRIES: Final = 10
_SASL_FAILED = {"saslfail", "sasltoolong", "saslaborted", "nicklocked"}
_NICK_TAKEN = {"nicknameinuse", "nickcollision", "unavailresource", "erroneusnickname"}
_REFUSED = {"passwdmismatch": "server password refused", "yourebannedcreep": "banned from server"}
#: ERR_INVALIDUSERNAME (InspIRCd: "Your username is not valid"); the library has no name for it
_BAD_USERNAME = "468"


class NotConnected(Exception):
    """A line could not be written: there is no connection now."""


class IrcListener(Protocol):
    """What the gateway hears from its connection (on the event loop)."""

    def irc_event(self, event: Event) -> None:
        """One parsed event of a registered connection (the library's ``Event``)."""

    def irc_undecodable(self) -> None:
        """A line was not UTF-8 and was decoded with the fallback encoding."""


class _Protocol(IrcProtocol):  # type: ignore[misc]
    """The library's protocol, telling its connection when the server stops taking our data."""

    connection: _Connection

    def pause_writing(self) -> None:
        self.connection.owner._writing(self.connection, paused=True)

    def resume_writing(self) -> None:
        self.connection.owner._writing(self.connection, paused=False)


class _Connection(AioConnection):  # type: ignore[misc]
    """The library's asyncio connection with our opening sequence, reader and writer."""

    owner: IrcConnection
    protocol_class = _Protocol

    async def open(self, settings: IrcConfig, nick: str, context: ssl.SSLContext | None) -> None:
        # the attributes AioConnection.connect sets, without its immediate NICK/USER
        self.handlers: dict[str, Any] = {}
        self.real_server_name = ""
        self.real_nickname = nick
        self.server, self.port = settings.server, settings.server_port
        self.server_address = (self.server, self.port)
        self.nickname = nick
        self.username = settings.username or default_username(nick)
        self.ircname = settings.realname or nick
        self.password = settings.password
        #: complete lines not handled yet, and the unterminated rest of the last read
        self.pending: deque[bytes] = deque()
        self._partial = b""
        #: reading is paused (lines wait for their turn, or for room in the event buffer)
        self.holding = False
        self.ended = False
        self._turn: asyncio.Handle | None = None
        self._waiting: asyncio.Task[None] | None = None
        factory = AioFactory(ssl=context, server_hostname=settings.server if context else None)
        self.transport, self.protocol = await factory(
            self.protocol_class(self, self.reactor.loop), self.server_address
        )
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.connected = True

    # -- reading ------------------------------------------------------------------------------

    def process_data(self, new_data: bytes) -> None:
        if self.ended:
            return
        self.owner.heard()
        data = self._partial + new_data if self._partial else new_data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        self.pending.extend(lines)
        if len(self._partial) > MAX_PENDING_BYTES:
            self.owner._misbehaving(
                "line_too_long", f"the server sent a line over {MAX_PENDING_BYTES} bytes"
            )
            return
        if self._turn is None and self._waiting is None:
            self._work()

    def _work(self) -> None:
        """Handle up to LINES_PER_TURN lines; pause reading while any wait."""
        self._turn = None
        owner = self.owner
        handled = 0
        while self.pending and not self.ended:
            if handled >= LINES_PER_TURN:
                self._hold()
                self._turn = self.reactor.loop.call_soon(self._work)
                return
            if owner.events.full:
                self._hold()
                owner.gateway.metrics.pushback.inc()
                self._waiting = self.reactor.loop.create_task(self._wait(owner.events.wait_room()))
                return
            if owner.announcing:
                # welcomed, but irc.connect is not out yet: the events of this connection
                # follow it, they do not overtake it
                self._hold()
                self._waiting = self.reactor.loop.create_task(
                    self._wait(owner.wait_connected(owner.connect_timeout))
                )
                return
            raw = self.pending.popleft()
            handled += 1
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            if not raw:
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                owner.listener.irc_undecodable()
                line = raw.decode(owner.settings.fallback_encoding, "replace")
            if owner.debug:
                owner.log.debug("%s: ← %s", owner.name, clip(line, 600))
            try:
                self._process_line(line)
            except Exception as exc:  # the library fails on some malformed lines
                owner.bad_line(line, exc)
        if not self.ended:
            self._release()

    async def _wait(self, condition: Awaitable[None]) -> None:
        try:
            await condition
        except TimeoutError:
            pass  # the attempt failed: ended by now, or handled below as usual
        finally:
            self._waiting = None
        if not self.ended:
            self._work()

    def _hold(self) -> None:
        if not self.holding:
            self.holding = True
            with contextlib.suppress(Exception):
                self.transport.pause_reading()

    def _release(self) -> None:
        if self.holding:
            self.holding = False
            with contextlib.suppress(Exception):
                self.transport.resume_reading()

    # -- writing and closing ------------------------------------------------------------------

    def send_raw(self, string: str) -> None:
        """Write one line (the library's checks), never through the library's raw logger."""
        transport = getattr(self, "transport", None)
        if transport is None or self.ended or transport.is_closing():
            raise ServerNotConnectedError("Not connected.")
        transport.write(self._prep_message(string))
        owner = self.owner
        if owner.debug:
            owner.log.debug("%s: → %s", owner.name, loggable(string))
        waiting = transport.get_write_buffer_size()
        if waiting > MAX_WRITE_BUFFER:
            owner._misbehaving(
                "write_buffer_full",
                f"the server does not read what we send: {waiting} bytes waiting "
                f"(limit {MAX_WRITE_BUFFER})",
            )

    def end(self) -> None:
        """Stop handling lines (the connection is being dropped or was lost)."""
        if not self.ended and self.pending:
            # read while we held back, never handled: counted, as lines a lost connection
            # leaves in the kernel are not (we cannot see those)
            left = sum(1 for line in self.pending if line.strip())
            self.owner.gateway.metrics.dropped("connection_lost", left)
            self.owner.log.info(
                "%s: %d line(s) read from the server were not handled before the connection ended",
                self.owner.name,
                left,
            )
        self.ended = True
        self.pending.clear()
        if self._turn is not None:
            self._turn.cancel()
            self._turn = None
        if self._waiting is not None:
            self._waiting.cancel()
            self._waiting = None

    def disconnect(self, message: str = "") -> None:
        try:
            del self.connected
        except AttributeError:
            return
        with contextlib.suppress(Exception):
            self.quit(message)  # not once the transport is closing (an abort)
        self.end()
        self.transport.close()
        self._handle_event(Event("disconnect", self.server, "", [message]))


class _Reactor(AioReactor):  # type: ignore[misc]
    connection_class = _Connection


class IrcConnection(ReconnectingClient):
    """One IRC identity on one server; see the module docstring."""

    listener: IrcListener  # type: ignore[assignment]

    def __init__(
        self,
        gateway: Gateway[Any],
        settings: IrcConfig,
        *,
        listener: Any,
        events: EventBuffer,
    ) -> None:
        super().__init__(
            gateway,
            server=settings.address,
            listener=listener,
            events=events,
            backoff=Backoff(settings.reconnect.initial, settings.reconnect.maximum),
            connect_timeout=settings.connect_timeout,
            idle_timeout=settings.idle_timeout,
        )
        self.settings = settings
        #: the nick registration asks for first, and the gateway reclaims: the YAML's until an
        #: ``irc.nick`` sets another (issue 21, item 7: it survives reconnects)
        self.wanted_nick = settings.nick
        #: ``user@host`` the server shows for us, once seen (for the 512-byte budget)
        self.userhost: str | None = None
        #: capabilities the server acknowledged on this connection
        self.caps: set[str] = set()
        #: whether DEBUG lines are wanted (checked once per line, so cached per connection)
        self.debug = False
        self._conn: _Connection | None = None
        self._lost_reason: asyncio.Future[str] | None = None
        self._welcome: asyncio.Future[str] | None = None
        self._error: str | None = None
        self._offered: dict[str, str] = {}
        self._cap_lines = 0
        self._sasl_sent = False
        self._nicks: list[str] = []
        self._write_ok = asyncio.Event()
        self._write_ok.set()
        self._context = self._tls_context() if settings.tls is not None else None
        sasl = settings.sasl
        if sasl is not None and sasl.password is not None:
            # the payload is the password in base64: redacted like the password itself
            user = sasl.username or settings.nick
            chunks = sasl_payload(sasl.mechanism, user, sasl.password.get_secret_value())
            for secret in (*chunks, "".join(chunks)):
                register_secret(secret)
        # the library logs every line it sends (raw) and receives at DEBUG; we write the lines
        # ourselves, and log them with secrets masked
        for name in ("irc.client", "irc.client_aio"):
            logging.getLogger(name).setLevel(logging.INFO)

    def _tls_context(self) -> ssl.SSLContext:
        tls = self.settings.tls
        assert tls is not None
        context = ssl.create_default_context(cafile=tls.ca_file)
        if tls.cert_file:
            context.load_cert_chain(tls.cert_file, tls.key_file)
        if not tls.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    # -- what the gateway uses ----------------------------------------------------------------

    @property
    def nick(self) -> str:
        """Our nick on the current connection (the wanted one before the first)."""
        if self._conn is not None and self._conn.real_nickname:
            return str(self._conn.real_nickname)
        return self.wanted_nick

    @property
    def announcing(self) -> bool:
        """Registered (001 seen), but ``irc.connect`` not put yet."""
        welcome = self._welcome
        return (
            welcome is not None
            and welcome.done()
            and not welcome.cancelled()
            and welcome.exception() is None
            and not self.connected
        )

    @property
    def casemapping(self) -> str:
        """The server's CASEMAPPING (ISUPPORT), ``rfc1459`` until it said (or if unknown)."""
        if self._conn is None:
            return "rfc1459"
        return casemapping(getattr(self._conn.features, "casemapping", None))

    def readiness(self) -> list[str]:
        reasons = super().readiness()
        conn = self._conn
        if not reasons and conn is not None and not self._write_ok.is_set():
            waiting = conn.transport.get_write_buffer_size()
            reasons.append(f"{self.server} does not read what we send ({waiting} bytes waiting)")
        return reasons

    async def writable(self) -> None:
        """Return once the server takes what we send (at once while it does)."""
        await self._write_ok.wait()

    def send(self, line: str) -> None:
        """Write one line now (the caller paces); :class:`NotConnected` without a connection."""
        if self._conn is None or not self.connected:
            raise NotConnected(f"not connected to {self.server}")
        try:
            self._conn.send_raw(line)
        except ServerNotConnectedError:
            raise NotConnected(f"not connected to {self.server}") from None

    def bad_line(self, line: str, exc: Exception) -> None:
        self.gateway.metrics.error("bad_line")
        self.log.warning(
            "%s: skipped a line the IRC library could not parse (%s): %s",
            self.name,
            describe_error(exc),
            clip(line),
            extra={"repeat": f"{self.name}:bad_line"},
        )

    def event_keys(self) -> dict[str, Any]:
        # irc.connect / irc.disconnect carry this process's channel, as every IRC event does
        return {"server": self.server, "reply_channel": self.gateway.reply_channel}

    # -- ReconnectingClient hooks -------------------------------------------------------------

    async def _connect(self) -> Mapping[str, Any]:
        loop = asyncio.get_running_loop()
        reactor = _Reactor(loop=loop)
        reactor.add_global_handler("all_events", self._on_event, -10)
        conn: _Connection = reactor.server()
        conn.owner = self
        self._conn = conn
        self._lost_reason = loop.create_future()
        self._welcome = loop.create_future()
        self._error = None
        self._offered = {}
        self._cap_lines = 0
        self._sasl_sent = False
        self._write_ok.set()
        self.caps = set()
        self.userhost = None
        self.debug = self.log.isEnabledFor(logging.DEBUG)
        settings = self.settings
        nick = self.wanted_nick
        self._nicks = nick_candidates(nick, settings.alternates, NICK_TRIES)
        try:
            await conn.open(settings, nick, self._context)
        except ssl.SSLCertVerificationError as exc:
            raise ConnectFailed(f"TLS: {exc.verify_message or exc}", fatal=True) from None
        if settings.capabilities or settings.sasl is not None:
            conn.send_raw("CAP LS 302")
        if settings.password is not None:
            conn.pass_(settings.password.get_secret_value())
        conn.nick(nick)
        conn.user(conn.username, conn.ircname)
        registered = await asyncio.shield(self._welcome)
        if settings.nickserv_password is not None and settings.sasl is None:
            secret = settings.nickserv_password.get_secret_value()
            try:
                conn.privmsg("NickServ", f"IDENTIFY {secret}")
            except ServerNotConnectedError:
                raise ConnectFailed(self._error or "connection lost after registration") from None
        return {"nick": registered, "capabilities": sorted(self.caps)}

    async def _wait_lost(self) -> str:
        assert self._lost_reason is not None
        return await asyncio.shield(self._lost_reason)

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        self._write_ok.set()  # a sender waiting for it finds no connection instead
        if conn is not None:
            # QUIT, then the transport is closed once what is buffered was written
            with contextlib.suppress(Exception):
                conn.disconnect("gateway stopped")

    async def _probe(self) -> None:
        conn = self._conn
        if conn is None:
            return
        if conn.holding:
            # we stopped reading, the server did not stop talking: lines wait to be handled
            self.heard()
            return
        conn.send_raw("PING :keepalive")

    def _abort(self, reason: str) -> None:
        self._resolve_lost(reason)
        conn = self._conn
        if conn is not None:
            conn.end()
            if getattr(conn, "transport", None) is not None:
                conn.transport.abort()

    def _misbehaving(self, kind: str, reason: str) -> None:
        """Drop the connection because the server broke a limit: logged, counted, and the
        backoff before the reconnect is not reset by how long the connection lasted."""
        self.gateway.metrics.error(kind)
        self.misbehaved()
        self.log.warning("%s: %s; dropping the connection", self.name, reason)
        self._abort(reason)

    def _writing(self, conn: _Connection, *, paused: bool) -> None:
        if conn is not self._conn:
            return
        if paused:
            self._write_ok.clear()
        else:
            self._write_ok.set()

    # -- events ---------------------------------------------------------------------------------

    def _resolve_lost(self, reason: str) -> None:
        if self._lost_reason is not None and not self._lost_reason.done():
            self._lost_reason.set_result(reason)
        if self._welcome is not None and not self._welcome.done():
            self._welcome.set_exception(ConnectFailed(reason))

    def _fail(self, message: str, *, fatal: bool) -> None:
        if self._welcome is not None and not self._welcome.done():
            self._welcome.set_exception(ConnectFailed(message, fatal=fatal))

    def _on_event(self, conn: _Connection, event: Event) -> None:
        if conn is not self._conn:
            return  # a connection we already left
        kind = event.type
        if kind == "all_raw_messages":
            return
        if kind == "disconnect":
            self._resolve_lost(self._error or "connection closed by the server")
            return
        if kind == "error":
            text = str(event.target)
            self._error = f"server said: {text}"
            registering = self._welcome is not None and not self._welcome.done()
            if registering and refused_for_configuration(text):
                self._fail(f"the server refused the registration: {text}", fatal=True)
            return
        if kind == "nick" and conn.real_nickname != event.target:
            # the library renames us only when the source matches our nick exactly
            mapping = self.casemapping
            source = event.source.nick if event.source else None
            if source is not None and same_nick(source, conn.real_nickname, mapping):
                conn.real_nickname = event.target
        if self._welcome is not None and not self._welcome.done():
            self._registering(conn, event)
            return
        if kind == "join" and event.source.nick == conn.real_nickname and event.source.userhost:
            self.userhost = event.source.userhost
        self.listener.irc_event(event)

    def _registering(self, conn: _Connection, event: Event) -> None:
        settings, kind = self.settings, event.type
        if kind == "welcome":
            assert self._welcome is not None
            self._welcome.set_result(str(event.target))
        elif kind == "cap":
            self._cap(conn, [str(a) for a in event.arguments])
        elif kind == "authenticate" and settings.sasl is not None and not self._sasl_sent:
            self._sasl_sent = True  # once: a server asking again gets no second copy
            sasl = settings.sasl
            password = sasl.password.get_secret_value() if sasl.password else ""
            user = sasl.username or settings.nick
            for chunk in sasl_payload(sasl.mechanism, user, password):
                conn.send_raw(f"AUTHENTICATE {chunk}")
        elif kind == "saslsuccess":
            conn.send_raw("CAP END")
        elif kind in _SASL_FAILED:
            text = event.arguments[-1] if event.arguments else kind
            mechanism = settings.sasl.mechanism if settings.sasl else "?"
            self._fail(f"SASL {mechanism} refused by the server: {text}", fatal=True)
        elif kind in _NICK_TAKEN:
            tried = conn.real_nickname
            if tried in self._nicks and self._nicks.index(tried) + 1 < len(self._nicks):
                following = self._nicks[self._nicks.index(tried) + 1]
                self.log.warning(
                    "%s: nick %s is not available (%s); trying %s",
                    self.name,
                    tried,
                    kind,
                    following,
                )
                conn.real_nickname = following
                conn.nick(following)
            else:
                self._fail(f"no usable nick (tried {', '.join(self._nicks)})", fatal=False)
        elif kind in _REFUSED:
            self._fail(_REFUSED[kind], fatal=True)
        elif kind == _BAD_USERNAME:
            text = event.arguments[-1] if event.arguments else "invalid user name"
            self._fail(
                f"the server refused the user name {conn.username!r}: {text} (irc.username)",
                fatal=True,
            )

    def _cap(self, conn: _Connection, args: list[str]) -> None:
        sasl = self.settings.sasl
        sub = args[0].upper() if args else ""
        if sub == "LS":
            more, caps = parse_cap_ls(args)
            self._cap_lines += 1
            self._offered.update(caps)
            if self._cap_lines > MAX_CAP_LINES or len(self._offered) > MAX_CAPS:
                self._misbehaving(
                    "cap_flood",
                    f"the server's CAP LS goes on past {MAX_CAP_LINES} lines or "
                    f"{MAX_CAPS} capabilities",
                )
                return
            if more:
                return
            wanted = cap_request(
                self._offered, self.settings.capabilities, sasl.mechanism if sasl else None
            )
            if sasl is not None and "sasl" not in wanted:
                self._fail("SASL is configured but the server does not offer it", fatal=True)
                return
            if wanted:
                conn.send_raw(f"CAP REQ :{' '.join(wanted)}")
            else:
                conn.send_raw("CAP END")
        elif sub == "ACK":
            self.caps.update(args[-1].split())
            if sasl is not None and "sasl" in self.caps:
                conn.send_raw(f"AUTHENTICATE {sasl.mechanism}")
            else:
                conn.send_raw("CAP END")
        elif sub == "NAK":
            if sasl is not None:
                self._fail("the server refused the SASL capability", fatal=True)
            else:
                conn.send_raw("CAP END")
