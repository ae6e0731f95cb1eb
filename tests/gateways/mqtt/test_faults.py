"""Faults with real processes: the broker, then Redis, killed mid-stream; count what arrived.

The gateway runs as ``python -m gateways.mqtt.cli``; the test publishes sequence-numbered QoS 1
messages with a paho client and reads the layer the way a consumer would.

Both servers are configured so that *they* lose nothing: mosquitto persists sessions and keeps
an unbounded queue (its default drops QoS 1 messages beyond 1000 queued per client), and Redis
appends and fsyncs every write. Whatever goes missing then went missing in the gateway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.layers import resolve_layer
from core.retry import LAYER_ERRORS
from core.testing import STARTED_LINE, GatewayProcess, MosquittoServer, RedisServer, until
from tests.gateways.mqtt.conftest import (
    TIMEOUT,
    MqttTestClient,
    gateway_config,
)
from tests.support.example import ROOT

Start = Callable[[MosquittoServer], MosquittoServer]


class Seen:
    """What arrived: the ids each sequence number came with, and how often it came."""

    def __init__(self) -> None:
        self.ids: dict[int, set[str]] = {}
        self.deliveries = 0

    @property
    def duplicates(self) -> int:
        return self.deliveries - len(self.ids)

    async def read(self, layer: Any, channel: str, until_count: int) -> None:
        """Receive ``mqtt.message`` events until ``until_count`` distinct numbers came."""
        while len(self.ids) < until_count:
            message = await asyncio.wait_for(layer.receive(channel), TIMEOUT * 2)
            if message["type"] == "mqtt.message":
                self.ids.setdefault(int(message["payload"]), set()).add(message["id"])
                self.deliveries += 1


async def publish(port: int, numbers: range) -> None:
    publisher = MqttTestClient(port)
    try:
        await asyncio.to_thread(publisher.publish_many, "seq/n", [b"%d" % n for n in numbers])
    finally:
        publisher.close()


async def test_broker_killed_mid_stream_loses_no_qos1_message(
    tmp_path: Path, redis_server: RedisServer, start_service: Start
) -> None:
    count = 10_000
    broker = start_service(MosquittoServer(persistent=True, extra_config=["max_queued_messages 0"]))
    # a small channel capacity stalls the gateway mid-stream (withholding acks) until we read
    url = redis_server.url + "?capacity=2000"
    config = {
        **gateway_config(
            broker,
            name="seq",
            client_id="seq-gateway",
            clean_start=False,
            session_expiry=3600,
            subscriptions=[{"topic": "seq/#", "qos": 1}],
        ),
        "layer": url,
        "inbound_capacity": None,  # the layer's capacity above, not 100,000
    }
    gateway = GatewayProcess.from_config(
        tmp_path, config, cwd=ROOT, ready_line=STARTED_LINE
    ).start()
    layer = resolve_layer(url)
    seen = Seen()
    try:
        await gateway.wait_ready()
        await publish(broker.port, range(count // 2))
        # the layer is full: the gateway holds unacknowledged messages, the broker the rest
        await until(lambda: gateway.metric("gateway_backpressure_waits_total") > 0)
        await asyncio.to_thread(broker.save_and_kill)
        await asyncio.to_thread(broker.start)
        await publish(broker.port, range(count // 2, count))
        await seen.read(layer, "seq", count)
        assert sorted(seen.ids) == list(range(count))  # zero lost
        # the messages the gateway held unacknowledged came again after the restart (it hands
        # its own copies off too), each time with the same id: consumers can de-duplicate
        assert seen.duplicates > 0
        assert all(len(found) == 1 for found in seen.ids.values())
        await until(lambda: gateway.get("/readyz")[0] == 200)
    finally:
        code = gateway.stop()
        await layer.close_pools()
    assert code == 0


async def test_redis_killed_mid_stream_loses_no_qos1_message(
    tmp_path: Path, durable_redis_server: RedisServer, start_service: Start
) -> None:
    count = 2000
    redis = durable_redis_server
    broker = start_service(MosquittoServer(extra_config=["max_queued_messages 0"]))
    url = redis.url + "?capacity=100000"
    config = {
        **gateway_config(broker, name="seq", subscriptions=[{"topic": "seq/#", "qos": 1}]),
        "layer": url,
    }
    gateway = GatewayProcess.from_config(
        tmp_path, config, cwd=ROOT, ready_line=STARTED_LINE
    ).start()
    seen = Seen()
    try:
        await gateway.wait_ready()
        await publish(broker.port, range(count // 2))
        layer = resolve_layer(url)
        await seen.read(layer, "seq", 100)  # flowing: now kill Redis
        await layer.close_pools()
        await asyncio.to_thread(redis.kill)
        await publish(broker.port, range(count // 2, count))  # the broker takes them meanwhile
        await until(lambda: "layer unreachable" in gateway.get("/readyz")[1])
        await asyncio.to_thread(redis.start)
        layer = resolve_layer(url)
        for _ in range(3):
            try:
                await seen.read(layer, "seq", count)
                break
            except LAYER_ERRORS:  # a connection from before the restart
                continue
        assert sorted(seen.ids) == list(range(count))  # zero lost
        assert all(len(found) == 1 for found in seen.ids.values())
        await until(lambda: gateway.get("/readyz")[0] == 200)
        await layer.close_pools()
    finally:
        code = gateway.stop()
    assert code == 0


async def test_gateway_killed_mid_stream_loses_no_qos1_message(
    tmp_path: Path, redis_server: RedisServer, start_service: Start
) -> None:
    # what a premature acknowledgement would lose: the messages the gateway held when it died
    count = 2000
    broker = start_service(MosquittoServer(persistent=True, extra_config=["max_queued_messages 0"]))
    url = redis_server.url + "?capacity=500"
    config = {
        **gateway_config(
            broker,
            name="seq",
            client_id="seq-gateway",
            clean_start=False,
            subscriptions=[{"topic": "seq/#", "qos": 1}],
        ),
        "layer": url,
        "inbound_capacity": None,  # the layer's capacity above, not 100,000
    }
    first = GatewayProcess.from_config(tmp_path, config, cwd=ROOT, ready_line=STARTED_LINE).start()
    second = GatewayProcess.from_config(tmp_path, config, cwd=ROOT, ready_line=STARTED_LINE)
    layer = resolve_layer(url)
    seen = Seen()
    try:
        await first.wait_ready()
        await publish(broker.port, range(count))
        # stalled on a full layer for a few retries: every ack it sent has reached the broker
        await until(lambda: first.metric("gateway_retries_total", kind="layer_send") >= 3)
        assert first.kill() == -9
        second.start()
        await seen.read(layer, "seq", count)
        assert sorted(seen.ids) == list(range(count))  # zero lost
        # a message handed off but not yet acknowledged when the process died comes again,
        # with the same id (how many depends on when the kill lands: none to a few)
        assert all(len(found) == 1 for found in seen.ids.values())
    finally:
        code = second.stop()
        await layer.close_pools()
    assert code == 0
