"""Gateways and workers on different Redis layers are named, not silent (issue 29 item 4)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from channels.layers import InMemoryChannelLayer

from core.layer_check import ENV_AFTER, ChannelsRedisCheck, StreamsReadCheck, check_after
from core.layers import resolve_layer
from core.testing import DjangoWorker, GatewayProcess, RedisServer, free_port, http_get, until
from tests.support.example import EXAMPLES, ExampleProject, example_project

pytestmark = pytest.mark.timeout(180)

log = logging.getLogger("gateway.test")

GATEWAY_WARNING = "nothing on the streams layer has read channel 'support-mail'"
WORKER_WARNING = "messages for channel 'support-mail' wait in channels_redis' format"


def test_check_after(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv(ENV_AFTER, raising=False)
    assert check_after() == 30
    monkeypatch.setenv(ENV_AFTER, "2.5")
    assert check_after() == 2.5
    monkeypatch.setenv(ENV_AFTER, "0")
    assert check_after() == 0
    monkeypatch.setenv(ENV_AFTER, "soon")
    assert check_after() == 30


def test_the_checks_rest_on_other_layers() -> None:
    memory = InMemoryChannelLayer()
    assert not StreamsReadCheck("gw", memory, log).active
    assert not ChannelsRedisCheck("worker", memory, log).active
    channels_redis = resolve_layer("redis://127.0.0.1:1/0?layer=channels_redis")
    assert not StreamsReadCheck("gw", channels_redis, log).active
    streams = resolve_layer("redis://127.0.0.1:1/0")
    assert StreamsReadCheck("gw", streams, log).active
    assert not StreamsReadCheck("gw", streams, log, after=0).active  # turned off


@pytest.fixture
async def streams(redis_server: RedisServer) -> AsyncIterator[Any]:
    layer = resolve_layer(redis_server.url)
    yield layer
    await layer.flush()
    await layer.close_pools()


async def reasons_after_poll(check: Any, channels: list[str] | None = None) -> list[str]:
    await check.poll(channels or [])
    return list(check.reasons())


async def test_a_stream_nobody_reads_is_named_once_then_cleared(
    streams: Any, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, log.name)
    check = StreamsReadCheck("gw", streams, log, after=0.3)
    await streams.send("orphan", {"type": "t.x", "id": "1"})
    check.sent("orphan")
    check.sent("specific.abc!def")  # process-local: never looked at
    reasons = await until(lambda: reasons_after_poll(check), 10, "the unread channel")
    assert len(reasons) == 1, reasons
    assert reasons[0].startswith("channel 'orphan': 1 message(s) unread on the streams layer")
    assert "?layer=channels_redis or channel_layer_settings()" in reasons[0]
    for _ in range(3):  # later looks: the same episode, no second WARNING
        await asyncio.sleep(check.interval)
        await check.poll()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("gw: nothing on the streams layer has read channel 'orphan'")
    for words in ("'asgi:stream:orphan'", "?layer=channels_redis", "channel_layer_settings("):
        assert words in warnings[0]
    # a consumer of the streams layer reads it: over
    reader = resolve_layer(redis_server.url)
    try:
        assert (await reader.receive("orphan"))["id"] == "1"
        await until(lambda: _cleared(check, []), 10, "cleared")
        assert any("channel 'orphan' is read again" in r.getMessage() for r in caplog.records)
    finally:
        await reader.close_pools()


async def test_a_slow_consumer_is_not_a_mismatch(
    streams: Any, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A consumer holding fetched messages reads, slowly: what waits behind it is no alarm."""
    check = StreamsReadCheck("gw", streams, log, after=0.3)
    reader = resolve_layer(redis_server.url)
    try:
        await streams.send("busy", {"type": "t.x", "id": "1"})
        _message, token = await reader.receive_with_ack("busy")  # held, not acknowledged
        for n in range(2, 5):
            await streams.send("busy", {"type": "t.x", "id": str(n)})
        check.sent("busy")
        for _ in range(6):  # twice `after` and more with three messages waiting
            await check.poll()
            await asyncio.sleep(check.interval)
        assert check.reasons() == []
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        await reader.ack(token)
    finally:
        await reader.close_pools()


async def test_messages_in_channels_redis_format_are_named_for_a_streams_worker(
    streams: Any, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, log.name)
    channels_redis = resolve_layer(redis_server.url + "?layer=channels_redis")
    check = ChannelsRedisCheck("worker", streams, log, after=0.3)
    try:
        await channels_redis.send("cr-chan", {"type": "t.x", "id": "1"})
        reasons = await until(
            lambda: reasons_after_poll(check, ["cr-chan", "empty"]), 10, "the unread key"
        )
        assert len(reasons) == 1 and reasons[0].startswith(
            "channel 'cr-chan': 1 message(s) wait in channels_redis' format"
        )
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "Redis key 'asgicr-chan'" in warnings[0], warnings
        assert "drop ?layer=channels_redis" in warnings[0]
        # a channels_redis receiver takes it: over
        assert (await channels_redis.receive("cr-chan"))["id"] == "1"
        await until(lambda: _cleared(check, ["cr-chan"]), 10, "cleared")
        assert any("is read again" in r.getMessage() for r in caplog.records)
    finally:
        await channels_redis.close_pools()


async def _cleared(check: Any, channels: list[str]) -> bool:
    return await reasons_after_poll(check, channels) == []


# -- real processes ----------------------------------------------------------------------------


async def send_mail(project: ExampleProject, message_id: str) -> None:
    await aiosmtplib.send(
        f"Subject: layers\r\nMessage-ID: <{message_id}>\r\n\r\nhi\r\n".encode(),
        sender="a@example.org",
        recipients=["support@example.com"],
        hostname="127.0.0.1",
        port=int(project.env["SMTP_PORT"]),
    )


def mismatch_project(tmp_path: Path, redis: RedisServer, **layers: str) -> ExampleProject:
    env = {"SMTP_PORT": str(free_port()), "RELAY_PORT": str(free_port()), ENV_AFTER: "2"}
    return example_project(tmp_path, redis.url, migrate=False, env={**env, **layers})


async def wait_line(process: Any, needle: str, timeout: float = 60) -> str:
    return str(await asyncio.to_thread(process.wait_for, needle, timeout))


async def readyz(port: int) -> tuple[int, str]:
    return await asyncio.to_thread(http_get, port, "/readyz")


async def test_a_gateway_on_streams_names_workers_on_channels_redis(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The trap of issue 29: `--layer redis://` gateways, a stock channels_redis project."""
    project = await asyncio.to_thread(
        mismatch_project,
        tmp_path,
        redis_server,
        EXAMPLE_LAYER=redis_server.url + "?layer=channels_redis",
    )
    worker = project.worker("support-mail")  # reads channels_redis' sorted sets
    gateway = await asyncio.to_thread(project.gateway("email.yaml").start)
    try:
        await send_mail(project, "m1@x")
        line = await wait_line(gateway, GATEWAY_WARNING)
        assert "WARNING" in line and "?layer=channels_redis" in line
        assert "channel_layer_settings(" in line
        status, body = await readyz(gateway.health_port)
        assert status == 503 and "channel 'support-mail'" in body, body
        assert worker.alive
    finally:
        assert await asyncio.to_thread(gateway.stop) == 0, gateway.tail()
        await asyncio.to_thread(worker.stop)
    assert sum(GATEWAY_WARNING in line for line in gateway.output) == 1


async def test_a_streams_worker_names_a_gateway_on_channels_redis(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The other way round: the gateway writes channels_redis, the worker reads streams."""
    project = await asyncio.to_thread(
        mismatch_project,
        tmp_path,
        redis_server,
        GATEWAYS_LAYER=redis_server.url + "?layer=channels_redis",
    )
    port = free_port()
    worker = DjangoWorker(
        EXAMPLES, ["support-mail"], project.env, extra_args=["--health-port", str(port)]
    ).start()
    gateway = await asyncio.to_thread(project.gateway("email.yaml").start)
    try:
        await send_mail(project, "m2@x")
        line = await wait_line(worker, WORKER_WARNING)
        assert "WARNING" in line and "drop ?layer=channels_redis" in line
        status, body = await readyz(port)
        assert status == 503 and "wait in channels_redis' format" in body, body
    finally:
        assert await asyncio.to_thread(gateway.stop) == 0, gateway.tail()
        assert await asyncio.to_thread(worker.stop) == 0, worker.tail()


async def test_no_warning_when_both_sides_use_the_streams_layer(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    project = await asyncio.to_thread(mismatch_project, tmp_path, redis_server)
    await asyncio.to_thread(project.migrate)  # MailConsumer stores each mail
    port = free_port()
    worker = DjangoWorker(
        EXAMPLES, ["support-mail"], project.env, extra_args=["--health-port", str(port)]
    ).start()
    gateway: GatewayProcess = await asyncio.to_thread(project.gateway("email.yaml").start)

    def stored(count: int) -> Callable[[], bool]:
        return lambda: len(project.rows("SELECT id FROM mail_mail")) >= count

    try:
        await send_mail(project, "m3@x")
        await until(stored(1), 60, "the first mail stored by the worker")
        # three times `after` with the channel in use, both checks looking every 0.7 s
        await asyncio.sleep(6)
        await send_mail(project, "m4@x")
        await until(stored(2), 60, "the second mail stored by the worker")
        assert (await readyz(gateway.health_port))[0] == 200
        assert (await readyz(port))[0] == 200
    finally:
        assert await asyncio.to_thread(gateway.stop) == 0, gateway.tail()
        assert await asyncio.to_thread(worker.stop) == 0, worker.tail()
    assert not [line for line in gateway.output if "nothing on the streams layer" in line]
    assert not [line for line in worker.output if "channels_redis' format" in line]
