"""The ``slack:`` section of an integration file. Field descriptions are the YAML reference."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from core.config import MAX_MESSAGE_BYTES, GatewayConfig, Section

__all__ = [
    "DedupConfig",
    "EventsApiConfig",
    "PacingConfig",
    "RetryConfig",
    "SlackConfig",
    "SlackGatewayConfig",
]

#: a layer message stays under 1 MiB (DESIGN §3); the envelope needs room too
MAX_BODY = 1024 * 1024 - 64 * 1024
#: Socket Mode frames: what is read by default, and at most
FRAME_SIZE = 4 * 1024 * 1024
MAX_FRAME_SIZE = 64 * 1024 * 1024


def _url(value: str) -> str:
    if not value.startswith(("https://", "http://")):
        raise ValueError("must be an http:// or https:// URL")
    return value if value.endswith("/") else value + "/"


class EventsApiConfig(Section):
    """``slack.events_api``: where the HTTP server for the Events API listens."""

    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=3000, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    path: str = Field(
        default="/slack/events",
        description="The Request URL path for events, slash commands and interactivity.",
    )
    max_body_size: int = Field(
        default=256 * 1024,
        gt=0,
        le=MAX_BODY,
        description="Bytes per request body; larger is answered 413 before it is read.",
    )
    max_age: int = Field(
        default=300,
        gt=0,
        le=3600,
        description="Seconds a signed request may be old (X-Slack-Request-Timestamp); "
        "older or further in the future is 401 (replay protection).",
    )

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/") or any(c.isspace() for c in value):
            raise ValueError("must start with / and contain no spaces")
        return value


class DedupConfig(Section):
    """``slack.dedup``: retried deliveries are recognised by ``event_id`` for this long."""

    window: float = Field(
        default=3600.0,
        gt=0,
        description="Seconds an event id is remembered (Slack retries "
        "within about 5 minutes over HTTP; Socket Mode redelivers unacknowledged envelopes).",
    )
    max_entries: int = Field(
        default=100_000,
        ge=1,
        description="Ids kept in memory (non-Redis layers); the oldest is forgotten first. "
        "With the window in Redis: ids remembered in memory whose done mark Redis did not take.",
    )
    redis: bool = Field(
        default=True,
        description="With a redis:// layer, keep the window in that Redis (survives restarts, "
        "shared by replicas); false keeps it in memory.",
    )


class PacingConfig(Section):
    """``slack.pacing``: messages per channel (Slack allows about one a second per channel)."""

    rate: float = Field(default=1.0, gt=0, le=1000, description="Messages per second.")
    burst: int = Field(default=3, ge=1, le=1000, description="Messages that may go at once.")
    queue: int = Field(
        default=100,
        ge=0,
        le=100_000,
        description="Commands waiting per channel; one more is answered ok: false.",
    )


class RetryConfig(Section):
    """``slack.retry``: how Web API calls are retried (slack_sdk's retry handlers)."""

    rate_limited: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Retries of a call answered 429, each after its Retry-After.",
    )
    connection_errors: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Retries of a call that failed to connect, with exponential backoff.",
    )
    backoff: float = Field(
        default=0.5, gt=0, le=60, description="Backoff factor (s) for connection errors."
    )


class SlackConfig(Section):
    """``slack:`` — one Slack app in one workspace."""

    secret_files: ClassVar[tuple[str, ...]] = ("bot_token", "app_token", "signing_secret")
    bot_token: SecretStr = Field(
        description="Bot token (xoxb-…) for the Web API; or bot_token_file. Never logged."
    )
    app_token: SecretStr | None = Field(
        default=None,
        description="App-level token (xapp-…, scope connections:write); required for "
        "socket_mode; or app_token_file.",
    )
    signing_secret: SecretStr | None = Field(
        default=None,
        description="Signing secret; required for events_api; or signing_secret_file.",
    )
    transport: Literal["socket_mode", "events_api"] = Field(
        default="socket_mode",
        description="socket_mode: a WebSocket the gateway opens; events_api: an HTTP server "
        "Slack posts to.",
    )
    events_api: EventsApiConfig = Field(
        default_factory=EventsApiConfig, description="The HTTP listener (events_api only)."
    )
    api_url: str = Field(
        default="https://slack.com/api/",
        description="Base URL of the Web API. In Socket Mode the WebSocket URL comes from its "
        "apps.connections.open.",
    )
    response_url_prefix: str = Field(
        default="https://hooks.slack.com/",
        description="slack.respond only posts to response_url values starting with this.",
    )
    ack_timeout: float = Field(
        default=2.5,
        gt=0,
        lt=3,
        description="Seconds an envelope may wait for the de-dup window, its channel_type "
        "and the layer; not taken by then, it is not "
        "acknowledged (Socket Mode: Slack redelivers) or answered 503 (Events API). Slack "
        "wants an answer within 3 s.",
    )
    max_in_flight: int = Field(
        default=32,
        ge=1,
        le=10_000,
        description="Socket Mode: envelopes handled at once per connection (their events may "
        "reach the layer in a different order; Slack does not promise an order either).",
    )
    max_frame_size: int = Field(
        default=FRAME_SIZE,
        gt=MAX_MESSAGE_BYTES,
        le=MAX_FRAME_SIZE,
        description="Socket Mode: bytes of the largest WebSocket frame (envelope) read. Above "
        "the layer's 1 MiB event limit, so an envelope whose event is over that limit is still "
        "read, acknowledged and counted as too_large; a larger frame closes the connection "
        "(1009) and Slack redelivers it.",
    )
    ignore_self: bool = Field(
        default=True,
        description="Drop message events the app's own bot user sent (no echo loops).",
    )
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="De-duplication.")
    pacing: PacingConfig = Field(default_factory=PacingConfig, description="Send pacing.")
    retry: RetryConfig = Field(default_factory=RetryConfig, description="Web API retries.")
    timeout: float = Field(default=30.0, gt=0, description="Seconds for one Web API call.")
    ping_interval: float = Field(
        default=10.0,
        gt=0,
        description="Socket Mode: WebSocket ping every this many seconds; a socket that "
        "stays silent for twice as long is replaced.",
    )
    connect_timeout: float = Field(
        default=30.0, gt=0, description="Seconds for auth.test + apps.connections.open + hello."
    )
    reconnect_initial: float = Field(default=1.0, gt=0, description="First reconnect delay (s).")
    reconnect_maximum: float = Field(default=60.0, gt=0, description="Largest delay (s).")
    buffer: int = Field(
        default=1000,
        ge=1,
        description="slack.connect / slack.disconnect events waiting for the layer.",
    )

    _check_urls = field_validator("api_url", "response_url_prefix")(_url)

    @model_validator(mode="after")
    def _check(self) -> SlackConfig:
        if self.transport == "socket_mode" and not _set(self.app_token):
            raise ValueError("app_token: required for socket_mode (or app_token_file)")
        if self.transport == "events_api" and not _set(self.signing_secret):
            raise ValueError("signing_secret: required for events_api (or signing_secret_file)")
        if not self.bot_token.get_secret_value():
            raise ValueError("bot_token: must not be empty")
        if self.reconnect_maximum < self.reconnect_initial:
            raise ValueError("reconnect_maximum must not be below reconnect_initial")
        return self


def _set(secret: SecretStr | None) -> bool:
    return secret is not None and bool(secret.get_secret_value())


class SlackGatewayConfig(GatewayConfig):
    """A Slack integration file."""

    gateway: Literal["slack"]
    slack: SlackConfig
