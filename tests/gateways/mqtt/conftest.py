"""Helpers for the MQTT gateway tests: a threaded paho test client and the sensors integration.

The servers come from the shared fixtures in tests/conftest.py; running gateways (in process or
as a child), commands and waits come from core.testing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from paho.mqtt.client import Client, MQTTMessage, MQTTv5, MQTTv311
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from core import testing
from core.testing import WAIT, Certs, MosquittoServer, run_gateway
from core.types import ChannelLayer
from gateways.mqtt.config import MqttGatewayConfig
from gateways.mqtt.gateway import MqttGateway

#: generous: the CI machine may be slow, and nothing here measures speed
TIMEOUT = WAIT


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


@contextlib.asynccontextmanager
async def running(
    config: dict[str, Any], layer: ChannelLayer, *, ready: bool = True
) -> AsyncIterator[MqttGateway]:
    """Run an in-process gateway (``run_gateway``), typed as MqttGateway."""
    gateway = MqttGateway(MqttGatewayConfig.model_validate(config), layer)
    async with run_gateway(gateway, ready=ready):
        yield gateway


async def command(
    layer: ChannelLayer, message: dict[str, Any], channel: str = "sensors.send"
) -> dict[str, Any]:
    """``core.testing.command`` on the ``sensors`` integration's command channel."""
    return await testing.command(layer, channel, message)


def dump(message: dict[str, Any]) -> str:
    return json.dumps({k: repr(v) for k, v in message.items()})
