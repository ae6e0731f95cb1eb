"""``EmailGateway``: SMTP in → ``email.receive``; ``email.send`` → the relay.

SMTP answers follow the layer, not our hopes: ``250`` only once the layer accepted the mail,
``451`` when it is full or unreachable (the sender's MTA retries later), ``550`` for recipients
outside ``email.accept``, ``552`` for mail over the size limit. A fault of ours is never a 5xx:
an unexpected exception in a hook is logged with its traceback and answered ``451``.

Mail is parsed in the parser processes of :mod:`gateways.email.parser_pool`, never on the
event loop; their answers (parsed, over a cap, over the CPU limit, lost) become SMTP replies
here.

The gateway is the :class:`~gateways.email.connection.SmtpListener` of its SMTP server: the
``smtp_*`` methods below decide, the server's handler only carries aiosmtpd's hooks to them.
"""

from __future__ import annotations

import asyncio
import email.policy
import ipaddress
import re
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar

from core.envelope import MAX_MESSAGE_BYTES, Command, CommandError, encoded_size
from core.logs import clip
from core.retry import Backoff, StartupError
from core.service import EventRefused, Gateway, handles, listen
from core.types import ChannelLayer
from gateways.email.auth import PROBE_INTERVAL, DkimSigner, MailAuthenticator, SignaturesLost
from gateways.email.config import EmailGatewayConfig
from gateways.email.connection import RelayError, SmtpEnvelope, SmtpRelay, SmtpServer
from gateways.email.parser_pool import ParseOutcome, ParserPool, ParsersBusy, ParserStartError
from gateways.email.signatures import SignatureRequest
from gateways.email.translate import (
    InvalidMail,
    accepts_recipient,
    build_mail,
    envelope_address_refusal,
    has_bare_lf,
    same_mailbox,
    unparsed_mail,
)
from gateways.email.verdicts import (
    AuthVerdict,
    authentication_results,
    classify,
    event_headers,
    smtp_refusal,
)

__all__ = ["EmailGateway"]

_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9._-]+")


class EmailGateway(Gateway[EmailGatewayConfig]):
    """One SMTP listener and one relay per integration."""

    protocol = "email"
    config_model = EmailGatewayConfig
    #: relay round trips are slow and independent: send several at once
    command_concurrency: ClassVar[int] = 8

    def __init__(self, config: EmailGatewayConfig, layer: ChannelLayer) -> None:
        super().__init__(config, layer)
        self.settings = config.email
        self.server = SmtpServer(
            self.settings, self, on_refused=lambda: self.metrics.error("too_many_connections")
        )
        self.relay = SmtpRelay(self.settings.relay) if self.settings.relay is not None else None
        #: sender authentication (email.verify); None with verify: off
        self.authenticator: MailAuthenticator | None = None
        self.signer: DkimSigner | None = None
        self.parsers = ParserPool(self.settings.parser, self.metrics, name=self.name)
        self._in_data = 0
        self._data_idle = asyncio.Event()
        self._data_idle.set()

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        relay = self.settings.relay
        if relay is not None and relay.tls != "none" and not relay.validate_certs:
            self.log.warning(
                "%s: email.relay.validate_certs is false: the relay's certificate is not "
                "checked, so anyone on the path to %s can read and change outgoing mail",
                self.name,
                relay.host,
            )
        if relay is not None and relay.dkim is not None:
            try:
                self.signer = DkimSigner(relay.dkim)
            except ValueError as exc:
                raise StartupError(str(exc)) from None
        try:
            await self.parsers.start()
        except ParserStartError as exc:
            raise StartupError(f"cannot start the parser processes: {exc}") from exc
        try:
            await listen(self.server.start, self.settings.host, self.settings.port)
        except StartupError:
            await self.parsers.close()
            raise
        if self.settings.verify.mode != "off":
            # after start(): the authserv-id defaults to the hostname, looked up there
            self.authenticator = MailAuthenticator(
                self.settings.verify,
                self.server.hostname,
                self._verify_signatures,
                self._dns_outage,
            )
            if self.authenticator.resolver.problem:
                self.log.error("%s: %s", self.name, self.authenticator.resolver.problem)
        self.metrics.connected.set(1)

    async def drain(self) -> None:
        self.server.stop_accepting()
        await self._data_idle.wait()

    async def close(self) -> None:
        await self.server.close()
        if self.authenticator is not None:
            self.authenticator.close()
        await self.parsers.close()
        self.metrics.connected.set(0)

    def readiness(self) -> list[str]:
        reasons = [] if self.server.listening else ["SMTP server not listening"]
        return reasons + self.parsers.readiness()

    # -- SMTP listener (the server's handler calls these; None accepts an address) -------------

    def smtp_sender(self, address: str, envelope: SmtpEnvelope) -> str | None:
        if self.stopping:
            return "421 4.3.2 Service shutting down, try again later"
        refusal = envelope_address_refusal(address, smtputf8=envelope.smtputf8, sender=True)
        if refusal is not None:
            return self._refuse_address("sender", address, envelope, refusal)
        return None

    def smtp_recipient(self, address: str, envelope: SmtpEnvelope) -> str | None:
        refusal = envelope_address_refusal(address, smtputf8=envelope.smtputf8, sender=False)
        if refusal is not None:
            return self._refuse_address("recipient", address, envelope, refusal)
        if not accepts_recipient(address, self.settings.accept):
            self.metrics.error("relay_denied")
            self.log.warning(
                "%s: refused recipient %s from %s (not in email.accept)",
                self.name,
                clip(address),
                envelope.peer,
            )
            return "550 5.7.1 Relaying denied: recipient not accepted here"
        key = same_mailbox(address)
        if any(same_mailbox(known) == key for known in envelope.rcpt_to):
            # a repeated RCPT is one recipient: consumers saw it twice in rcpt_to
            return "250 OK (duplicate recipient)"
        if len(envelope.rcpt_to) >= self.settings.max_recipients:
            return "452 4.5.3 Too many recipients"
        return None

    def _refuse_address(self, role: str, address: str, envelope: SmtpEnvelope, reply: str) -> str:
        self.metrics.error("bad_address")
        self.log.warning(
            "%s: refused %s %s from %s: %s",
            self.name,
            role,
            clip(address.encode("utf-8", "surrogateescape").decode("utf-8", "replace")),
            envelope.peer,
            reply,
        )
        return reply

    async def smtp_data(self, envelope: SmtpEnvelope) -> str:
        self._in_data += 1
        self._data_idle.clear()
        stored: list[Path] = []
        reply = "451 4.3.0 Local error, try again later"
        try:
            reply = await self._receive(envelope, stored)
            return reply
        finally:
            if stored and not reply.startswith("250"):
                # refused or failed: the sender's retry stores them again
                await asyncio.to_thread(_remove_files, stored)
            self._in_data -= 1
            if self._in_data == 0:
                self._data_idle.set()

    def smtp_proxy(self, balancer: str, client: str | None) -> bool:
        proxy = self.settings.proxy_protocol
        assert proxy is not None  # aiosmtpd reads PROXY headers only when configured
        try:
            address = ipaddress.ip_address(balancer)
        except ValueError:
            address = None
        if address is None or not any(address in net for net in proxy.trusted):
            self.metrics.error("proxy_untrusted")
            self.log.warning(
                "%s: closed a connection from %s: not in email.proxy_protocol.trusted",
                self.name,
                clip(balancer),
            )
            return False
        return True

    def smtp_error(self, error: Exception) -> str:
        self.metrics.error("smtp_session")
        self.log.error("%s: SMTP session error: %r", self.name, error, exc_info=error)
        return "451 4.3.0 Local error, try again later"

    async def _receive(self, envelope: SmtpEnvelope, stored: list[Path]) -> str:
        received = time.time()
        raw = envelope.content
        peer = envelope.peer
        if has_bare_lf(raw) and self.settings.bare_lf == "reject":
            self.metrics.error("bare_lf")
            self.log.warning("%s: refused mail from %s: bare LF line ending", self.name, peer)
            return "550 5.5.2 Bare LF line endings are not accepted (RFC 5321 2.3.8)"
        keys_or_reply = await self._parse(raw, peer)
        if isinstance(keys_or_reply, str):
            return keys_or_reply
        keys = keys_or_reply
        kind = classify(
            keys["headers"], envelope.mail_from, [a["content_type"] for a in keys["attachments"]]
        )
        verdict = None
        if self.authenticator is not None:
            try:
                verdict = await self._authenticate(envelope, keys)
            except ParsersBusy as exc:
                self.metrics.pushback.inc()
                self.log.info("%s: answered 451 to %s: %s", self.name, peer, exc)
                return "451 4.3.2 All parsers busy, try again later"
            except SignaturesLost as exc:
                return self._lost(exc.outcome, "checking the signatures of", raw, peer)
            refusal = smtp_refusal(verdict)
            if refusal is not None:
                self.metrics.error("dmarc_reject")
                self.log.warning(
                    "%s: answered 550 to %s for %s from %s: DMARC fail, policy reject",
                    self.name,
                    peer,
                    clip(keys["message_id"]),
                    clip(verdict.dmarc.domain),
                )
                return refusal
            results = authentication_results(verdict)
            keys["headers"] = event_headers(keys["headers"], results, verdict.authserv_id)
            raw = _prepend_header("Authentication-Results", results, raw)
        if keys["defects"]:
            self.log.info(
                "%s: mail from %s has MIME defects: %s",
                self.name,
                peer,
                ", ".join(clip(d, 100) for d in keys["defects"][:5]),
            )
        keys["attachments"] = await self._store_large(keys["attachments"], stored)
        if self.settings.include_raw:
            keys["raw"] = raw
        event = self.event(
            "receive",
            id=keys["message_id"] or None,
            time=received,
            mail_from=envelope.mail_from,
            rcpt_to=list(envelope.rcpt_to),
            peer=peer,
            proxy=envelope.proxy,
            auth_user=envelope.auth_user,
            tls=envelope.tls,
            kind=kind,
            auth=verdict.as_event() if verdict is not None else None,
            **keys,
        )
        if self.settings.attachment_store is not None and _too_large(event):
            # a 2 MB text/plain mail within the advertised SIZE got 552 (issue 14, item 9):
            # with a store, the bodies go there as the attachments do
            await self._store_bodies(event, stored)
        try:
            accepted = await self.publish(event, timeout=self.settings.accept_timeout)
        except EventRefused as exc:
            if exc.reason != "too_large":
                raise  # a fault of ours: smtp_error answers 451
            self.log.warning(
                "%s: answered 552 to %s: set email.attachment_store to keep large attachments "
                "out of the layer",
                self.name,
                peer,
            )
            return "552 5.3.4 Message too big for this system"
        if not accepted:
            self.log.info(
                "%s: answered 451 to %s for %s: layer did not accept it within %.0f s",
                self.name,
                peer,
                clip(keys["message_id"]),
                self.settings.accept_timeout,
            )
            return "451 4.3.0 Temporarily unable to accept the message, try again later"
        self.log.info(
            "%s: accepted %s from %s for %s (%d bytes)",
            self.name,
            clip(keys["message_id"]),
            clip(envelope.mail_from),
            clip(",".join(envelope.rcpt_to)),
            len(raw),
        )
        return "250 2.0.0 OK: queued"

    async def _authenticate(self, envelope: SmtpEnvelope, keys: dict[str, Any]) -> AuthVerdict:
        assert self.authenticator is not None
        verdict = await self.authenticator.check(
            envelope.content,
            keys["headers"],
            client=envelope.peer,
            helo=envelope.helo,
            mail_from=envelope.mail_from,
        )
        results = [verdict.spf.result, verdict.dmarc.result, verdict.arc.result]
        if "temperror" in [*results, *(d.result for d in verdict.dkim)]:
            self.metrics.error("auth_temperror")
            resolver = self.authenticator.resolver
            if resolver.down_since is None:  # an outage is logged once, not once a mail
                self.log.info(
                    "%s: mail from %s: some verdicts are temperror (DNS failed or too slow)",
                    self.name,
                    envelope.peer,
                )
        return verdict

    async def _verify_signatures(self, request: SignatureRequest) -> ParseOutcome:
        return await self.parsers.verify(request, wait=self.settings.accept_timeout)

    def _dns_outage(self, started: bool) -> None:
        assert self.authenticator is not None
        resolver = self.authenticator.resolver
        if started:
            self.metrics.error("dns_outage")
            self.log.warning(
                "%s: the DNS resolvers (%s) do not answer: verdicts needing a lookup are "
                "temperror at once (mail still accepted) until they do; asking again every "
                "%.0f s",
                self.name,
                resolver.nameservers,
                PROBE_INTERVAL,
            )
        else:
            self.log.info(
                "%s: the DNS resolvers answer again; %d lookups were answered temperror at once "
                "meanwhile",
                self.name,
                resolver.failed_fast,
            )

    async def _parse(self, raw: bytes, peer: str | None) -> dict[str, Any] | str:
        """The ``email.receive`` keys of ``raw`` from a parser process, or the SMTP reply."""
        try:
            outcome = await self.parsers.parse(raw, wait=self.settings.accept_timeout)
        except ParsersBusy as exc:
            self.metrics.pushback.inc()
            self.log.info("%s: answered 451 to %s: %s", self.name, peer, exc)
            return "451 4.3.2 All parsers busy, try again later"
        if outcome.kind == "parsed":
            assert outcome.keys is not None
            return outcome.keys
        if outcome.kind in ("died", "timeout", "error"):
            return self._lost(outcome, "parsing", raw, peer)
        if outcome.limit is not None:
            kind, detail = "mail_limit", outcome.limit.detail
            reply = outcome.limit.reply
        else:
            kind = "parse_cpu_limit"
            limit = self.settings.parser.cpu_limit
            detail = f"over the CPU limit of {limit:g} s ({outcome.detail})"
            reply = f"554 5.6.0 Message too complex to parse within {limit:g} s of CPU"
        self.metrics.error(kind)
        if self.settings.parser.over_limit == "raw":
            self.log.warning(
                "%s: mail from %s (%d bytes) not parsed, handed on raw: %s",
                self.name,
                peer,
                len(raw),
                detail,
            )
            return unparsed_mail(raw, f"NotParsed: {detail}")
        self.log.warning(
            "%s: refused mail from %s (%d bytes): %s", self.name, peer, len(raw), detail
        )
        return reply

    def _lost(self, outcome: ParseOutcome, doing: str, raw: bytes, peer: str | None) -> str:
        """The reply to a mail whose parser process died, hung or hit a bug of ours."""
        if outcome.kind == "error":
            # a bug of ours: the child's traceback, then the usual 451
            self.metrics.error("smtp_session")
            self.log.error(
                "%s: %s the mail from %s failed; answered 451:\n%s",
                self.name,
                doing,
                peer,
                _cut(outcome.detail.rstrip(), 4000),
            )
        else:
            # not known to be the mail's fault: the sender retries, the pool has a new parser
            self.log.error(
                "%s: answered 451 to %s (%d bytes): %s", self.name, peer, len(raw), outcome.detail
            )
        return "451 4.3.0 Local error, try again later"

    async def _store_large(
        self, attachments: list[dict[str, Any]], stored: list[Path]
    ) -> list[dict[str, Any]]:
        store = self.settings.attachment_store
        if store is None:
            return attachments
        out = []
        for item in attachments:
            if item["size"] <= self.settings.max_inline_attachment:
                out.append(item)
                continue
            name = _UNSAFE_FILENAME.sub("_", item["filename"] or "attachment")[:80]
            path = Path(store) / f"{uuid.uuid4().hex}-{name}"
            stored.append(path)
            await asyncio.to_thread(_write_file, path, item["content"])
            out.append({**item, "content": None, "path": str(path)})
        return out

    async def _store_bodies(self, event: dict[str, Any], stored: list[Path]) -> None:
        store = self.settings.attachment_store
        assert store is not None
        for key, suffix in (("text", "txt"), ("html", "html")):
            value = event[key]
            if value is None or len(value) <= self.settings.max_inline_attachment // 4:
                continue  # at most 4 bytes a character: this one fits however it is encoded
            data = value.encode("utf-8")
            if len(data) <= self.settings.max_inline_attachment:
                continue
            path = Path(store) / f"{uuid.uuid4().hex}-body.{suffix}"
            stored.append(path)
            await asyncio.to_thread(_write_file, path, data)
            event[key] = None
            event[f"{key}_path"] = str(path)

    # -- commands ----------------------------------------------------------------------------

    @handles("email.send")
    async def handle_send(self, command: Command) -> dict[str, Any]:
        if self.relay is None:
            raise CommandError("no relay configured (email.relay)")
        relay_config = self.relay.config
        try:
            mail = build_mail(
                command.body,
                default_from=relay_config.from_address,
                message_id_domain=self.server.hostname,
            )
        except InvalidMail as exc:
            raise CommandError(str(exc)) from None
        message_id = str(mail.message["Message-ID"])
        message: Any = mail.message
        if self.signer is not None:
            flat = mail.message.as_bytes(policy=_SMTP_POLICY)
            # RSA signing is a few ms of CPU: off the event loop
            message = await asyncio.to_thread(self.signer.sign, flat)
        backoff = Backoff(1.0, relay_config.retry_max_delay)
        attempt = 0
        while True:
            try:
                refused = await self.relay.send(
                    message,
                    mail.sender,
                    mail.recipients,
                    local_hostname=self.server.hostname,
                )
            except RelayError as exc:
                if not exc.temporary or attempt >= relay_config.retries or self.stopping:
                    raise CommandError(f"relay refused {message_id}: {exc}") from None
                attempt += 1
                delay = backoff.next()
                self.metrics.retry("relay")
                self.log.warning(
                    "%s: relay failed for %s (%s); retry %d/%d in %.1f s",
                    self.name,
                    message_id,
                    exc,
                    attempt,
                    relay_config.retries,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            self.log.info("%s: sent %s to %s", self.name, message_id, ",".join(mail.recipients))
            return {"message_id": message_id, "refused": refused}


_SMTP_POLICY = email.policy.SMTP


def _prepend_header(name: str, value: str, raw: bytes) -> bytes:
    """``raw`` with ``name: value`` on top, folded at its ``;`` (RFC 8601 style)."""
    folded = ";\r\n\t".join(part.strip() for part in value.split(";"))
    return f"{name}: {folded}\r\n".encode("utf-8", "replace") + raw


def _cut(text: str, limit: int) -> str:
    """``text`` with its middle left out past ``limit`` characters: a traceback's message may
    quote what the sender wrote, at any length."""
    if len(text) <= limit:
        return text
    head, tail = text[: limit // 4], text[-limit * 3 // 4 :]
    return f"{head}\n… ({len(text) - len(head) - len(tail)} characters left out) …\n{tail}"


def _too_large(event: dict[str, Any]) -> bool:
    try:
        return encoded_size(event) > MAX_MESSAGE_BYTES
    except TypeError:
        return False  # publish() refuses it and names the key


def _write_file(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def _remove_files(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
