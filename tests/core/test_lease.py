"""core.lease on a real Redis: one holder at a time, fencing tokens, renew and release only by
the holder, and a paused holder that finds its lease taken."""

from __future__ import annotations

import asyncio

import pytest

from core.layers import resolve_layer
from core.lease import RedisLease, owner_id
from core.redis import RedisUnavailable, layer_redis
from core.testing import RedisServer


async def test_one_holder_at_a_time_with_growing_tokens(redis_server: RedisServer) -> None:
    layer = resolve_layer(redis_server.url)
    redis = layer_redis(layer, "irc", "ops")
    assert redis is not None
    a, b = RedisLease(redis, "a", 0.3), RedisLease(redis, "b", 0.3)
    try:
        first = await a.acquire()
        assert first is not None and a.held
        assert await b.acquire() is None and not b.held
        assert await b.holder() == "a"
        assert await a.renew()
        await a.release()
        assert not a.held and await a.holder() is None
        second = await b.acquire()
        assert second is not None and second > first
        # a holder paused past its ttl finds the lease another's: renew says so, release
        # leaves the other's lease alone
        a.token = first
        assert not await a.renew() and not a.held
        a.token = first
        await a.release()
        assert await b.holder() == "b"
        await asyncio.sleep(0.4)  # b never renewed: its ttl passed
        assert await a.acquire() is not None
        assert not await b.renew()
        assert await a.holder() == "a" and a.key == "asgi:gateways:irc:ops:lease"
    finally:
        await redis.close()
        await layer.close_pools()


async def test_a_down_redis_is_redis_unavailable(redis_server: RedisServer) -> None:
    layer = resolve_layer(redis_server.url)
    redis = layer_redis(layer, "irc", "ops", timeout=1)
    assert redis is not None
    lease = RedisLease(redis, owner_id(), 5)
    try:
        redis_server.kill()
        with pytest.raises(RedisUnavailable, match=f"127.0.0.1:{redis_server.port}"):
            await lease.acquire()
        assert not lease.held
    finally:
        await redis.close()
        await layer.close_pools()
