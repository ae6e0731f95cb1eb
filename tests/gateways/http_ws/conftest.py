"""Fixtures for the http_ws tests: gateway-http-ws and ``runworker live echo`` on a real Redis."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from core.testing import DjangoWorker, RedisServer, Server, free_port
from tests.conftest import service

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples"
SECRET = "test-webhook-secret"


@dataclass
class Web:
    """A running gateway-http-ws (examples/web.yaml) with its worker, on ``redis``."""

    redis: RedisServer
    env: dict[str, str]
    port: int
    health_port: int
    gateway: Server | None = None
    worker: DjangoWorker | None = None
    extra: list[object] = field(default_factory=list)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start_gateway(self) -> Server:
        self.gateway = Server(
            [
                "gateway-http-ws",
                "--config",
                str(EXAMPLES / "web.yaml"),
                "--app",
                "example.asgi:application",
            ],
            "ready: events",
            cwd=ROOT,
            env={**os.environ, **self.env},
            name="gateway-http-ws",
        )
        return self.gateway

    def start_worker(self, *channels: str) -> DjangoWorker:
        self.worker = DjangoWorker(EXAMPLES, list(channels or ("live", "echo")), self.env).start()
        return self.worker

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        if self.gateway is not None:
            self.gateway.stop()


def web_env(redis: RedisServer, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "DJANGO_SETTINGS_MODULE": "example.settings",
        "EXAMPLE_LAYER": redis.url,
        "GATEWAYS_LAYER": redis.url,
        "EXAMPLE_DB": str(tmp_path / "example.sqlite3"),
        "ATTACHMENT_STORE": str(tmp_path / "attachments"),
        "PYTHONPATH": str(EXAMPLES),
        "WEBHOOK_SECRET": SECRET,
        **extra,
    }


@pytest.fixture
def web_factory(redis_server: RedisServer, tmp_path: Path) -> Iterator[type[Web]]:
    started: list[Web] = []

    def make(**extra: str) -> Web:
        port, health = free_port(), free_port()
        env = web_env(redis_server, tmp_path, WEB_PORT=str(port), HEALTH_PORT=str(health), **extra)
        web = Web(redis_server, env, port, health)
        started.append(web)
        return web

    yield make  # type: ignore[misc]
    for web in started:
        web.stop()


def migrate(env: dict[str, str]) -> None:
    import subprocess
    import sys

    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--verbosity", "0"],
        cwd=EXAMPLES,
        env={**os.environ, **env},
        check=True,
        timeout=120,
    )


async def start(web: Web) -> Web:
    """Start the worker and the gateway; return once an HTTP round trip through both works."""
    await asyncio.to_thread(migrate, web.env)
    web.start_worker()
    await asyncio.to_thread(web.start_gateway)
    import httpx

    # the worker may still be starting: a 504 means "not yet" (its late answer is swept)
    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(15):
            response = await client.get(f"{web.http}/api/echo")
            if response.status_code == 200:
                return web
        raise AssertionError(f"no answer through the worker: {web.worker and web.worker.tail()}")


@pytest.fixture
async def web(web_factory: type[Web]) -> AsyncIterator[Web]:
    """gateway-http-ws (short timeouts) and ``runworker live echo``, answering."""
    service("redis-server")
    yield await start(
        web_factory(
            WEB_CONNECT_TIMEOUT="2",
            WEB_RESPONSE_TIMEOUT="2",
            WEB_MAX_MESSAGE="4096",
            WEB_MAX_BODY="4096",
        )
    )
