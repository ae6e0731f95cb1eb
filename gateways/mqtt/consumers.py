"""Django-side helpers for the MQTT gateway: typed commands, checked before they leave, and a
generic consumer that answers MQTT 5 requests in one call.

    from gateways.mqtt.consumers import MqttCommands

    class SensorConsumer(AsyncConsumer):
        async def mqtt_message(self, message):
            mqtt = MqttCommands(self.channel_layer, message["reply_channel"])
            await mqtt.publish("alerts/boiler", {"temperature": 92}, qos=1)

Builders (``mqtt_publish``, ``mqtt_subscribe``, ``mqtt_unsubscribe``) return the command dict
and raise :class:`core.consumers.InvalidCommand` for anything the gateway would refuse (a
wildcard in a publish topic, QoS 3, a ``$SYS`` topic, an unknown key …), using the gateway's
own parsers (``translate.parse_*``). Checks that depend on the YAML (``mqtt.protocol: 3.1.1``
refuses MQTT 5 properties) are left to the gateway. :class:`MqttCommands` sends them; every
method waits (``timeout`` seconds at most, then raises) while the command channel is full or
the layer is down (:func:`core.consumers.send_command`). Pass ``result_channel`` (and an
``id``) to get the ``mqtt.result`` there, or ``wait=True`` to get it back. The keys are those of
``gateways/mqtt/README.md``; the guide is ``docs/consumers.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from core.consumers import (
    CommandId,
    Commands,
    GatewayConsumer,
    InvalidCommand,
    Message,
    Validator,
    command,
)
from gateways.mqtt.translate import parse_publish, parse_subscribe, parse_unsubscribe

__all__ = [
    "VALIDATORS",
    "MqttCommands",
    "MqttConsumer",
    "mqtt_publish",
    "mqtt_subscribe",
    "mqtt_unsubscribe",
]

PayloadFormat = Literal["bytes", "text", "json", "auto"]
RetainHandling = Literal["send", "if_new", "never", 0, 1, 2]


def _check_subscribe(body: Mapping[str, Any]) -> object:
    # the gateway fills in its own inbound channel and payload format; MQTT 5 is the superset
    return parse_subscribe(body, default_channel="inbound", default_format="bytes", mqtt5=True)


#: every command the MQTT gateway takes, with the gateway's own check of its keys
VALIDATORS: dict[str, Validator] = {
    "mqtt.publish": lambda body: parse_publish(body, mqtt5=True),
    "mqtt.subscribe": _check_subscribe,
    "mqtt.unsubscribe": parse_unsubscribe,
    "mqtt.resync": lambda body: None,  # internal: replicas tell each other; any body is taken
}


def _checked(type_: str, id: CommandId | None, result_channel: str | None, **keys: Any) -> Message:
    return MqttCommands.check(command(type_, id=id, result_channel=result_channel, **keys))


def mqtt_publish(
    topic: str,
    payload: Any = None,
    *,
    qos: int = 0,
    retain: bool = False,
    properties: Mapping[str, Any] | None = None,
    id: CommandId | None = None,
    result_channel: str | None = None,
) -> Message:
    """``mqtt.publish``: bytes go as they are, str as UTF-8, ``None`` as an empty payload, any
    other value as JSON. ``properties`` (MQTT 5): ``content_type``, ``response_topic``,
    ``correlation_data``, ``user_properties``, ``message_expiry``, ``payload_format_indicator``."""
    return _checked(
        "mqtt.publish",
        id,
        result_channel,
        topic=topic,
        payload=payload,
        qos=qos,
        retain=retain,
        properties=None if properties is None else dict(properties),
    )


def mqtt_subscribe(
    topic: str,
    *,
    qos: int = 1,
    channel: str | None = None,
    payload: PayloadFormat | None = None,
    no_local: bool | None = None,
    retain_as_published: bool | None = None,
    retain_handling: RetainHandling | None = None,
    id: CommandId | None = None,
    result_channel: str | None = None,
) -> Message:
    """``mqtt.subscribe``: matches of the filter ``topic`` go to ``channel`` (default: the
    integration's inbound channel), decoded as ``payload``; the last three are MQTT 5 options."""
    return _checked(
        "mqtt.subscribe",
        id,
        result_channel,
        topic=topic,
        qos=qos,
        channel=channel,
        payload=payload,
        no_local=no_local,
        retain_as_published=retain_as_published,
        retain_handling=retain_handling,
    )


def mqtt_unsubscribe(
    topic: str,
    *,
    channel: str | None = None,
    id: CommandId | None = None,
    result_channel: str | None = None,
) -> Message:
    """``mqtt.unsubscribe`` of the filter ``topic`` (to ``channel``, or every run-time route)."""
    return _checked("mqtt.unsubscribe", id, result_channel, topic=topic, channel=channel)


class MqttCommands(Commands):
    """Send MQTT commands to one integration's command channel (``NAME.send``, every event's
    ``reply_channel``).

    Every method checks its command first (:class:`~core.consumers.InvalidCommand`, nothing
    sent) and returns ``None``, or with ``wait=True`` the ``mqtt.result``
    (:class:`~core.consumers.CommandFailed` on ``ok: false``,
    :class:`~core.consumers.ResultTimeout` after ``timeout`` seconds).
    """

    protocol = "mqtt"
    validators = VALIDATORS

    async def publish(
        self,
        topic: str,
        payload: Any = None,
        *,
        qos: int = 0,
        retain: bool = False,
        properties: Mapping[str, Any] | None = None,
        id: CommandId | None = None,
        result_channel: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`mqtt_publish`; the result has ``topic``, ``qos``, ``mid``."""
        message = mqtt_publish(
            topic,
            payload,
            qos=qos,
            retain=retain,
            properties=properties,
            id=id,
            result_channel=result_channel,
        )
        return await self.submit(message, wait=wait, timeout=timeout)

    async def subscribe(
        self,
        topic: str,
        *,
        qos: int = 1,
        channel: str | None = None,
        payload: PayloadFormat | None = None,
        no_local: bool | None = None,
        retain_as_published: bool | None = None,
        retain_handling: RetainHandling | None = None,
        id: CommandId | None = None,
        result_channel: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`mqtt_subscribe`; the result has ``granted_qos``."""
        message = mqtt_subscribe(
            topic,
            qos=qos,
            channel=channel,
            payload=payload,
            no_local=no_local,
            retain_as_published=retain_as_published,
            retain_handling=retain_handling,
            id=id,
            result_channel=result_channel,
        )
        return await self.submit(message, wait=wait, timeout=timeout)

    async def unsubscribe(
        self,
        topic: str,
        *,
        channel: str | None = None,
        id: CommandId | None = None,
        result_channel: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`mqtt_unsubscribe`; the result has ``removed``."""
        message = mqtt_unsubscribe(topic, channel=channel, id=id, result_channel=result_channel)
        return await self.submit(message, wait=wait, timeout=timeout)


class MqttConsumer(GatewayConsumer):
    """A consumer of MQTT events (``mqtt_message``, ``mqtt_connect`` … as in any consumer) that
    answers an MQTT 5 request in one call: :meth:`reply`; :attr:`mqtt` sends any command."""

    commands_class = MqttCommands

    @property
    def mqtt(self) -> MqttCommands:
        """:class:`MqttCommands` to the integration the current event came from."""
        return MqttCommands(self.channel_layer, self.reply_channel())

    async def reply(
        self,
        payload: Any = None,
        *,
        qos: int = 1,
        properties: Mapping[str, Any] | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """Publish ``payload`` to the current message's MQTT 5 ``response_topic``, with its
        ``correlation_data`` (request/response, MQTT 5 4.10); an error if it named none."""
        event = self.current("reply")
        request = event.get("properties") or {}
        topic = request.get("response_topic")
        if not isinstance(topic, str):
            raise InvalidCommand(
                f"the {event.get('type')} on {event.get('topic')!r} names no response_topic "
                "(an MQTT 5 request does): publish to a topic of your choice instead"
            )
        answer = dict(properties or {})
        if request.get("correlation_data") is not None:
            answer.setdefault("correlation_data", request["correlation_data"])
        return await self.mqtt.publish(
            topic, payload, qos=qos, properties=answer or None, wait=wait, timeout=timeout
        )
