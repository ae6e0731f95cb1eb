"""core.redis: a gateway's own keys beside a real Redis layer, under the layer's prefix."""

from __future__ import annotations

import pytest
from channels.layers import InMemoryChannelLayer

from core.layers import resolve_layer
from core.redis import LayerRedis, RedisUnavailable, layer_redis
from core.testing import RedisServer


async def test_keys_live_beside_the_layer_under_its_prefix(redis_server: RedisServer) -> None:
    layer = resolve_layer(f"{redis_server.url}?prefix=myapp")
    redis = layer_redis(layer, "mqtt", "sensors")
    assert isinstance(redis, LayerRedis)
    try:
        key = redis.key("subscriptions")
        assert key == "myapp:gateways:mqtt:sensors:subscriptions"
        await redis.call("hset", key, "a", "1")
        assert await redis.call("hgetall", key) == {b"a": b"1"}
        assert redis.description == f"127.0.0.1:{redis_server.port}/0"
        await layer.send("some-channel", {"type": "x"})
        await layer.flush()  # the layer's flush clears its prefix, ours included
        assert await redis.call("hgetall", key) == {}
    finally:
        await redis.close()
        await redis.close()
        await layer.close_pools()


async def test_a_down_redis_is_one_clear_error(redis_server: RedisServer) -> None:
    redis = layer_redis(resolve_layer(redis_server.url), "scheduler", "cron")
    assert redis is not None
    try:
        redis_server.kill()
        with pytest.raises(RedisUnavailable) as error:
            await redis.call("set", redis.key("lease"), "me")
        message = str(error.value)
        assert message.startswith(f"Redis at 127.0.0.1:{redis_server.port}/0: set: ")
        assert "\n" not in message
        redis_server.start()
        assert await redis.call("set", redis.key("lease"), "me")
    finally:
        await redis.close()


def test_other_layers_have_no_redis() -> None:
    assert layer_redis(InMemoryChannelLayer(), "mqtt", "x") is None
