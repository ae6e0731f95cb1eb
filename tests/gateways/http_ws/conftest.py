"""Fixtures for the http_ws tests: gateway-http-ws and ``runworker live echo`` on a real Redis."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from core.testing import WAIT, DjangoWorker, GatewayProcess, RedisServer, Server, free_port
from tests.conftest import missing, service
from tests.support.example import EXAMPLES, ExampleProject, example_project

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


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Chromium; skipped locally (failed under CI) when it cannot start."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        missing("chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(options=options, service=Service(driver_path))
    except WebDriverException as exc:
        missing(f"headless chromium cannot start: {exc.msg}")
    try:
        yield driver
    finally:
        driver.quit()


PASSWORD = "correct horse battery staple"


@dataclass
class ChatSite:
    """The example's Channels application (examples/example/asgi.py) served one way: through
    gateway-http-ws and ``runworker rooms`` workers (``bridge``), or by Daphne (``daphne``), on
    one Redis, with the user ``alice`` (:data:`PASSWORD`) in its database."""

    kind: str
    project: ExampleProject
    port: int
    gateways: list[GatewayProcess]
    workers: list[DjangoWorker]
    server: Server | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def login(self) -> str:
        """Sign in as alice through the login form; the session cookie's value."""
        import httpx

        with httpx.Client(base_url=self.http, timeout=30) as client:
            client.get("/accounts/login/").raise_for_status()
            form = {
                "username": "alice",
                "password": PASSWORD,
                "csrfmiddlewaretoken": client.cookies["csrftoken"],
                "next": "/chat/",
            }
            done = client.post("/accounts/login/", data=form)
            assert done.status_code == 302, done.text
            return str(client.cookies["sessionid"])

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        for gateway in self.gateways:
            gateway.stop()
        if self.server is not None:
            self.server.stop()


def wait_page(port: int, path: str = "/chat/", timeout: float = 60) -> None:
    """Until ``path`` answers 200 (a worker or Daphne has Django loaded)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=10).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing answers {path} on port {port}")
        time.sleep(0.1)


def start_worker(project: ExampleProject, *channels: str) -> DjangoWorker:
    """``runworker CHANNEL…``, returned once it listens (so connects spread over workers)."""
    worker = DjangoWorker(EXAMPLES, channels, {**project.env, "GATEWAYS_LOG_LEVEL": "INFO"})
    worker.start()
    worker.wait_for("Running worker for channels", WAIT)
    time.sleep(0.5)  # from that line to the listener's first fetch
    return worker


def chat_project(directory: Path, redis: RedisServer, **env: str) -> ExampleProject:
    """The example project on ``redis``, migrated, with the user alice."""
    project = example_project(directory, redis.url, env=env)
    argv = ["manage.py", "createsuperuser", "--noinput", "--username", "alice"]
    subprocess.run(
        [sys.executable, *argv, "--email", "alice@example.com"],
        cwd=EXAMPLES,
        env={**os.environ, **project.env, "DJANGO_SUPERUSER_PASSWORD": PASSWORD},
        check=True,
        capture_output=True,
        timeout=120,
    )
    return project


def serve_chat(kind: str, directory: Path, redis: RedisServer, workers: int = 2) -> ChatSite:
    """Start the chat ``kind`` (bridge, daphne) on ``redis``; stopped by the caller."""
    port = free_port()
    project = chat_project(directory, redis, WEB_PORT=str(port))
    site = ChatSite(kind, project, port, [], [])
    try:
        if kind == "daphne":
            argv = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port)]
            env = {**os.environ, "PYTHONUNBUFFERED": "1", **project.env}
            argv.append("example.asgi:application")
            site.server = Server(argv, None, cwd=EXAMPLES, env=env, name="daphne")
        else:
            site.gateways.append(project.gateway("web.yaml").start())
            site.workers += [start_worker(project, "rooms") for _ in range(workers)]
        wait_page(port)
    except BaseException:
        site.stop()
        raise
    return site


@pytest.fixture(scope="module", params=["bridge", "daphne"])
def chat_site(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ChatSite]:
    """The chat through gateway-http-ws and two ``runworker rooms``, then the same under
    Daphne: the tests that use it must pass on both (parity)."""
    service("redis-server")
    with RedisServer() as redis:
        site = serve_chat(str(request.param), tmp_path_factory.mktemp(request.param), redis)
        try:
            yield site
        finally:
            site.stop()
