"""Prometheus metrics shared by every gateway in a process, labelled by integration name."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["REGISTRY", "GatewayMetrics"]

#: one registry per process; `gateways run` serves several integrations from it
REGISTRY = CollectorRegistry(auto_describe=True)

_EVENTS = Counter(
    "gateway_events", "Inbound events accepted by the layer", ["gateway", "type"], registry=REGISTRY
)
_COMMANDS = Counter(
    "gateway_commands",
    "Commands handled, by outcome (ok, failed, invalid)",
    ["gateway", "type", "outcome"],
    registry=REGISTRY,
)
_ERRORS = Counter("gateway_errors", "Errors by kind", ["gateway", "kind"], registry=REGISTRY)
_RETRIES = Counter(
    "gateway_retries",
    "Retries (layer sends, reconnects, relays)",
    ["gateway", "kind"],
    registry=REGISTRY,
)
_WAITS = Counter(
    "gateway_backpressure_waits",
    "Times an inbound event waited because the layer was full or unreachable",
    ["gateway"],
    registry=REGISTRY,
)
_PUSHBACK = Counter(
    "gateway_pushback",
    "Times the transport was pushed back (SMTP 451, MQTT ack withheld, HTTP 503)",
    ["gateway"],
    registry=REGISTRY,
)
_DROPS = Counter(
    "gateway_dropped", "Inbound events dropped, by reason", ["gateway", "reason"], registry=REGISTRY
)
_LATENCY = Histogram(
    "gateway_layer_send_seconds",
    "Time for the layer to accept one message",
    ["gateway"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
    registry=REGISTRY,
)
_CONNECTED = Gauge(
    "gateway_transport_connected",
    "1 while the transport is connected",
    ["gateway"],
    registry=REGISTRY,
)
_STALLED = Gauge(
    "gateway_stalled",
    "1 while the layer has refused events for a while (see core.stall)",
    ["gateway"],
    registry=REGISTRY,
)
_STALLS = Counter("gateway_stalls", "Stalls that started", ["gateway"], registry=REGISTRY)
_STALLED_SECONDS = Counter(
    "gateway_stalled_seconds", "Seconds spent stalled", ["gateway"], registry=REGISTRY
)
_HELD = Gauge(
    "gateway_held_messages",
    "Inbound messages the gateway holds back because the layer has not taken them yet",
    ["gateway"],
    registry=REGISTRY,
)
_DUPLICATES = Counter(
    "gateway_duplicates",
    "Inbound events handed to the layer again (at-least-once redelivery of the same id)",
    ["gateway"],
    registry=REGISTRY,
)


class GatewayMetrics:
    """The metrics of one integration (all series carry ``gateway=<name>``)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.backpressure_waits = _WAITS.labels(name)
        self.pushback = _PUSHBACK.labels(name)
        self.layer_latency = _LATENCY.labels(name)
        self.connected = _CONNECTED.labels(name)
        self.stalled = _STALLED.labels(name)
        self.stalls = _STALLS.labels(name)
        self.stalled_seconds = _STALLED_SECONDS.labels(name)
        self.held = _HELD.labels(name)
        self.duplicates = _DUPLICATES.labels(name)

    def event(self, type_: str) -> None:
        _EVENTS.labels(self.name, type_).inc()

    def command(self, type_: str, outcome: str) -> None:
        _COMMANDS.labels(self.name, type_, outcome).inc()

    def error(self, kind: str) -> None:
        _ERRORS.labels(self.name, kind).inc()

    def retry(self, kind: str) -> None:
        _RETRIES.labels(self.name, kind).inc()

    def dropped(self, reason: str, count: int = 1) -> None:
        _DROPS.labels(self.name, reason).inc(count)
