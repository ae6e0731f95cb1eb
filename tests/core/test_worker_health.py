"""A ConsumerWorker's /healthz, /readyz and /metrics (core/worker_health.py, issue 29 item 5)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from channels.layers import InMemoryChannelLayer

from core.layers import resolve_layer
from core.testing import DjangoWorker, RedisServer, free_port, http_get, metric_from_text, until
from core.worker import ConsumerWorker, RetryPolicy
from core.worker_health import HealthSettings
from tests.core.test_worker import app_of
from tests.support.example import EXAMPLES, example_project

pytestmark = pytest.mark.timeout(120)


async def get(port: int, path: str) -> tuple[int, str]:
    try:
        return await asyncio.to_thread(http_get, port, path)
    except OSError as exc:  # not listening yet, or gone
        return 0, str(exc)


async def wait_status(port: int, status: int, *needles: str, timeout: float = 30) -> str:
    """Wait until /readyz answers ``status`` with every needle in its body; the body."""

    async def probe() -> str | None:
        code, body = await get(port, "/readyz")
        return body if code == status and all(n in body for n in needles) else None

    body = await until(probe, timeout, f"/readyz {status} with {needles}", interval=0.1)
    return str(body)


def settings_of(**health: Any) -> HealthSettings:
    return HealthSettings.from_settings(health)


def test_health_settings() -> None:
    assert settings_of() == HealthSettings(host="127.0.0.1", port=None, stuck_after=300.0)
    assert settings_of(host="0.0.0.0", port="9102", stuck_after=5) == HealthSettings(
        "0.0.0.0", 9102, 5.0
    )
    # the command line beats the setting
    assert HealthSettings.from_settings({"port": 1}, port=2, host="::1").port == 2
    for bad, why in [
        ({"prot": 1}, "unknown key(s) ['prot']"),
        ({"port": "http"}, "HEALTH"),
        ({"port": 70000}, "not a TCP port"),
        ({"stuck_after": 0}, "stuck_after must be positive"),
        ({"host": ""}, "host must not be empty"),
    ]:
        with pytest.raises(ValueError, match=r"GATEWAYS_WORKER: HEALTH") as caught:
            HealthSettings.from_settings(bad)
        assert why in str(caught.value)
    with pytest.raises(ValueError, match="must be a dict"):
        HealthSettings.from_settings(9102)  # type: ignore[arg-type]
    # a GATEWAYS_WORKER key like the others: the retry policy does not call it unknown
    RetryPolicy.from_settings({"HEALTH": {"port": 9102}})


class ProblemLayer(InMemoryChannelLayer):  # type: ignore[misc]
    """The in-memory layer plus ``health_problems()``, as core.streams has it."""

    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []

    def health_problems(self) -> list[str]:
        return list(self.problems)


@pytest.fixture
async def slow_worker() -> AsyncIterator[tuple[ConsumerWorker, ProblemLayer, asyncio.Event]]:
    """A worker on channel "slowpoke" whose handler waits for the event on id "slow"."""
    layer = ProblemLayer()
    release = asyncio.Event()

    async def handle(message: dict[str, Any]) -> None:
        if message["id"] == "slow":
            await release.wait()

    worker = ConsumerWorker(
        app_of(handle),
        ["slowpoke"],
        layer,
        retry=RetryPolicy(max_attempts=1, dead_letter="log"),
        health=HealthSettings(port=0, stuck_after=0.5),
        shutdown_grace=1,
    )
    task = asyncio.create_task(worker.health.around(worker.arun))
    await until(lambda: worker.health.server is not None, 10, "the health server")
    try:
        yield worker, layer, release
    finally:
        release.set()
        await worker.drain()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_readyz_names_a_stuck_handler_and_the_layers_own_problems(
    slow_worker: tuple[ConsumerWorker, ProblemLayer, asyncio.Event],
) -> None:
    worker, layer, release = slow_worker
    assert worker.health.server is not None
    port = worker.health.server.port
    assert await wait_status(port, 200, "ready") == "ready\n"
    assert await get(port, "/healthz") == (200, "ok\n")
    text = (await get(port, "/metrics"))[1]
    handled = metric_from_text(text, "gateway_worker_messages_total", channel="slowpoke")
    seconds = metric_from_text(text, "gateway_worker_handler_seconds_count", channel="slowpoke")

    await layer.send("slowpoke", {"type": "t.x", "id": "slow"})
    body = await wait_status(port, 503, "has been handling t.x (id=slow)")
    assert "worker: consumer on 'slowpoke'" in body and "stuck_after: 0.5 s" in body
    text = (await get(port, "/metrics"))[1]
    assert metric_from_text(text, "gateway_worker_in_flight", channel="slowpoke") == 1

    release.set()
    await layer.send("slowpoke", {"type": "t.x", "id": "quick"})
    await wait_status(port, 200, "ready")

    async def both_handled() -> str | None:
        text = (await get(port, "/metrics"))[1]
        done = metric_from_text(
            text, "gateway_worker_messages_total", channel="slowpoke", outcome="handled"
        )
        return text if done == handled + 2 else None

    text = str(await until(both_handled, 10, "two handled messages on /metrics"))
    assert metric_from_text(text, "gateway_worker_in_flight", channel="slowpoke") == 0
    count = metric_from_text(text, "gateway_worker_handler_seconds_count", channel="slowpoke")
    assert count == seconds + 2

    layer.problems.append("stream 'asgi:stream:slowpoke' vanished")
    await wait_status(port, 503, "worker: layer: stream 'asgi:stream:slowpoke' vanished")
    layer.problems.clear()
    await wait_status(port, 200, "ready")


def runworker(project_env: dict[str, str], port: int, *channels: str) -> DjangoWorker:
    return DjangoWorker(
        EXAMPLES, channels, project_env, extra_args=["--health-port", str(port)]
    ).start()


async def test_readyz_follows_redis_down_and_back(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    project = await asyncio.to_thread(example_project, tmp_path, redis_server.url, migrate=False)
    port = free_port()
    worker = runworker(project.env, port, "support-mail")
    try:
        await wait_status(port, 200, "ready")
        await asyncio.to_thread(redis_server.terminate)
        body = await wait_status(port, 503, "worker: layer unreachable")
        assert "starting" not in body
        assert await get(port, "/healthz") == (200, "ok\n")  # alive, only not ready
        await asyncio.to_thread(redis_server.start)
        await wait_status(port, 200, "ready")
        assert worker.alive
    finally:
        assert await asyncio.to_thread(worker.stop) == 0, worker.tail()


async def test_metrics_count_a_dead_lettered_message(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    project = await asyncio.to_thread(example_project, tmp_path, redis_server.url, migrate=False)
    port = free_port()
    worker = runworker(project.env, port, "support-mail")
    layer = resolve_layer(redis_server.url)
    try:
        await wait_status(port, 200, "ready")
        # MailConsumer has no handler for it: channels raises ValueError, not transient
        await layer.send("support-mail", {"type": "no.such.thing", "id": "dl-1"})
        letter = await asyncio.wait_for(layer.receive("support-mail.dead"), 30)
        assert letter["message"] == {"type": "no.such.thing", "id": "dl-1"}

        async def metrics() -> str:
            return (await get(port, "/metrics"))[1]

        def count(text: str, outcome: str) -> float:
            return metric_from_text(
                text, "gateway_worker_messages_total", channel="support-mail", outcome=outcome
            )

        text = await metrics()
        assert count(text, "dead_lettered") == 1
        assert count(text, "failed") == 1 and count(text, "handled") == 0
        assert count(text, "retried") == 0
        seconds = "gateway_worker_handler_seconds_count"
        assert metric_from_text(text, seconds, channel="support-mail") == 1
        assert metric_from_text(text, "gateway_worker_in_flight", channel="support-mail") == 0
        assert (await get(port, "/readyz"))[0] == 200
    finally:
        assert await asyncio.to_thread(worker.stop) == 0, worker.tail()
        await layer.close_pools()


def test_a_bad_or_taken_health_port_is_one_line(tmp_path: Path) -> None:
    """A bad port is a usage error (2); a port in use cannot start (3): one line each."""
    env = {**os.environ, **example_project(tmp_path, migrate=False).env}

    def run(port: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "manage.py", "runworker", "support-mail", "--health-port", str(port)],
            cwd=EXAMPLES,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    result = run(70000)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "CommandError: GATEWAYS_WORKER: HEALTH: port 70000 is not a TCP port"
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run(taken.getsockname()[1])
    assert result.returncode == 3, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("CommandError: could not start the health server on 127.0.0.1:")
    assert "Traceback" not in result.stderr
