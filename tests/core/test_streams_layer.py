"""core.streams.StreamsChannelLayer on real Redis servers: the channel layer contract, batching
under 1,000 senders, acknowledged delivery and redelivery, Redis crashes."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis
from channels.exceptions import ChannelFull

from core.layers import channel_layer_settings, resolve_layer
from core.metrics import REGISTRY
from core.streams import DELIVERY_KEY, StreamsChannelLayer
from core.testing import RedisServer, Server, free_port, until
from core.worker import ConsumerWorker, RetryPolicy

ROOT = Path(__file__).resolve().parents[2]


def streams_url(server: RedisServer, query: str = "") -> str:
    return server.url.replace("redis://", "redis+streams://") + (f"?{query}" if query else "")


@pytest.fixture
async def layer(redis_server: RedisServer) -> AsyncIterator[StreamsChannelLayer]:
    layer = resolve_layer(streams_url(redis_server, "capacity=5"))
    assert isinstance(layer, StreamsChannelLayer)
    yield layer
    await layer.flush()


def dropped(reason: str) -> float:
    value = REGISTRY.get_sample_value("gateway_layer_dropped_total", {"reason": reason})
    return value or 0.0


def test_layer_path_and_django_settings() -> None:
    layer = resolve_layer("redis+streams://127.0.0.1:6390/2?capacity=9&redelivery_timeout=7")
    assert isinstance(layer, StreamsChannelLayer)
    assert (layer.capacity, layer.redelivery_timeout, layer.expiry) == (9, 7.0, None)
    assert layer.hosts == [{"address": "redis://127.0.0.1:6390/2"}]
    entry = channel_layer_settings("rediss+streams://h:6390/0?batch=5")
    assert entry["BACKEND"] == "core.streams.StreamsChannelLayer"
    assert entry["CONFIG"]["hosts"] == [{"address": "rediss://h:6390/0"}]
    assert entry["CONFIG"]["batch"] == 5


async def test_send_receive_in_order_and_capacity(layer: StreamsChannelLayer) -> None:
    for n in range(5):
        await layer.send("work", {"type": "t.x", "n": n})
    with pytest.raises(ChannelFull):
        await layer.send("work", {"type": "t.x", "n": 5})
    assert [(await layer.receive("work"))["n"] for _ in range(5)] == [0, 1, 2, 3, 4]
    await layer.send("work", {"type": "t.x", "n": 6})  # room again once received
    assert (await layer.receive("work"))["n"] == 6


async def test_channel_full_is_exact_for_concurrent_senders(layer: StreamsChannelLayer) -> None:
    """Fifty sends in one batch: exactly ``capacity`` are accepted, each caller gets its answer."""
    results = await asyncio.gather(
        *(layer.send("crowded", {"type": "t.x", "n": n}) for n in range(50)),
        return_exceptions=True,
    )
    accepted = [n for n, r in enumerate(results) if r is None]
    assert accepted == [0, 1, 2, 3, 4]
    assert all(isinstance(r, ChannelFull) for r in results[5:])


async def test_send_many_appends_an_ordered_prefix(layer: StreamsChannelLayer) -> None:
    """One call for many messages; it stops at the first full channel, so nothing overtakes."""
    batch = [("a", {"type": "t.x", "n": n}) for n in range(4)]
    batch += [("b", {"type": "t.x", "n": n}) for n in range(6)]  # b holds 5: the 6th is full
    batch += [("a", {"type": "t.x", "n": 99})]  # room on a, but after the refused one
    assert await layer.send_many(batch) == 9
    assert [(await layer.receive("a"))["n"] for _ in range(4)] == [0, 1, 2, 3]
    assert [(await layer.receive("b"))["n"] for _ in range(5)] == [0, 1, 2, 3, 4]
    # the rest goes once there is room, in order, and concurrent sends keep their own answers
    again, single = await asyncio.gather(layer.send_many(batch[9:]), layer.send("a", {"n": 7}))
    assert again == 2 and single is None
    assert [(await layer.receive(c))["n"] for c in ("b", "a", "a")] == [5, 99, 7]


async def test_send_many_across_hosts_keeps_the_order(redis_server: RedisServer) -> None:
    with RedisServer() as second:
        layer = StreamsChannelLayer(hosts=[redis_server.url, second.url], capacity=2)
        names = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
        assert len({layer._where(name)[0] for name in names}) == 2  # both hosts are used
        batch = [(name, {"type": "t.x", "n": i}) for i, name in enumerate(names * 3)]
        assert await layer.send_many(batch) == 16  # the 17th finds alpha full (capacity 2)
        for i, name in enumerate(names):
            assert [(await layer.receive(name))["n"] for _ in range(2)] == [i, i + 8]
        await layer.flush()


async def test_channel_capacity_patterns(redis_server: RedisServer) -> None:
    layer = StreamsChannelLayer(
        hosts=[redis_server.url], capacity=3, channel_capacity={"big.*": 6, "tiny": 1}
    )
    for channel, room in (("big.one", 6), ("tiny", 1), ("other", 3)):
        for n in range(room):
            await layer.send(channel, {"type": "t.x", "n": n})
        with pytest.raises(ChannelFull):
            await layer.send(channel, {"type": "t.x"})
    await layer.flush()


async def test_expired_messages_are_counted_and_logged(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    layer = StreamsChannelLayer(hosts=[redis_server.url], expiry=1)
    await layer.send("old", {"type": "t.x", "n": 1})
    await layer.send("old2", {"type": "t.x", "n": 1})
    before = dropped("expired")
    await asyncio.sleep(1.2)  # what is under test is age
    await layer.send("old", {"type": "t.x", "n": 2})  # trims the expired one at the send
    assert (await layer.receive("old"))["n"] == 2
    await layer.send("old2-other", {"type": "t.x"})
    receiving = asyncio.create_task(layer.receive("old2"))  # dropped at the fetch
    await until(lambda: dropped("expired") - before >= 2, what="two expired messages counted")
    assert "older than expiry" in caplog.text and "dropped message" in caplog.text
    receiving.cancel()
    await asyncio.gather(receiving, return_exceptions=True)
    await layer.flush()


async def test_no_expiry_by_default(layer: StreamsChannelLayer) -> None:
    assert layer.expiry is None
    raw = redis.Redis.from_url(layer.hosts[0]["address"])
    await layer.send("kept", {"type": "t.x"})
    assert raw.ttl(f"{layer.prefix}:stream:kept") == -1  # no key expiry either
    raw.close()


async def test_groups(layer: StreamsChannelLayer) -> None:
    await layer.group_add("room", "alice")
    await layer.group_add("room", "bob")
    await layer.group_send("room", {"type": "t.hello"})
    assert await layer.receive("alice") == {"type": "t.hello"}
    assert await layer.receive("bob") == {"type": "t.hello"}
    await layer.group_discard("room", "bob")
    for _ in range(5):
        await layer.send("alice", {"type": "t.fill"})
    await layer.group_send("room", {"type": "t.skipped"})  # alice full: skipped, no error
    await layer.send("bob", {"type": "t.direct"})
    assert await layer.receive("bob") == {"type": "t.direct"}  # bob got nothing from the group


async def test_group_sends_and_sends_in_one_batch(layer: StreamsChannelLayer) -> None:
    """group_sends, sends and a full channel queued at once (one writer round trip, one batch
    script call): each caller gets its own answer, in order, and a member's capacity of its
    own (``set_channel_capacity``) is what the group_send checks."""
    layer.set_channel_capacity("carol", 1)
    local = await layer.new_channel()
    for member in ("alice", "carol", local):
        await layer.group_add("room", member)
    for _ in range(5):
        await layer.send("full", {"type": "t.fill"})
    before = dropped("group_full")
    answers = await asyncio.gather(
        layer.group_send("room", {"type": "t.room", "n": 1}),
        layer.send("alice", {"type": "t.direct"}),
        layer.send("full", {"type": "t.refused"}),
        layer.group_send("room", {"type": "t.room", "n": 2}),  # carol (capacity 1) is full
        return_exceptions=True,
    )
    assert answers[:2] == [None, None] and answers[3] is None
    assert isinstance(answers[2], ChannelFull)
    assert dropped("group_full") == before + 1
    got = [await layer.receive("alice") for _ in range(3)]
    assert got == [{"type": "t.room", "n": 1}, {"type": "t.direct"}, {"type": "t.room", "n": 2}]
    assert (await layer.receive("carol"))["n"] == 1
    assert [(await layer.receive(local))["n"] for _ in range(2)] == [1, 2]
    await layer.send("carol", {"type": "t.after"})  # carol got one message: it has room again


async def test_process_local_channels(layer: StreamsChannelLayer) -> None:
    one, two = await layer.new_channel(), await layer.new_channel("reply")
    assert "!" in one and two.startswith("reply.") and one != two
    await layer.send(two, {"type": "t.x", "to": "two"})
    await layer.send(one, {"type": "t.x", "to": "one"})
    await layer.group_add("locals", one)
    await layer.group_add("locals", two)
    await layer.group_send("locals", {"type": "t.g"})
    assert [await layer.receive(one) for _ in range(2)] == [
        {"type": "t.x", "to": "one"},
        {"type": "t.g"},
    ]
    assert [await layer.receive(two) for _ in range(2)] == [
        {"type": "t.x", "to": "two"},
        {"type": "t.g"},
    ]
    other = StreamsChannelLayer(hosts=layer.hosts)
    with pytest.raises(AssertionError, match="Wrong client prefix"):
        await other.receive(one)


async def test_flush(layer: StreamsChannelLayer) -> None:
    await layer.send("gone", {"type": "t.x"})
    await layer.group_add("g", "gone")
    await layer.flush()
    raw = redis.Redis.from_url(layer.hosts[0]["address"])
    assert raw.keys(f"{layer.prefix}:*") == []
    raw.close()
    await layer.send("gone", {"type": "t.y"})  # works again after a flush
    assert await layer.receive("gone") == {"type": "t.y"}


async def test_two_hosts_shard_channels(redis_server: RedisServer) -> None:
    with RedisServer() as second:
        layer = StreamsChannelLayer(hosts=[redis_server.url, second.url], capacity=1000)
        channels = [f"shard{n}" for n in range(20)]
        for channel in channels:
            await layer.send(channel, {"type": "t.x", "c": channel})
            await layer.group_add("everyone", channel)
        await layer.group_send("everyone", {"type": "t.all"})
        for channel in channels:
            assert await layer.receive(channel) == {"type": "t.x", "c": channel}
            assert await layer.receive(channel) == {"type": "t.all"}
        counts = []
        for server in (redis_server, second):
            raw = redis.Redis.from_url(server.url)
            counts.append(len(raw.keys("asgi:stream:*")))
            raw.close()
        assert sum(counts) == 20 and all(counts), counts
        await layer.flush()


async def test_thousand_concurrent_senders(redis_server: RedisServer) -> None:
    """redis-py 8's 100-connection pool: no MaxConnectionsError, everything delivered."""
    layer = StreamsChannelLayer(hosts=[redis_server.url], capacity=100_000)
    per = 3

    async def sender(i: int) -> None:
        for n in range(per):
            await layer.send("crowd", {"type": "t.x", "i": i, "n": n})

    async def receiver() -> list[tuple[int, int]]:
        got = []
        for _ in range(1000 * per):
            message = await layer.receive("crowd")
            got.append((message["i"], message["n"]))
        return got

    receiving = asyncio.create_task(receiver())
    await asyncio.gather(*(sender(i) for i in range(1000)))
    received = await receiving
    assert sorted(received) == [(i, n) for i in range(1000) for n in range(per)]
    for i in range(1000):  # one sender's messages stay in its order
        assert [n for j, n in received if j == i] == list(range(per))
    raw = redis.Redis.from_url(redis_server.url)
    # acknowledged and deleted (the last acknowledgements are on their way)
    await until(lambda: raw.xlen("asgi:stream:crowd") == 0, what="all acknowledged")
    assert int(raw.info("clients")["connected_clients"]) < 10
    raw.close()
    await layer.flush()


async def test_unacknowledged_message_is_redelivered_with_its_count(
    redis_server: RedisServer,
) -> None:
    first = StreamsChannelLayer(hosts=[redis_server.url], redelivery_timeout=0.5)
    await first.send("acked", {"type": "t.x", "id": "m1"})
    message, token = await first.receive_with_ack("acked")
    assert message == {"type": "t.x", "id": "m1"} and token.delivery == 1
    await first.close_pools()  # "dies" holding it
    second = StreamsChannelLayer(hosts=[redis_server.url], redelivery_timeout=0.5)
    again, token = await asyncio.wait_for(second.receive_with_ack("acked"), 10)
    assert again == {"type": "t.x", "id": "m1"} and token.redelivered
    # its handler starts: counted in Redis first, then it carries its count
    assert await second.begin(token, again) == 2
    assert again == {"type": "t.x", "id": "m1", DELIVERY_KEY: 2}
    assert await second.ack(token) is True
    raw = redis.Redis.from_url(redis_server.url)
    assert raw.xlen("asgi:stream:acked") == 0
    assert raw.xpending("asgi:stream:acked", "channels")["pending"] == 0
    raw.close()
    await second.flush()


async def test_worker_sigkilled_mid_handler_is_redelivered(redis_server: RedisServer) -> None:
    """Every message handled at least once; what the dead worker held comes with a count."""
    path = streams_url(redis_server, "redelivery_timeout=1&batch=10")
    layer = resolve_layer(path)
    raw = redis.Redis.from_url(redis_server.url)
    for n in range(20):
        await layer.send("jobs", {"type": "t.job", "id": f"j{n}", "hang": n == 3})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "tests.core.streams_worker", path, "jobs", "seen"]
    child = await asyncio.to_thread(Server, argv, "worker ready", cwd=ROOT, env=env)
    try:
        await until(lambda: b"j3:1" in raw.lrange("seen", 0, -1), 30, "j3 started")
    finally:
        await asyncio.to_thread(child.kill)
    handled: dict[str, list[int]] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            handled.setdefault(message["id"], []).append(message.get(DELIVERY_KEY, 1))

    worker = ConsumerWorker(app, ["jobs"], layer, retry=RetryPolicy(dead_letter="log"))
    running = asyncio.create_task(worker.arun())
    seen = {e.decode().split(":")[0] for e in raw.lrange("seen", 0, -1)}
    await until(lambda: seen | set(handled) == {f"j{n}" for n in range(20)}, 30, "all handled")
    assert handled["j3"][0] == 2  # in the killed worker's handler: redelivered, counted
    # what the killed worker had fetched but not handled comes back too, counted once at most
    # (__delivery__ counts handler starts, not fetches)
    assert all(deliveries[0] <= 2 for deliveries in handled.values())
    await until(lambda: raw.xlen("asgi:stream:jobs") == 0, 10, "all acknowledged")
    await worker.drain()
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    raw.close()
    await layer.flush()


async def test_redis_killed_and_restarted_loses_nothing_sent(
    durable_redis_server: RedisServer,
) -> None:
    """appendfsync always: every send that returned is delivered, whatever was acked or not."""
    server = durable_redis_server
    layer = StreamsChannelLayer(hosts=[server.url], capacity=10_000, redelivery_timeout=1)
    sent: list[int] = []
    handled: set[int] = set()

    async def sender() -> None:
        for n in range(300):
            while True:
                try:
                    await layer.send("durable", {"type": "t.x", "n": n})
                except (redis.exceptions.RedisError, OSError):
                    await asyncio.sleep(0.05)  # the layer retries nothing itself
                    continue
                sent.append(n)
                break

    async def consumer() -> None:
        while len(handled) < 300:
            try:
                message, token = await layer.receive_with_ack("durable")
            except (redis.exceptions.RedisError, OSError):
                await asyncio.sleep(0.05)
                continue
            handled.add(message["n"])
            layer.ack(token).add_done_callback(lambda f: f.exception())

    consuming = asyncio.create_task(consumer())
    sending = asyncio.create_task(sender())
    await until(lambda: len(handled) >= 100, 30, "a third handled")
    server.kill()
    server.start()
    await asyncio.wait_for(sending, 60)
    await asyncio.wait_for(consuming, 60)
    assert handled == set(sent) == set(range(300))
    assert layer.health_problems() == []  # it persisted: restarted, nothing lost, no alarm
    await layer.flush()


async def test_consumers_of_gone_processes_are_forgotten(redis_server: RedisServer) -> None:
    gone = StreamsChannelLayer(hosts=[redis_server.url])
    await gone.send("shared", {"type": "t.x"})
    assert await gone.receive("shared") == {"type": "t.x"}
    await gone.close_pools()
    raw = redis.Redis.from_url(redis_server.url)
    names = [c["name"] for c in raw.xinfo_consumers("asgi:stream:shared", "channels")]
    assert names == [gone.consumer.encode()]
    # the gone consumer's idle time must pass the expiry: Redis counts it in whole ms from
    # its last read, which a fast machine makes 1 ms before the next layer's first fetch
    later = StreamsChannelLayer(hosts=[redis_server.url], consumer_expiry=0.05)
    await asyncio.sleep(0.1)
    await later.send("shared", {"type": "t.y"})
    assert await later.receive("shared") == {"type": "t.y"}  # its first fetch claims and tidies
    names = [c["name"] for c in raw.xinfo_consumers("asgi:stream:shared", "channels")]
    assert names == [later.consumer.encode()]
    raw.close()
    await later.flush()


async def test_sentinel_host(redis_server: RedisServer, tmp_path: Path) -> None:
    """A Sentinel-managed host (``master_name`` + ``sentinels``), as channels_redis takes it."""
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor main 127.0.0.1 {redis_server.port} 1\n"
    )
    binary = shutil.which("redis-sentinel") or shutil.which("redis-server")
    assert binary is not None
    sentinel = await asyncio.to_thread(
        Server, [binary, str(conf), "--sentinel"], "Sentinel ID", name="redis-sentinel"
    )
    try:
        host = {"sentinels": [("127.0.0.1", port)], "master_name": "main"}
        layer = StreamsChannelLayer(hosts=[host])
        await layer.send("watched", {"type": "t.x", "n": 1})
        assert await layer.receive("watched") == {"type": "t.x", "n": 1}
        await layer.flush()
    finally:
        await asyncio.to_thread(sentinel.stop)


async def test_worker_acknowledges_after_the_handler_returned(redis_server: RedisServer) -> None:
    layer = StreamsChannelLayer(hosts=[redis_server.url])
    raw = redis.Redis.from_url(redis_server.url)
    started, release = asyncio.Event(), asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while True:
            await receive()
            started.set()
            await release.wait()

    worker = ConsumerWorker(app, ["held"], layer, retry=RetryPolicy(dead_letter="log"))
    running = asyncio.create_task(worker.arun())
    await layer.send("held", {"type": "t.x", "id": "h1"})
    await asyncio.wait_for(started.wait(), 10)
    assert raw.xpending("asgi:stream:held", "channels")["pending"] == 1  # in the handler
    release.set()
    await until(lambda: raw.xlen("asgi:stream:held") == 0, what="acknowledged after the handler")
    assert raw.xpending("asgi:stream:held", "channels")["pending"] == 0
    await worker.drain()
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    raw.close()
    await layer.flush()


async def test_group_send_fans_out_per_process_and_reports_what_it_cannot_deliver(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """One entry per process for its process-local members, however many; a member whose
    channel is full is counted (``group_full``) and logged at WARNING, never silent."""
    sockets = StreamsChannelLayer(hosts=[redis_server.url], capacity=2)
    locals_ = [await sockets.new_channel() for _ in range(5)]
    for channel in [*locals_, "full-worker"]:
        await sockets.group_add("room", channel)
    await sockets.send("full-worker", {"type": "t.x"})
    await sockets.send("full-worker", {"type": "t.x"})
    before = dropped("group_full")
    await sockets.group_send("room", {"type": "t.room", "n": 1})
    raw = redis.Redis.from_url(redis_server.url)
    assert raw.xlen(sockets._stream_prefix + sockets.non_local_name(locals_[0])) == 1
    for channel in locals_:
        assert await asyncio.wait_for(sockets.receive(channel), 5) == {"type": "t.room", "n": 1}
    assert dropped("group_full") - before == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "group_send to 'room' reached 5 of 6" in w and "'full-worker'" in w for w in warnings
    )
    # the process stream full too (nobody reads it): every member there is counted
    await sockets.group_send("room", {"type": "t.room", "n": 2})
    await sockets.group_send("room", {"type": "t.room", "n": 3})
    await sockets.group_send("room", {"type": "t.room", "n": 4})
    assert dropped("group_full") - before == 1 + 1 + 1 + 6
    raw.close()
    await sockets.flush()


async def test_a_held_message_stays_claimed_and_a_closed_layer_hands_back_what_it_held(
    redis_server: RedisServer,
) -> None:
    """``hold``: kept claimed past ``redelivery_timeout``, no other consumer takes it; at
    ``close_pools`` it is handed back, claimable by the next fetch at once."""
    first = StreamsChannelLayer(hosts=[redis_server.url], redelivery_timeout=1)
    second = StreamsChannelLayer(hosts=[redis_server.url], redelivery_timeout=30)
    await first.send("held", {"type": "t.x", "id": "h1"})
    _, token = await first.receive_with_ack("held")
    first.hold(token)
    third = StreamsChannelLayer(hosts=[redis_server.url], redelivery_timeout=1)
    with pytest.raises(TimeoutError):  # three redelivery timeouts of the holder
        await asyncio.wait_for(third.receive("held"), 3)
    await third.close_pools()
    await first.close_pools()
    again, token = await asyncio.wait_for(second.receive_with_ack("held"), 5)
    assert again["id"] == "h1" and token.redelivered
    await second.ack(token)
    await second.flush()


async def test_health_problems_clear_after_their_period(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import core.streams

    monkeypatch.setattr(core.streams, "PROBLEM_PERIOD", 0.5)
    layer = StreamsChannelLayer(hosts=[redis_server.url])
    await layer.send("kept", {"type": "t.x"})
    raw = redis.Redis.from_url(redis_server.url)
    raw.flushall()
    raw.close()
    before = REGISTRY.get_sample_value("gateway_layer_vanished_total", {"what": "dataset"}) or 0
    await layer.send("kept", {"type": "t.x"})
    assert [p for p in layer.health_problems() if "lost its data" in p]
    assert REGISTRY.get_sample_value("gateway_layer_vanished_total", {"what": "dataset"}) == (
        before + 1
    )
    assert [r for r in caplog.records if r.levelno == logging.ERROR and "is gone" in r.message]
    await asyncio.sleep(0.6)
    assert layer.health_problems() == []
    await layer.send("kept", {"type": "t.x"})  # the new dataset is the known one now
    assert layer.health_problems() == []
    await layer.flush()


async def test_redis_at_maxmemory_pushes_back_like_a_full_channel(
    start_service: Any,
) -> None:
    """A gateway's inbound channel may hold 100,000 messages: should Redis reach maxmemory
    first (noeviction), a send is refused as ChannelFull (the gateway pushes back), not with an
    error that would drop the event as unsendable."""
    server = start_service(
        RedisServer(extra_args=["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"])
    )
    layer = StreamsChannelLayer(hosts=[server.url], capacity=1_000_000)
    blob = {"type": "t.x", "body": b"x" * 10_000}
    with pytest.raises(ChannelFull):
        for _ in range(2000):
            await layer.send("big", blob)
    assert await layer.send_many([("big", blob)] * 5) == 0
    await layer.flush()


async def test_a_full_local_buffer_drops_the_oldest_counted_and_logged_once(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A process-local channel nobody takes from (a socket gone, still in a room): what its
    buffer cannot hold is dropped oldest first, each counted, logged once per 10 s."""
    layer = StreamsChannelLayer(hosts=[redis_server.url], capacity=3)
    idle, busy = await layer.new_channel(), await layer.new_channel()
    before = dropped("local_overflow")
    waiting = asyncio.create_task(layer.receive(busy))  # keeps the process stream read
    for n in range(9):
        while True:
            try:
                await layer.send(idle, {"type": "t.x", "n": n})
                break
            except ChannelFull:  # fetched and deleted from Redis a moment later
                await asyncio.sleep(0.01)
    await layer.send(busy, {"type": "t.x", "n": -1})
    assert (await asyncio.wait_for(waiting, 5))["n"] == -1
    assert [(await layer.receive(idle))["n"] for _ in range(3)] == [6, 7, 8]
    assert dropped("local_overflow") - before == 6
    lines = [r.getMessage() for r in caplog.records if "local_overflow" in r.getMessage()]
    assert len(lines) == 1 and repr(idle) in lines[0]
    await layer.flush()


async def test_a_receive_right_after_a_cancelled_one_gets_the_message(
    redis_server: RedisServer,
) -> None:
    """Cancelling a receive cancels its fetch; a receive started before that fetch has ended
    (no await in between) must not wait on it for ever."""
    layer = StreamsChannelLayer(hosts=[redis_server.url])
    first = asyncio.create_task(layer.receive("again"))
    await asyncio.sleep(0.2)  # its fetch is blocked in XREADGROUP
    first.cancel()
    second = asyncio.create_task(layer.receive("again"))
    await layer.send("again", {"type": "t.x"})
    assert await asyncio.wait_for(second, 10) == {"type": "t.x"}
    assert first.cancelled()
    await layer.flush()


def blocked_reads(raw: redis.Redis) -> int:
    """Clients Redis holds blocked in ``XREADGROUP`` now (fetches waiting for entries)."""
    return sum(1 for c in raw.client_list() if c["cmd"] == "xreadgroup" and "b" in c["flags"])


async def test_an_entry_redis_hands_to_a_cancelled_read_is_not_left_pending(
    redis_server: RedisServer,
) -> None:
    """Redis serves a blocked XREADGROUP until it sees the connection close: an entry sent after
    a receive was cancelled and before its read's connection is gone goes to that read. It must
    reach the next receive at once, not wait pending for a claim ``redelivery_timeout`` later.
    (Another process sends it here while this loop is held, so the order is certain.)"""
    import threading

    layer = StreamsChannelLayer(hosts=[redis_server.url], redelivery_timeout=120)
    raw = redis.Redis.from_url(redis_server.url)

    def send_from_elsewhere() -> None:
        async def send() -> None:
            other = StreamsChannelLayer(hosts=[redis_server.url])
            await other.send("handed", {"type": "t.x", "n": 1})
            await other.close_pools()

        thread = threading.Thread(target=asyncio.run, args=(send(),))
        thread.start()
        thread.join()  # this event loop stands still meanwhile: the cancelled read is open

    first = asyncio.create_task(layer.receive("handed"))
    await until(lambda: blocked_reads(raw) == 1, 5, "the fetch blocked in XREADGROUP")
    first.cancel()
    await asyncio.sleep(0)  # the receive ends (its fetch is cancelled in the next turn)
    send_from_elsewhere()
    assert await asyncio.wait_for(layer.receive("handed"), 5) == {"type": "t.x", "n": 1}
    assert first.cancelled()

    def pending() -> int:
        return int(raw.xpending("asgi:stream:handed", "channels")["pending"])

    await until(lambda: pending() == 0, 5, "the acknowledgement")  # nothing left for a claim
    raw.close()
    await layer.flush()


async def test_a_fetch_cancelled_on_a_stalled_redis_still_ends(redis_server: RedisServer) -> None:
    """Unblocking a cancelled read asks Redis; a Redis that does not answer (stopped here) gets
    UNBLOCK_PATIENCE, then the read is abandoned: a process can still shut down."""
    import signal

    from core.streams import UNBLOCK_PATIENCE

    layer = StreamsChannelLayer(hosts=[redis_server.url])
    raw = redis.Redis.from_url(redis_server.url)
    first = asyncio.create_task(layer.receive("stalled"))
    await until(lambda: blocked_reads(raw) == 1, 5, "the fetch blocked in XREADGROUP")
    raw.close()
    (fetch,) = [r.task for r in layer._state().readers.values() if r.task is not None]
    assert fetch is not None
    os.kill(redis_server.pid, signal.SIGSTOP)
    try:
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)  # the receive ends at once
        await asyncio.wait_for(asyncio.gather(fetch, return_exceptions=True), 3 * UNBLOCK_PATIENCE)
        assert fetch.cancelled()
    finally:
        os.kill(redis_server.pid, signal.SIGCONT)
    await layer.flush()


async def test_a_receive_after_a_redis_restart_is_no_outage(redis_server: RedisServer) -> None:
    """A reader keeps its read connection between fetches; Redis restarting meanwhile (or
    closing it after its idle ``timeout``) must not make the next receive fail: as a
    connection taken from a pool is checked, the stale one is replaced first."""
    layer = StreamsChannelLayer(hosts=[redis_server.url])
    await layer.send("after-restart", {"type": "t.x", "n": 1})
    assert await asyncio.wait_for(layer.receive("after-restart"), 5) == {"type": "t.x", "n": 1}
    redis_server.kill()  # the reader holds its connection, idle
    redis_server.start()
    await layer.send("after-restart", {"type": "t.x", "n": 2})
    assert await asyncio.wait_for(layer.receive("after-restart"), 5) == {"type": "t.x", "n": 2}
    await layer.flush()


def test_a_layer_never_closed_is_collected_quietly(redis_server: RedisServer) -> None:
    """Channels never closes a layer: used in one event loop, then in another (as
    ``async_to_sync`` does), then collected, its read connections must not raise or warn
    from a destructor (pytest makes that a failure in the user's own tests)."""
    import gc

    layers = [StreamsChannelLayer(hosts=[redis_server.url])]

    async def use(n: int) -> None:
        await layers[0].send("never-closed", {"type": "t.x", "n": n})
        assert await layers[0].receive("never-closed") == {"type": "t.x", "n": n}

    unraisable: list[Any] = []
    hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        asyncio.run(use(1))
        asyncio.run(use(2))  # drops the first loop's state, its loop closed
        layers.clear()
        gc.collect()
    finally:
        sys.unraisablehook = hook
    ours = [u for u in unraisable if "_ReadClient" in repr(u.object)]
    assert ours == [], [f"{u.object!r}: {u.exc_value!r}" for u in ours]
