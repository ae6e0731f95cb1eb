"""Django-side helpers: send MQTT gateway commands from a consumer without spelling out dicts.

    from gateways.mqtt.consumers import MqttCommands

    class SensorConsumer(AsyncConsumer):
        async def mqtt_message(self, message):
            mqtt = MqttCommands(self.channel_layer, message["reply_channel"])
            await mqtt.publish("alerts/boiler", {"temperature": 92}, qos=1)

Every method sends one command, waiting (``timeout`` seconds at most, then raising) while the
command channel is full or the layer is down, see :func:`core.consumers.send_command`. Pass
``result_channel`` (and an ``id``) to get the ``mqtt.result`` there. The keys are those of
``gateways/mqtt/README.md``.
"""

from __future__ import annotations

from typing import Any

from core.consumers import send_command
from core.types import ChannelLayer

__all__ = ["MqttCommands", "publish_command", "subscribe_command", "unsubscribe_command"]


def _envelope(
    type_: str, id: str | None, result_channel: str | None, **keys: Any
) -> dict[str, Any]:
    message: dict[str, Any] = {"type": type_}
    if id is not None:
        message["id"] = id
    if result_channel is not None:
        message["result_channel"] = result_channel
    message.update({k: v for k, v in keys.items() if v is not None})
    return message


def publish_command(
    topic: str,
    payload: Any = None,
    *,
    qos: int = 0,
    retain: bool = False,
    properties: dict[str, Any] | None = None,
    id: str | None = None,
    result_channel: str | None = None,
) -> dict[str, Any]:
    """An ``mqtt.publish``: bytes go as they are, str as UTF-8, other values as JSON."""
    return _envelope(
        "mqtt.publish",
        id,
        result_channel,
        topic=topic,
        payload=payload,
        qos=qos,
        retain=retain,
        properties=properties,
    )


def subscribe_command(
    topic: str,
    *,
    qos: int = 1,
    channel: str | None = None,
    payload: str | None = None,
    id: str | None = None,
    result_channel: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """An ``mqtt.subscribe``: matches of ``topic`` go to ``channel`` (default: the inbound one).

    ``options`` are the MQTT 5 subscription options ``no_local``, ``retain_as_published`` and
    ``retain_handling``.
    """
    return _envelope(
        "mqtt.subscribe",
        id,
        result_channel,
        topic=topic,
        qos=qos,
        channel=channel,
        payload=payload,
        **options,
    )


def unsubscribe_command(
    topic: str,
    *,
    channel: str | None = None,
    id: str | None = None,
    result_channel: str | None = None,
) -> dict[str, Any]:
    """An ``mqtt.unsubscribe`` of ``topic`` (to ``channel``, or every run-time route of it)."""
    return _envelope("mqtt.unsubscribe", id, result_channel, topic=topic, channel=channel)


class MqttCommands:
    """Send commands to one MQTT integration's command channel (``NAME.send``)."""

    def __init__(
        self, channel_layer: ChannelLayer, command_channel: str, *, timeout: float = 30.0
    ) -> None:
        self.channel_layer = channel_layer
        self.command_channel = command_channel
        self.timeout = timeout

    async def send(self, command: dict[str, Any]) -> None:
        """Send a command dict as it is."""
        await send_command(self.channel_layer, self.command_channel, command, timeout=self.timeout)

    async def publish(self, topic: str, payload: Any = None, **keys: Any) -> None:
        """See :func:`publish_command`."""
        await self.send(publish_command(topic, payload, **keys))

    async def subscribe(self, topic: str, **keys: Any) -> None:
        """See :func:`subscribe_command`."""
        await self.send(subscribe_command(topic, **keys))

    async def unsubscribe(self, topic: str, **keys: Any) -> None:
        """See :func:`unsubscribe_command`."""
        await self.send(unsubscribe_command(topic, **keys))
