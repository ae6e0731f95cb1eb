"""Helpers for the MQTT gateway tests: a threaded paho test client, in-process and subprocess
gateways, and layer round trips. The servers come from the shared fixtures in tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from paho.mqtt.client import Client, MQTTMessage, MQTTv5, MQTTv311
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from core.testing import Certs, MosquittoServer, Server, free_port
from gateways.mqtt.config import MqttGatewayConfig
from gateways.mqtt.gateway import MqttGateway

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples"
#: generous: the CI machine may be slow, and nothing here measures speed
TIMEOUT = 30.0


class MqttTestClient:
    """A paho client on its own network thread: publishes, subscribes, and queues what arrives."""

    def __init__(
        self,
        port: int,
        *,
        protocol: int = 5,
        client_id: str = "",
        certs: Certs | None = None,
        auth: tuple[str, str] | None = None,
    ) -> None:
        self.client = Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTv5 if protocol == 5 else MQTTv311,
        )
        self.client.max_inflight_messages_set(200)
        if certs is not None:
            self.client.tls_set(ca_certs=str(certs.ca_crt))
        if auth is not None:
            self.client.username_pw_set(*auth)
        self.messages: queue.Queue[MQTTMessage] = queue.Queue()
        self.client.on_message = lambda client, userdata, message: self.messages.put(message)
        self._subacks: dict[int, threading.Event] = {}
        self.client.on_subscribe = self._on_subscribe
        connected = threading.Event()
        self.client.on_connect = lambda *args: connected.set()
        self.client.connect("localhost" if certs else "127.0.0.1", port)
        self.client.loop_start()
        if not connected.wait(TIMEOUT):
            raise TimeoutError("the test client did not connect")

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, *args: Any) -> None:
        self._subacks.setdefault(mid, threading.Event()).set()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        _, mid = self.client.subscribe(topic, qos)
        assert mid is not None
        if not self._subacks.setdefault(mid, threading.Event()).wait(TIMEOUT):
            raise TimeoutError(f"no SUBACK for {topic}")

    def publish(
        self,
        topic: str,
        payload: bytes | str = b"",
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> None:
        info = self.client.publish(topic, payload, qos, retain, properties)
        info.wait_for_publish(TIMEOUT)

    def publish_many(self, topic: str, payloads: list[bytes], qos: int = 1) -> None:
        """Publish in a burst (paho keeps up to 200 in flight), then wait for every ack."""
        infos = [self.client.publish(topic, payload, qos) for payload in payloads]
        for info in infos:
            info.wait_for_publish(TIMEOUT)

    def next(self, timeout: float = TIMEOUT) -> MQTTMessage:
        return self.messages.get(timeout=timeout)

    async def anext(self, timeout: float = TIMEOUT) -> MQTTMessage:
        return await asyncio.to_thread(self.next, timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def mqtt_client() -> Iterator[Callable[..., MqttTestClient]]:
    """Factory: ``mqtt_client(port, **options)``; every client is disconnected after the test."""
    made: list[MqttTestClient] = []

    def make(port: int, **options: Any) -> MqttTestClient:
        made.append(MqttTestClient(port, **options))
        return made[-1]

    yield make
    for client in made:
        client.close()


def publish_properties(**values: Any) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(props, name, value)
    return props


def gateway_config(broker: MosquittoServer | int, name: str = "sensors", **mqtt: Any) -> Any:
    """An integration dict for ``broker`` with ``mqtt:`` keys overridden by ``mqtt``."""
    port = broker if isinstance(broker, int) else broker.port
    section = {"host": "127.0.0.1", "port": port, "reconnect": {"initial": 0.1, "maximum": 1}}
    section.update(mqtt)
    return {"gateway": "mqtt", "name": name, "shutdown_grace": 5, "mqtt": section}


async def until(predicate: Callable[[], Any], timeout: float = TIMEOUT, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy (tests only; bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (result := predicate()):
        if loop.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.02)
    return result


@contextlib.asynccontextmanager
async def running(
    config: dict[str, Any], layer: Any, *, ready: bool = True
) -> AsyncIterator[MqttGateway]:
    """Run an in-process gateway; wait until /readyz would be green; stop it afterwards."""
    gateway = MqttGateway(MqttGatewayConfig.model_validate(config), layer)
    task = asyncio.create_task(gateway.run())
    started = asyncio.create_task(gateway.started.wait())
    await asyncio.wait({task, started}, timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        started.cancel()
        task.result()  # raises why it could not start
    if ready:
        await until(lambda: not gateway.ready_reasons(), what="gateway readiness")
    try:
        yield gateway
    finally:
        gateway.stop()
        await asyncio.wait_for(task, TIMEOUT)


async def receive(layer: Any, channel: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    message: dict[str, Any] = await asyncio.wait_for(layer.receive(channel), timeout)
    return message


async def receive_type(layer: Any, channel: str, type_: str) -> dict[str, Any]:
    """The next message of ``type_`` on ``channel`` (others, like mqtt.connect, are skipped)."""
    while True:
        message = await receive(layer, channel)
        if message["type"] == type_:
            return message


async def command(layer: Any, message: dict[str, Any], channel: str = "sensors.send") -> Any:
    """Send a command with a fresh result channel and return its ``mqtt.result``."""
    result_channel = await layer.new_channel("test-result.")
    await layer.send(channel, {"id": "cmd", **message, "result_channel": result_channel})
    return await receive(layer, result_channel)


class GatewayProcess:
    """``python -m gateways.mqtt.cli --config FILE`` as a child process, with a health port."""

    def __init__(self, path: Path, health_port: int, env: dict[str, str] | None = None) -> None:
        self.path = path
        self.health_port = health_port
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.server: Server | None = None

    @classmethod
    def from_config(
        cls, tmp_path: Path, config: dict[str, Any], env: dict[str, str] | None = None
    ) -> GatewayProcess:
        """Write ``config`` (plus a health port) to a YAML file in ``tmp_path``."""
        health_port = free_port()
        path = tmp_path / f"{config['name']}-{health_port}.yaml"
        path.write_text(yaml.safe_dump({**config, "health": {"port": health_port}}))
        return cls(path, health_port, env)

    def start(self) -> GatewayProcess:
        argv = [sys.executable, "-m", "gateways.mqtt.cli", "--config", str(self.path)]
        # "started", not "ready": a gateway facing a full layer serves before it is ready
        self.server = Server(argv, "started: events", TIMEOUT, cwd=ROOT, env=self.env, name="gw")
        return self

    def get(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.health_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    async def wait_ready(self) -> None:
        await until(lambda: self.get("/readyz")[0] == 200, what=f"{self.path.name} /readyz")

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the /metrics samples of ``name`` that carry ``labels`` (0 when none)."""
        _, text = self.get("/metrics")
        wanted = {f'{k}="{v}"' for k, v in labels.items()}
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{"):
                key, _, value = line.rpartition(" ")
                if wanted <= set(key[len(name) + 1 : -1].split(",")):
                    total += float(value)
        return total

    def stop(self) -> int | None:
        return self.server.stop() if self.server is not None else None

    def kill(self) -> int | None:
        return self.server.kill() if self.server is not None else None


def dump(message: dict[str, Any]) -> str:
    return json.dumps({k: repr(v) for k, v in message.items()})
