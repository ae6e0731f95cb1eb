"""Layer paths (DESIGN §3), including the redis-py 8 idle-receive trap on a real Redis."""

from __future__ import annotations

import asyncio
import os

import pytest
from channels.layers import InMemoryChannelLayer
from channels_redis.core import RedisChannelLayer

from core.layers import (
    LayerPathError,
    channel_layer_settings,
    is_memory_layer,
    resolve_layer,
)
from core.logs import describe_layer
from core.streams import StreamsChannelLayer
from core.testing import RedisServer

# for the import-path form
FACTORY_CALLS: list[int] = []
INSTANCE = InMemoryChannelLayer()


def factory() -> InMemoryChannelLayer:
    FACTORY_CALLS.append(1)
    return InMemoryChannelLayer(capacity=7)


NOT_A_LAYER = object()


class CustomLayer:
    async def send(self, channel: str, message: dict[str, object]) -> None: ...
    async def receive(self, channel: str) -> dict[str, object]:
        return {}

    async def new_channel(self, prefix: str = "x") -> str:
        return prefix


CUSTOM = CustomLayer()


def test_memory() -> None:
    layer = resolve_layer("memory://")
    assert isinstance(layer, InMemoryChannelLayer)
    assert is_memory_layer(layer)
    assert resolve_layer("memory://?capacity=5&expiry=9").capacity == 5


def test_redis_selects_the_streams_layer() -> None:
    layer = resolve_layer("redis://127.0.0.1:6390/2?capacity=1000&prefix=gw&batch=7")
    assert isinstance(layer, StreamsChannelLayer)
    assert (layer.capacity, layer.expiry, layer.prefix, layer.batch) == (1000, None, "gw", 7)
    assert layer.hosts == [{"address": "redis://127.0.0.1:6390/2"}]
    assert isinstance(resolve_layer("redis+streams://h/0?layer=streams"), StreamsChannelLayer)


def test_channels_redis_options_and_timeout_trap() -> None:
    path = "redis://127.0.0.1:6390/2?capacity=1000&expiry=30&prefix=gw&layer=channels_redis"
    layer = resolve_layer(path)
    assert isinstance(layer, RedisChannelLayer)
    assert (layer.capacity, layer.expiry, layer.prefix) == (1000, 30, "gw")
    host = layer.hosts[0]
    assert host["address"] == "redis://127.0.0.1:6390/2"
    assert host["socket_timeout"] is None
    assert not is_memory_layer(layer)


def test_import_path_instance_and_factory() -> None:
    assert resolve_layer("tests.core.test_layers:INSTANCE") is INSTANCE
    layer = resolve_layer("tests.core.test_layers:factory")
    assert layer.capacity == 7 and FACTORY_CALLS


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("", "expected redis://"),
        ("nonsense", "expected redis://"),
        ("amqp://localhost", "unknown scheme 'amqp'"),
        ("redis://", "no host"),
        ("redis://localhost:notaport/0", "bad port"),
        ("redis://localhost/0?capacity=lots", "capacity must be an integer"),
        ("redis://localhost/0?layer=pubsub", "layer must be 'streams' or 'channels_redis'"),
        ("memory://somehost", "takes no host"),
        ("memory://?bogus=1", "unknown option 'bogus'"),
        ("no.such.module:layer", "No module named"),
        ("tests.core.test_layers:missing", "has no attribute"),
        ("tests.core.test_layers:NOT_A_LAYER", "is not a channel layer"),
    ],
)
def test_bad_paths_are_one_line_errors(path: str, fragment: str) -> None:
    with pytest.raises(LayerPathError) as info:
        resolve_layer(path)
    message = str(info.value)
    assert fragment in message
    assert repr(path.strip()) in message
    assert "\n" not in message


def test_django_needs_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DJANGO_SETTINGS_MODULE", raising=False)
    with pytest.raises(LayerPathError, match="DJANGO_SETTINGS_MODULE is not set"):
        resolve_layer("django")


def test_describe_hides_password() -> None:
    assert describe_layer("redis://:hunter22@h:6379/0") == "redis://:***@h:6379/0"
    assert describe_layer("rediss://u:pw12@h/0") == "rediss://u:***@h/0"
    assert describe_layer("memory://") == "memory://"
    assert describe_layer("redis://:pa/ss@h/0") == "redis://:***@h/0"
    assert describe_layer("redis://h/0?prefix=a@b") == "redis://h/0?prefix=a@b"
    assert describe_layer("redis://u@h/0") == "redis://u@h/0"  # a user, no password


def test_channel_layer_settings_for_django() -> None:
    entry = channel_layer_settings("redis://127.0.0.1:6390/1?capacity=50")
    assert entry["BACKEND"] == "core.streams.StreamsChannelLayer"
    assert entry["CONFIG"]["capacity"] == 50 and entry["CONFIG"]["redelivery_timeout"] == 30
    entry = channel_layer_settings("redis://127.0.0.1:6390/1?capacity=50&layer=channels_redis")
    assert entry["BACKEND"] == "core.layers.RedisChannelLayer"
    assert entry["CONFIG"]["hosts"][0]["socket_timeout"] is None
    assert entry["CONFIG"]["capacity"] == 50
    assert channel_layer_settings("memory://")["BACKEND"].endswith("InMemoryChannelLayer")
    with pytest.raises(LayerPathError):
        channel_layer_settings("tests.core.test_layers:CUSTOM")


@pytest.mark.parametrize("which", ["streams", "channels_redis"])
async def test_idle_receive_outlives_redis_py_socket_timeout(
    redis_server: RedisServer, which: str
) -> None:
    """redis-py 8 would raise TimeoutError after 5 s of an idle receive(); ours keeps waiting."""
    layer = resolve_layer(f"{redis_server.url}?layer={which}")
    receiving = asyncio.create_task(layer.receive("idle"))
    await asyncio.sleep(6.5)
    assert not receiving.done(), receiving.exception() if receiving.done() else None
    sender = resolve_layer(f"{redis_server.url}?layer={which}")
    await sender.send("idle", {"type": "late.message", "n": 1})
    message = await asyncio.wait_for(receiving, 10)
    assert message == {"type": "late.message", "n": 1}
    await layer.close_pools()
    await sender.close_pools()


async def test_django_alias(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]) -> None:
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "tests.core.django_settings")
    layer = resolve_layer("django")
    assert is_memory_layer(layer)
    assert resolve_layer("django:other").capacity == 3
    with pytest.raises(LayerPathError, match="'missing'"):
        resolve_layer("django:missing")


@pytest.mark.parametrize("which", ["streams", "channels_redis"])
@pytest.mark.parametrize("senders", [100, 1000])
async def test_many_concurrent_senders(redis_server: RedisServer, senders: int, which: str) -> None:
    """Issue 6 item 11: redis-py 8's 100-connection pool raised MaxConnectionsError here."""
    layer = resolve_layer(f"{redis_server.url}?capacity=100000&layer={which}")
    per = 3
    received: list[tuple[int, int]] = []

    async def sender(i: int) -> None:
        for n in range(per):
            await layer.send("crowd", {"type": "t.x", "i": i, "n": n})

    async def receiver() -> None:
        while len(received) < senders * per:
            message = await layer.receive("crowd")
            received.append((message["i"], message["n"]))

    receiving = asyncio.create_task(receiver())
    await asyncio.wait_for(asyncio.gather(*(sender(i) for i in range(senders))), 120)
    await asyncio.wait_for(receiving, 120)
    assert sorted(received) == [(i, n) for i in range(senders) for n in range(per)]
    await layer.flush()
    await layer.close_pools()
