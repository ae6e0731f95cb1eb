"""The gateway service base: command loop, publish with backpressure, buffer, drain, health."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from typing import Any, ClassVar, Literal

import pytest
from channels.layers import InMemoryChannelLayer

from core.config import GatewayConfig, HealthConfig
from core.envelope import Command, CommandError
from core.health import HealthServer
from core.layers import resolve_layer
from core.metrics import REGISTRY
from core.service import Backoff, EventBuffer, Gateway
from core.testing import RedisServer


class EchoConfig(GatewayConfig):
    gateway: Literal["echo"] = "echo"


class EchoGateway(Gateway[EchoConfig]):
    """A gateway whose transport is a list: enough to exercise the base class."""

    protocol = "echo"
    config_model = EchoConfig
    command_concurrency: ClassVar[int] = 4

    def __init__(self, config: EchoConfig, layer: Any) -> None:
        super().__init__(config, layer)
        self.sent: list[str] = []
        self.closed = False
        self.release = asyncio.Event()
        self.release.set()

    async def close(self) -> None:
        self.closed = True

    async def handle_say(self, command: Command) -> dict[str, Any]:
        text = command.body.get("text")
        if not isinstance(text, str):
            raise CommandError("text: must be a string")
        await self.release.wait()
        self.sent.append(text)
        return {"length": len(text)}

    async def handle_crash(self, command: Command) -> None:
        raise RuntimeError("handler bug")


def metric(name: str, gateway: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"gateway": gateway, **labels}) or 0.0


@pytest.fixture
async def echo(request: pytest.FixtureRequest) -> AsyncIterator[EchoGateway]:
    name = "echo-" + re.sub(r"[^a-zA-Z0-9]+", "-", request.node.name)[:80]
    gateway = EchoGateway(EchoConfig(name=name, shutdown_grace=1.0), InMemoryChannelLayer())
    task = asyncio.create_task(gateway.run())
    await asyncio.wait_for(gateway.started.wait(), 5)
    yield gateway
    gateway.stop()
    await asyncio.wait_for(task, 10)


async def command(gateway: EchoGateway, message: dict[str, Any]) -> dict[str, Any]:
    layer = gateway.layer
    await layer.send(gateway.config.commands_channel, {**message, "result_channel": "results"})
    result: dict[str, Any] = await asyncio.wait_for(layer.receive("results"), 5)
    return result


async def test_commands_and_results(echo: EchoGateway) -> None:
    result = await command(echo, {"type": "echo.say", "id": "1", "text": "hello"})
    assert result == {"type": "echo.result", "id": "1", "ok": True, "error": None, "length": 5}
    assert echo.sent == ["hello"]
    assert metric("gateway_commands_total", echo.name, type="echo.say", outcome="ok") == 1


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"type": "echo.say", "id": 7, "text": 1}, "text: must be a string"),
        ({"type": "echo.shout", "id": 7}, "unknown command type 'echo.shout'"),
        ({"type": "mqtt.say", "id": 7}, "unknown command type 'mqtt.say' for the echo gateway"),
        ({"id": 7}, "command has no 'type'"),
        ({"type": "echo.crash", "id": 7}, "internal error: RuntimeError: handler bug"),
    ],
)
async def test_bad_commands_are_answered_and_never_stop_the_loop(
    echo: EchoGateway, message: dict[str, Any], error: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "gateway.echo"):
        result = await command(echo, message)
    assert result["ok"] is False and result["id"] == "7"
    assert error in result["error"]
    assert any(r.levelno >= logging.WARNING for r in caplog.records)
    # the loop still runs
    assert (await command(echo, {"type": "echo.say", "text": "next"}))["ok"] is True


async def test_command_without_result_channel_and_non_dict(echo: EchoGateway) -> None:
    await echo.layer.send(echo.config.commands_channel, {"type": "echo.bogus"})
    await echo.layer.send(echo.config.commands_channel, {"type": "echo.say", "text": "a"})
    assert (await command(echo, {"type": "echo.say", "text": "b"}))["ok"]
    assert "a" in echo.sent and "b" in echo.sent
    assert await echo.dispatch(["not", "a", "dict"]) is None


async def test_reply_channel_takes_commands_too(echo: EchoGateway) -> None:
    assert echo.reply_channel is not None and "!" in echo.reply_channel
    await echo.layer.send(
        echo.reply_channel, {"type": "echo.say", "text": "direct", "result_channel": "r2"}
    )
    assert (await asyncio.wait_for(echo.layer.receive("r2"), 5))["ok"]


async def test_publish_uses_routes_and_envelope() -> None:
    config = EchoConfig(name="routed", routes={"echo.joined": "lobby"})
    gateway = EchoGateway(config, InMemoryChannelLayer())
    event = gateway.event("joined", nick="bob")
    assert event["reply_channel"] == "routed.send" and event["gateway"] == "routed"
    assert await gateway.publish(event, timeout=1)
    assert (await gateway.layer.receive("lobby"))["nick"] == "bob"
    other = gateway.event("said", text="x", reply_channel="special!")
    assert await gateway.publish(other, timeout=1)
    assert (await gateway.layer.receive("routed"))["reply_channel"] == "special!"


async def test_publish_gives_up_when_layer_stays_full(caplog: pytest.LogCaptureFixture) -> None:
    gateway = EchoGateway(EchoConfig(name="full-layer"), InMemoryChannelLayer(capacity=1))
    assert await gateway.publish(gateway.event("a"), timeout=1)
    with caplog.at_level(logging.WARNING, "gateway.echo"):
        assert not await gateway.publish(gateway.event("b"), timeout=0.3)
    assert "layer refuses echo.b" in caplog.text
    assert metric("gateway_pushback_total", "full-layer") == 1
    assert metric("gateway_backpressure_waits_total", "full-layer") == 1
    # a full layer is not an unreachable one
    assert gateway.ready_reasons() == ["full-layer: starting"]


async def test_publish_waits_until_layer_has_room() -> None:
    gateway = EchoGateway(EchoConfig(name="waits"), InMemoryChannelLayer(capacity=1))
    assert await gateway.publish(gateway.event("first"), timeout=1)
    pending = asyncio.create_task(gateway.publish(gateway.event("second")))
    await asyncio.sleep(0.3)
    assert not pending.done()
    assert (await gateway.layer.receive("waits"))["type"] == "echo.first"
    assert await asyncio.wait_for(pending, 5)
    assert (await gateway.layer.receive("waits"))["type"] == "echo.second"


async def test_event_buffer_bounded_counted_and_ordered(caplog: pytest.LogCaptureFixture) -> None:
    gateway = EchoGateway(EchoConfig(name="buffered"), InMemoryChannelLayer(capacity=1))
    buffer = EventBuffer(gateway, capacity=3)
    buffer.start()
    with caplog.at_level(logging.WARNING, "gateway.echo"):
        # one goes to the layer, three wait in the buffer, the fifth and sixth are dropped
        accepted = [buffer.put(gateway.event("n", n=i)) for i in range(6)]
        await asyncio.sleep(0)
        accepted += [buffer.put(gateway.event("n", n=6))]
        await asyncio.sleep(1.2)
    assert accepted.count(False) >= 2
    assert metric("gateway_dropped_total", "buffered", reason="buffer_full") == accepted.count(
        False
    )
    assert f"dropped {accepted.count(False)} event(s): buffer full" in caplog.text
    received = []
    while len(received) < accepted.count(True):
        received.append((await asyncio.wait_for(gateway.layer.receive("buffered"), 5))["n"])
    assert received == sorted(received)
    assert await buffer.flush(1) == 0


async def test_event_buffer_counts_what_shutdown_leaves() -> None:
    gateway = EchoGateway(EchoConfig(name="buffer-stop"), InMemoryChannelLayer(capacity=1))
    buffer = EventBuffer(gateway, capacity=10)
    buffer.start()
    for i in range(4):
        buffer.put(gateway.event("n", n=i))
    gateway.stop()
    assert await buffer.flush(0.3) == 3
    assert metric("gateway_dropped_total", "buffer-stop", reason="shutdown") == 3


async def test_stop_drains_in_flight_commands() -> None:
    gateway = EchoGateway(EchoConfig(name="drain", shutdown_grace=5), InMemoryChannelLayer())
    task = asyncio.create_task(gateway.run())
    await gateway.started.wait()
    gateway.release.clear()
    await gateway.layer.send("drain.send", {"type": "echo.say", "text": "slow"})
    await asyncio.sleep(0.1)
    gateway.stop()
    gateway.stop()  # idempotent
    await asyncio.sleep(0.1)
    assert not task.done()
    gateway.release.set()
    await asyncio.wait_for(task, 5)
    assert gateway.sent == ["slow"] and gateway.closed


async def test_stop_cancels_after_grace(caplog: pytest.LogCaptureFixture) -> None:
    gateway = EchoGateway(EchoConfig(name="grace", shutdown_grace=0.2), InMemoryChannelLayer())
    task = asyncio.create_task(gateway.run())
    await gateway.started.wait()
    gateway.release.clear()
    await gateway.layer.send("grace.send", {"type": "echo.say", "text": "stuck"})
    await asyncio.sleep(0.1)
    gateway.stop()
    await asyncio.wait_for(task, 5)
    assert gateway.sent == [] and gateway.closed
    assert "cancelling 1 command(s)" in caplog.text


def test_backoff_is_capped_jittered_and_resets() -> None:
    backoff = Backoff(initial=1, maximum=8)
    delays = [backoff.next() for _ in range(8)]
    assert 0.5 <= delays[0] <= 1
    assert all(4 <= d <= 8 for d in delays[4:])
    assert len(set(delays)) > 1
    backoff.reset()
    assert backoff.next() <= 1


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def test_health_server() -> None:
    gateway = EchoGateway(
        EchoConfig(name="healthy", health=HealthConfig(port=0)), InMemoryChannelLayer()
    )
    server = HealthServer("127.0.0.1", 0, [gateway.ready_reasons])
    await server.start()
    try:
        assert await http_get(server.port, "/healthz") == (200, "ok\n")
        assert await http_get(server.port, "/readyz") == (503, "healthy: starting\n")
        task = asyncio.create_task(gateway.run())
        await gateway.started.wait()
        assert await http_get(server.port, "/readyz") == (200, "ready\n")
        await gateway.publish(gateway.event("x"), timeout=1)
        status, body = await http_get(server.port, "/metrics")
        assert status == 200
        assert 'gateway_events_total{gateway="healthy",type="echo.x"} 1.0' in body
        assert (await http_get(server.port, "/nope"))[0] == 404
        gateway.stop()
        await task
    finally:
        await server.stop()


async def test_layer_down_then_back(redis_server: RedisServer) -> None:
    """Redis killed: publish gives up at its deadline, readiness says why; restarted: it works."""
    layer = resolve_layer(redis_server.url)
    gateway = EchoGateway(EchoConfig(name="redis-down"), layer)
    task = asyncio.create_task(gateway.run())
    await gateway.started.wait()
    assert await gateway.publish(gateway.event("before"), timeout=5)
    redis_server.kill()
    assert not await gateway.publish(gateway.event("during"), timeout=1)
    assert "redis-down: layer unreachable" in gateway.ready_reasons()
    redis_server.restart()
    assert await gateway.publish(gateway.event("after"), timeout=15)
    assert gateway.ready_reasons() == []
    # the command loop survived the outage too
    await layer.send("redis-down.send", {"type": "echo.say", "text": "hi", "result_channel": "r"})
    assert (await asyncio.wait_for(layer.receive("r"), 15))["ok"]
    gateway.stop()
    await asyncio.wait_for(task, 10)
    await layer.close_pools()


async def test_command_waiting_for_a_slot_survives_stop() -> None:
    """Issue 8 item 9: a command that arrives while every slot is busy stays on its channel."""
    layer = InMemoryChannelLayer()
    gateway = EchoGateway(EchoConfig(name="slots", shutdown_grace=0.2), layer)
    task = asyncio.create_task(gateway.run())
    await gateway.started.wait()
    gateway.release.clear()
    for n in range(EchoGateway.command_concurrency + 1):
        await layer.send("slots.send", {"type": "echo.say", "text": f"t{n}"})
    await asyncio.sleep(0.2)
    assert len(gateway._commands) == EchoGateway.command_concurrency
    gateway.stop()
    await asyncio.wait_for(task, 5)
    # the four in flight were cancelled after the grace (and said so); the fifth was never
    # taken off the channel, so the next gateway process gets it
    left = await asyncio.wait_for(layer.receive("slots.send"), 1)
    assert left["text"] == f"t{EchoGateway.command_concurrency}"


async def test_undecodable_command_is_logged_counted_and_skipped(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 14 item 2: raw bytes on the command channel must not kill the command loop."""
    import time

    import redis

    layer = resolve_layer(redis_server.url)
    gateway = EchoGateway(EchoConfig(name="poison"), layer)
    task = asyncio.create_task(gateway.run())
    await gateway.started.wait()
    raw = redis.Redis.from_url(redis_server.url)
    raw.zadd(layer.prefix + "poison.send", {b"R" * 12 + b"\xc1 not msgpack": time.time()})
    raw.close()
    await layer.send("poison.send", {"type": "echo.say", "text": "hi", "result_channel": "r"})
    assert (await asyncio.wait_for(layer.receive("r"), 15))["ok"]
    lines = [r.getMessage() for r in caplog.records if "undecodable" in r.getMessage()]
    assert len(lines) == 1 and "'poison.send'" in lines[0]
    assert metric("gateway_dropped_total", "poison", reason="undecodable_command") == 1
    assert gateway.ready_reasons() == []
    gateway.stop()
    await asyncio.wait_for(task, 10)
    await layer.close_pools()


async def test_a_dead_command_loop_fails_readiness_and_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(EchoGateway):
        async def _command_loop(self, channel: str) -> None:
            if channel == self.config.commands_channel:
                raise RuntimeError("bug in the loop")
            await super()._command_loop(channel)

    gateway = Broken(EchoConfig(name="dead-loop", shutdown_grace=0.2), InMemoryChannelLayer())
    with pytest.raises(RuntimeError, match="bug in the loop"):
        await asyncio.wait_for(gateway.run(), 5)
    assert "dead-loop: command loop died: RuntimeError: bug in the loop" in gateway.ready_reasons()
    assert "command loop died" in caplog.text and gateway.closed


async def test_ready_is_logged_only_when_readyz_agrees(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 6 item 7: "ready" was logged while Redis was unreachable."""
    caplog.set_level(logging.INFO)
    redis_server.kill()
    layer = resolve_layer(redis_server.url)
    gateway = EchoGateway(EchoConfig(name="late-redis"), layer)
    task = asyncio.create_task(gateway.run())
    await asyncio.wait_for(gateway.started.wait(), 15)
    await asyncio.sleep(1)
    assert "late-redis: layer unreachable" in gateway.ready_reasons()
    assert "late-redis not ready yet: late-redis: layer unreachable" in caplog.text
    assert "late-redis ready" not in caplog.text
    redis_server.restart()
    for _ in range(200):  # recovers by probing, without any traffic
        if "late-redis ready: events" in caplog.text:
            break
        await asyncio.sleep(0.1)
    assert "late-redis ready: events" in caplog.text
    assert gateway.ready_reasons() == []
    gateway.stop()
    await asyncio.wait_for(task, 10)
    await layer.close_pools()
