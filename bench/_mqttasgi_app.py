"""The mqttasgi row of bench/mqtt_worker.py: mqttasgi's own protocol server running an
``MqttConsumer`` that notes each message as bench/_mqtt_worker_app.py's consumers do.

mqttasgi (PyPI) is the other way a Django project takes MQTT into channels consumers: one
process that is the broker's client and runs the consumer itself, no channel layer between.
Run as ``python -m mqttasgi.cli -H HOST -p PORT -i ID -c False
bench._mqttasgi_app:application`` with ``BENCH_TOPIC`` (subscribed in ``connect``, QoS 1) and
``BENCH_OUT`` (where the records go at exit, as JSON) in the environment; it prints ``ready``
once subscribed and ``n COUNT`` lines as it handles messages, like the worker helper.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
from pathlib import Path
from typing import Any

from bench import _mqtt_worker_app as stamps

stamps.configure_django()

from mqttasgi.consumers import MqttConsumer  # noqa: E402 - needs Django configured


def _write() -> None:
    records = [(p.decode(), s, d) for p, s, d in stamps.HANDLED]
    Path(os.environ["BENCH_OUT"]).write_text(json.dumps({"handled": records, "cpu": stamps.CPU}))


atexit.register(_write)


class StampMqttConsumer(MqttConsumer):  # type: ignore[misc]
    async def connect(self) -> None:
        await self.subscribe(os.environ["BENCH_TOPIC"], 1)
        await asyncio.sleep(0.5)  # mqttasgi sends the SUBSCRIBE at its next loop turn
        print("ready", flush=True)
        self.reporting = asyncio.ensure_future(self._report())

    async def _report(self) -> None:
        told = -1
        while True:
            if len(stamps.HANDLED) != told:
                told = len(stamps.HANDLED)
                print(f"n {told}", flush=True)
            await asyncio.sleep(0.02)

    async def receive(self, mqtt_message: dict[str, Any]) -> None:
        stamps.record(mqtt_message)

    async def disconnect(self) -> None:
        self.reporting.cancel()  # the subscription stays: a persistent session keeps it


application = StampMqttConsumer.as_asgi()
