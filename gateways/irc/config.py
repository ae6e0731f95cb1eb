"""The ``irc:`` section of an integration file. Field descriptions are the YAML reference."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, SecretStr, model_validator

from core.config import GatewayConfig, PaceBurst, PaceRate, ReconnectConfig, Section
from gateways.irc.translate import (
    InvalidCommand,
    check_channel,
    check_encoding,
    check_nick,
    check_username,
)

__all__ = [
    "ChannelConfig",
    "FloodConfig",
    "IrcConfig",
    "IrcGatewayConfig",
    "ReconnectConfig",
    "SaslConfig",
    "TlsConfig",
]


def _valid(check: Any) -> Any:
    def validate(value: Any) -> Any:
        try:
            return check(value)
        except InvalidCommand as exc:
            raise ValueError(str(exc)) from None

    return validate


Nick = Annotated[str, AfterValidator(_valid(check_nick))]
ChannelName = Annotated[str, AfterValidator(_valid(check_channel))]
UserName = Annotated[str, AfterValidator(_valid(check_username))]


class TlsConfig(Section):
    """``irc.tls``: connect over TLS (present = on). The server's certificate is verified."""

    ca_file: str | None = Field(
        default=None, description="PEM file of the CAs to trust; default: the system's CA store."
    )
    cert_file: str | None = Field(
        default=None, description="Client certificate (PEM): CertFP, and SASL EXTERNAL."
    )
    key_file: str | None = Field(default=None, description="Private key of cert_file (PEM).")
    verify: bool = Field(
        default=True,
        description="Verify the server's certificate and host name. Off lets anyone on the "
        "path read and change the traffic, passwords included; for throwaway test setups only.",
    )

    @model_validator(mode="after")
    def _key_needs_cert(self) -> TlsConfig:
        if self.key_file and not self.cert_file:
            raise ValueError("key_file needs cert_file")
        return self


class SaslConfig(Section):
    """``irc.sasl``: authenticate during registration. A refusal stops the gateway (exit 3)."""

    mechanism: Literal["PLAIN", "EXTERNAL"] = Field(
        default="PLAIN",
        description="PLAIN (account + password) or EXTERNAL (the TLS client certificate).",
    )
    username: str | None = Field(
        default=None, description="Account name (PLAIN); default: the nick."
    )
    password: SecretStr | None = Field(
        default=None, description="Account password; or password_file."
    )

    secret_files = ("password",)

    @model_validator(mode="after")
    def _check(self) -> SaslConfig:
        if self.mechanism == "PLAIN" and self.password is None:
            raise ValueError("password: required for PLAIN (or password_file)")
        return self


def _channel_entry(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


class ChannelConfig(Section):
    """One channel joined at every connect: ``"#ops"`` or ``{name: "#ops", key: …}``."""

    name: ChannelName = Field(description="Channel name, with its prefix (#, &, + or !).")
    key: SecretStr | None = Field(default=None, description="Channel key (+k); or key_file.")

    secret_files = ("key",)


class FloodConfig(Section):
    """``irc.flood``: every line the gateway sends is paced (a token bucket per connection)."""

    burst: PaceBurst = Field(default=4, le=100, description="Lines that may leave at once.")
    rate: PaceRate = Field(
        default=1.0, description="Lines per second after the burst (most servers: 0.5-2)."
    )


class IrcConfig(Section):
    """``irc:`` — one IRC identity on one server."""

    server: str = Field(description="Host name or address of the IRC server.")
    port: int | None = Field(
        default=None, ge=1, le=65535, description="Port; default 6697 with tls, else 6667."
    )
    tls: TlsConfig | None = Field(default=None, description="TLS settings; present = TLS on.")
    nick: Nick = Field(description="The nick to use and reclaim.")
    alternates: list[Nick] = Field(
        default_factory=list,
        description="Nicks tried in order when nick is taken; then nick plus a digit suffix.",
    )
    username: UserName | None = Field(
        default=None,
        description="USER name; default: the nick's ASCII letters, digits, _, - and . "
        "(acc[bot] registers as accbot: servers refuse brackets there).",
    )
    realname: str | None = Field(default=None, description="Real name (GECOS); default: the nick.")
    password: SecretStr | None = Field(
        default=None, description="Server password (PASS); or password_file."
    )
    sasl: SaslConfig | None = Field(default=None, description="SASL during registration.")
    nickserv_password: SecretStr | None = Field(
        default=None,
        description="Sent as NickServ IDENTIFY after registration when SASL is not used; "
        "or nickserv_password_file.",
    )
    channels: list[Annotated[ChannelConfig, BeforeValidator(_channel_entry)]] = Field(
        default_factory=list,
        description='Channels joined at every connect: a name ("#ops") or {name, key}.',
    )
    max_channels: int = Field(
        default=200,
        ge=1,
        le=10_000,
        description="Channels the gateway keeps joined (and rejoins after a reconnect) at most: "
        "the YAML's plus those joined at run time. An irc.join beyond it is refused; a JOIN "
        "the server makes for us beyond it is passed on but not rejoined (logged, counted).",
    )
    rejoin_after_kick: bool = Field(default=True, description="Join again after being kicked.")
    rejoin_delay: float = Field(
        default=5.0, ge=0, description="Seconds to wait before that rejoin."
    )
    capabilities: list[str] = Field(
        default_factory=lambda: ["server-time", "message-tags"],
        description="IRCv3 capabilities requested when the server offers them "
        "(echo-message only if listed here).",
    )
    fallback_encoding: Annotated[str, AfterValidator(_valid(check_encoding))] = Field(
        default="latin-1", description="Decodes lines that are not valid UTF-8 (counted, logged)."
    )
    flood: FloodConfig = Field(default_factory=FloodConfig, description="Flood control.")
    queue: int = Field(
        default=1000, ge=1, le=1_000_000, description="Outbound lines waiting; more are refused."
    )
    queue_timeout: float = Field(
        default=60.0,
        gt=0,
        description="A line still waiting after this (s), e.g. while disconnected, "
        "is answered with an error instead of being sent late.",
    )
    buffer: int = Field(default=10_000, ge=1, description="Inbound events waiting for the layer.")
    raw_commands: bool = Field(
        default=False, description="Allow irc.raw (any line). Never on for a shared bot."
    )
    reclaim_interval: float = Field(
        default=30.0,
        gt=0,
        description="Seconds between attempts to take back nick while it is used.",
    )
    idle_timeout: float = Field(
        default=120.0, gt=0, description="PING the server after this silence; drop if still silent."
    )
    connect_timeout: float = Field(
        default=30.0, gt=0, description="Seconds for connect + registration."
    )
    reconnect: ReconnectConfig = Field(default_factory=ReconnectConfig, description="Backoff.")
    lease_ttl: float = Field(
        default=5.0,
        ge=1.0,
        le=300.0,
        description="Replicas on a Redis layer (active/standby): seconds the active replica's "
        "Redis lease lives without renewal (renewed every third of it); a standby connects "
        "at most this long, plus one try (a fifth of it), after the active one died.",
    )

    secret_files = ("password", "nickserv_password")

    @model_validator(mode="after")
    def _check(self) -> IrcConfig:
        external = self.sasl is not None and self.sasl.mechanism == "EXTERNAL"
        if external and (self.tls is None or self.tls.cert_file is None):
            raise ValueError("sasl: EXTERNAL needs tls.cert_file (the client certificate)")
        if len(self.channels) > self.max_channels:
            raise ValueError(
                f"channels: {len(self.channels)} listed, more than max_channels "
                f"({self.max_channels})"
            )
        return self

    @property
    def server_port(self) -> int:
        if self.port is not None:
            return self.port
        return 6697 if self.tls is not None else 6667

    @property
    def address(self) -> str:
        """``host:port`` for logs and events."""
        return f"{self.server}:{self.server_port}"


class IrcGatewayConfig(GatewayConfig):
    """An IRC integration file."""

    gateway: Literal["irc"]
    irc: IrcConfig
