"""The ``email:`` section of an integration file. Field descriptions are the YAML reference."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, FilePath, SecretStr, field_validator, model_validator

from core.config import MAX_MESSAGE_BYTES, GatewayConfig, Section

__all__ = ["AuthConfig", "EmailConfig", "EmailGatewayConfig", "RelayConfig", "TlsConfig"]


class TlsConfig(Section):
    """``email.tls``: offer STARTTLS with this certificate."""

    cert_file: FilePath = Field(description="PEM certificate chain.")
    key_file: FilePath = Field(description="PEM private key.")
    required: bool = Field(False, description="Refuse MAIL until the client did STARTTLS.")


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

    secret_files = ("password",)

    @model_validator(mode="after")
    def _auth_needs_tls(self) -> RelayConfig:
        if self.username and self.tls == "none":
            raise ValueError("username needs tls: starttls or implicit (no AUTH in clear text)")
        if bool(self.username) != bool(self.password):
            raise ValueError("username and password go together")
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
        10.0, gt=0, description="Seconds to wait for the layer before answering 451."
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
