"""Fixtures for the http_ws tests: gateway-http-ws and ``runworker live echo`` on a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.testing import (
    DjangoWorker,
    ExampleProject,
    GatewayProcess,
    RedisServer,
    example_project,
    free_port,
)
from tests.conftest import service

SECRET = "test-webhook-secret"


@dataclass
class Web:
    """A running gateway-http-ws (examples/web.yaml) with its worker, on ``redis``."""

    redis: RedisServer
    project: ExampleProject
    port: int
    gateway: GatewayProcess | None = None
    worker: DjangoWorker | None = None

    @property
    def env(self) -> dict[str, str]:
        return self.project.env

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start_gateway(self) -> GatewayProcess:
        app = ["--app", "example.asgi:application"]
        self.gateway = self.project.gateway("web.yaml", extra_args=app).start()
        return self.gateway

    def start_worker(self, *channels: str) -> DjangoWorker:
        self.worker = self.project.worker(*(channels or ("live", "echo")))
        return self.worker

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        if self.gateway is not None:
            self.gateway.stop()


@pytest.fixture
def web_factory(redis_server: RedisServer, tmp_path: Path) -> Iterator[type[Web]]:
    started: list[Web] = []

    def make(**extra: str) -> Web:
        port = free_port()
        env = {"WEBHOOK_SECRET": SECRET, "WEB_PORT": str(port), **extra}
        project = example_project(tmp_path, redis_server.url, migrate=False, env=env)
        web = Web(redis_server, project, port)
        started.append(web)
        return web

    yield make  # type: ignore[misc]
    for web in started:
        web.stop()


async def start(web: Web) -> Web:
    """Start the worker and the gateway; return once an HTTP round trip through both works."""
    await asyncio.to_thread(web.project.migrate)
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
