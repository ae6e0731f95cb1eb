"""End to end with real processes: gateway-mqtt, redis-server, mosquitto, manage.py runworker.

- the example integration (examples/sensors.yaml + examples/sensors): a consumer under a real
  runworker subscribes at run time, stores readings and publishes alerts back;
- a shared subscription across two gateway processes: every message consumed exactly once;
- the binary's exit codes.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from core.layers import resolve_layer
from core.testing import STARTED_LINE, GatewayProcess, MosquittoServer, RedisServer, receive, until
from tests.gateways.mqtt.conftest import (
    TIMEOUT,
    MqttTestClient,
    gateway_config,
    publish_properties,
)
from tests.support.example import EXAMPLES, ROOT, example_project

MakeClient = Callable[..., MqttTestClient]


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateways.mqtt.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


async def test_consumer_under_runworker_subscribes_at_run_time(
    tmp_path: Path,
    redis_server: RedisServer,
    mosquitto_server: MosquittoServer,
    mqtt_client: MakeClient,
) -> None:
    project = await asyncio.to_thread(
        example_project, tmp_path, redis_server.url, env={"MQTT_PORT": str(mosquitto_server.port)}
    )
    gateway = project.gateway("sensors.yaml", ready_line=STARTED_LINE).start()
    worker = project.worker("sensors")
    try:
        await gateway.wait_ready()
        client = mqtt_client(mosquitto_server.port)
        client.subscribe("replies/#")
        client.subscribe("alerts/#")
        status = mqtt_client(mosquitto_server.port)
        status.subscribe("gateways/sensors/status")
        assert (await status.anext()).payload == b"online"  # the birth message, retained

        # ask the consumer to watch one more topic: it sends mqtt.subscribe to the gateway and
        # answers on our MQTT 5 response topic once the broker granted it
        request = publish_properties(ResponseTopic="replies/1", CorrelationData=b"req-1")
        watch = {"topic": "lab/+/temperature", "threshold": 25}
        client.publish("sensors-control/watch", json.dumps(watch), properties=request)
        reply = await client.anext(TIMEOUT * 2)  # the first message also waits for Django
        assert reply.topic == "replies/1" and reply.properties.CorrelationData == b"req-1"
        assert json.loads(reply.payload) == {
            "ok": True,
            "error": None,
            "action": "watch",
            "topic": "lab/+/temperature",
        }

        client.publish("lab/kitchen/temperature", b"27.5")  # over the watch's threshold (25)
        alert = await client.anext()
        assert alert.topic == "alerts/lab/kitchen/temperature"
        body = json.loads(alert.payload)
        assert (body["value"], body["threshold"]) == (27.5, 25)

        # the static subscription, default threshold 30: 12 does not alert, 31 does; the
        # consumer handles them in order, so the next alert is the one for 31
        client.publish("sensors/boiler/pressure", b"12")
        client.publish("sensors/boiler/temperature", b'{"value": 31}')
        alert = await client.anext()
        assert alert.topic == "alerts/sensors/boiler/temperature"

        def rows() -> list[tuple[str, float, bool]]:
            return project.rows("SELECT topic, value, alerted FROM sensors_reading ORDER BY id")

        expected = [
            ("lab/kitchen/temperature", 27.5, 1),
            ("sensors/boiler/pressure", 12.0, 0),
            ("sensors/boiler/temperature", 31.0, 1),
        ]
        await until(lambda: rows() == expected, what=f"stored readings (have {rows()})")
    finally:
        worker.stop()
        code = gateway.stop()
    assert code == 0, gateway.tail()
    assert (await status.anext()).payload == b"offline"  # the will, published on a clean stop


async def test_embedded_in_one_process_on_the_memory_layer(
    tmp_path: Path, mosquitto_server: MosquittoServer, mqtt_client: MakeClient
) -> None:
    """``gateways run sensors.yaml`` with the Django settings: gateway and consumers in one
    process, no Redis; the worker listens on every channel the integration delivers to."""
    env = {"MQTT_PORT": str(mosquitto_server.port), "MQTT_CLIENT_ID": "embedded-sensors"}
    project = await asyncio.to_thread(example_project, tmp_path, env=env)
    argv = [
        sys.executable,
        "-m",
        "gateways.cli",
        "run",
        str(EXAMPLES / "sensors.yaml"),
        "--layer",
        "memory://",
    ]
    server = project.server(argv, "running consumers on sensors", name="gateways-run")
    try:
        client = mqtt_client(mosquitto_server.port)
        client.subscribe("alerts/#")
        health = project.gateway("sensors.yaml")  # not started: its /readyz is the one above
        await health.wait_ready()  # connected and subscribed
        client.publish("sensors/boiler/temperature", b"99")
        alert = await client.anext()
        assert alert.topic == "alerts/sensors/boiler/temperature"
        assert json.loads(alert.payload)["value"] == 99
    finally:
        assert server.stop() == 0, server.tail()


@pytest.mark.replicas
async def test_shared_subscription_across_two_processes(
    tmp_path: Path,
    redis_server: RedisServer,
    start_service: Callable[[MosquittoServer], MosquittoServer],
) -> None:
    broker = start_service(MosquittoServer(extra_config=["max_queued_messages 0"]))
    count = 2000
    url = redis_server.url + "?capacity=100000"
    config = {
        **gateway_config(
            broker, name="jobs", subscriptions=[{"topic": "$share/workers/jobs/#", "qos": 1}]
        ),
        "layer": url,
    }
    replicas = [
        GatewayProcess.from_config(tmp_path, config, cwd=ROOT, ready_line=STARTED_LINE).start()
        for _ in range(2)
    ]
    layer = resolve_layer(url)
    try:
        for replica in replicas:
            await replica.wait_ready()
        publisher = MqttTestClient(broker.port)
        payloads = [str(n).encode() for n in range(count)]
        await asyncio.to_thread(publisher.publish_many, "jobs/work", payloads)
        publisher.close()
        seen: Counter[int] = Counter()
        while len(seen) < count:
            message = await receive(layer, "jobs")
            if message["type"] == "mqtt.message":
                seen[int(message["payload"])] += 1
        assert sorted(seen) == list(range(count))
        for replica in replicas:
            # the broker delivers in order on each connection: nothing is still on its way
            await until(lambda r=replica: r.metric("gateway_events_total", type="mqtt.message") > 0)
        handled = [r.metric("gateway_events_total", type="mqtt.message") for r in replicas]
        assert sum(handled) == count and all(handled), handled  # split, and exactly once
        assert max(seen.values()) == 1
    finally:
        codes = [replica.stop() for replica in replicas]
        await layer.close_pools()
    assert codes == [0, 0]


def test_check_config_and_exit_codes(
    tmp_path: Path, redis_server: RedisServer, mosquitto_password_server: MosquittoServer
) -> None:
    ok = run("--check-config", "--config", str(EXAMPLES / "sensors.yaml"))
    assert ok.returncode == 0 and ok.stdout.strip().endswith("sensors.yaml: ok")
    bad = tmp_path / "bad.yaml"
    bad.write_text("gateway: mqtt\nname: s\nmqtt: {subscriptions: [{topic: 'a/#/b', qos: 3}]}\n")
    result = run("--check-config", "--config", str(bad))
    assert result.returncode == 2
    assert "mqtt.subscriptions[0].qos: must be 0, 1 or 2" in result.stderr
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("gateway-mqtt ")
    # refused by the broker: exit 3 with the broker's reason, and never the password
    refused = tmp_path / "refused.yaml"
    refused.write_text(
        f"gateway: mqtt\nname: s\nlayer: {redis_server.url}\nmqtt: {{host: 127.0.0.1, "
        f"port: {mosquitto_password_server.port}, username: alice, password: wrong-password}}\n"
    )
    result = run("--config", str(refused))
    assert result.returncode == 3, result.stderr
    assert "refused the connection" in result.stderr and "wrong-password" not in result.stderr
