"""core.streams.StreamsChannelLayer on a real local Redis Cluster (3 masters, 3 replicas).

A channel's keys share a hash tag, so every script runs in one slot; sends to channels in many
slots, group_send across slots, a ConsumerWorker, and a master killed mid-stream (its replica
takes over; the layer's callers see only the outage errors they already push back on).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
from channels.exceptions import ChannelFull
from redis.crc import key_slot

from core.layers import LayerPathError, channel_layer_settings, resolve_layer
from core.metrics import REGISTRY
from core.retry import LAYER_ERRORS, send_command
from core.streams import LayerUnavailable, StreamsChannelLayer
from core.testing import RedisClusterServers, until
from core.worker import ConsumerWorker, RetryPolicy
from tests.conftest import _run

#: channels whose streams are in different hash slots (on all three masters)
CHANNELS = [f"chan-{n}" for n in range(24)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    """One cluster for the tests that kill nothing (those that do get their own,
    ``redis_cluster``); each test's layer flushes its keys."""
    yield from _run(RedisClusterServers())


@pytest.fixture
async def layer(cluster: RedisClusterServers) -> AsyncIterator[StreamsChannelLayer]:
    layer = resolve_layer(cluster.url + "?capacity=5")
    assert isinstance(layer, StreamsChannelLayer)
    yield layer
    await layer.flush()


def client(cluster: RedisClusterServers) -> redis.RedisCluster:
    return redis.RedisCluster(host="127.0.0.1", port=cluster.ports[0])


def test_cluster_layer_path_and_django_settings() -> None:
    path = "redis+cluster://:pw@10.0.0.1:7000,10.0.0.2:7001/?capacity=9&durability=replicated"
    layer = resolve_layer(path)
    assert isinstance(layer, StreamsChannelLayer)
    assert layer.hosts == [{"cluster": ["redis://:pw@10.0.0.1:7000", "redis://:pw@10.0.0.2:7001"]}]
    assert (layer.capacity, layer.durability) == (9, "replicated")
    entry = channel_layer_settings("rediss+cluster://h:7000?durability_timeout=0.5")
    assert entry["BACKEND"] == "core.streams.StreamsChannelLayer"
    assert entry["CONFIG"]["hosts"] == [{"cluster": ["rediss://h:7000"]}]
    assert entry["CONFIG"]["durability_timeout"] == 0.5
    for bad in ("redis+cluster:///", "redis+cluster://h:7000/3", "redis+cluster://h:x"):
        with pytest.raises(LayerPathError):
            resolve_layer(bad)
    with pytest.raises(LayerPathError, match="durability must be one of"):
        resolve_layer("redis+cluster://h:7000?durability=sync")
    with pytest.raises(LayerPathError, match="durability needs the streams layer"):
        resolve_layer("redis://h:6379/0?layer=channels_redis&durability=replicated")
    with pytest.raises(LayerPathError, match="durability_timeout must be"):
        resolve_layer("redis://h:6379/0?durability_timeout=soon")
    plain_durable = resolve_layer("redis://h:6379/0?durability=replicated&durability_timeout=2")
    assert isinstance(plain_durable, StreamsChannelLayer)
    assert (plain_durable.durability, plain_durable.durability_timeout) == ("replicated", 2.0)
    # the keys of one channel share a hash tag; plain hosts keep their key names
    assert layer._stream_key("a.b") == "asgi:stream:{a.b}"
    assert layer._runs_key(layer._stream_key("a.b")) == "asgi:runs:{a.b}"
    marker = layer._marker_key(layer._stream_key("a.b"))
    assert key_slot(marker.encode()) == key_slot(b"a.b")
    plain = resolve_layer("redis://h:6379/0")
    assert isinstance(plain, StreamsChannelLayer)
    assert plain._stream_key("a.b") == "asgi:stream:a.b"
    assert plain._marker_key("asgi:stream:a.b") == "asgi:epoch"


async def test_send_receive_capacity_and_send_many_across_slots(
    layer: StreamsChannelLayer, cluster: RedisClusterServers
) -> None:
    slots = {key_slot(layer._stream_key(c).encode()) for c in CHANNELS}
    assert len(slots) == len(CHANNELS)
    for n in range(5):
        await asyncio.gather(*(layer.send(c, {"type": "t.x", "n": n}) for c in CHANNELS))
    with pytest.raises(ChannelFull):
        await layer.send(CHANNELS[3], {"type": "t.x", "n": 5})
    for channel in CHANNELS:
        assert [(await layer.receive(channel))["n"] for _ in range(5)] == [0, 1, 2, 3, 4]
    # send_many: an ordered prefix, stopping at the first full channel, across slots
    batch = [("sm-a", {"type": "t.x", "n": n}) for n in range(3)]
    batch += [("sm-b", {"type": "t.x", "n": n}) for n in range(7)]  # the 6th is refused
    batch += [("sm-c", {"type": "t.x", "n": 0})]
    assert await layer.send_many(batch) == 8
    assert [(await layer.receive("sm-b"))["n"] for _ in range(5)] == [0, 1, 2, 3, 4]
    # each slot that took a write has its marker, on the master that serves the slot
    markers = [layer._marker_key(layer._stream_key(c)) for c in CHANNELS]
    assert all(client(cluster).exists(m) for m in markers)
    # process-local channels live on the cluster too
    local = await layer.new_channel()
    await layer.send(local, {"type": "t.local"})
    assert (await layer.receive(local))["type"] == "t.local"


async def test_group_send_reaches_members_in_every_slot(layer: StreamsChannelLayer) -> None:
    other = resolve_layer(layer_url(layer))
    assert isinstance(other, StreamsChannelLayer)
    locals_ = [await layer.new_channel() for _ in range(3)] + [await other.new_channel()]
    for channel in [*CHANNELS, *locals_]:
        await layer.group_add("room", channel)
    await layer.group_send("room", {"type": "t.room", "text": "hi"})
    for channel in CHANNELS:
        assert (await asyncio.wait_for(layer.receive(channel), 5))["text"] == "hi"
    for channel in locals_[:3]:
        assert (await asyncio.wait_for(layer.receive(channel), 5))["text"] == "hi"
    assert (await asyncio.wait_for(other.receive(locals_[3]), 5))["text"] == "hi"
    await layer.group_discard("room", CHANNELS[0])
    await layer.group_send("room", {"type": "t.room", "text": "again"})
    assert (await asyncio.wait_for(layer.receive(CHANNELS[1]), 5))["text"] == "again"
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(layer.receive(CHANNELS[0]), 0.3)
    await other.close_pools()


def layer_url(layer: StreamsChannelLayer) -> str:
    (host,) = layer.hosts
    return "redis+cluster://" + ",".join(u.split("//")[1] for u in host["cluster"]) + "/"


async def test_consumer_worker_on_the_cluster(layer: StreamsChannelLayer) -> None:
    handled: list[tuple[str, int]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            handled.append((scope["channel"], message["n"]))

    channels = CHANNELS[:6]
    worker = ConsumerWorker(app, channels, layer, retry=RetryPolicy(), shutdown_grace=2)
    task = asyncio.create_task(worker.arun())
    for n in range(4):
        for channel in channels:
            await layer.send(channel, {"type": "t.x", "n": n})
    await until(lambda: len(handled) == 24, 20, "24 messages handled")
    assert sorted(handled) == sorted((c, n) for c in channels for n in range(4))
    await worker.drain()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize("durability", ["async", "replicated"])
async def test_master_killed_mid_stream(
    redis_cluster: RedisClusterServers, durability: str
) -> None:
    """A stream of sends to one channel and a receiver; the channel's master is SIGKILLed
    halfway. Its replica takes over (cluster-node-timeout 1 s); the sender (retrying as the
    gateways do, on LAYER_ERRORS only) and the receiver see nothing but outage errors, and
    carry on. With durability=replicated no acknowledged message is lost (the killed master
    comes back as a replica, which the new master needs to accept writes again); with the
    default the loss Redis' asynchronous replication allows is counted (docs/redis.md)."""
    layer = resolve_layer(
        redis_cluster.url + f"?capacity=100000&durability={durability}&durability_timeout=0.5"
    )
    assert isinstance(layer, StreamsChannelLayer)
    channel = "failover"
    master = redis_cluster.master_of(layer._stream_key(channel))
    acknowledged: list[int] = []
    received: list[int] = []
    outages: list[BaseException] = []
    total = 400

    async def sender() -> None:
        for n in range(total):
            try:
                await layer.send(channel, {"type": "t.x", "n": n})
            except LAYER_ERRORS as exc:
                outages.append(exc)
                await send_command(layer, channel, {"type": "t.x", "n": n}, timeout=60)
            acknowledged.append(n)
            await asyncio.sleep(0.005)

    async def receiver() -> None:
        while True:
            try:
                received.append((await layer.receive(channel))["n"])
            except LAYER_ERRORS as exc:
                outages.append(exc)
                await asyncio.sleep(0.1)

    sending = asyncio.create_task(sender())
    receiving = asyncio.create_task(receiver())
    await until(lambda: len(acknowledged) >= total // 2, 30, "half the messages sent")
    master.kill()
    killed_at = time.monotonic()
    if durability == "replicated":
        # the promoted replica has no replica of its own until the old master rejoins as one
        key = layer._stream_key(channel)
        await until(
            lambda: asyncio.to_thread(failed_over, redis_cluster, key, master), 30, "the failover"
        )
        await asyncio.to_thread(master.start)
    await asyncio.wait_for(sending, 90)
    await until(lambda: set(received) >= set(acknowledged) or time.monotonic() - killed_at > 30)
    receiving.cancel()
    await asyncio.gather(receiving, return_exceptions=True)
    lost = sorted(set(acknowledged) - set(received))
    print(
        f"durability={durability}: {len(acknowledged)} acknowledged, {len(lost)} lost, "
        f"{len(received) - len(set(received))} duplicates, {len(outages)} outage errors"
    )
    if durability == "replicated":
        assert lost == []
    else:
        assert len(lost) < total // 2  # only what was in flight at the kill, if anything
    # what reached the callers were outage errors (pushed back on, retried), nothing else
    assert all(isinstance(e, LAYER_ERRORS) for e in outages)
    # (redis-py's RedisCluster retries through most of a failover: often none reach them)
    key = layer._stream_key(channel)
    assert await asyncio.to_thread(redis_cluster.master_of, key) is not master  # failed over
    await layer.flush()


def failed_over(cluster: RedisClusterServers, key: str, dead: Any) -> bool:
    """The replica of ``dead`` serves ``key``'s slot now, and the cluster is ok."""
    try:
        if cluster.master_of(key) is dead:
            return False
        cluster.wait_ok(timeout=0.1)
    except RuntimeError:
        return False
    return True


async def test_a_shard_without_master_or_replica_is_an_outage(
    redis_cluster: RedisClusterServers,
) -> None:
    """A master and its replica both down: the cluster answers CLUSTERDOWN (no node serves
    those slots). After redis-py's retries a send raises an outage error (in LAYER_ERRORS: the
    gateways push back, 451 / no PUBACK / 503), not another error; once the servers are back
    the layer carries on."""
    layer = resolve_layer(redis_cluster.url)
    assert isinstance(layer, StreamsChannelLayer)
    await layer.send("down", {"type": "t.x", "n": 1})
    master = redis_cluster.master_of(layer._stream_key("down"))
    shard = [master, *redis_cluster.replicas_of(master)]
    live = next(c for c in CHANNELS if redis_cluster.master_of(layer._stream_key(c)) not in shard)
    for server in shard:
        server.kill()
    alive = next(server for server in redis_cluster.servers if server.alive)
    await until(lambda: asyncio.to_thread(cluster_state, alive.port, "fail"), 30, "CLUSTERDOWN")
    with pytest.raises(LAYER_ERRORS) as raised:
        await asyncio.wait_for(layer.send("down", {"type": "t.x", "n": 2}), 60)
    print(f"a send to a shard that is down raised {type(raised.value).__name__}: {raised.value}")
    # a live master answers CLUSTERDOWN for every slot while the cluster is down
    with pytest.raises(LayerUnavailable) as refused:
        await asyncio.wait_for(layer.send(live, {"type": "t.x"}), 60)
    assert isinstance(refused.value.__cause__, redis.exceptions.ClusterDownError)
    vanished = REGISTRY.get_sample_value("gateway_layer_vanished_total", {"what": "dataset"})
    for server in shard:
        await asyncio.to_thread(server.start)  # nodes.conf kept, the data (no AOF) gone
    await asyncio.to_thread(redis_cluster.wait_ok)
    await send_command(layer, "down", {"type": "t.x", "n": 3}, timeout=60)
    assert (await asyncio.wait_for(layer.receive("down"), 10))["n"] == 3
    # the slot's marker vanished with the data: reported (ERROR, metric, /readyz reason)
    after = REGISTRY.get_sample_value("gateway_layer_vanished_total", {"what": "dataset"})
    assert (after or 0) == (vanished or 0) + 1
    assert any("lost its data" in problem for problem in layer.health_problems())
    await layer.flush()


def cluster_state(port: int, state: str) -> bool:
    info = redis.Redis(host="127.0.0.1", port=port).cluster("info")
    return bool(info["cluster_state"] == state)


def test_cluster_errors_are_outages() -> None:
    """CLUSTERDOWN, TRYAGAIN, MOVED/ASK left over and READONLY reach callers as
    LayerUnavailable, a redis ConnectionError: in core.service.LAYER_ERRORS."""
    from core.streams import _outage

    for error in (
        redis.exceptions.ClusterDownError("CLUSTERDOWN The cluster is down"),
        redis.exceptions.TryAgainError("TRYAGAIN"),
        redis.exceptions.MovedError("3999 127.0.0.1:6381"),
        redis.exceptions.ReadOnlyError("READONLY You can't write against a read only replica."),
    ):
        mapped = _outage(error)
        assert isinstance(mapped, LayerUnavailable) and isinstance(mapped, LAYER_ERRORS)
        assert mapped.__cause__ is error
    plain = redis.exceptions.ResponseError("WRONGTYPE")
    assert _outage(plain) is plain


async def test_the_unread_channel_check_works_on_the_cluster(layer: StreamsChannelLayer) -> None:
    """core.layer_check reads streams of many slots in one pipeline (and Redis' clock apart:
    a cluster pipeline refuses TIME)."""
    import logging

    from core.layer_check import StreamsReadCheck

    check = StreamsReadCheck("gw", layer, logging.getLogger("test"), after=0.3)
    for channel in CHANNELS[:3]:
        await layer.send(channel, {"type": "t.x", "id": "1"})
        check.sent(channel)

    async def reasons() -> list[str]:
        await check.poll()
        return check.reasons()

    found = await until(reasons, 10, "the unread channels")
    assert isinstance(found, list) and len(found) == 3


async def test_a_gateway_on_the_cluster(layer: StreamsChannelLayer) -> None:
    """The email gateway in process on a redis+cluster:// layer: a mail answered 250 is on
    its inbound channel; the readiness probe PINGs the cluster."""
    from core.layers import probe_layer
    from tests.gateways.email.test_gateway import NAME, aiosmtplib_send, config, mail, running

    assert await probe_layer(layer) is None
    async with running(config(), layer) as gateway:
        response = await aiosmtplib_send(gateway.server.port, mail(Message_ID="<c@example.org>"))
        assert response.code == 250
        event = await asyncio.wait_for(layer.receive(NAME), 10)
        assert event["id"] == "<c@example.org>"
