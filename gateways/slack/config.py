"""The ``slack:`` section of an integration file. Field descriptions are the YAML reference."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from core.config import (
    MAX_EVENT_PAYLOAD,
    MAX_MESSAGE_BYTES,
    GatewayConfig,
    PaceBurst,
    PaceRate,
    Section,
)

__all__ = [
    "AnswersConfig",
    "DedupConfig",
    "EventsApiConfig",
    "OAuthConfig",
    "PacingConfig",
    "RetryConfig",
    "SlackConfig",
    "SlackGatewayConfig",
]

#: Socket Mode frames: what is read by default, and at most
FRAME_SIZE = 4 * 1024 * 1024
MAX_FRAME_SIZE = 64 * 1024 * 1024


def _url(value: str) -> str:
    if not value.startswith(("https://", "http://")):
        raise ValueError("must be an http:// or https:// URL")
    return value if value.endswith("/") else value + "/"


def _path(value: str) -> str:
    if not value.startswith("/") or any(c.isspace() for c in value):
        raise ValueError("must start with / and contain no spaces")
    return value


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
        le=MAX_EVENT_PAYLOAD,
        description="Bytes per request body; larger is answered 413 before it is read.",
    )
    max_age: int = Field(
        default=300,
        gt=0,
        le=3600,
        description="Seconds a signed request may be old (X-Slack-Request-Timestamp); "
        "older or further in the future is 401 (replay protection).",
    )

    _check_path = field_validator("path")(_path)


#: events whose acknowledgement can carry a consumer's answer (translate.ANSWERABLE)
AnswerableEvent = Literal["slack.command", "slack.view_submission", "slack.options"]


def _default_answered() -> list[AnswerableEvent]:
    return ["slack.view_submission", "slack.options"]


class AnswersConfig(Section):
    """``slack.answers``: acknowledgements that wait for a consumer's ``slack.ack``."""

    timeout: float = Field(
        default=2.5,
        gt=0,
        lt=3,
        description="Seconds from an envelope's arrival the gateway waits for the consumer's "
        "slack.ack; none by then, it acknowledges empty (logged, counted) so Slack does not "
        "retry. Slack wants the acknowledgement within 3 s.",
    )
    wait_for: list[AnswerableEvent] = Field(
        default_factory=_default_answered,
        description="Events whose acknowledgement waits for an answer (they carry an "
        "ack_channel): slack.view_submission (response_action), slack.options (external "
        "select options), slack.command (an immediate message). Others are acknowledged at "
        "once.",
    )
    max_waiting: int = Field(
        default=1000,
        ge=1,
        le=100_000,
        description="Events waiting for their answer at once; one more is acknowledged at once "
        "with ack_channel None (logged; outcome skipped of gateway_slack_answers_total).",
    )


class OAuthConfig(Section):
    """``slack.oauth``: one app installed in many workspaces (Slack's OAuth v2 install flow).

    Installations (bot tokens) are kept in the layer's Redis (in memory on other layers);
    commands name their workspace with ``team`` (and ``enterprise``).
    """

    secret_files: ClassVar[tuple[str, ...]] = ("client_secret",)
    client_id: str = Field(min_length=1, description="The app's Client ID (Basic Information).")
    client_secret: SecretStr = Field(
        description="The app's Client Secret; or client_secret_file. Never logged."
    )
    scopes: list[str] = Field(
        min_length=1, description="Bot token scopes the install asks for (chat:write, …)."
    )
    install_path: str = Field(
        default="/slack/install",
        description="GET here starts an install: a state is issued and the browser is sent to "
        "Slack's authorize page.",
    )
    redirect_path: str = Field(
        default="/slack/oauth_redirect",
        description="The Redirect URL path Slack sends the browser back to (code and state).",
    )
    redirect_uri: str | None = Field(
        default=None,
        description="The full public Redirect URL (https://your.host/slack/oauth_redirect), "
        "sent to Slack with the install; needed when the app has several Redirect URLs.",
    )
    authorize_url: str = Field(
        default="https://slack.com/oauth/v2/authorize",
        description="Slack's authorize page (a local stand-in only changes this and api_url).",
    )
    state_ttl: float = Field(
        default=600.0,
        gt=0,
        le=86400,
        description="Seconds an install's state stays valid; it is single use.",
    )
    success_url: str | None = Field(
        default=None,
        description="Where the browser goes after an install; default: a short page.",
    )
    failure_url: str | None = Field(
        default=None,
        description="Where the browser goes when an install failed (?error=reason); default: "
        "a short page with the reason.",
    )
    refresh_before: float = Field(
        default=7200.0,
        gt=0,
        description="Token rotation: a bot token is refreshed (oauth.v2.access, grant_type "
        "refresh_token) when it has less than this many seconds left, before it is used and "
        "by a background check.",
    )

    _check_paths = field_validator("install_path", "redirect_path")(_path)

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: list[str]) -> list[str]:
        if any(not scope or "," in scope or any(c.isspace() for c in scope) for scope in value):
            raise ValueError("each scope is one word such as chat:write")
        return value

    @field_validator("authorize_url", "redirect_uri", "success_url", "failure_url")
    @classmethod
    def _urls(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _distinct_paths(self) -> OAuthConfig:
        if self.install_path == self.redirect_path:
            raise ValueError("install_path and redirect_path must differ")
        if not self.client_secret.get_secret_value():
            raise ValueError("client_secret: must not be empty")
        return self


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

    rate: PaceRate = Field(default=1.0, description="Messages per second.")
    burst: PaceBurst = Field(default=3, le=1000, description="Messages that may go at once.")
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
    """``slack:`` — one Slack app, in one workspace (``bot_token``) or many (``oauth``)."""

    secret_files: ClassVar[tuple[str, ...]] = ("bot_token", "app_token", "signing_secret")
    bot_token: SecretStr | None = Field(
        default=None,
        description="Bot token (xoxb-…) for the Web API, one workspace; or bot_token_file. "
        "Required unless oauth is set (then each installation has its own). Never logged.",
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
        default_factory=EventsApiConfig,
        description="The HTTP listener (events_api; with socket_mode only for oauth's paths).",
    )
    oauth: OAuthConfig | None = Field(
        default=None,
        description="Many workspaces: the OAuth install flow on the HTTP listener, an "
        "installation store, token rotation. Off when absent (one workspace, bot_token).",
    )
    answers: AnswersConfig = Field(
        default_factory=AnswersConfig,
        description="Answers inside the acknowledgement (slack.ack).",
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
        if self.oauth is None and not _set(self.bot_token):
            raise ValueError("bot_token: required (or bot_token_file), unless oauth is set")
        if self.oauth is not None and self.bot_token is not None:
            raise ValueError("bot_token: not used with oauth (each installation has its own token)")
        if self.oauth is not None and self.events_api.path in (
            self.oauth.install_path,
            self.oauth.redirect_path,
        ):
            raise ValueError(
                "oauth: install_path and redirect_path must differ from events_api.path"
            )
        if self.reconnect_maximum < self.reconnect_initial:
            raise ValueError("reconnect_maximum must not be below reconnect_initial")
        return self


def _set(secret: SecretStr | None) -> bool:
    return secret is not None and bool(secret.get_secret_value())


class SlackGatewayConfig(GatewayConfig):
    """A Slack integration file."""

    gateway: Literal["slack"]
    slack: SlackConfig
