"""The only module that touches SMTP sockets: the aiosmtpd server and the aiosmtplib relay.

The server runs on the gateway's own event loop (``loop.create_server`` with aiosmtpd's ``SMTP``
protocol), not in aiosmtpd's ``Controller`` thread, so hooks can await the layer directly.
:class:`SmtpHandler` is aiosmtpd's handler: it turns each hook's session and envelope into plain
values and asks the gateway (an :class:`SmtpListener`) what to answer. Policy — which addresses
are accepted, what becomes an event, 250 or 451 or 552 — stays in the gateway and
``translate.py``; this module only records what the gateway accepted on aiosmtpd's envelope.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiosmtplib
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, LoginPassword, syntax

from core.logs import clip
from gateways.email.config import AuthConfig, EmailConfig, RelayConfig

__all__ = [
    "RelayError",
    "SmtpEnvelope",
    "SmtpHandler",
    "SmtpListener",
    "SmtpRelay",
    "SmtpServer",
]

log = logging.getLogger("gateway.email")


def _authenticator(auth: AuthConfig) -> Callable[..., AuthResult]:
    users = {name: secret.get_secret_value().encode() for name, secret in auth.users.items()}

    def authenticate(
        server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if isinstance(auth_data, LoginPassword):
            user = auth_data.login.decode("utf-8", "replace")
            expected = users.get(user)
            # compare even for unknown users so timing does not reveal which users exist
            ok = hmac.compare_digest(expected or b"\0" * 16, auth_data.password)
            if expected is not None and ok:
                return AuthResult(success=True, auth_data=user)
            log.warning("AUTH %s failed for %s from %s", mechanism, clip(user), session.peer[0])
        # handled=False makes aiosmtpd send 535; the default would send nothing and hang the client
        return AuthResult(success=False, handled=False)

    return authenticate


@dataclass(frozen=True)
class SmtpEnvelope:
    """One SMTP transaction as far as it got, as plain values (aiosmtpd's objects stay here)."""

    #: the client's IP address (behind a PROXY protocol balancer: the one its header names)
    peer: str | None
    #: MAIL FROM, once accepted
    mail_from: str | None
    #: the RCPT TO addresses accepted so far, in order
    rcpt_to: tuple[str, ...]
    #: the client asked for SMTPUTF8 in MAIL FROM
    smtputf8: bool
    #: the AUTH user name, when the session authenticated
    auth_user: str | None
    #: the session runs over TLS (STARTTLS, or the implicit TLS listener)
    tls: bool
    #: the mail as received after DATA (dot-unstuffed); empty before DATA
    content: bytes
    #: the HELO/EHLO name the client gave
    helo: str | None = None
    #: the load balancer's address when the connection began with a PROXY header
    proxy: str | None = None

    @classmethod
    def of(cls, server: Any, session: Any, envelope: Any) -> SmtpEnvelope:
        peer = session.peer[0] if session.peer else None
        proxy = None
        data = session.proxy_data
        if data is not None and data.valid and data.src_addr is not None:
            proxy, peer = peer, str(data.src_addr)
        return cls(
            peer=peer,
            mail_from=envelope.mail_from,
            rcpt_to=tuple(envelope.rcpt_tos),
            smtputf8=bool(envelope.smtp_utf8),
            auth_user=session.auth_data if isinstance(session.auth_data, str) else None,
            tls=session.ssl is not None or getattr(server, "implicit_tls", False),
            content=envelope.original_content or b"",
            helo=session.host_name,
            proxy=proxy,
        )


class SmtpListener(Protocol):
    """What the SMTP server asks the gateway (on the event loop); the answers are SMTP replies.

    ``smtp_sender`` and ``smtp_recipient`` return ``None`` to accept the address (the handler
    records it on the envelope and answers ``250 OK``), or the reply that refuses it — which
    records nothing, so a ``250`` string accepts without recording (a duplicate recipient).
    """

    def smtp_sender(self, address: str, envelope: SmtpEnvelope) -> str | None: ...

    def smtp_recipient(self, address: str, envelope: SmtpEnvelope) -> str | None: ...

    async def smtp_data(self, envelope: SmtpEnvelope) -> str: ...

    def smtp_error(self, error: Exception) -> str: ...

    def smtp_proxy(self, balancer: str, client: str | None) -> bool:
        """A PROXY header from ``balancer`` naming ``client`` (None: LOCAL/UNKNOWN, a health
        check): True lets the session go on, False closes it."""
        ...


class SmtpHandler:
    """aiosmtpd's handler object: its ``handle_*`` hooks, each handed to the listener.

    A class of its own so that aiosmtpd's hook names never sit on the gateway, whose commands
    are looked up by name (issue 8, bug 1).
    """

    def __init__(self, listener: SmtpListener) -> None:
        self.listener = listener

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        reply = self.listener.smtp_sender(address, SmtpEnvelope.of(server, session, envelope))
        if reply is not None:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        reply = self.listener.smtp_recipient(address, SmtpEnvelope.of(server, session, envelope))
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return await self.listener.smtp_data(SmtpEnvelope.of(server, session, envelope))

    async def handle_PROXY(self, server: Any, session: Any, envelope: Any, data: Any) -> bool:
        balancer = session.peer[0] if session.peer else ""
        client = str(data.src_addr) if data.valid and data.src_addr is not None else None
        return self.listener.smtp_proxy(balancer, client)

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd calls this for an exception escaping any hook (or its own parsing)
        return self.listener.smtp_error(error)


class _Protocol(SMTP):
    """aiosmtpd's protocol, registering itself with the server so shutdown can reach it."""

    def __init__(
        self, owner: SmtpServer, handler: SmtpHandler, implicit_tls: bool, **kwargs: Any
    ) -> None:
        super().__init__(handler, **kwargs)
        self._owner = owner
        self._turned_away = False
        #: the implicit TLS listener's session: TLS from the first byte (aiosmtpd only knows
        #: STARTTLS, so session.ssl stays None there)
        self.implicit_tls = implicit_tls

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # called again after STARTTLS with the TLS transport: only the first call counts
        if self.transport is None and len(self._owner.sessions) >= self._owner.max_sessions:
            # 1,000 idle connections all got a banner and sat until the idle timeout
            # (issue 14, item 8): past the cap, say so (RFC 5321 3.8) and hang up
            self._turned_away = True
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(b"421 4.7.0 Too many connections, try again later\r\n")
            transport.close()
            self._owner.turned_away()
            return
        self._owner.sessions.add(self)
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._turned_away:
            super().data_received(data)

    def eof_received(self) -> bool | None:
        return False if self._turned_away else super().eof_received()

    def connection_lost(self, error: Exception | None) -> None:
        if self._turned_away:
            return
        self._owner.sessions.discard(self)
        super().connection_lost(error)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA, the mail read in a few reads instead of one per line.

        aiosmtpd awaits ``readuntil(CRLF)`` and runs its checks once per line of the mail: 85 us
        of the event loop's CPU for the benchmark's 2.5 KB mail, 11 us read at once
        (issue 21). Here the mail is read up to each ``.CRLF`` (a line that ends with a dot,
        or the end of DATA) with the stream's limit raised to the SIZE limit, and aiosmtpd's
        per-line rules are applied to the whole: the lines longer than aiosmtpd takes (500),
        over SIZE (552, whichever came first, as aiosmtpd decides), dot-unstuffing. A mail
        that does not fit under the raised limit goes on line by line with aiosmtpd's own
        rules from where it stands; so does any configuration this does not cover.
        """
        limit = self.data_size_limit
        if self._decode_data or not limit or "_limit" not in vars(self._reader):
            await super().smtp_DATA(arg)
            return
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        reader = self._reader
        # StreamReader's limit (no public setter): aiosmtpd makes it line_length_limit
        stream_limit: int = vars(reader)["_limit"]
        chunks: list[bytes] = []
        whole, ended = True, False
        try:
            vars(reader)["_limit"] = max(stream_limit, limit + 2 * self.line_length_limit)
            try:
                while self.transport is not None:
                    try:
                        chunk = await reader.readuntil(b".\r\n")
                    except asyncio.LimitOverrunError:
                        whole = False  # over SIZE: the rest line by line, nothing read yet
                        break
                    chunks.append(chunk)
                    if chunk.endswith(b"\r\n.\r\n") or (
                        chunk == b".\r\n" and (len(chunks) == 1 or chunks[-2].endswith(b"\r\n"))
                    ):
                        ended = True
                        break
            finally:
                vars(reader)["_limit"] = stream_limit
            if whole and not ended:
                return  # the connection is gone (never a truncated mail to the handler)
            lines = b"".join(chunks)
            if whole:
                lines = lines[:-3]  # the lone dot
            state = _data_state(
                lines,
                limit=limit,
                stream_limit=stream_limit,
                line_length_limit=self.line_length_limit,
            )
            if not whole:
                state = await self._rest_by_line(state, len(lines), limit)
        except asyncio.CancelledError:
            _aiosmtpd_log.info("Connection lost during DATA")
            self._writer.close()
            raise
        if state == "too_long":
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        if state == "too_much":
            await self.push("552 Error: Too much mail data")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        # dot-unstuffing (RFC 5321 4.5.2): a line's leading dot goes
        content = lines.replace(b"\r\n.", b"\r\n")
        if content.startswith(b"."):
            content = content[1:]
        self.envelope.content = content
        self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    async def _rest_by_line(self, state: str, num_bytes: int, limit: int) -> str:
        """aiosmtpd's DATA loop after the first ``num_bytes`` (whole lines) gave ``state``:
        its reads, limits and order, until the lone dot."""
        reader = self._reader
        fragments: list[bytes] = []
        while self.transport is not None:
            try:
                line = await reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError as exc:
                if state == "nominal":
                    state = "too_long"
                line = await reader.read(exc.consumed)
            if not fragments and line == b".\r\n":
                break
            num_bytes += len(line)
            if state == "nominal" and num_bytes > limit:
                state = "too_much"
            fragments.append(line)
            if line.endswith(b"\r\n"):
                if state == "nominal" and len(b"".join(fragments)) > self.line_length_limit:
                    state = "too_long"
                fragments.clear()
        return state

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd parses every MAIL and RCPT address with the stdlib's RFC 5322 header
        # parser: 40 us each, 80 us of the event loop's CPU per mail (bench/email.py's
        # profile). The common form, <dot-atom@dot-atom> and optional parameters, is taken
        # apart here with the same result; anything else (quoted local parts, domain
        # literals, comments, non-ASCII) goes to aiosmtpd's parser as before.
        match = _PLAIN_PATH.fullmatch(arg)
        if match is None:
            return super()._getaddr(arg)
        address, rest = match.group(1), match.group(2) or ""
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, rest


def _data_state(lines: bytes, *, limit: int, stream_limit: int, line_length_limit: int) -> str:
    """What aiosmtpd's DATA loop makes of ``lines`` (whole CRLF lines, the lone dot not among
    them): ``nominal``, ``too_much`` (over ``limit`` bytes) or ``too_long`` (a line over
    ``line_length_limit``), whichever it meets first.

    A line longer than ``stream_limit + 2`` stops its ``readuntil`` (LimitOverrunError) before
    the line is counted; a shorter one is counted, then measured.
    """
    if len(lines) <= limit and (
        len(lines) <= line_length_limit
        or max(map(len, lines.split(b"\r\n"))) + 2 <= line_length_limit
    ):
        return "nominal"
    num_bytes = 0
    for text in lines.split(b"\r\n")[:-1]:
        size = len(text) + 2
        if size > stream_limit + 2:
            return "too_long"
        num_bytes += size
        if num_bytes > limit:
            return "too_much"
        if size > line_length_limit:
            return "too_long"
    return "nominal"


#: aiosmtpd's logger, for the line it writes when a client leaves during DATA
_aiosmtpd_log = logging.getLogger("mail.log")


#: ``<local@domain>`` with dot-atom parts (RFC 5322 atext), then nothing or a space and the
#: parameters (an esmtp-keyword starts with a letter or digit, never a comment): the paths
#: whose parse by ``get_angle_addr`` is the text between the brackets
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_PATH = re.compile(
    rf"<({_ATOM}(?:\.{_ATOM})*@{_ATOM}(?:\.{_ATOM})*)>(?: ([A-Za-z0-9][ -~]*))?"
)


class SmtpServer:
    """An SMTP listener with STARTTLS, AUTH (only after TLS), SIZE, idle timeouts and a cap."""

    def __init__(
        self,
        config: EmailConfig,
        listener: SmtpListener,
        on_refused: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.handler = SmtpHandler(listener)
        self.sessions: set[_Protocol] = set()
        #: the name in the banner, EHLO and Message-IDs: config.hostname, else the FQDN
        self.hostname = config.hostname or "localhost"
        self.max_sessions = config.max_connections
        self._on_refused = on_refused
        self._unreported = 0
        self._server: asyncio.Server | None = None
        self._implicit: asyncio.Server | None = None
        self._tls: ssl.SSLContext | None = None
        if config.tls is not None:
            self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._tls.load_cert_chain(config.tls.cert_file, config.tls.key_file)

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self.config.port
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def implicit_port(self) -> int | None:
        """The implicit TLS listener's port (None without ``email.tls.implicit_port``)."""
        if self._implicit is None or not self._implicit.sockets:
            return self.config.tls.implicit_port if self.config.tls is not None else None
        return int(self._implicit.sockets[0].getsockname()[1])

    @property
    def listening(self) -> bool:
        servers = [s for s in (self._server, self._implicit) if s is not None]
        return bool(servers) and all(s.is_serving() for s in servers)

    def turned_away(self) -> None:
        """Count a connection refused for the cap; one log line a second says how many."""
        if self._on_refused is not None:
            self._on_refused()
        if self._unreported == 0:
            asyncio.get_running_loop().call_later(1.0, self._report_turned_away)
        self._unreported += 1

    def _report_turned_away(self) -> None:
        count, self._unreported = self._unreported, 0
        log.warning(
            "answered 421 to %d connection(s): %d SMTP sessions open (email.max_connections)",
            count,
            len(self.sessions),
        )

    def _protocol(self, implicit_tls: bool = False) -> _Protocol:
        cfg = self.config
        proxy = cfg.proxy_protocol
        return _Protocol(
            self,
            self.handler,
            implicit_tls,
            data_size_limit=cfg.size_limit,
            enable_SMTPUTF8=True,
            hostname=self.hostname,  # else aiosmtpd calls getfqdn() on the loop per connection
            # implicit TLS: no STARTTLS inside TLS, and AUTH at once (aiosmtpd would ask for
            # STARTTLS before AUTH, which it cannot offer there)
            tls_context=None if implicit_tls else self._tls,
            require_starttls=not implicit_tls and cfg.tls is not None and cfg.tls.required,
            timeout=cfg.session_timeout,
            auth_required=cfg.auth is not None and cfg.auth.required,
            auth_require_tls=not implicit_tls,
            authenticator=_authenticator(cfg.auth) if cfg.auth is not None else None,
            # a balancer in TCP mode sends its PROXY header before any TLS: only on the
            # plain/STARTTLS listener
            proxy_protocol_timeout=proxy.timeout
            if proxy is not None and not implicit_tls
            else None,
        )

    async def start(self) -> None:
        if self.config.hostname is None:
            # a DNS lookup that can take seconds: once, in a thread, never on the loop
            self.hostname = await asyncio.to_thread(socket.getfqdn)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, self.config.host, self.config.port)
        log.info("SMTP server listening on %s:%d", self.config.host, self.port)
        tls = self.config.tls
        if tls is not None and tls.implicit_port is not None:
            try:
                self._implicit = await loop.create_server(
                    lambda: self._protocol(implicit_tls=True),
                    self.config.host,
                    tls.implicit_port,
                    ssl=self._tls,
                )
            except OSError:
                self._server.close()
                raise
            log.info(
                "SMTP server listening with implicit TLS on %s:%d",
                self.config.host,
                self.implicit_port,
            )

    def stop_accepting(self) -> None:
        for server in (self._server, self._implicit):
            if server is not None:
                server.close()

    async def close(self) -> None:
        """Close idle sessions and the listener. Sessions in DATA were drained before."""
        self.stop_accepting()
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.close()
        for server in (self._server, self._implicit):
            if server is not None:
                await server.wait_closed()
        self._server = self._implicit = None


class RelayError(Exception):
    """Sending failed. ``temporary`` is True for 4xx replies and connection failures."""

    def __init__(self, message: str, *, temporary: bool) -> None:
        super().__init__(message)
        self.temporary = temporary


class SmtpRelay:
    """Hands finished messages to the configured relay with aiosmtplib, one connection each."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self._tls: ssl.SSLContext | None = None
        if config.tls != "none":
            self._tls = ssl.create_default_context(
                cafile=str(config.ca_file) if config.ca_file else None
            )
            if not config.validate_certs:
                self._tls.check_hostname = False
                self._tls.verify_mode = ssl.CERT_NONE

    async def send(
        self, message: Any, sender: str, recipients: list[str], *, local_hostname: str
    ) -> list[str]:
        """Send once; return the recipients the relay refused. Raise :class:`RelayError`.

        ``local_hostname`` is the EHLO name (the server's, resolved once at start: else
        aiosmtplib looks up the FQDN again for every connection).
        """
        cfg = self.config
        try:
            refused, _ = await aiosmtplib.send(
                message,
                sender=sender,
                recipients=recipients,
                local_hostname=local_hostname,
                hostname=cfg.host,
                port=cfg.port,
                username=cfg.username,
                password=cfg.password.get_secret_value() if cfg.password else None,
                use_tls=cfg.tls == "implicit",
                start_tls=cfg.tls == "starttls",
                tls_context=self._tls,
                validate_certs=cfg.validate_certs,
                timeout=cfg.timeout,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            temporary = all(400 <= c < 500 for c in codes)
            detail = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
            raise RelayError(f"all recipients refused: {detail}", temporary=temporary) from None
        except aiosmtplib.SMTPResponseException as exc:
            raise RelayError(f"{exc.code} {exc.message}", temporary=400 <= exc.code < 500) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise RelayError(f"{type(exc).__name__}: {exc}", temporary=True) from None
        return [f"{rcpt}: {resp.code} {resp.message}" for rcpt, resp in refused.items()]
