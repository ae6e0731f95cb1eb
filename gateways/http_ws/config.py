"""The ``http_ws:`` section of an integration file. Field descriptions are the YAML reference."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, FilePath, SecretStr, field_validator, model_validator

from core.config import MAX_EVENT_PAYLOAD, GatewayConfig, Section
from core.types import check_channel_name

__all__ = [
    "HttpRoute",
    "HttpWsConfig",
    "HttpWsGatewayConfig",
    "TlsConfig",
    "WebhookRoute",
    "WebsocketRoute",
]


def _path(value: str) -> str:
    if not value.startswith("/") or any(c.isspace() for c in value) or "*" in value[:-1]:
        raise ValueError("must start with /, contain no spaces, and * only at the end")
    return value


class _Route(Section):
    path: str = Field(
        description="Exact path, or a prefix when it ends in * (/api/*); the longest match wins."
    )
    channel: str | None = Field(None, description="Inbound channel; default the integration's.")

    _check_path = field_validator("path")(_path)
    _check_channel = field_validator("channel")(check_channel_name)


class WebsocketRoute(_Route):
    """``http_ws.websocket[]``: WebSocket paths bridged to the layer."""


class HttpRoute(_Route):
    """``http_ws.http[]``: HTTP paths whose requests become ``http.request``."""


class WebhookRoute(_Route):
    """``http_ws.webhooks[]``: paths whose signed POSTs become ``http.webhook`` (answered 202)."""

    signature: Literal["github", "hmac-sha256"] = Field(
        "github",
        description="github: X-Hub-Signature-256: sha256=<hex>; hmac-sha256: hex HMAC of the "
        "body in `header`.",
    )
    header: str = Field("X-Hub-Signature-256", description="Header carrying the signature.")
    secret: SecretStr | None = Field(None, description="Shared secret; prefer secret_file.")

    secret_files = ("secret",)

    @model_validator(mode="after")
    def _needs_secret(self) -> WebhookRoute:
        if self.secret is None or not self.secret.get_secret_value():
            raise ValueError("secret or secret_file is required: unsigned webhooks are refused")
        return self


class TlsConfig(Section):
    """``http_ws.tls``: serve HTTPS and WSS (uvicorn's ssl options)."""

    cert_file: FilePath = Field(description="PEM certificate chain.")
    key_file: FilePath = Field(description="PEM private key.")
    key_password: SecretStr | None = Field(None, description="Password of an encrypted key.")


class HttpWsConfig(Section):
    """``http_ws:`` — the uvicorn server, its bridged paths and its limits."""

    host: str = Field("127.0.0.1", description="Address uvicorn listens on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port; 0 picks a free one.")
    websocket: list[WebsocketRoute] = Field(
        default_factory=list, description="WebSocket routes: [{path, channel}]."
    )
    http: list[HttpRoute] = Field(
        default_factory=list, description="HTTP routes: [{path, channel}]."
    )
    webhooks: list[WebhookRoute] = Field(
        default_factory=list, description="Signed webhook routes (checked before http)."
    )
    app: str | None = Field(
        None,
        description="ASGI application (module:attr) serving every other path in-process, "
        "e.g. the Django project; --app overrides it.",
    )
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="Origins allowed to open WebSockets: full origins, *.domain or *. "
        "Empty: same origin as the Host header only. Refused handshakes get 403.",
    )
    max_message_size: int = Field(
        256 * 1024,
        gt=0,
        le=MAX_EVENT_PAYLOAD,
        description="Bytes per WebSocket message; larger closes with 1009.",
    )
    max_body_size: int = Field(
        256 * 1024, gt=0, le=MAX_EVENT_PAYLOAD, description="Bytes per HTTP body; larger gets 413."
    )
    max_websockets: int = Field(
        1000,
        gt=0,
        description="Open WebSockets at once (bridged and in-process); more get 503. HTTP has "
        "its own cap, so webhooks keep working when this one is reached.",
    )
    max_requests: int = Field(
        1000,
        gt=0,
        description="HTTP requests in progress at once (bridged, webhooks and in-process); "
        "more get 503. Idle keep-alive connections do not count.",
    )
    header_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a new connection has to send its request line and headers (and a "
        "kept-alive one, its next request's) before it is closed.",
    )
    idle_timeout: float = Field(
        300.0, gt=0, description="Seconds without a message either way before a socket closes."
    )
    connect_timeout: float = Field(
        10.0, gt=0, description="Seconds a consumer has to answer websocket.connect."
    )
    response_timeout: float = Field(
        30.0, gt=0, description="Seconds a consumer has to answer http.request (else 504)."
    )
    publish_timeout: float = Field(
        5.0,
        gt=0,
        description="Seconds to wait for a full or unreachable layer before 503 / close 1013.",
    )
    keepalive_timeout: float = Field(
        5.0, gt=0, description="Seconds an idle HTTP keep-alive connection stays open."
    )
    ping_interval: float = Field(
        20.0, gt=0, description="Seconds between WebSocket pings (dead peers are closed)."
    )
    worker_timeout: float = Field(
        5.0,
        ge=1.0,
        description="Seconds without a heartbeat from the worker hosting a socket before the "
        "socket is re-bound to another worker (and its requests answered 502).",
    )
    rebind_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds a socket whose worker stopped waits for another worker to take it "
        "before it is closed with 1012.",
    )
    replay_buffer: int = Field(
        32,
        ge=2,
        le=10_000,
        description="Messages per socket kept until the worker hosting it confirms them, to "
        "replay after a re-bind; the client is not read while it is full.",
    )
    tls: TlsConfig | None = Field(None, description="Certificate for HTTPS / WSS.")
    forwarded_allow_ips: list[str] | None = Field(
        None,
        description="Trusted proxies whose X-Forwarded-For/-Proto set client and scheme; "
        "default none.",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_connections" in data:
            raise ValueError(
                "max_connections was split into max_websockets (open sockets) and "
                "max_requests (HTTP requests in progress): set those instead"
            )
        return data

    @model_validator(mode="after")
    def _something_to_serve(self) -> HttpWsConfig:
        if not (self.websocket or self.http or self.webhooks or self.app):
            raise ValueError("nothing to serve: set websocket, http, webhooks or app")
        return self


class HttpWsGatewayConfig(GatewayConfig):
    """An HTTP/WebSocket integration file."""

    gateway: Literal["http_ws"]
    http_ws: HttpWsConfig

    def consumer_channels(self) -> list[str]:
        """The inbound channels plus every route's own channel."""
        routes = [*self.http_ws.websocket, *self.http_ws.http, *self.http_ws.webhooks]
        extra = {r.channel for r in routes if r.channel}
        return sorted({*super().consumer_channels(), *extra})
