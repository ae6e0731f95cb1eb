"""gateways/mqtt/consumers.py: MqttConsumer answers an MQTT 5 request in one call."""

from __future__ import annotations

from typing import Any

import pytest

from core.consumers import InvalidCommand
from gateways.mqtt.consumers import MqttConsumer, mqtt_publish, mqtt_subscribe
from tests.gateways.conftest import Handle, sent


def request(**properties: Any) -> dict[str, Any]:
    return {
        "type": "mqtt.message",
        "gateway": "sensors",
        "id": "m1",
        "reply_channel": "sensors.send",
        "topic": "devices/7/ask",
        "payload": {"question": "temperature?"},
        "format": "json",
        "payload_error": None,
        "qos": 1,
        "retain": False,
        "dup": False,
        "subscription": "devices/+/ask",
        "properties": properties,
    }


class Responder(MqttConsumer):
    async def mqtt_message(self, message: dict[str, Any]) -> None:
        await self.reply({"temperature": 21.5})
        await self.mqtt.subscribe("devices/7/#", payload="json", channel="devices")


async def test_reply_goes_to_the_response_topic_with_the_correlation_data(
    handle: Handle,
) -> None:
    asked = request(response_topic="devices/7/answer", correlation_data=b"\x01\x02")
    responder = await handle(Responder, asked)
    assert await sent(responder, "sensors.send") == mqtt_publish(
        "devices/7/answer",
        {"temperature": 21.5},
        qos=1,
        properties={"correlation_data": b"\x01\x02"},
    )
    assert await sent(responder, "sensors.send") == mqtt_subscribe(
        "devices/7/#", payload="json", channel="devices"
    )


async def test_a_message_without_a_response_topic_cannot_be_answered(handle: Handle) -> None:
    with pytest.raises(InvalidCommand, match="names no response_topic"):
        await handle(Responder, request())
