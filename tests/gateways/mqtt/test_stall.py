"""A consumer that stops reading for longer than several keep-alives: nothing may be lost.

Real processes: mosquitto (``max_queued_messages 0``, so the broker loses nothing itself), Redis
with a small channel capacity (the layer fills within a second), the ``gateway-mqtt`` binary with
the default YAML plus a 2-second keep-alive, and a paho publisher. Nobody reads the channel until
the gateway has been stalled for four keep-alive intervals; then the test drains it and counts.

The stall used to end the session: the gateway stopped reading the socket, the broker's PINGRESP
went unread, the keep-alive expired and a reconnect with ``clean_start: true`` threw away every
message the broker had sent and not had acknowledged (3,989 of 5,000 lost).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.client import Client
from paho.mqtt.enums import CallbackAPIVersion

from core.layers import resolve_layer
from core.testing import HOST, GatewayProcess, MosquittoServer, RedisServer, until
from tests.gateways.mqtt.conftest import TIMEOUT, MqttTestClient

Start = Callable[[MosquittoServer], MosquittoServer]

KEEPALIVE = 2
COUNT = 3000
#: what makes the layer full within a second: the gateway stalls long before COUNT arrive
CAPACITY = 50
BROKER = ["max_queued_messages 0", "sys_interval 1"]


def integration(broker: MosquittoServer, layer: str, **mqtt: Any) -> dict[str, Any]:
    """The default YAML: a broker, one QoS 1 subscription, and the short keep-alive."""
    section = {
        "host": broker.host,
        "port": broker.port,
        "keepalive": KEEPALIVE,
        "subscriptions": [{"topic": "seq/#", "qos": 1}],
        **mqtt,
    }
    # the layer's capacity (CAPACITY), not the default inbound_capacity: the channel fills up
    return {
        "gateway": "mqtt",
        "name": "seq",
        "layer": layer,
        "inbound_capacity": None,
        "mqtt": section,
    }


class Seen:
    """Sequence numbers that arrived on the layer, and how many deliveries it took."""

    def __init__(self) -> None:
        self.numbers: set[int] = set()
        self.ids: dict[int, set[str]] = {}
        self.deliveries = 0

    async def read(self, layer: Any, channel: str, enough: Callable[[], bool]) -> None:
        while not enough():
            message = await asyncio.wait_for(layer.receive(channel), TIMEOUT)
            if message["type"] == "mqtt.message":
                number = int(message["payload"])
                self.numbers.add(number)
                self.ids.setdefault(number, set()).add(message["id"])
                self.deliveries += 1


async def publish(port: int, numbers: range, *, qos: int = 1, protocol: int = 5) -> None:
    publisher = MqttTestClient(port, protocol=protocol)
    try:
        payloads = [b"%d" % n for n in numbers]
        await asyncio.to_thread(publisher.publish_many, "seq/n", payloads, qos)
    finally:
        publisher.close()


async def stalled_for(gateway: GatewayProcess, seconds: float) -> str:
    """Wait until the gateway has been stalled ``seconds`` in all; return /readyz meanwhile."""
    await until(lambda: gateway.metric("gateway_stalled", gateway="seq") == 1, TIMEOUT, "stall")
    status, body = gateway.get("/readyz")
    assert status == 503 and "stalled" in body and "layer full on channel 'seq'" in body, body
    await until(
        lambda: gateway.metric("gateway_stalled_seconds_total", gateway="seq") >= seconds,
        TIMEOUT + seconds,
        f"{seconds} s of stall",
    )
    return body


def offline_subscriber(port: int) -> None:
    """Leave a persistent QoS 1 session for ``seq/#`` behind at the broker."""
    client = Client(CallbackAPIVersion.VERSION2, client_id="offline", clean_session=False)
    client.connect(HOST, port)
    client.loop_start()
    try:
        done = threading.Event()
        client.on_subscribe = lambda *args: done.set()
        client.subscribe("seq/#", 1)
        assert done.wait(TIMEOUT)
    finally:
        client.disconnect()
        client.loop_stop()


def stall_lines(lines: list[str]) -> tuple[list[str], list[str]]:
    starts = [line for line in lines if "WARNING" in line and "seq: stalled:" in line]
    ends = [line for line in lines if "WARNING" in line and "seq: stall over after" in line]
    return starts, ends


async def drain_and_check(
    gateway: GatewayProcess, layer_url: str, count: int, seen: Seen | None = None
) -> Seen:
    layer = resolve_layer(layer_url)
    seen = seen or Seen()
    try:
        await seen.read(layer, "seq", lambda: len(seen.numbers) >= count)
    finally:
        await layer.close_pools()
    assert sorted(seen.numbers) == list(range(count))  # none lost
    # a redelivery carries the id of the first delivery: consumers can de-duplicate
    assert all(len(ids) == 1 for ids in seen.ids.values())
    await gateway.wait_ready(TIMEOUT)
    assert gateway.metric("gateway_stalled", gateway="seq") == 0
    assert gateway.metric("gateway_dropped_total", gateway="seq") == 0
    return seen


@pytest.mark.parametrize(
    ("protocol", "inflight"),
    [
        ("5", None),
        ("3.1.1", None),
        # no limit on what the broker sends unacknowledged (3.1.1 has no receive maximum, and
        # mosquitto 2.0.11 overshoots an MQTT 5 one): the hold overflows, the rest stays with
        # the broker, and the gateway resumes its session to fetch it
        ("3.1.1", 0),
    ],
    ids=["mqtt5", "mqtt311", "mqtt311-unlimited-inflight"],
)
async def test_qos1_stall_longer_than_keepalives_loses_nothing(
    tmp_path: Path,
    redis_server: RedisServer,
    start_service: Start,
    protocol: str,
    inflight: int | None,
) -> None:
    extra = [] if inflight is None else [f"max_inflight_messages {inflight}"]
    broker = start_service(MosquittoServer(extra_config=BROKER + extra))
    url = f"{redis_server.url}?capacity={CAPACITY}"
    # a hold smaller than COUNT, so a broker without flow control overflows it
    config = integration(broker, url, protocol=protocol, max_pending=1000)
    gateway = GatewayProcess.from_config(tmp_path, config).start()
    try:
        await publish(broker.port, range(COUNT), protocol=5 if protocol == "5" else 3)
        await stalled_for(gateway, 4 * KEEPALIVE)
        held = gateway.metric("gateway_held_messages", gateway="seq")
        assert 0 < held <= 1000  # mqtt.max_pending
        deferred = gateway.metric("mqtt_deferred_total", gateway="seq")
        seen = await drain_and_check(gateway, url, COUNT)
        resumes = gateway.metric("mqtt_session_resumes_total", gateway="seq")
        duplicates = gateway.metric("gateway_duplicates_total", gateway="seq")
        lines = gateway.server.drain() if gateway.server else []
    finally:
        code = gateway.stop()
    assert code == 0
    text = "\n".join(lines)
    # our pushback never looks like a dead broker, and the session was never thrown away
    assert "keep-alive" not in text and "new session" not in text, text
    starts, ends = stall_lines(lines)
    assert len(starts) == 1 and len(ends) == 1, (starts, ends)
    if inflight == 0:
        assert deferred > 0 and resumes > 0  # the path beyond the hold was taken
    # every duplicate delivery the consumer saw was counted by the gateway
    assert seen.deliveries - COUNT <= duplicates, (seen.deliveries, duplicates)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"], ids=["mqtt5", "mqtt311"])
async def test_qos1_stall_across_a_broker_restart_loses_nothing(
    tmp_path: Path, redis_server: RedisServer, start_service: Start, protocol: str
) -> None:
    broker = start_service(MosquittoServer(persistent=True, extra_config=BROKER))
    url = f"{redis_server.url}?capacity={CAPACITY}"
    config = integration(broker, url, protocol=protocol, reconnect={"initial": 0.1, "maximum": 1})
    gateway = GatewayProcess.from_config(tmp_path, config).start()
    version = 5 if protocol == "5" else 3
    try:
        await publish(broker.port, range(COUNT // 2), protocol=version)
        await stalled_for(gateway, 2 * KEEPALIVE)
        await asyncio.to_thread(broker.save_and_kill)
        await asyncio.to_thread(broker.start)
        await publish(broker.port, range(COUNT // 2, COUNT), protocol=version)
        await stalled_for(gateway, 4 * KEEPALIVE)
        await drain_and_check(gateway, url, COUNT)
    finally:
        code = gateway.stop()
    assert code == 0


async def test_qos0_stall_drops_are_counted_exactly(
    tmp_path: Path, redis_server: RedisServer, start_service: Start
) -> None:
    broker = start_service(MosquittoServer(extra_config=BROKER))
    url = f"{redis_server.url}?capacity={CAPACITY}"
    config = integration(broker, url, subscriptions=[{"topic": "seq/#", "qos": 0}], buffer=200)
    gateway = GatewayProcess.from_config(tmp_path, config).start()
    layer = resolve_layer(url)
    seen = Seen()

    def dropped() -> float:
        return gateway.metric("gateway_dropped_total", gateway="seq", reason="buffer_full")

    try:
        await publish(broker.port, range(COUNT), qos=0)
        await stalled_for(gateway, KEEPALIVE)
        await until(lambda: dropped() > 0, TIMEOUT, "QoS 0 drops")
        # the gateway read every message the broker sent: each arrives or is counted
        await seen.read(layer, "seq", lambda: len(seen.numbers) + dropped() >= COUNT)
        await gateway.wait_ready(TIMEOUT)
        assert len(seen.numbers) + dropped() == COUNT
        assert seen.deliveries == len(seen.numbers)  # QoS 0 is never redelivered
        lines = gateway.server.drain() if gateway.server else []
    finally:
        await layer.close_pools()
        code = gateway.stop()
    assert code == 0
    assert any("WARNING" in line and "buffer full" in line for line in lines)


async def test_broker_drops_are_watched(
    tmp_path: Path, redis_server: RedisServer, start_service: Start
) -> None:
    # a broker with mosquitto's small default queue, and an offline persistent subscriber
    broker = start_service(
        MosquittoServer(extra_config=["max_queued_messages 10", "sys_interval 1"])
    )
    config = integration(broker, redis_server.url)
    gateway = GatewayProcess.from_config(tmp_path, config).start()
    try:
        await asyncio.to_thread(offline_subscriber, broker.port)
        await until(lambda: gateway.metric("mqtt_broker_dropped_messages", gateway="seq") >= 0)
        before = gateway.metric("mqtt_broker_dropped_messages", gateway="seq")
        await publish(broker.port, range(50))
        await until(
            lambda: gateway.metric("mqtt_broker_dropped_messages", gateway="seq") >= before + 40,
            TIMEOUT,
            "the broker's drop counter",
        )
        assert gateway.metric("mqtt_broker_stored_messages", gateway="seq") >= 0
        line = gateway.server.wait_for("dropped", TIMEOUT) if gateway.server else ""
    finally:
        code = gateway.stop()
    assert code == 0
    assert "WARNING" in line and "max_queued_messages" in line, line


async def test_without_a_persistent_session_drops_beyond_the_hold_are_counted(
    tmp_path: Path, redis_server: RedisServer, start_service: Start
) -> None:
    # clean_start: true on 3.1.1: the broker forgets the session at every disconnect, so the
    # gateway cannot leave messages with it; beyond the hold they are acknowledged and counted
    broker = start_service(MosquittoServer(extra_config=[*BROKER, "max_inflight_messages 0"]))
    url = f"{redis_server.url}?capacity={CAPACITY}"
    config = integration(broker, url, protocol="3.1.1", clean_start=True, max_pending=100)
    gateway = GatewayProcess.from_config(tmp_path, config).start()
    layer = resolve_layer(url)
    seen = Seen()

    def dropped() -> float:
        return gateway.metric("gateway_dropped_total", gateway="seq", reason="hold_full")

    try:
        await publish(broker.port, range(COUNT), protocol=3)
        await until(lambda: dropped() > 0, TIMEOUT, "drops beyond the hold")
        await seen.read(layer, "seq", lambda: len(seen.numbers) + dropped() >= COUNT)
        assert len(seen.numbers) + dropped() == COUNT
        # the drops are reported once a second: wait for that line rather than race it
        await asyncio.to_thread(gateway.wait_for, "the hold is full", TIMEOUT)
        lines = gateway.tail().splitlines()
    finally:
        await layer.close_pools()
        code = gateway.stop()
    assert code == 0
    assert any("WARNING" in line and "session does not outlive" in line for line in lines)
    assert any("WARNING" in line and "the hold is full" in line for line in lines)
