"""``durability`` of core.streams.StreamsChannelLayer across a failover, on a real master and
replica: with ``durability=replicated`` a send returns only once the replica has the message
(``WAIT 1``), so promoting the replica after the master died loses no acknowledged message;
with the default, what the replica had not received when the master died is lost."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest
import redis

from core.layers import resolve_layer
from core.retry import LAYER_ERRORS, send_command
from core.streams import NotReplicated, StreamsChannelLayer
from core.testing import ReplicatedRedis, until


def stream_entries(port: int, key: str) -> int:
    return int(redis.Redis(host="127.0.0.1", port=port).xlen(key))


async def failover(sentinel_redis: ReplicatedRedis) -> None:
    """Wait until Sentinel finished failing over to the replica (the master was killed).

    The tests then bring the old master back with ``rejoin``: as a replica of the new master,
    as docs/redis.md tells operators. Started again as it was (an empty master, no persistence)
    it was once promoted back by a second, spurious failover and the promoted replica, which had
    every acknowledged message, resynchronised from it: all of them were lost (issue 24)."""
    new_master = sentinel_redis.replica.port
    await until(
        lambda: asyncio.to_thread(sentinel_redis.failed_over_to, new_master),
        60,
        "Sentinel to fail over to the replica",
    )


def layer_on(replicated: ReplicatedRedis, query: str) -> StreamsChannelLayer:
    url = replicated.master.url.replace("redis://", "redis+streams://")
    layer = resolve_layer(f"{url}?capacity=1000000&{query}")
    assert isinstance(layer, StreamsChannelLayer)
    return layer


async def test_replicated_sends_survive_the_master_dying(replicated_redis: ReplicatedRedis) -> None:
    """300 sends; the replica is frozen (SIGSTOP) for a while in the middle, and the sends
    made meanwhile are refused (NotReplicated, an outage to the gateways: 451, no PUBACK …);
    then the master is SIGKILLed right after the last acknowledgement and the replica
    promoted: it has every acknowledged message."""
    layer = layer_on(replicated_redis, "durability=replicated&durability_timeout=0.3")
    acknowledged = refused = 0
    for n in range(300):
        if n == 100:
            replicated_redis.replica.send_signal(signal.SIGSTOP)
        try:
            await layer.send("orders", {"type": "t.x", "n": n})
            acknowledged += 1
        except NotReplicated as exc:
            assert isinstance(exc, LAYER_ERRORS)  # the gateways push back on it
            refused += 1
        if n == 105:
            replicated_redis.replica.send_signal(signal.SIGCONT)
    replicated_redis.master.kill()
    replicated_redis.promote()
    kept = stream_entries(replicated_redis.replica.port, layer._stream_key("orders"))
    # every acknowledged message is there; a refused one may be too (a retry then duplicates it)
    assert refused >= 5
    assert acknowledged == 300 - refused
    assert kept >= acknowledged
    print(f"replicated: {acknowledged} acknowledged, {refused} refused, {kept} on the replica")


async def test_default_durability_can_lose_acknowledged_sends(
    replicated_redis: ReplicatedRedis,
) -> None:
    """The same failover without the option: sends made while the replica could not keep up
    were acknowledged, and the promoted replica does not have them (docs/redis.md)."""
    layer = layer_on(replicated_redis, "")
    replicated_redis.replica.send_signal(signal.SIGSTOP)
    payload = b"x" * 8192
    acknowledged = 0
    for n in range(4000):  # 32 MB: more than the kernel buffers between the two hold
        await layer.send("orders", {"type": "t.x", "n": n, "pad": payload})
        acknowledged += 1
    replicated_redis.master.kill()
    replicated_redis.replica.send_signal(signal.SIGCONT)
    # it reads what reached it before the connection closed, then sees its master gone
    replica = redis.Redis(host="127.0.0.1", port=replicated_redis.replica.port)
    await until(lambda: replica.info("replication")["master_link_status"] == "down")
    replicated_redis.promote()
    kept = stream_entries(replicated_redis.replica.port, layer._stream_key("orders"))
    print(f"async: {acknowledged} acknowledged, {kept} on the promoted replica")
    assert kept < acknowledged


@pytest.mark.parametrize("durability", ["async", "replicated"])
async def test_sentinel_failover_mid_stream(
    sentinel_redis: ReplicatedRedis, durability: str
) -> None:
    """Sends (retried on outage errors, as the gateways do) and a receiver on a Sentinel
    host; the master is SIGKILLed halfway and Sentinel promotes the replica. With
    durability=replicated no acknowledged message is lost (sends wait, refused, until the old
    master is back as the new one's replica); with the default the loss is counted."""
    layer = StreamsChannelLayer(
        hosts=[sentinel_redis.sentinel_host],
        capacity=1_000_000,
        durability=durability,
        durability_timeout=0.5,
    )
    acknowledged: list[int] = []
    received: list[int] = []
    outages: list[BaseException] = []
    total = 300

    async def sender() -> None:
        for n in range(total):
            try:
                await layer.send("mail", {"type": "t.x", "n": n})
            except LAYER_ERRORS as exc:
                outages.append(exc)
                await send_command(layer, "mail", {"type": "t.x", "n": n}, timeout=60)
            acknowledged.append(n)
            await asyncio.sleep(0.005)

    async def receiver() -> None:
        while True:
            try:
                received.append((await layer.receive("mail"))["n"])
            except LAYER_ERRORS as exc:
                outages.append(exc)
                await asyncio.sleep(0.1)

    sending = asyncio.create_task(sender())
    receiving = asyncio.create_task(receiver())
    await until(lambda: len(acknowledged) >= total // 2, 30, "half the messages sent")
    sentinel_redis.master.kill()
    await failover(sentinel_redis)
    if durability == "replicated":
        # the promoted replica has no replica of its own until the old master is back as one
        await asyncio.to_thread(sentinel_redis.rejoin, sentinel_redis.master)
    await asyncio.wait_for(sending, 90)
    try:
        await until(lambda: set(received) >= set(acknowledged), 30, "every acknowledged message")
    except TimeoutError:
        if durability == "replicated":
            raise
    receiving.cancel()
    await asyncio.gather(receiving, return_exceptions=True)
    lost = sorted(set(acknowledged) - set(received))
    print(
        f"sentinel, durability={durability}: {len(acknowledged)} acknowledged, {len(lost)} "
        f"lost, {len(received) - len(set(received))} duplicates, {len(outages)} outage errors"
    )
    if durability == "replicated":
        assert lost == []
    else:  # what the replica had not received when the master died, if anything
        assert len(lost) < total // 2
    assert outages, "the failover was not noticed"
    assert all(isinstance(e, LAYER_ERRORS) for e in outages)
    await layer.flush()


async def test_an_unreplicated_mail_is_451_then_250(replicated_redis: ReplicatedRedis) -> None:
    """The email gateway on a durability=replicated layer whose replica is frozen: the mail is
    not accepted (451, the sender retries), and 250 once the replica confirms again."""
    import aiosmtplib

    from tests.gateways.email.test_gateway import NAME, aiosmtplib_send, config, mail, running

    layer = layer_on(replicated_redis, "durability=replicated&durability_timeout=0.2")
    async with running(config(accept_timeout=1), layer) as gateway:
        replicated_redis.replica.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(aiosmtplib.SMTPDataError) as refused:
                await aiosmtplib_send(gateway.server.port, mail(Message_ID="<r@example.org>"))
            assert refused.value.code == 451
            with pytest.raises(NotReplicated):  # group_send waits for the replica too
                await layer.group_send("room", {"type": "t.x"})
        finally:
            replicated_redis.replica.send_signal(signal.SIGCONT)
        response = await aiosmtplib_send(gateway.server.port, mail(Message_ID="<r@example.org>"))
        assert response.code == 250
        # at least once: the refused attempt may be in Redis too (de-duplicate on id)
        ids = {(await layer.receive(NAME))["id"]}
        assert ids == {"<r@example.org>"}
    await layer.close_pools()


async def test_mails_answered_250_survive_a_sentinel_failover(
    sentinel_redis: ReplicatedRedis,
) -> None:
    """The email gateway on a Sentinel layer with durability=replicated; 500 mails (issue 24's
    count), each sent again while the gateway answers 451; the master SIGKILLed halfway,
    Sentinel promotes the replica, the old master comes back as its replica. Every mail
    answered 250 is on the inbound channel."""
    import aiosmtplib

    from tests.gateways.email.test_gateway import NAME, aiosmtplib_send, config, mail, running

    layer = StreamsChannelLayer(
        hosts=[sentinel_redis.sentinel_host],
        capacity=1_000_000,
        durability="replicated",
        durability_timeout=0.5,
    )
    layer.set_channel_capacity(NAME, 1_000_000)
    accepted: list[str] = []
    refusals = 0
    total = 500
    async with running(config(accept_timeout=1), layer) as gateway:

        async def client() -> None:
            nonlocal refusals
            for n in range(total):
                message_id = f"<m{n}@example.org>"
                while True:
                    try:
                        await aiosmtplib_send(gateway.server.port, mail(Message_ID=message_id))
                        break
                    except aiosmtplib.SMTPDataError as exc:
                        assert exc.code == 451, exc  # never a 5xx: the sender retries
                        refusals += 1
                        await asyncio.sleep(0.1)
                accepted.append(message_id)

        sending = asyncio.create_task(client())
        await until(lambda: len(accepted) >= total // 2, 60, "half the mails accepted")
        sentinel_redis.master.kill()
        await failover(sentinel_redis)
        await asyncio.to_thread(sentinel_redis.rejoin, sentinel_redis.master)
        await asyncio.wait_for(sending, 120)
        received: set[str] = set()

        async def drain() -> bool:
            while len(received) < len(accepted):
                received.add((await asyncio.wait_for(layer.receive(NAME), 10))["id"])
            return True

        await asyncio.wait_for(drain(), 60)
    print(f"mails: {len(accepted)} answered 250, {refusals} answered 451 first, 0 lost")
    assert set(accepted) == received
    assert refusals > 0, "the failover was never hit: the test proved nothing"
    await layer.flush()


async def test_mqtt_qos1_through_a_sentinel_failover(
    sentinel_redis: ReplicatedRedis, start_service: Any
) -> None:
    """The MQTT gateway (in process) on a Sentinel layer with durability=replicated: 5,000
    QoS 1 messages (issue 24's count), the master SIGKILLed once 500 arrived (the channel holds
    200, so most are still at the broker, unacknowledged). A message is PUBACKed only after a
    replica has it, so every one of them reaches the channel after the failover."""
    from core.testing import MosquittoServer
    from tests.gateways.mqtt.conftest import MqttTestClient, gateway_config, running
    from tests.gateways.mqtt.test_faults import Seen

    count = 5000
    broker = start_service(MosquittoServer(extra_config=["max_queued_messages 0"]))

    def layer() -> StreamsChannelLayer:
        return StreamsChannelLayer(
            hosts=[sentinel_redis.sentinel_host],
            capacity=200,
            durability="replicated",
            durability_timeout=0.5,
        )

    config = {
        **gateway_config(broker, name="seq", subscriptions=[{"topic": "seq/#", "qos": 1}]),
        "inbound_capacity": None,  # the layer's capacity, 200
    }
    reader = layer()
    seen = Seen()
    async with running(config, layer()):
        publisher = MqttTestClient(broker.port)
        try:
            payloads = [b"%d" % n for n in range(count)]
            publishing = asyncio.create_task(
                asyncio.to_thread(publisher.publish_many, "seq/n", payloads)
            )
            await seen.read(reader, "seq", 500)
            sentinel_redis.master.kill()
            at_kill = len(seen.ids)
            await failover(sentinel_redis)
            await asyncio.to_thread(sentinel_redis.rejoin, sentinel_redis.master)
            await publishing
            for _ in range(5):
                try:
                    await seen.read(reader, "seq", count)
                    break
                except LAYER_ERRORS:  # the failover, seen by the reader
                    await asyncio.sleep(0.2)
        finally:
            publisher.close()
        print(
            f"mqtt: {count} QoS 1 messages, {at_kill} had arrived at the kill, "
            f"{len(seen.ids)} arrived, {seen.duplicates} duplicates"
        )
    assert at_kill <= 700  # the failover came mid-stream
    assert sorted(seen.ids) == list(range(count))  # zero lost
    await reader.flush()
