"""ConsumerWorker on a real Redis: redelivery of transient failures, dead letters, junk entries."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis import exceptions as redis_errors

from core.layers import resolve_layer
from core.metrics import REGISTRY
from core.streams import StreamsChannelLayer
from core.testing import RedisServer, inject_undecodable, until
from core.worker import DEAD_LETTER_TYPE, ConsumerWorker, RetryPolicy

Handler = Callable[[dict[str, Any]], Awaitable[None]]

FAST = {"initial_delay": 0.01, "max_delay": 0.05}


def app_of(handle: Handler) -> Any:
    """A plain ASGI "channel" application that hands each message to ``handle``."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while True:
            await handle(await receive())

    return app


@pytest.fixture(params=["", "?layer=channels_redis"])
async def layer(redis_server: RedisServer, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """Both Redis layers: core.streams' (``redis://``) and channels_redis'."""
    layer = resolve_layer(redis_server.url + request.param)
    yield layer
    await layer.flush()
    await layer.close_pools()


async def run_worker(
    layer: Any, channel: str, handle: Handler, policy: RetryPolicy
) -> tuple[ConsumerWorker, asyncio.Task[None]]:
    worker = ConsumerWorker(app_of(handle), [channel], layer, retry=policy, shutdown_grace=2)
    return worker, asyncio.create_task(worker.arun())


async def stop(worker: ConsumerWorker, task: asyncio.Task[None]) -> None:
    await worker.drain()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_transient_failure_is_delivered_again_to_a_fresh_instance(
    layer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[tuple[str, int]] = []
    instances: set[int] = set()

    async def handle(message: dict[str, Any]) -> None:
        instances.add(id(asyncio.current_task()))
        seen.append((message["id"], len(seen)))
        if message["id"] == "m1" and sum(1 for i, _ in seen if i == "m1") < 3:
            # what the consumer's own layer call raised during the Redis outage (issue 6)
            raise redis_errors.ConnectionError("Connection closed by server.")

    worker, task = await run_worker(
        layer, "flaky", handle, RetryPolicy(max_attempts=5, dead_letter="log", **FAST)
    )
    await layer.send("flaky", {"type": "t.x", "id": "m1"})
    await layer.send("flaky", {"type": "t.x", "id": "m2"})
    await until(lambda: [i for i, _ in seen] == ["m1", "m1", "m1", "m2"], 15, "m1 x3, then m2")
    assert len(instances) == 3  # each retry on a fresh consumer instance
    retries = [r for r in caplog.records if "delivering it again" in r.getMessage()]
    assert len(retries) == 2
    # issue 14 item 10: a failed handler names the message's channel, type and id
    assert "'flaky'" in retries[0].getMessage() and "t.x (id=m1)" in retries[0].getMessage()
    await stop(worker, task)


async def test_attempts_used_up_go_to_the_dead_letter_channel(
    layer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    async def handle(message: dict[str, Any]) -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("still down")

    worker, task = await run_worker(layer, "down", handle, RetryPolicy(max_attempts=3, **FAST))
    await layer.send("down", {"type": "t.x", "id": "lost?", "body": b"\x00\xff"})
    letter = await asyncio.wait_for(layer.receive("down.dead"), 15)
    assert letter["type"] == DEAD_LETTER_TYPE
    assert letter["message"] == {"type": "t.x", "id": "lost?", "body": b"\x00\xff"}
    assert letter["attempts"] == 3 and letter["channel"] == "down"
    assert "still down" in letter["error"]
    assert calls == 3

    def gave_up() -> list[str]:
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        return [e for e in errors if "t.x (id=lost?)" in e and "'down.dead'" in e]

    # logged once the send returned, which can be just after we got it
    await until(gave_up, 15, "the dead-letter log line")
    await stop(worker, task)


async def test_a_bug_is_not_retried_but_logged_with_the_message(
    layer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    async def handle(message: dict[str, Any]) -> None:
        nonlocal calls
        calls += 1
        if message["id"] == "bad":
            raise KeyError("subject")

    worker, task = await run_worker(layer, "buggy", handle, RetryPolicy(dead_letter="log", **FAST))
    await layer.send("buggy", {"type": "t.x", "id": "bad"})
    await layer.send("buggy", {"type": "t.x", "id": "good"})
    await until(lambda: calls >= 2, 15, "both messages handled")
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("'buggy'" in e and "t.x (id=bad)" in e and "KeyError" in e for e in errors)
    assert any("gave up on t.x (id=bad)" in e for e in errors)
    assert calls == 2  # not retried; the next message still handled
    await stop(worker, task)


async def test_undecodable_entry_is_logged_counted_and_skipped(
    layer: Any, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    handled: list[str] = []

    async def handle(message: dict[str, Any]) -> None:
        handled.append(message["id"])

    # channels_redis pops the entry and raises: the worker counts it; core.streams drops it as
    # it fetches (never raising to the receiver) and counts it itself
    metric, labels = ("gateway_dropped_total", {"gateway": "worker", "reason": "undecodable"})
    if isinstance(layer, StreamsChannelLayer):
        metric, labels = ("gateway_layer_dropped_total", {"reason": "undecodable"})
    before = REGISTRY.get_sample_value(metric, labels)
    worker, task = await run_worker(layer, "junk", handle, RetryPolicy(**FAST))
    # bytes that are not msgpack, straight into the channel in Redis (issue 14 item 2)
    inject_undecodable(layer, redis_server.url, "junk")
    await layer.send("junk", {"type": "t.x", "id": "after"})
    await until(lambda: handled == ["after"], 15, "the message after the junk")
    lines = [r.getMessage() for r in caplog.records if "undecodable" in r.getMessage()]
    assert len(lines) == 1 and "'junk'" in lines[0]
    after = REGISTRY.get_sample_value(metric, labels)
    assert (after or 0) - (before or 0) == 1
    assert not task.done()
    await stop(worker, task)


def test_policy_from_settings() -> None:
    options = {
        "MAX_ATTEMPTS": 2,
        "DEAD_LETTER": "log",
        "TRANSIENT_ERRORS": ["builtins.LookupError"],
    }
    policy = RetryPolicy.from_settings(options)
    assert policy.max_attempts == 2 and policy.dead_letter == "log"
    assert LookupError in policy.transient and ConnectionError in policy.transient
    from django.db import OperationalError

    assert OperationalError in policy.transient  # an unmigrated or unreachable database
    assert RetryPolicy.from_settings(options, max_attempts=7).max_attempts == 7
    with pytest.raises(ValueError, match="unknown key"):
        RetryPolicy.from_settings({"RETRIES": 1})
    with pytest.raises(ValueError, match="dead_letter"):
        RetryPolicy.from_settings({"DEAD_LETTER": "drop"})


async def test_concurrency_keeps_order_per_key(layer: Any) -> None:
    """Four consumer instances on one channel; messages with the same ``topic`` stay in order."""
    handled: list[tuple[str, int]] = []
    busy = 0
    most = 0
    instances: set[int] = set()

    async def handle(message: dict[str, Any]) -> None:
        nonlocal busy, most
        instances.add(id(asyncio.current_task()))
        busy += 1
        most = max(most, busy)
        # work that takes longer for some messages: without the key, order would break
        for _ in range(message["n"] % 5):
            await asyncio.sleep(0)
        await asyncio.sleep(0.001 * (message["n"] % 3))
        busy -= 1
        handled.append((message["topic"], message["n"]))

    worker = ConsumerWorker(
        app_of(handle),
        ["lanes"],
        layer,
        retry=RetryPolicy(dead_letter="log", **FAST),
        shutdown_grace=2,
        concurrency={"lanes": 4},
        ordering_key={"lanes": "topic"},
    )
    task = asyncio.create_task(worker.arun())
    topics = [f"t/{k}" for k in range(8)]
    sent = 0
    for n in range(160):
        while True:
            try:
                await layer.send("lanes", {"type": "t.x", "topic": topics[n % 8], "n": n})
                break
            except Exception:  # ChannelFull: the worker is behind
                await asyncio.sleep(0.01)
        sent += 1
    deadline = time.monotonic() + 30
    while len(handled) < sent:
        assert time.monotonic() < deadline, len(handled)
        await asyncio.sleep(0.02)
    for topic in topics:
        numbers = [n for t, n in handled if t == topic]
        assert numbers == sorted(numbers) and len(numbers) == 20, (topic, numbers)
    assert most > 1 and len(instances) == 4  # really in parallel, on four instances
    await stop(worker, task)
