"""The ``mqtt:`` section of an integration file. Field descriptions are the YAML reference."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self, get_args

from pydantic import AfterValidator, BeforeValidator, Field, SecretStr, model_validator

from core.config import GatewayConfig, Section
from core.config import ReconnectConfig as SharedReconnectConfig
from core.types import CHANNEL_NAME_RULE, is_channel_name
from gateways.mqtt.translate import (
    PAYLOAD_FORMATS,
    RETAIN_HANDLING,
    InvalidTopic,
    validate_filter,
    validate_topic,
)

__all__ = [
    "MessageConfig",
    "MqttConfig",
    "MqttGatewayConfig",
    "ReconnectConfig",
    "SubscriptionConfig",
    "TlsConfig",
    "WebSocketConfig",
    "WillConfig",
]

PayloadFormat = Literal["bytes", "text", "json", "auto"]
assert set(get_args(PayloadFormat)) == set(PAYLOAD_FORMATS)


def _qos(value: int) -> int:
    if value not in (0, 1, 2):
        raise ValueError("must be 0, 1 or 2")
    return value


def _topic(value: str) -> str:
    try:
        return validate_topic(value)
    except InvalidTopic as exc:
        raise ValueError(str(exc)) from None


def _filter(value: str) -> str:
    try:
        return validate_filter(value)
    except InvalidTopic as exc:
        raise ValueError(str(exc)) from None


def _protocol(value: Any) -> Any:
    # YAML reads `protocol: 5` as an int and `protocol: 3.1.1` as a string
    text = str(value).strip().lower().removeprefix("mqtt").removeprefix("v")
    return {"5": "5", "5.0": "5", "3.1.1": "3.1.1", "311": "3.1.1", "4": "3.1.1"}.get(text, text)


def _retain_handling(value: Any) -> Any:
    if isinstance(value, str) and value in RETAIN_HANDLING:
        return RETAIN_HANDLING[value]
    return value


QoS = Annotated[int, AfterValidator(_qos)]
Topic = Annotated[str, AfterValidator(_topic)]
TopicFilter = Annotated[str, AfterValidator(_filter)]


class TlsConfig(Section):
    """``mqtt.tls``: connect over TLS (present = on). The broker's certificate is verified."""

    ca_file: str | None = Field(
        None, description="PEM file of the CAs to trust; default: the system's CA store."
    )
    cert_file: str | None = Field(None, description="Client certificate (PEM) for mutual TLS.")
    key_file: str | None = Field(None, description="Private key of cert_file (PEM).")
    key_password: SecretStr | None = Field(
        None, description="Password of key_file if it is encrypted; or key_password_file."
    )
    verify: bool = Field(
        True,
        description="Verify the broker's certificate and host name. Turning it off lets anyone "
        "on the path read and change the traffic; for throwaway test setups only.",
    )

    secret_files = ("key_password",)

    @model_validator(mode="after")
    def _key_needs_cert(self) -> TlsConfig:
        if self.key_file and not self.cert_file:
            raise ValueError("key_file needs cert_file")
        return self


class WebSocketConfig(Section):
    """``mqtt.websocket``: the HTTP side of ``transport: websockets``."""

    path: str = Field(
        default="/mqtt", description="Request path of the broker's WebSocket endpoint."
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="Extra HTTP headers for the upgrade request."
    )


class MessageConfig(Section):
    """A message the gateway publishes by itself (``birth``)."""

    topic: Topic = Field(description="Topic name (no wildcards).")
    payload: str = Field("", description="Payload text (sent as UTF-8).")
    qos: QoS = Field(1, description="0, 1 or 2.")
    retain: bool = Field(True, description="Keep it as the topic's retained message.")


class WillConfig(MessageConfig):
    """``mqtt.will``: the Last Will the broker publishes if the gateway vanishes."""

    on_stop: bool = Field(
        True,
        description="Also publish it on a clean shutdown (SIGTERM), so `offline` always follows "
        "`online` from the birth message.",
    )


class SubscriptionConfig(Section):
    """One entry of ``mqtt.subscriptions``: a topic filter and where its messages go."""

    topic: TopicFilter = Field(
        description="Topic filter with + and # wildcards; `$share/GROUP/FILTER` for a shared "
        "subscription that splits messages among the gateway replicas."
    )
    qos: QoS = Field(
        1,
        description="Maximum QoS. At 1 and 2 the broker's message is acknowledged only after the "
        "layer accepted it.",
    )
    channel: str | None = Field(
        None, description="Channel for matching messages; default: routes[mqtt.message] or name."
    )
    payload: PayloadFormat | None = Field(
        None, description="bytes, text, json or auto; default: mqtt.payload."
    )
    no_local: bool = Field(False, description="MQTT 5: skip messages this gateway published.")
    retain_as_published: bool = Field(
        False, description="MQTT 5: keep the publisher's retain flag on forwarded messages."
    )
    retain_handling: Annotated[int, BeforeValidator(_retain_handling)] = Field(
        0,
        ge=0,
        le=2,
        description="MQTT 5: when the broker sends retained messages: send (on every "
        "subscribe), if_new (only for a new subscription) or never.",
    )

    @model_validator(mode="after")
    def _check(self) -> SubscriptionConfig:
        channel = self.channel
        if channel is not None and not is_channel_name(channel):
            raise ValueError(f"channel: {CHANNEL_NAME_RULE}")
        if self.no_local and self.topic.startswith("$share/"):
            raise ValueError("no_local cannot be set on a shared subscription (MQTT 5 §3.8.3.1)")
        return self


class ReconnectConfig(SharedReconnectConfig):
    """``mqtt.reconnect``: capped, jittered exponential backoff between connection attempts."""

    initial: float = Field(default=0.5, gt=0, description="Seconds before the first retry.")
    maximum: float = Field(default=30.0, gt=0, description="Cap of the delay, in seconds.")

    @model_validator(mode="after")
    def _cap_not_below_start(self) -> Self:
        # replaces the shared check: MqttConfig makes it, so the error stays as it always read,
        # `mqtt: reconnect.maximum must not be below reconnect.initial`
        return self


class MqttConfig(Section):
    """``mqtt:`` — the broker, the session and the subscriptions."""

    host: str = Field("localhost", description="Broker host name or address.")
    port: int | None = Field(
        None, ge=1, le=65535, description="Broker port; default 1883, or 8883 with tls."
    )
    protocol: Annotated[Literal["3.1.1", "5"], BeforeValidator(_protocol)] = Field(
        "5", description="MQTT version: 5 (default) or 3.1.1."
    )
    transport: Literal["tcp", "websockets"] = Field(
        "tcp", description="tcp, or websockets (MQTT over WebSocket; see websocket)."
    )
    websocket: WebSocketConfig = Field(
        default_factory=WebSocketConfig, description="Path and headers for websockets."
    )
    client_id: str | None = Field(
        None,
        description="MQTT client id: the name of the persistent session at the broker. Default: "
        "NAME-HOSTNAME, stable across restarts on one host (a random id would leave the "
        "session behind at every restart); a second process of the same integration on the "
        "same host gets NAME-HOSTNAME-2, and so on (a lock file per id in the temporary "
        "directory). Set it per replica where host names change at every start (e.g. a "
        "Kubernetes Deployment): the broker keeps each abandoned session for session_expiry.",
    )
    clean_start: bool = Field(
        False,
        description="true: throw the broker's session away when the process starts. The "
        "default false resumes it, so QoS 1/2 messages queued while the gateway was away (or "
        "left unacknowledged during a stall) arrive. Reconnects within one process always "
        "try to resume.",
    )
    session_expiry: int | None = Field(
        None,
        ge=0,
        le=2**32 - 1,
        description="MQTT 5: seconds the broker keeps the session after a disconnect. "
        "Default 86400 (one day); 0 with clean_start: true. 0 makes the session end with "
        "every disconnect, and a stall beyond max_pending then drops messages (counted).",
    )
    keepalive: int = Field(60, ge=0, le=65535, description="Keep-alive interval in seconds.")
    connect_timeout: float = Field(
        10.0, gt=0, description="Seconds for TCP, TLS and CONNACK on each connection attempt."
    )
    username: str | None = Field(None, description="User name.")
    password: SecretStr | None = Field(None, description="Password; or password_file.")
    tls: TlsConfig | None = Field(None, description="TLS settings; present means TLS on.")
    will: WillConfig | None = Field(None, description="Last Will message.")
    birth: MessageConfig | None = Field(
        None, description="Published after every successful connect (e.g. `online`, retained)."
    )
    subscriptions: list[SubscriptionConfig] = Field(
        default_factory=list,
        description="Static subscriptions, restored after every reconnect. Consumers add more "
        "at run time with mqtt.subscribe.",
    )
    payload: PayloadFormat = Field(
        "bytes",
        description="How payloads reach consumers: bytes, text (UTF-8), json, or auto (json "
        "when the MQTT 5 content type says so, text when the payload format flag is set).",
    )
    id_property: str | None = Field(
        None,
        description="MQTT 5 user property that carries the publisher's own message id; when "
        "present it becomes the event id (exact de-duplication).",
    )
    max_payload: int = Field(
        1_000_000,
        gt=0,
        le=1_000_000,
        description="Largest topic + payload in bytes (events stay under 1 MB). MQTT 5 tells "
        "the broker (Maximum Packet Size) so it never sends more; on 3.1.1 larger messages "
        "are acknowledged, dropped and counted with a WARNING.",
    )
    receive_maximum: int = Field(
        20_000,
        ge=1,
        le=65535,
        description="MQTT 5: QoS 1/2 messages the broker may have in flight to the gateway. "
        "Default: max_pending (at most 65,535), so a burst travels to the gateway's hold "
        "instead of the broker's queue for the client, which a default mosquitto caps at 1,000 "
        "messages and beyond that drops (max_queued_messages).",
    )
    max_pending: int = Field(
        20_000,
        ge=1,
        description="QoS 1/2 messages the gateway holds, unacknowledged, while the layer does "
        "not take them (the hold). Beyond it (a broker that ignores receive_maximum, or MQTT "
        "3.1.1, which has none) further QoS 1 messages are left unacknowledged with the broker "
        "and fetched again by resuming the session once the hold is empty; with a session "
        "that does not persist they are acknowledged, dropped and counted. The gateway never "
        "stops reading the socket (keep-alive answers must get through).",
    )
    max_pending_bytes: int = Field(
        16_000_000,
        ge=1_000_000,
        description="Bytes (topic + payload) the hold may keep; beyond it, as beyond "
        "max_pending. At least 1,000,000, so any message fits.",
    )
    watch_broker_drops: bool = Field(
        True,
        description="Subscribe (QoS 0) to mosquitto's $SYS/broker/publish/messages/dropped and "
        "$SYS/broker/store/messages/count, export them as metrics and log a WARNING when the "
        "broker's drop counter grows. Harmless on brokers without them.",
    )
    buffer: int = Field(
        10_000,
        ge=1,
        description="QoS 0 messages (and connect/disconnect events) waiting for the layer; "
        "beyond it they are dropped, counted and logged.",
    )
    command_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a command waits for the connection and the broker's answer "
        "(PUBACK, SUBACK) before it is answered ok: false.",
    )
    max_inflight: int = Field(
        20, ge=1, le=65535, description="Outgoing QoS 1/2 messages in flight to the broker."
    )
    max_queued: int = Field(
        1000, ge=1, description="Outgoing QoS 1/2 messages queued behind them; more fail."
    )
    reconnect: ReconnectConfig = Field(
        default_factory=ReconnectConfig, description="Backoff between connection attempts."
    )
    persist_subscriptions: bool = Field(
        True,
        description="Keep run-time subscriptions in Redis (when the layer is a Redis one) "
        "so they survive a gateway restart and reach every replica.",
    )

    secret_files = ("password",)

    @model_validator(mode="before")
    @classmethod
    def _window_as_the_hold(cls, data: Any) -> Any:
        # receive_maximum left out: as large as the hold, so a smaller max_pending alone is valid
        if isinstance(data, dict) and "receive_maximum" not in data and "max_pending" in data:
            try:
                return {**data, "receive_maximum": max(1, min(int(data["max_pending"]), 65535))}
            except (TypeError, ValueError):
                pass  # a bad max_pending gets its own error from the field
        return data

    @model_validator(mode="after")
    def _check(self) -> MqttConfig:
        if self.password is not None and self.username is None:
            raise ValueError("password needs username")
        if self.mqtt5 and self.max_pending < self.receive_maximum:
            raise ValueError(
                "max_pending must not be below receive_maximum (the broker may send that many)"
            )
        if self.protocol == "3.1.1":
            if self.session_expiry is not None:
                raise ValueError("session_expiry needs protocol 5 (3.1.1 has clean_start only)")
            if self.id_property is not None:
                raise ValueError("id_property needs protocol 5 (3.1.1 has no user properties)")
            for i, sub in enumerate(self.subscriptions):
                if sub.no_local or sub.retain_as_published or sub.retain_handling:
                    raise ValueError(
                        f"subscriptions[{i}]: no_local, retain_as_published and "
                        "retain_handling need protocol 5"
                    )
        if self.reconnect.maximum < self.reconnect.initial:
            raise ValueError("reconnect.maximum must not be below reconnect.initial")
        return self

    @property
    def broker_port(self) -> int:
        """The port, defaulted by transport."""
        if self.port is not None:
            return self.port
        return 8883 if self.tls is not None else 1883

    @property
    def broker(self) -> str:
        """``host:port`` for logs and events."""
        return f"{self.host}:{self.broker_port}"

    @property
    def mqtt5(self) -> bool:
        return self.protocol == "5"

    @property
    def persistent_session(self) -> bool:
        """Whether the broker keeps the session (and its unacknowledged messages) over a
        disconnect, so the gateway may leave messages with it and resume."""
        if self.mqtt5:
            return self.session_expiry_seconds > 0
        return not self.clean_start

    @property
    def session_expiry_seconds(self) -> int:
        """The MQTT 5 Session Expiry Interval actually sent."""
        if self.session_expiry is not None:
            return self.session_expiry
        return 0 if self.clean_start else 86_400


class MqttGatewayConfig(GatewayConfig):
    """An MQTT integration file."""

    gateway: Literal["mqtt"]
    mqtt: MqttConfig

    def consumer_channels(self) -> list[str]:
        """The inbound channels plus every static subscription's own channel."""
        extra = {s.channel for s in self.mqtt.subscriptions if s.channel}
        return sorted({*super().consumer_channels(), *extra})

    def subscription_channel(self, sub: SubscriptionConfig) -> str:
        """Where a static subscription's messages go."""
        return sub.channel or self.route("mqtt.message")
