"""The ``email:`` section of an integration file. Field descriptions are the YAML reference."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    FilePath,
    IPvAnyNetwork,
    SecretStr,
    field_validator,
    model_validator,
)

from core.config import MAX_MESSAGE_BYTES, GatewayConfig, Section
from gateways.email.translate import MailLimits

__all__ = [
    "AuthConfig",
    "DkimSigningConfig",
    "DnsConfig",
    "EmailConfig",
    "EmailGatewayConfig",
    "ParserConfig",
    "ProxyProtocolConfig",
    "RelayConfig",
    "TlsConfig",
    "TrustedRelay",
    "VerifyConfig",
]

_LIMITS = MailLimits()
_DOMAIN = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?$"
)
_NAMESERVER = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\s]+))(?::(?P<port>\d{1,5}))?$"
)


def _domain(value: str, what: str) -> str:
    value = value.strip().lower().rstrip(".")
    if not _DOMAIN.match(value):
        raise ValueError(f"{value!r} is not a {what}")
    return value


class TlsConfig(Section):
    """``email.tls``: offer STARTTLS with this certificate, and optionally implicit TLS."""

    cert_file: FilePath = Field(description="PEM certificate chain.")
    key_file: FilePath = Field(description="PEM private key.")
    required: bool = Field(False, description="Refuse MAIL until the client did STARTTLS.")
    implicit_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Also listen here with implicit TLS (SMTPS, port 465 style: TLS from the "
        "first byte, no STARTTLS) on email.host; 0 picks a free one. AUTH is offered there at "
        "once. PROXY protocol is not read on this port.",
    )


class AuthConfig(Section):
    """``email.auth``: SMTP AUTH (PLAIN, LOGIN), only ever offered after STARTTLS."""

    users: dict[str, SecretStr] = Field(
        default_factory=dict, description="user → password; prefer users_file."
    )
    users_file: FilePath | None = Field(
        None, description="File of `user:password` lines (# comments allowed)."
    )
    required: bool = Field(False, description="Refuse MAIL from clients that did not AUTH.")

    @model_validator(mode="after")
    def _load_users(self) -> AuthConfig:
        if self.users_file is not None:
            users = dict(self.users)
            for number, line in enumerate(self.users_file.read_text("utf-8").splitlines(), 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                user, sep, password = line.partition(":")
                if not sep or not user:
                    raise ValueError(f"users_file line {number}: expected user:password")
                users[user] = SecretStr(password)
            object.__setattr__(self, "users", users)
        if not self.users:
            raise ValueError("no users: set users or users_file")
        return self


class DkimSigningConfig(Section):
    """``email.relay.dkim``: DKIM-sign every ``email.send`` (RFC 6376) before it leaves."""

    domain: str = Field(
        description="Signing domain (`d=`); publish the public key under "
        "SELECTOR._domainkey.DOMAIN."
    )
    selector: str = Field(description="Selector (`s=`).")
    private_key: SecretStr = Field(
        description="The private key: PEM (RSA) for rsa-sha256, the base64 seed for "
        "ed25519-sha256; prefer private_key_file."
    )
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] = Field(
        "rsa-sha256", description="Signature algorithm."
    )
    headers: list[str] | None = Field(
        None,
        description="Header fields to sign; default: dkimpy's list (From, To, Cc, Subject, "
        "Date, Message-ID, In-Reply-To, References, Reply-To, MIME and list headers …), "
        "From always included.",
    )

    secret_files = ("private_key",)

    @field_validator("domain")
    @classmethod
    def _check_domain(cls, value: str) -> str:
        return _domain(value, "domain name")

    @field_validator("selector")
    @classmethod
    def _check_selector(cls, value: str) -> str:
        return _domain(value, "selector (DNS labels)")

    @model_validator(mode="after")
    def _check_key(self) -> DkimSigningConfig:
        key = self.private_key.get_secret_value().strip()
        if self.algorithm == "rsa-sha256":
            if not re.match(r"^-----BEGIN (RSA )?PRIVATE KEY-----", key):
                raise ValueError("private_key: not a PEM RSA private key (BEGIN PRIVATE KEY)")
        elif not re.fullmatch(r"[A-Za-z0-9+/]{43}=", key):
            raise ValueError("private_key: ed25519-sha256 needs the 32-byte seed in base64")
        if self.headers is not None and "from" not in {h.lower() for h in self.headers}:
            raise ValueError("headers: From must be signed (RFC 6376 5.4)")
        return self


class RelayConfig(Section):
    """``email.relay``: the SMTP server ``email.send`` hands mail to."""

    host: str = Field(description="Relay host name.")
    port: int = Field(587, ge=1, le=65535, description="Relay port.")
    tls: Literal["starttls", "implicit", "none"] = Field(
        "starttls", description="starttls (port 587), implicit (465) or none (local relays only)."
    )
    validate_certs: bool = Field(True, description="Verify the relay's certificate.")
    ca_file: FilePath | None = Field(None, description="CA bundle to verify the relay against.")
    username: str | None = Field(None, description="AUTH user.")
    password: SecretStr | None = Field(None, description="AUTH password; or password_file.")
    from_address: str | None = Field(
        None, description="Envelope sender and From: when a command gives none."
    )
    timeout: float = Field(30.0, gt=0, description="Seconds for each SMTP step.")
    retries: int = Field(5, ge=0, description="Retries after a 4xx or a connection failure.")
    retry_max_delay: float = Field(60.0, gt=0, description="Cap of the backoff between retries.")
    dkim: DkimSigningConfig | None = Field(
        None, description="DKIM-sign outgoing mail with this key and selector."
    )

    secret_files = ("password",)

    @model_validator(mode="after")
    def _auth_needs_tls(self) -> RelayConfig:
        if self.username and self.tls == "none":
            raise ValueError("username needs tls: starttls or implicit (no AUTH in clear text)")
        if bool(self.username) != bool(self.password):
            raise ValueError("username and password go together")
        return self


class DnsConfig(Section):
    """``email.verify.dns``: the resolver of SPF, DKIM, DMARC and ARC lookups (dnspython)."""

    nameservers: list[str] = Field(
        default_factory=list,
        description="Resolvers to ask, `ADDRESS` or `ADDRESS:PORT` (`[v6]:PORT`); empty: "
        "those of /etc/resolv.conf.",
    )
    timeout: float = Field(
        2.0, gt=0, description="Seconds for one lookup, retries included (capped by budget)."
    )
    budget: float = Field(
        5.0,
        gt=0,
        description="Seconds all lookups of one mail may take together; what is not "
        "answered by then is a temperror verdict (the mail is still accepted).",
    )
    cache_size: int = Field(
        10_000,
        ge=0,
        description="Answers kept (LRU, each for its DNS TTL); 0 turns the cache off.",
    )
    failure_ttl: float = Field(
        30.0,
        ge=0,
        description="Seconds a failed lookup (timeout, SERVFAIL) is answered temperror from "
        "memory instead of being asked again; 0: never remembered. While the resolvers do not "
        "answer at all, every lookup fails at once (see the README).",
    )

    @field_validator("nameservers")
    @classmethod
    def _check_nameservers(cls, value: list[str]) -> list[str]:
        for entry in value:
            match = _NAMESERVER.match(entry.strip())
            if match is None or (match["port"] and not 0 < int(match["port"]) < 65536):
                raise ValueError(f"{entry!r} is not ADDRESS or ADDRESS:PORT")
        return [entry.strip() for entry in value]


class TrustedRelay(Section):
    """One entry of ``email.verify.trusted_relays``: a hop whose own verdicts are believed."""

    authserv_id: str | None = Field(
        None,
        description="The name the relay puts in its Authentication-Results header (needed "
        "with networks).",
    )
    networks: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="Addresses the relay connects from (an MTA in front of the gateway). Mail "
        "from there: SPF is taken from the relay's top Authentication-Results with "
        "authserv_id, not checked against the relay's own address.",
    )
    arc_domains: list[str] = Field(
        default_factory=list,
        description="ARC-Seal `d=` domains of the relay (a forwarder, a mailing list). When "
        "the ARC chain passes and its newest seal is by one of them, a DMARC failure the "
        "sealer's ARC-Authentication-Results show as a pass is overridden (trusted_forwarder).",
    )

    @field_validator("arc_domains")
    @classmethod
    def _check_arc_domains(cls, value: list[str]) -> list[str]:
        return [_domain(v, "domain name") for v in value]

    @model_validator(mode="after")
    def _check(self) -> TrustedRelay:
        if not self.networks and not self.arc_domains:
            raise ValueError("give networks (with authserv_id) or arc_domains")
        if self.networks and not self.authserv_id:
            raise ValueError("networks needs authserv_id (whose Authentication-Results to use)")
        return self


class VerifyConfig(Section):
    """``email.verify``: SPF, DKIM, DMARC and ARC verdicts on every mail (also ``verify: MODE``)."""

    mode: Literal["off", "report", "enforce"] = Field(
        "report",
        description="off: no checks, `auth` is None; report: verdicts in `auth` and in an "
        "Authentication-Results header, every mail accepted; enforce: as report, and a DMARC "
        "failure whose policy is reject gets 550 5.7.1 at the end of DATA, quarantine sets "
        "`auth.quarantine`.",
    )
    authserv_id: str | None = Field(
        None,
        description="The name in our Authentication-Results header; default: email.hostname "
        "(the FQDN).",
    )
    trusted_relays: list[TrustedRelay] = Field(
        default_factory=list, description="Relays whose own verdicts are believed."
    )
    max_signatures: int = Field(
        5,
        ge=0,
        description="DKIM signatures verified per mail (those of the From domain first, then "
        "in header order); the others get `policy` (not verified). Each costs a body hash: "
        "0.7 s of CPU for 10 MB of short lines.",
    )
    max_arc_sets: int = Field(
        10,
        ge=0,
        le=50,
        description="ARC sets (hops) a chain may have to be verified; a longer chain gets ARC "
        "`fail` unverified (RFC 8617 allows 50). Each set costs a body hash.",
    )
    dns: DnsConfig = Field(default_factory=DnsConfig, description="The resolver.")  # type: ignore[arg-type]

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"mode": data} if isinstance(data, str) else data


class ProxyProtocolConfig(Section):
    """``email.proxy_protocol``: every connection starts with a PROXY v1/v2 header (HAProxy,
    cloud load balancers), so ``peer`` and SPF see the client's address, not the balancer's."""

    trusted: list[IPvAnyNetwork] = Field(
        min_length=1,
        description="Addresses the load balancer connects from; a connection from anywhere "
        "else is closed (a PROXY header would let it claim any address).",
    )
    timeout: float = Field(
        5.0, gt=0, description="Seconds to wait for the PROXY header before hanging up."
    )


class ParserConfig(Section):
    """``email.parser``: the processes that parse inbound mail, and what is too costly to parse.

    Mail is never parsed on the event loop: CPython's header parser is quadratic in some inputs
    (one mail froze the gateway for 10-20 s, issue 21). Each mail goes to one of ``processes``
    child processes; the header caps are checked there before parsing, and the parse runs under
    a CPU limit.
    """

    processes: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Parser processes; default min(4, CPUs). Each parses one mail at a time.",
    )
    max_queued: int = Field(
        default=64,
        ge=0,
        description="Mails waiting for a free parser; one more gets 451 4.3.2 at once, and a "
        "mail that waited accept_timeout gets it too.",
    )
    cpu_limit: float = Field(
        default=2.0,
        gt=0,
        description="CPU seconds one mail may take to parse (ordinary mail: about 1 ms); past "
        "it the mail is over the limit (over_limit).",
    )
    timeout: float = Field(
        default=30.0,
        gt=0,
        description="Wall-clock seconds a parser may take for one mail; then it is killed and "
        "replaced, and the mail gets 451 4.3.0. Must be above cpu_limit.",
    )
    max_header_fields: int = Field(
        default=_LIMITS.max_header_fields,
        ge=1,
        description="Header fields of a mail (its own header block); more: over the limit.",
    )
    max_header_length: int = Field(
        default=_LIMITS.max_header_length,
        ge=1000,
        description="Bytes of one header field, name and folded lines included; longer: over "
        "the limit.",
    )
    max_encoded_words: int = Field(
        default=_LIMITS.max_encoded_words,
        ge=1,
        description="RFC 2047 encoded words (=?charset?q?…?=) in one header field; more: over "
        "the limit.",
    )
    over_limit: Literal["reject", "raw"] = Field(
        default="reject",
        description="A mail over a cap or over cpu_limit: reject answers 552 5.3.4 (header "
        "fields, length) or 554 5.6.0 (encoded words, CPU); raw hands it on unparsed, as one "
        "message/rfc822 attachment with a defect.",
    )

    @property
    def limits(self) -> MailLimits:
        return MailLimits(
            max_header_fields=self.max_header_fields,
            max_header_length=self.max_header_length,
            max_encoded_words=self.max_encoded_words,
        )

    @model_validator(mode="after")
    def _timeout_above_cpu_limit(self) -> ParserConfig:
        if self.timeout <= self.cpu_limit:
            raise ValueError("timeout must be above cpu_limit (a parse takes at least its CPU)")
        return self


class EmailConfig(Section):
    """``email:`` — the SMTP server that receives mail, and the relay that sends it."""

    host: str = Field("127.0.0.1", description="Address the SMTP server listens on.")
    port: int = Field(2525, ge=0, le=65535, description="SMTP port; 0 picks a free one.")
    hostname: str | None = Field(
        None,
        description="Name in the banner and EHLO replies, in the EHLO to the relay and in "
        "Message-IDs; default: the FQDN, looked up once at start.",
    )
    accept: list[str] = Field(
        min_length=1,
        description="Recipients accepted: domains (`example.com`) or addresses "
        "(`support@example.com`). Anything else gets 550: never an open relay.",
    )
    max_message_size: int = Field(
        10 * 1024 * 1024,
        gt=0,
        description="Bytes; larger mail gets 552. Without attachment_store the gateway takes "
        "(and advertises as SIZE) at most 512 KiB (341 KiB with include_raw): its event must "
        "fit the layer's 1 MB.",
    )
    max_recipients: int = Field(100, gt=0, description="RCPT TO per message; more get 452.")
    accept_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds to wait for a free parser, and then for the layer, before "
        "answering 451.",
    )
    session_timeout: float = Field(
        60.0,
        gt=0,
        description="Idle seconds before disconnecting (an idle flood holds connections this "
        "long).",
    )
    max_connections: int = Field(
        100,
        gt=0,
        description="SMTP sessions at once; beyond this a client gets 421 and is disconnected.",
    )
    bare_lf: Literal["reject", "accept"] = Field(
        "reject",
        description="Mail with a bare LF line ending gets 550 (SMTP smuggling defence).",
    )
    include_raw: bool = Field(False, description="Add the raw message bytes as `raw`.")
    max_inline_attachment: int = Field(
        256 * 1024, ge=0, description="Attachments larger than this go to attachment_store."
    )
    attachment_store: Path | None = Field(
        None,
        description="Directory for large attachments (event carries `path`); without it, "
        "mail whose event would pass 1 MB gets 552.",
    )
    tls: TlsConfig | None = Field(None, description="STARTTLS certificate.")
    auth: AuthConfig | None = Field(None, description="SMTP AUTH users (requires tls).")
    relay: RelayConfig | None = Field(None, description="Outbound relay for email.send.")
    verify: VerifyConfig = Field(
        default_factory=VerifyConfig,  # type: ignore[arg-type]
        description="Sender authentication (SPF, DKIM, DMARC, ARC); `verify: off` to skip.",
    )
    proxy_protocol: ProxyProtocolConfig | None = Field(
        None, description="Read a PROXY protocol header first (behind a load balancer)."
    )
    parser: ParserConfig = Field(
        default_factory=ParserConfig, description="Parser processes and the caps they check."
    )

    @property
    def size_limit(self) -> int:
        """The largest mail the gateway can take, advertised as ``SIZE``; larger gets 552.

        Without a store every part travels in the event, and the event must fit the layer's
        limit: a 2 MB mail within a SIZE of 10 MB got 552 at DATA (issue 14, item 9). Decoding
        seldom makes a part larger than it was on the wire; headers appear twice, ``raw`` once
        more. So half the layer's limit, a third with ``raw``.
        """
        if self.attachment_store is not None:
            return self.max_message_size
        share = MAX_MESSAGE_BYTES // (3 if self.include_raw else 2)
        return min(self.max_message_size, share)

    @field_validator("accept")
    @classmethod
    def _check_accept(cls, value: list[str]) -> list[str]:
        out = []
        for entry in value:
            entry = entry.strip().lower().removeprefix("@")
            if not entry or any(c.isspace() for c in entry) or entry.count("@") > 1:
                raise ValueError(f"{entry!r} is not a domain or an address")
            out.append(entry)
        return out

    @model_validator(mode="after")
    def _auth_needs_tls(self) -> EmailConfig:
        if self.auth is not None and self.tls is None:
            raise ValueError("auth needs tls: AUTH is only offered after STARTTLS")
        return self


class EmailGatewayConfig(GatewayConfig):
    """An email integration file."""

    gateway: Literal["email"]
    email: EmailConfig
    inbound_capacity: int | None = Field(
        1_000,
        gt=0,
        description="As for every gateway, but 1,000 by default: a mail is up to 1 MB on the "
        "layer (up to 1 GB of Redis at this default), and SMTP senders retry a 451 anyway.",
    )
