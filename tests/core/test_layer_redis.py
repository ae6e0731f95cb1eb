"""core.redis on the layer's topology: a Redis Cluster (hash-tagged keys, the scheduler's store
on it), Sentinel (the master the Sentinel names, also after a failover) and the layer's
``durability="replicated"`` (a write that precedes an acknowledgement waits for a replica, and
one no replica confirmed is not accepted by its caller), all on real local servers."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterator

import pytest
import redis
from redis.crc import key_slot

from core.layers import resolve_layer
from core.lease import RedisLease
from core.metrics import GatewayMetrics
from core.redis import LayerRedis, NotReplicated, layer_redis
from core.streams import StreamsChannelLayer
from core.testing import RedisClusterServers, ReplicatedRedis, command, metric, receive, until
from gateways.mqtt.store import RedisSubscriptionStore, StoreError, open_store
from gateways.mqtt.translate import Route
from gateways.scheduler.connection import Commit, RedisStore, StoreNotReplicated
from gateways.slack.dedup import Claim, RedisDedupWindow
from gateways.slack.installations import RedisInstallationStore
from gateways.slack.translate import Installation
from tests.conftest import _run
from tests.gateways.scheduler.conftest import running, scheduler_config

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    yield from _run(RedisClusterServers())


def replicated_layer(replicated: ReplicatedRedis) -> StreamsChannelLayer:
    url = replicated.master.url.replace("redis://", "redis+streams://")
    layer = resolve_layer(f"{url}?durability=replicated&durability_timeout=1")
    assert isinstance(layer, StreamsChannelLayer)
    return layer


# -- Redis Cluster -----------------------------------------------------------------------------


async def test_a_cluster_layer_keeps_each_integrations_keys_in_one_slot(
    cluster: RedisClusterServers,
) -> None:
    layer = resolve_layer(cluster.url)
    store = layer_redis(layer, "mqtt", "sensors")
    assert isinstance(store, LayerRedis) and store.cluster
    lease_redis = layer_redis(layer, "irc", "bot")
    assert lease_redis is not None
    try:
        key = store.key("subscriptions")
        assert key == "asgi:gateways:{mqtt:sensors}:subscriptions"
        assert key_slot(key.encode()) == key_slot(store.key("anything:else").encode())
        assert store.description.startswith("Cluster 127.0.0.1:")
        subscriptions = open_store(layer, "sensors")
        assert isinstance(subscriptions, RedisSubscriptionStore)
        route = Route("site/+/temp", "temps", qos=1)
        await subscriptions.save(route)
        assert await subscriptions.load() == [route]
        await subscriptions.close()
        # the stored hash is on the master of its slot (read there without the cluster client)
        master = cluster.master_of(key)
        assert redis.Redis(host="127.0.0.1", port=master.port).hlen(key) == 1
        # Slack's installations: a MULTI/EXEC of two keys and an MGET, one slot
        slack = layer_redis(layer, "slack", "acme")
        assert slack is not None
        installations = RedisInstallationStore(slack)
        installed = Installation("T1", None, False, "xoxb-1", bot_token_expires_at=2e9)
        await installations.save(installed)
        assert await installations.find(None, "T1") == installed
        await installations.close()
        # a lease: a script over two keys (lease, fence), one slot
        lease = RedisLease(lease_redis, "me", ttl=5)
        assert await lease.acquire() == 1
        assert await lease.holder() == "me"
        await lease.release()
    finally:
        await store.close()
        await lease_redis.close()
        flush = resolve_layer(cluster.url)
        assert isinstance(flush, StreamsChannelLayer)
        await flush.flush()


async def test_the_scheduler_keeps_its_state_on_a_cluster(cluster: RedisClusterServers) -> None:
    """Its Redis store (not the one-process SQLite file): a one-shot added, fired once, and
    remembered as done, every key of it in the slot of ``{scheduler:NAME}``."""
    name = "on-cluster"
    async with running(scheduler_config(name, {}), cluster.url) as (gw, layer):
        assert isinstance(gw.store, RedisStore) and gw.store.shared
        await until(lambda: gw.leader, what="leader")
        add = {"type": "scheduler.add", "schedule": "once", "in": 0.3, "message": {"n": 1}}
        created = await command(layer, f"{name}.send", add)
        assert created["ok"] and created["created"] is True
        fire = await receive(layer, name)
        assert (fire["type"], fire["schedule"], fire["n"]) == ("scheduler.fire", "once", 1)
        again = await command(layer, f"{name}.send", add)
        assert again["ok"] and again["done"] is True
        later = {"type": "scheduler.add", "schedule": "later", "in": 3600, "message": {}}
        assert (await command(layer, f"{name}.send", later))["ok"]
        listed = await command(layer, f"{name}.send", {"type": "scheduler.list"})
        rows = listed["schedules"]
        assert isinstance(rows, list) and [r["schedule"] for r in rows] == ["later"]  # a pipeline
        done_key = f"asgi:gateways:{{scheduler:{name}}}:done:once"
        client = redis.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
        assert client.exists(done_key) == 1
        client.close()
        await layer.flush()
    assert metric("scheduler_fires_total", gateway=name) == 1


async def test_replicated_writes_on_a_cluster_wait_on_the_keys_master(
    cluster: RedisClusterServers,
) -> None:
    """``WAIT`` on the master of the integration's slot, in the pipeline of the write: accepted
    while its replica follows, refused while that replica is stopped (a plain write and the
    scheduler's commit script alike)."""
    layer = resolve_layer(cluster.url + "?durability=replicated&durability_timeout=1")
    store = layer_redis(layer, "scheduler", "durable")
    assert store is not None and store.cluster and store.replicated
    scheduler = RedisStore(store)
    try:
        assert await store.write("set", store.key("x"), "1") is True
        token = await scheduler.acquire("me", 30)
        assert token is not None
        commit = Commit("s", 100.0, fire=True)
        assert (await scheduler.advance("me", token, commit, done_ttl=60)).code == 1
        (replica,) = cluster.replicas_of(cluster.master_of(store.key("x")))
        replica.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(NotReplicated, match="no replica confirmed it"):
                await store.write("set", store.key("x"), "2")
            with pytest.raises(StoreNotReplicated):
                await scheduler.advance("me", token, Commit("s", 101.0, fire=True), done_ttl=60)
        finally:
            replica.send_signal(signal.SIGCONT)
        await asyncio.to_thread(cluster.wait_ok)
    finally:
        await scheduler.close()
        assert isinstance(layer, StreamsChannelLayer)
        await layer.flush()


# -- Sentinel ---------------------------------------------------------------------------------


async def test_a_sentinel_layer_writes_to_the_master_the_sentinel_names(
    sentinel_redis: ReplicatedRedis,
) -> None:
    layer = StreamsChannelLayer(hosts=[sentinel_redis.sentinel_host])
    store = layer_redis(layer, "mqtt", "sensors")
    assert store is not None
    try:
        assert store.description.startswith("Sentinel master 'main' via 127.0.0.1:")
        key = store.key("subscriptions")
        await store.write("hset", key, "a", "1")
        master = redis.Redis(host="127.0.0.1", port=sentinel_redis.master.port)
        assert master.hget(key, "a") == b"1"
        # the master dies: the Sentinel promotes the replica, and the keys follow it
        sentinel_redis.master.kill()
        new_master = sentinel_redis.replica.port
        await until(
            lambda: asyncio.to_thread(lambda: sentinel_redis.sentinel_master_port() == new_master),
            what="the Sentinel to promote the replica",
        )
        await until(lambda: _written(store, key), what="a write on the promoted replica")
        promoted = redis.Redis(host="127.0.0.1", port=new_master)
        assert promoted.hget(key, "b") == b"2"
    finally:
        await store.close()
        await layer.close_pools()


async def _written(store: LayerRedis, key: str) -> bool:
    try:
        await store.write("hset", key, "b", "2")
    except Exception:  # the old master's connection breaks first; a new one asks the Sentinel
        return False
    return True


# -- durability="replicated" ------------------------------------------------------------------


async def test_replicated_writes_wait_for_the_replica(replicated_redis: ReplicatedRedis) -> None:
    """A write a replica confirmed is accepted; with the replica stopped the same write (and
    each store's write that precedes an acknowledgement) is refused as not replicated."""
    layer = replicated_layer(replicated_redis)
    store = layer_redis(layer, "mqtt", "sensors")
    slack = layer_redis(layer, "slack", "team")
    assert store is not None and store.replicated and slack is not None
    subscriptions = RedisSubscriptionStore(store)
    window = RedisDedupWindow(slack, 60, 5, GatewayMetrics("team"), logging.getLogger("t"))
    route = Route("site/+/temp", "temps", qos=1)
    try:
        assert await store.write("set", store.key("x"), "1") is True
        await subscriptions.save(route)
        replica = redis.Redis(host="127.0.0.1", port=replicated_redis.replica.port)
        assert replica.hlen(subscriptions.key) == 1  # WAIT returned: the replica has it
        replicated_redis.replica.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(NotReplicated, match="no replica confirmed it"):
                await store.write("set", store.key("x"), "2")
            # mqtt.subscribe answers an error on it (before the table or the broker change)
            with pytest.raises(StoreError, match="not replicated"):
                await subscriptions.save(Route("site/+/hum", "hums", qos=1))
            # Slack: the event is in the layer; the mark no replica took is kept in memory
            assert await window.claim("Ev1") is Claim.NEW
            errors = metric("gateway_errors_total", gateway="team", kind="dedup_unavailable")
            await window.done("Ev1")
            assert window.unwritten.is_done("Ev1")
            assert metric("gateway_errors_total", gateway="team", kind="dedup_unavailable") > errors
            # reads do not wait
            assert await store.call("get", store.key("x")) == b"2"
        finally:
            replicated_redis.replica.send_signal(signal.SIGCONT)
    finally:
        await store.close()
        await slack.close()
        await layer.close_pools()


async def test_a_scheduler_commit_no_replica_confirmed_is_not_accepted(
    replicated_redis: ReplicatedRedis,
) -> None:
    """The scheduler's Redis store: a fenced commit a replica confirmed is accepted; with the
    replica stopped the next one raises StoreNotReplicated (the gateway does not send it)."""
    layer = replicated_layer(replicated_redis)
    redis_store = layer_redis(layer, "scheduler", "direct")
    assert redis_store is not None
    store = RedisStore(redis_store)
    try:
        token = await store.acquire("me", 30)
        assert token is not None
        commit = Commit("s", 100.0, fire=True)
        assert (await store.advance("me", token, commit, done_ttl=60)).code == 1
        replicated_redis.replica.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(StoreNotReplicated):
                await store.advance("me", token, Commit("s", 101.0, fire=True), done_ttl=60)
        finally:
            replicated_redis.replica.send_signal(signal.SIGCONT)
    finally:
        await store.close()
        await layer.close_pools()


async def test_the_scheduler_does_not_fire_an_unreplicated_commit(
    replicated_redis: ReplicatedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """The leader's commit of a due time no replica confirmed: not fired (the commit answers
    "nothing to do"), counted missed with a warning; the same commit once the replica is back
    finds it made (the master has it), so it is not fired twice either."""
    name = "replicated"
    url = replicated_redis.master.url.replace("redis://", "redis+streams://")
    url += "?durability=replicated&durability_timeout=1"
    config = scheduler_config(name, {"hourly": {"every": "1h"}})
    async with running(config, url) as (gw, _):
        token = await until(lambda: gw.token, what="leader")
        assert isinstance(token, int)
        spec = gw.entries["hourly"].spec
        due = gw.clock.wall()
        commit = Commit("hourly", due, fire=True)
        replicated_redis.replica.send_signal(signal.SIGSTOP)
        try:
            with caplog.at_level(logging.WARNING, logger="gateway.scheduler"):
                result = await gw._commit(spec, commit, token, due + 5)
        finally:
            replicated_redis.replica.send_signal(signal.SIGCONT)
        assert result.code == 0
        assert metric("scheduler_misses_total", gateway=name, reason="store") == 1
        assert "not fired" in caplog.text and "the write is not replicated" in caplog.text
        assert (await gw._commit(spec, commit, token, due + 5)).code == 0
