"""The only I/O of the IRC gateway: the ``irc`` library's asyncio connection, kept up by core.

How the two fit together: :class:`IrcConnection` is a :class:`core.client.ReconnectingClient`
(backoff, watchdog, ``irc.connect`` / ``irc.disconnect``, readiness) whose ``_connect`` hook
builds a fresh ``irc.client_aio`` reactor and connection for every attempt. The library does the
socket (its asyncio ``Protocol``), line splitting, parsing (tags, prefix, numerics → named
events, CTCP), PING answers and the ``send_raw`` checks (no newline, 512 bytes). Three things
the library's ``AioConnection.connect`` does not do are done here instead of it:

* **Capability negotiation first.** ``connect()`` sends ``NICK``/``USER`` at once, so a server
  completes registration before a ``CAP LS`` that follows could suspend it. :meth:`_Connection.
  open` opens the transport the same way, then sends ``CAP LS 302`` before ``PASS``/``NICK``/
  ``USER`` (IRCv3 capability negotiation), then SASL (PLAIN, EXTERNAL) on the ACK.
* **Lines that are not UTF-8** are decoded with the configured fallback, counted, never dropped
  (the library's default buffer raises ``UnicodeDecodeError`` out of ``data_received``).
* **One bad line never kills the connection**: a line the library cannot parse is logged,
  counted and skipped; an unterminated line over 64 KiB drops the connection instead of memory.

The library's rate limiter is never used (it sleeps); the gateway paces with :mod:`core.pacer`.
Facts go to the gateway through :class:`IrcListener`; the gateway decides (rejoin, reclaim).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterator, Mapping
from typing import Any, Final, Protocol

from irc.client import Event, ServerNotConnectedError
from irc.client_aio import AioConnection, AioReactor
from irc.connection import AioFactory
from jaraco.stream.buffer import LineBuffer

from core.client import ConnectFailed, ReconnectingClient
from core.service import Backoff, EventBuffer, Gateway, describe_error
from gateways.irc.config import IrcConfig
from gateways.irc.translate import cap_request, nick_candidates, parse_cap_ls, sasl_payload

__all__ = ["IrcConnection", "IrcListener", "NotConnected"]

#: an unterminated line longer than this ends the connection (tags 8 KiB + 512 is the legal most)
MAX_PENDING_BYTES: Final = 64 * 1024
#: how many nicks registration tries before giving up (nick, alternates, nick1, nick2, …)
NICK_TRIES: Final = 10
_SASL_FAILED = {"saslfail", "sasltoolong", "saslaborted", "nicklocked"}
_NICK_TAKEN = {"nicknameinuse", "nickcollision", "unavailresource", "erroneusnickname"}
_REFUSED = {"passwdmismatch": "server password refused", "yourebannedcreep": "banned from server"}


class NotConnected(Exception):
    """A line could not be written: there is no connection now."""


class IrcListener(Protocol):
    """What the gateway hears from its connection (on the event loop)."""

    def irc_event(self, event: Event) -> None:
        """One parsed event of a registered connection (the library's ``Event``)."""

    def irc_undecodable(self) -> None:
        """A line was not UTF-8 and was decoded with the fallback encoding."""


class _Buffer(LineBuffer):  # type: ignore[misc]
    """UTF-8 lines; the rest decoded with ``fallback`` and reported (never raises)."""

    def __init__(self, fallback: str, report: Any) -> None:
        super().__init__()
        self.fallback = fallback
        self.report = report

    def lines(self) -> Iterator[str]:
        for line in super().lines():
            try:
                yield line.decode("utf-8")
            except UnicodeDecodeError:
                self.report()
                yield line.decode(self.fallback, "replace")


class _Connection(AioConnection):  # type: ignore[misc]
    """The library's asyncio connection with our opening sequence and a sturdier reader."""

    owner: IrcConnection

    async def open(self, settings: IrcConfig, context: ssl.SSLContext | None) -> None:
        # the attributes AioConnection.connect sets, without its immediate NICK/USER
        self.buffer = _Buffer(settings.fallback_encoding, self.owner.listener.irc_undecodable)
        self.handlers: dict[str, Any] = {}
        self.real_server_name = ""
        self.real_nickname = settings.nick
        self.server, self.port = settings.server, settings.server_port
        self.server_address = (self.server, self.port)
        self.nickname = settings.nick
        self.username = settings.username or settings.nick
        self.ircname = settings.realname or settings.nick
        self.password = settings.password
        factory = AioFactory(ssl=context, server_hostname=settings.server if context else None)
        self.transport, self.protocol = await factory(
            self.protocol_class(self, self.reactor.loop), self.server_address
        )
        self.connected = True

    def process_data(self, new_data: bytes) -> None:
        self.owner.heard()
        self.buffer.feed(new_data)
        for line in self.buffer:
            if not line:
                continue
            try:
                self._process_line(line)
            except Exception as exc:  # the library fails on some malformed lines
                self.owner.bad_line(line, exc)
        if len(self.buffer) > MAX_PENDING_BYTES:
            self.owner._abort(f"the server sent a line over {MAX_PENDING_BYTES} bytes")


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
        #: ``user@host`` the server shows for us, once seen (for the 512-byte budget)
        self.userhost: str | None = None
        #: capabilities the server acknowledged on this connection
        self.caps: set[str] = set()
        self._conn: _Connection | None = None
        self._lost_reason: asyncio.Future[str] | None = None
        self._welcome: asyncio.Future[str] | None = None
        self._error: str | None = None
        self._offered: dict[str, str] = {}
        self._nicks: list[str] = []
        self._context = self._tls_context() if settings.tls is not None else None

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
        """Our nick on the current connection (the configured one before the first)."""
        if self._conn is not None and self._conn.real_nickname:
            return str(self._conn.real_nickname)
        return self.settings.nick

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
            "%s: skipped a line the IRC library could not parse (%s): %.200r",
            self.name,
            describe_error(exc),
            line,
        )

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
        self.caps = set()
        self.userhost = None
        settings = self.settings
        self._nicks = nick_candidates(settings.nick, settings.alternates, NICK_TRIES)
        try:
            await conn.open(settings, self._context)
        except ssl.SSLCertVerificationError as exc:
            raise ConnectFailed(f"TLS: {exc.verify_message or exc}", fatal=True) from None
        if settings.capabilities or settings.sasl is not None:
            conn.send_raw("CAP LS 302")
        if settings.password is not None:
            conn.pass_(settings.password.get_secret_value())
        conn.nick(settings.nick)
        conn.user(conn.username, conn.ircname)
        nick = await asyncio.shield(self._welcome)
        if settings.nickserv_password is not None and settings.sasl is None:
            secret = settings.nickserv_password.get_secret_value()
            conn.privmsg("NickServ", f"IDENTIFY {secret}")
        return {"nick": nick, "capabilities": sorted(self.caps)}

    async def _wait_lost(self) -> str:
        assert self._lost_reason is not None
        return await asyncio.shield(self._lost_reason)

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            # QUIT, then the transport is closed once what is buffered was written
            with contextlib.suppress(Exception):
                conn.disconnect("gateway stopped")

    async def _probe(self) -> None:
        if self._conn is not None:
            self._conn.send_raw("PING :keepalive")

    def _abort(self, reason: str) -> None:
        self._resolve_lost(reason)
        conn = self._conn
        if conn is not None and getattr(conn, "transport", None) is not None:
            conn.transport.abort()

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
        if kind == "disconnect":
            self._resolve_lost(self._error or "connection closed by the server")
            return
        if kind == "error":
            self._error = f"server said: {event.target}"
            return
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
        elif kind == "authenticate" and settings.sasl is not None:
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

    def _cap(self, conn: _Connection, args: list[str]) -> None:
        sasl = self.settings.sasl
        sub = args[0].upper() if args else ""
        if sub == "LS":
            more, caps = parse_cap_ls(args)
            self._offered.update(caps)
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
