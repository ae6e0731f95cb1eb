"""Hostile MQTT input from issue 14: 65,535-byte topics and ``$`` topics, on real brokers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from channels.layers import InMemoryChannelLayer

from core.layers import resolve_layer
from core.testing import STARTED_LINE, GatewayProcess, MosquittoServer, RedisServer, receive
from gateways.mqtt.translate import InvalidCommand, parse_publish, parse_subscribe
from tests.gateways.mqtt.conftest import (
    MqttTestClient,
    command,
    gateway_config,
    running,
)
from tests.support.example import ROOT

pytestmark = pytest.mark.timeout(180)

MakeClient = Callable[..., MqttTestClient]
#: the longest topic MQTT allows (a 2-byte length)
LONGEST = 65_535


# -- item 11: `$` topics belong to the broker ---------------------------------------------------


@pytest.mark.parametrize("topic", ["$SYS/broker/x", "$share/g/t", "$anything"])
def test_publish_to_dollar_topics_is_refused(topic: str) -> None:
    with pytest.raises(InvalidCommand, match=r"starts with '\$'"):
        parse_publish({"topic": topic, "payload": "x", "qos": 1}, mqtt5=True)
    # subscribing to $SYS stays allowed: reading the broker's statistics is legitimate
    assert parse_subscribe(
        {"topic": "$SYS/#"}, default_channel="c", default_format="bytes", mqtt5=True
    )


async def test_dollar_publish_is_refused_before_the_broker_drops_us(
    mosquitto_server: MosquittoServer, mqtt_client: MakeClient
) -> None:
    layer = InMemoryChannelLayer()
    config = gateway_config(mosquitto_server, name="sensors", subscriptions=[])
    async with running(config, layer) as gateway:
        client = mqtt_client(mosquitto_server.port)
        client.subscribe("after/#", qos=1)
        publish = {"type": "mqtt.publish", "topic": "$SYS/broker/evil", "payload": "x", "qos": 1}
        result = await command(layer, publish)
        assert result["ok"] is False and "starts with '$'" in result["error"]
        # mosquitto dropped the whole connection for this; the same connection carries on
        ok = await command(layer, {"type": "mqtt.publish", "topic": "after/a", "qos": 1})
        assert ok["ok"], ok
        assert (await client.anext()).topic == "after/a"
        connects = 0
        while True:
            try:
                message = await asyncio.wait_for(layer.receive("sensors"), 0.5)
            except TimeoutError:
                break
            connects += message["type"] == "mqtt.connect"
        assert connects == 1  # never reconnected
        assert not gateway.ready_reasons()


# -- item 1: long topics in log lines -----------------------------------------------------------


def long_topics(count: int) -> list[str]:
    return [f"big/{n:03d}/" + "t" * (LONGEST - 8) for n in range(count)]


def test_long_topic_errors_are_clipped() -> None:
    topic = "a/" + "b" * (LONGEST - 4) + "/#"
    with pytest.raises(InvalidCommand) as refused:
        parse_publish({"topic": topic}, mqtt5=True)
    assert len(str(refused.value)) < 300
    with pytest.raises(InvalidCommand) as refused:
        parse_subscribe(
            {"topic": "a/b#" + "c" * 60_000},
            default_channel="c",
            default_format="bytes",
            mqtt5=True,
        )
    assert len(str(refused.value)) < 300


async def test_long_topics_over_max_payload_do_not_stall_the_gateway(
    tmp_path: Path,
    redis_server: RedisServer,
    mosquitto_server: MosquittoServer,
    mqtt_client: MakeClient,
) -> None:
    config: dict[str, Any] = {
        **gateway_config(
            mosquitto_server,
            name="hostile",
            protocol="3.1.1",  # MQTT 5 would have the broker hold them back (Maximum Packet Size)
            max_payload=100,
            subscriptions=[{"topic": "big/#", "qos": 1}, {"topic": "ok/#", "qos": 1}],
        ),
        "layer": redis_server.url,
    }
    gateway = GatewayProcess.from_config(
        tmp_path, config, cwd=ROOT, ready_line=STARTED_LINE
    ).start()
    layer = resolve_layer(redis_server.url)
    try:
        await gateway.wait_ready()
        client = mqtt_client(mosquitto_server.port, protocol=4)
        # each was a 19 s stall logging its topic; 20 of them froze the gateway for minutes
        await asyncio.to_thread(
            lambda: [client.publish(topic, b"x" * 200, qos=1) for topic in long_topics(20)]
        )
        await asyncio.to_thread(client.publish, "ok/after", b"fine", 1)
        message = await receive(layer, "hostile", "mqtt.message")
        assert message["topic"] == "ok/after"
        assert (await asyncio.to_thread(gateway.get, "/healthz"))[0] == 200
        assert gateway.server is not None
        lines = [line for line in gateway.server.output if "over mqtt.max_payload" in line]
        assert len(lines) == 20 and all(len(line) < 1000 for line in lines)
        assert gateway.metric("gateway_dropped_total", reason="too_large") == 20
    finally:
        await layer.close_pools()
        assert gateway.stop() == 0
