"""The de-dup window's claim / done / release, in memory and in a real Redis."""

from __future__ import annotations

import logging

from core.layers import resolve_layer
from core.metrics import GatewayMetrics
from core.redis import layer_redis
from core.testing import RedisServer
from gateways.slack.dedup import Claim, DedupWindow, RedisDedupWindow


async def test_memory_window() -> None:
    now = [0.0]
    window = DedupWindow(window=60, max_entries=3, pending_for=5, clock=lambda: now[0])
    assert await window.claim("a") is Claim.NEW
    assert await window.claim("a") is Claim.PENDING  # being handed over: not acked
    await window.release("a")  # the layer did not take it
    assert await window.claim("a") is Claim.NEW
    await window.done("a")
    assert await window.claim("a") is Claim.DONE
    assert await window.claim("b") is Claim.NEW
    now[0] = 6.0  # b's pending mark expired (its process died mid-way)
    assert await window.claim("b") is Claim.NEW
    for key in "cde":  # over max_entries: the oldest is forgotten first
        assert await window.claim(key) is Claim.NEW
    assert len(window) == 3 and await window.claim("a") is Claim.NEW
    now[0] = 100.0  # past the window: all forgotten
    assert await window.claim("c") is Claim.NEW and len(window) == 1


async def test_redis_window_is_shared_and_pushes_back_on_a_pending_id(
    redis_server: RedisServer,
) -> None:
    layer = resolve_layer(redis_server.url)
    log = logging.getLogger("gateway.slack")
    windows = []
    for _ in range(2):  # two replicas of one integration
        redis = layer_redis(layer, "slack", "team")
        assert redis is not None
        windows.append(RedisDedupWindow(redis, 60, 5, GatewayMetrics("team"), log))
    one, two = windows
    try:
        assert await one.claim("Ev1") is Claim.NEW
        assert await two.claim("Ev1") is Claim.PENDING
        await one.release("Ev1")
        assert await two.claim("Ev1") is Claim.NEW
        await two.done("Ev1")
        assert await one.claim("Ev1") is Claim.DONE
        key = one.redis.key("seen:Ev1")
        assert 0 < await one.redis.call("pttl", key) <= 60_000
        assert await one.claim("Ev3") is Claim.NEW
        redis_server.kill()
        assert await one.claim("Ev2") is Claim.NEW  # Redis down: passes unchecked
        await one.release("Ev2")
        # delivered, but Redis went away before it took the done mark: this process knows
        await one.done("Ev3")
        assert await one.claim("Ev3") is Claim.DONE
    finally:
        for window in windows:
            await window.close()
        await layer.close_pools()
