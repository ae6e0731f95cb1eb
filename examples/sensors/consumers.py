"""Sensor readings over MQTT: stored, checked against a threshold, alerts published back.

The MQTT integration is ``examples/sensors.yaml``; ``manage.py runworker sensors`` runs this.

- ``sensors/<device>/<quantity>``: a reading, a JSON number or ``{"value": n}``. It is stored
  once (the event ``id`` de-duplicates redeliveries) and, when the value is above the threshold
  of the subscription it came through, ``alerts/<topic>`` is published (QoS 1).
- ``sensors-control/watch``: ``{"topic": "lab/+/temperature", "threshold": 30}`` makes this
  consumer subscribe to one more filter at run time (``mqtt.subscribe``). The answer goes to the
  request's MQTT 5 response topic with its correlation data, once the broker granted it.
- ``sensors-control/unwatch``: ``{"topic": "lab/+/temperature"}`` undoes that.

No handler lets an exception escape: under ``runworker`` that would end the consumer and lose the
messages queued for it. Errors are logged, and the gateway redelivers nothing it already handed
over, so a reading that fails to store is gone (a real project would retry or dead-letter it).
"""

from __future__ import annotations

import functools
import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from channels.consumer import AsyncConsumer
from django.conf import settings
from live.events import show

from gateways.mqtt.consumers import MqttCommands
from sensors.models import Reading, Watch

log = logging.getLogger("sensors")

CONTROL_PREFIX = "sensors-control/"
ALERT_PREFIX = "alerts/"


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[None]])


def guarded(handler: Handler) -> Handler:
    """Log what a handler raises instead of letting it end the consumer."""

    @functools.wraps(handler)
    async def wrapper(self: Any, message: dict[str, Any]) -> None:
        try:
            await handler(self, message)
        except Exception:
            log.exception(
                "%s failed on %s %s",
                handler.__name__,
                message.get("type"),
                message.get("topic") or message.get("id"),
            )

    return wrapper  # type: ignore[return-value]


def default_threshold() -> float:
    return float(getattr(settings, "SENSORS_DEFAULT_THRESHOLD", 30.0))


def reading_value(payload: Any) -> float | None:
    """The number in a reading payload (``21.5`` or ``{"value": 21.5}``), else ``None``."""
    if isinstance(payload, dict):
        payload = payload.get("value")
    if isinstance(payload, bool) or not isinstance(payload, int | float):
        return None
    value = float(payload)
    return value if math.isfinite(value) else None


class SensorConsumer(AsyncConsumer):
    """Handles every message type the ``sensors`` integration sends to its channel."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: control requests waiting for their mqtt.result, by command id
        self.pending: dict[str, Pending] = {}

    @guarded
    async def mqtt_connect(self, message: dict[str, Any]) -> None:
        resumed = message["session_present"]
        log.info("gateway connected to %s (session resumed: %s)", message["broker"], resumed)

    @guarded
    async def mqtt_disconnect(self, message: dict[str, Any]) -> None:
        log.warning("gateway lost %s: %s", message["broker"], message["reason"])

    @guarded
    async def mqtt_message(self, message: dict[str, Any]) -> None:
        mqtt = MqttCommands(self.channel_layer, message["reply_channel"])
        if message["topic"].startswith(CONTROL_PREFIX):
            await self.control(mqtt, message)
            return
        if message["payload_error"]:
            log.warning("ignoring %s: %s", message["topic"], message["payload_error"])
            return
        value = reading_value(message["payload"])
        if value is None:
            log.warning("ignoring %s: not a number: %r", message["topic"], message["payload"])
            return
        levels = message["topic"].split("/")
        reading, created = await Reading.objects.aget_or_create(
            message_id=message["id"],
            defaults={
                "topic": message["topic"],
                "device": levels[-2] if len(levels) > 1 else message["topic"],
                "quantity": levels[-1],
                "value": value,
            },
        )
        if not created:
            return  # a redelivery of a reading already handled
        await show(self.channel_layer, "mqtt", f"{message['topic']} = {value:g}")
        threshold = default_threshold()
        if message["subscription"]:
            watch = await Watch.objects.filter(topic=message["subscription"]).afirst()
            if watch is not None:
                threshold = watch.threshold
        if value > threshold:
            alert = {
                "topic": message["topic"],
                "value": value,
                "threshold": threshold,
                "reading": reading.pk,
            }
            await mqtt.publish(
                ALERT_PREFIX + message["topic"],
                alert,
                qos=1,
                id=f"alert-{reading.pk}",
                result_channel=self.scope["channel"],
            )

    async def control(self, mqtt: MqttCommands, message: dict[str, Any]) -> None:
        request = message["payload"] if isinstance(message["payload"], dict) else {}
        action = message["topic"].removeprefix(CONTROL_PREFIX)
        topic = request.get("topic")
        pending = Pending(
            action=action,
            topic=topic if isinstance(topic, str) else "",
            mqtt=mqtt,
            response_topic=message["properties"].get("response_topic"),
            correlation_data=message["properties"].get("correlation_data"),
        )
        if not pending.topic or action not in ("watch", "unwatch"):
            await pending.answer(ok=False, error=f"unknown request {action!r} or no topic")
            return
        command_id = f"{action}-{uuid.uuid4().hex}"
        # the gateway answers on our channel with mqtt.result once the broker granted it
        self.pending[command_id] = pending
        channel = self.scope["channel"]
        if action == "watch":
            threshold = reading_value(request.get("threshold", default_threshold()))
            if threshold is None:
                del self.pending[command_id]
                await pending.answer(ok=False, error="threshold must be a number")
                return
            await Watch.objects.aupdate_or_create(
                topic=pending.topic, defaults={"threshold": threshold}
            )
            await mqtt.subscribe(
                pending.topic,
                qos=1,
                channel=channel,
                payload="json",
                id=command_id,
                result_channel=channel,
            )
        else:
            await Watch.objects.filter(topic=pending.topic).adelete()
            await mqtt.unsubscribe(
                pending.topic, channel=channel, id=command_id, result_channel=channel
            )

    @guarded
    async def mqtt_result(self, message: dict[str, Any]) -> None:
        command_id = message["id"] or ""
        if command_id.startswith("alert-"):
            if message["ok"]:
                await Reading.objects.filter(pk=int(command_id[6:])).aupdate(alerted=True)
            else:
                log.warning("alert %s not published: %s", command_id, message["error"])
            return
        pending = self.pending.pop(command_id, None)
        if pending is None:
            return  # a request from before a worker restart
        if not message["ok"]:
            log.warning("%s %s failed: %s", pending.action, pending.topic, message["error"])
            if pending.action == "watch":
                await Watch.objects.filter(topic=pending.topic).adelete()
        await pending.answer(ok=message["ok"], error=message["error"])


@dataclass
class Pending:
    """A control request waiting for the gateway's mqtt.result."""

    action: str
    topic: str
    mqtt: MqttCommands
    response_topic: str | None
    correlation_data: bytes | None

    async def answer(self, *, ok: bool, error: str | None) -> None:
        """Answer on the request's MQTT 5 response topic, if it named one."""
        if not self.response_topic:
            return
        properties = {}
        if self.correlation_data is not None:
            properties["correlation_data"] = self.correlation_data
        body = {"ok": ok, "error": error, "action": self.action, "topic": self.topic}
        await self.mqtt.publish(self.response_topic, body, qos=1, properties=properties)
