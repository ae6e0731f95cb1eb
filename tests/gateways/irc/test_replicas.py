"""IRC active/standby with real processes: two ``gateway-irc`` replicas with the same YAML on one
Redis and a real ngircd. One nick on IRC at a time; the active one killed with SIGKILL → the
standby connects, rejoins, carries out the command sent during the gap exactly once, and every
line said on IRC is published once (gateways/irc/README.md, "Replicas")."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from core.layers import resolve_layer
from core.testing import WAIT, GatewayProcess, NgircdServer, RedisServer, command, until
from gateways.irc.gateway import LOST_LEASE, carried_over
from tests.gateways.irc.conftest import Peer, irc_config

pytestmark = [pytest.mark.timeout(180), pytest.mark.replicas]

#: short, so the test waits little for a killed replica's lease to expire
LEASE_TTL = 2.0


class Inbound:
    """Every message on the integration's inbound channel, read by a task of its own."""

    def __init__(self, layer: Any, channel: str) -> None:
        self.layer, self.channel = layer, channel
        self.messages: list[dict[str, Any]] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.messages.append(await self.layer.receive(self.channel))

    def texts(self, text: str) -> int:
        return sum(1 for m in self.messages if m["type"] == "irc.receive" and m.get("text") == text)


def state(redis: RedisServer) -> str:
    """The run-time state the active replica keeps for the next one (README, Replicas)."""
    client = Redis.from_url(redis.url)
    try:
        return (client.get("asgi:gateways:irc:ops:state") or b"").decode()
    finally:
        client.close()


def role(process: GatewayProcess) -> str:
    status, body = process.get("/readyz")
    assert status == 200, body  # a standby is ready too: it is doing its job
    return "active" if "role: active" in body else "standby" if "role: standby" in body else body


async def wait_role(process: GatewayProcess, wanted: str) -> None:
    async def is_it() -> bool:
        try:
            return await asyncio.to_thread(role, process) == wanted
        except (OSError, AssertionError):
            return False

    await until(is_it, WAIT, f"{process.path.name}: {wanted}", interval=0.05)


async def names(peer: Peer, channel: str) -> list[str]:
    await peer.send(f"NAMES {channel}")
    line = await peer.expect(" 353 ")
    return [n.lstrip("@+") for n in line.rsplit(":", 1)[1].split()]


@pytest.fixture
async def replicas(
    ngircd_server: NgircdServer, redis_server: RedisServer, tmp_path: Path
) -> AsyncIterator[tuple[GatewayProcess, GatewayProcess]]:
    config = {
        **irc_config(ngircd_server.port, channels=["#ops"], lease_ttl=LEASE_TTL),
        "layer": redis_server.url,
    }
    # the same YAML for both; only the health port differs (one file each)
    first = GatewayProcess.from_config(tmp_path, config)
    second = GatewayProcess.from_config(tmp_path, config)
    try:
        yield first, second
    finally:
        for process in (first, second):
            process.stop()


async def test_one_nick_at_a_time_and_the_standby_takes_over_after_kill_9(
    ngircd_server: NgircdServer,
    redis_server: RedisServer,
    replicas: tuple[GatewayProcess, GatewayProcess],
) -> None:
    first, second = replicas
    layer = resolve_layer(redis_server.url)
    inbound = Inbound(layer, "ops")
    peer = await Peer.connect(ngircd_server.port, "alice", "#ops", "#late")
    try:
        await asyncio.to_thread(first.start)
        await peer.expect(":bot!")  # its JOIN
        await wait_role(first, "active")
        # joined at run time: carried over to the next active replica (the lease renewal
        # writes it to Redis)
        joined = await command(layer, "ops.send", {"type": "irc.join", "channel": "#late"})
        assert joined["ok"], joined
        await until(lambda: "#late" in state(redis_server), WAIT, "state written")
        # the second replica is ready as a standby and never shows up on IRC
        await asyncio.to_thread(second.start)
        await wait_role(second, "standby")
        assert second.get("/healthz")[0] == 200
        assert "holds the IRC lease" in second.get("/readyz")[1]
        assert [n for n in await names(peer, "#ops") if n.startswith("bot")] == ["bot"]

        # a line said on IRC is published once (only the active replica hears it)
        await peer.send("PRIVMSG #ops :before")
        await until(lambda: inbound.texts("before") >= 1, WAIT, "'before' published")

        # kill -9 the active one; a command sent in the gap waits for the standby
        killed_at = time.monotonic()
        first.server.send_signal(signal.SIGKILL)
        await asyncio.to_thread(first.server.wait)
        await layer.send(
            "ops.send", {"type": "irc.send", "target": "#ops", "text": "during the gap"}
        )
        await peer.expect(":bot!")  # the old connection's QUIT, then the new one's JOINs
        rejoined = {(await peer.expect(" JOIN ")).rsplit(" ", 1)[1].lstrip(":") for _ in "12"}
        assert rejoined == {"#ops", "#late"}
        await wait_role(second, "active")
        takeover = time.monotonic() - killed_at
        said = await peer.expect("PRIVMSG #ops :during the gap")
        assert said.startswith(":bot!")

        # exactly once: a later command arrives, the gap's command did not come again
        await layer.send("ops.send", {"type": "irc.send", "target": "#ops", "text": "marker"})
        await peer.expect("PRIVMSG #ops :marker")
        assert sum("during the gap" in line for line in peer.lines) == 1
        assert [n for n in await names(peer, "#ops") if n.startswith("bot")] == ["bot"]

        # lines said now are published once, by the new active replica
        await peer.send("PRIVMSG #ops :after", "PRIVMSG #ops :last")
        await until(lambda: inbound.texts("last") >= 1, WAIT, "'last' published")
        assert (inbound.texts("before"), inbound.texts("after"), inbound.texts("last")) == (1, 1, 1)
        print(f"takeover after kill -9: {takeover:.2f} s (lease_ttl {LEASE_TTL:g} s)")
        assert "takeovers" in second.get("/metrics")[1]
    finally:
        inbound.task.cancel()
        await peer.close()


async def test_a_clean_stop_hands_over_at_once(
    ngircd_server: NgircdServer,
    redis_server: RedisServer,
    replicas: tuple[GatewayProcess, GatewayProcess],
) -> None:
    first, second = replicas
    peer = await Peer.connect(ngircd_server.port, "alice", "#ops")
    try:
        await asyncio.to_thread(first.start)
        await wait_role(first, "active")
        await asyncio.to_thread(second.start)
        await wait_role(second, "standby")
        assert await asyncio.to_thread(first.stop) == 0  # QUIT, then the lease released
        assert "released the IRC lease" in first.tail()
        await wait_role(second, "active")
        await peer.expect(" JOIN ")
        assert [n for n in await names(peer, "#ops") if n.startswith("bot")] == ["bot"]
    finally:
        await peer.close()


async def test_a_paused_active_replica_steps_down_and_exits_when_it_wakes(
    ngircd_server: NgircdServer,
    redis_server: RedisServer,
    replicas: tuple[GatewayProcess, GatewayProcess],
) -> None:
    first, second = replicas
    layer = resolve_layer(redis_server.url)
    peer = await Peer.connect(ngircd_server.port, "alice", "#ops")
    try:
        await asyncio.to_thread(first.start)
        await wait_role(first, "active")
        await asyncio.to_thread(second.start)
        await wait_role(second, "standby")
        # paused past its lease (a VM pause): the standby takes over; the old connection still
        # holds the nick on the server, so the new one registers under an alternate
        first.server.send_signal(signal.SIGSTOP)
        await wait_role(second, "active")
        # the paused process's blocked fetch may still take this one: it is delivered once
        # either way (handed back to the command channel by the old replica when it wakes and
        # finds the lease gone, or given back to the layer's group when it exits)
        await layer.send("ops.send", {"type": "irc.send", "target": "#ops", "text": "paused"})
        first.server.send_signal(signal.SIGCONT)
        code = await asyncio.to_thread(first.server.wait)
        assert code == 1, first.tail()
        assert LOST_LEASE in first.tail()
        try:
            await peer.expect("PRIVMSG #ops :paused", timeout=60)  # a claim may take a while
        except TimeoutError:
            raise AssertionError(f"first:\n{first.tail()}\nsecond:\n{second.tail()}") from None
        await layer.send("ops.send", {"type": "irc.send", "target": "#ops", "text": "marker"})
        await peer.expect("PRIVMSG #ops :marker")
        assert sum(line.endswith("PRIVMSG #ops :paused") for line in peer.lines) == 1

        async def one_bot_named_bot() -> bool:
            return [n for n in await names(peer, "#ops") if n.startswith("bot")] == ["bot"]

        await until(one_bot_named_bot, WAIT, "the nick reclaimed by the new active replica")
    finally:
        first.server.send_signal(signal.SIGCONT)
        await peer.close()


@pytest.mark.parametrize(
    ("state", "channels", "nick"),
    [
        # nothing stored, or not what the gateway writes: the YAML's
        (None, [("#a", "k"), ("#b", None)], None),
        ({"channels": 3}, [("#a", "k"), ("#b", None)], None),
        # #b parted and #x joined at run time, the nick changed: all kept
        (
            {
                "channels": [["#a", None], ["#x", "xk"]],
                "yaml": ["#a", "#b"],
                "nick": "n2",
                "yaml_nick": "bot",
            },
            [("#a", "k"), ("#x", "xk")],
            "n2",
        ),
        # the YAML changed since: #b is new there (joined), #c left it (not joined any more),
        # and a new YAML nick wins over the run-time one
        (
            {
                "channels": [["#a", None], ["#C", None]],
                "yaml": ["#a", "#c"],
                "nick": "n2",
                "yaml_nick": "old",
            },
            [("#a", "k"), ("#b", None)],
            None,
        ),
    ],
)
def test_what_a_new_active_replica_takes_over(
    state: Any, channels: list[tuple[str, str | None]], nick: str | None
) -> None:
    assert carried_over(state, [("#a", "k"), ("#b", None)], "bot", 200) == (channels, nick)


def test_run_time_channels_are_capped_at_max_channels() -> None:
    state = {"channels": [[f"#r{n}", None] for n in range(5)], "yaml": [], "nick": None}
    channels, _ = carried_over(state, [("#a", None)], "bot", 3)
    assert channels == [("#a", None), ("#r0", None), ("#r1", None)]
