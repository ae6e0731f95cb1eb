"""The IRC gateway against a real ngircd, with a second real IRC connection as the other side."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import pytest
from channels.layers import InMemoryChannelLayer

from core.retry import StartupError
from core.testing import WAIT, GatewayProcess, NgircdServer, RedisServer, command, metric
from gateways.irc.config import IrcGatewayConfig
from gateways.irc.gateway import IrcGateway
from tests.gateways.irc.conftest import Peer, irc_config, next_event, running

pytestmark = pytest.mark.timeout(120)


async def test_events_in_and_commands_out(ngircd_server: NgircdServer) -> None:
    port = ngircd_server.port
    async with running(irc_config(port, channels=["#ops"])) as (gateway, layer):
        connect = await next_event(layer, "irc.connect")
        assert connect["nick"] == "bot" and connect["server"] == f"127.0.0.1:{port}"
        assert connect["reply_channel"] == gateway.reply_channel  # like every event (item 9)
        joined = await next_event(layer, "irc.joined", self=True)
        assert joined["channel"] == "#ops" and joined["reply_channel"] == gateway.reply_channel
        alice = await Peer.connect(port, "alice", "#ops")
        try:
            assert (await next_event(layer, "irc.joined"))["nick"] == "alice"
            await alice.send(
                "PRIVMSG #ops :hello \x02world\x02",
                "PRIVMSG #ops :\x01ACTION waves\x01",
                "NOTICE #ops :note",
                "PRIVMSG bot :psst",
                "TOPIC #ops :new \x0304topic",
            )
            msg = await next_event(layer, "irc.receive")
            assert (msg["kind"], msg["text"], msg["plain"]) == (
                "message",
                "hello \x02world\x02",
                "hello world",
            )
            assert (msg["nick"], msg["target"], msg["private"]) == ("alice", "#ops", False)
            assert msg["user"] == "~alice" and msg["host"] == "127.0.0.1"
            action = await next_event(layer, "irc.receive")
            assert (action["kind"], action["text"]) == ("action", "waves")
            notice = await next_event(layer, "irc.receive")
            assert (notice["kind"], notice["text"]) == ("notice", "note")
            private = await next_event(layer, "irc.receive")
            assert (private["target"], private["private"]) == ("bot", True)
            topic = await next_event(layer, "irc.topic")
            assert (topic["channel"], topic["topic"], topic["plain"]) == (
                "#ops",
                "new \x0304topic",
                "new topic",
            )

            # commands out, each seen by alice
            for kind, line in (
                ("message", "PRIVMSG #ops :hi"),
                ("notice", "NOTICE #ops :hi"),
                ("action", "PRIVMSG #ops :\x01ACTION hi\x01"),
            ):
                result = await command(
                    layer,
                    "ops.send",
                    {"type": "irc.send", "target": "#ops", "text": "hi", "kind": kind},
                )
                assert result["ok"], result
                assert (await alice.expect(":bot!")).endswith(line)
            result = await command(
                layer, gateway.reply_channel, {"type": "irc.send", "target": "alice", "text": "dm"}
            )
            assert result["ok"] and (await alice.expect("PRIVMSG alice")).endswith(":dm")
            assert (
                await command(
                    layer, "ops.send", {"type": "irc.topic", "channel": "#ops", "topic": "set"}
                )
            )["ok"]
            assert (await alice.expect(":bot!")).endswith("TOPIC #ops :set")
            assert (await command(layer, "ops.send", {"type": "irc.join", "channel": "#runtime"}))[
                "ok"
            ]
            assert (await next_event(layer, "irc.joined", self=True))["channel"] == "#runtime"
            assert (
                await command(
                    layer, "ops.send", {"type": "irc.part", "channel": "#runtime", "reason": "bye"}
                )
            )["ok"]
            parted = await next_event(layer, "irc.parted", self=True)
            assert (parted["channel"], parted["reason"]) == ("#runtime", "bye")
            assert "#runtime" not in gateway.channels

            # invite in: alice creates #private (she is its operator) and invites the bot
            await alice.send("JOIN #private")
            await alice.expect(" 366 ")
            await alice.send("INVITE bot #private")
            invite = await next_event(layer, "irc.invite")
            assert (invite["nick"], invite["channel"], invite["self"]) == (
                "alice",
                "#private",
                True,
            )

            await alice.send("QUIT :done")
            quit_ = await next_event(layer, "irc.quit", nick="alice")
            assert quit_["reason"] and quit_["self"] is False
        finally:
            await alice.close()


async def test_kick_rejoin_and_nick(ngircd_server: NgircdServer) -> None:
    port = ngircd_server.port
    alice = await Peer.connect(port, "alice", "#ops")  # first in: channel operator
    try:
        config = irc_config(port, channels=["#ops"], rejoin_delay=0.1)
        async with running(config) as (gateway, layer):
            await next_event(layer, "irc.joined", self=True)
            await alice.send("KICK #ops bot :out")
            kicked = await next_event(layer, "irc.kicked")
            assert (kicked["nick"], kicked["by"], kicked["reason"], kicked["self"]) == (
                "bot",
                "alice",
                "out",
                True,
            )
            assert (await next_event(layer, "irc.joined", self=True))["channel"] == "#ops"
            result = await command(layer, "ops.send", {"type": "irc.nick", "nick": "bot2"})
            assert result["ok"]
            nick = await next_event(layer, "irc.nick")
            assert (nick["nick"], nick["new"], nick["self"]) == ("bot", "bot2", True)
            assert gateway.client.nick == "bot2"
    finally:
        await alice.close()


async def test_long_text_is_split_and_hostile_input_refused(
    ngircd_server: NgircdServer, caplog: pytest.LogCaptureFixture
) -> None:
    port = ngircd_server.port
    alice = await Peer.connect(port, "alice", "#ops")
    try:
        async with running(irc_config(port, channels=["#ops"])) as (gateway, layer):
            await next_event(layer, "irc.joined", self=True)
            text = " ".join(f"{i:04d}é€" for i in range(2000 // 7 + 1))[:2000]
            result = await command(
                layer, "ops.send", {"type": "irc.send", "target": "#ops", "text": text}
            )
            assert result["ok"] and result["lines"] >= 2
            got = []
            for _ in range(result["lines"]):
                line = await alice.expect("PRIVMSG #ops :")
                assert len(line.encode()) + 2 <= 512  # as relayed, with the prefix
                got.append(line.split(" :", 1)[1])
            # nothing lost, nothing cut inside a character (a split at a space uses that space)
            assert " ".join(got) == text

            for bad in ("a\r\nQUIT :pwned", "a\nJOIN #evil", "a\0b"):
                result = await command(
                    layer, "ops.send", {"type": "irc.send", "target": "#ops", "text": bad}
                )
                assert not result["ok"] and "refused" in result["error"]
            result = await command(layer, "ops.send", {"type": "irc.join", "channel": "#a\r\nQUIT"})
            assert not result["ok"]
            result = await command(
                layer, "ops.send", {"type": "irc.send", "target": "#ops\r\nQUIT", "text": "x"}
            )
            assert not result["ok"]
            with caplog.at_level(logging.WARNING, "gateway.irc"):
                result = await command(layer, "ops.send", {"type": "irc.kick", "channel": "#ops"})
            assert result["error"] == "unknown command 'irc.kick'"
            assert "unknown command 'irc.kick'" in caplog.text
            result = await command(layer, "ops.send", {"type": "irc.raw", "line": "QUIT"})
            assert not result["ok"] and "disabled" in result["error"]
            # the connection survived all of it, and nothing extra reached the channel
            result = await command(
                layer, "ops.send", {"type": "irc.send", "target": "#ops", "text": "still here"}
            )
            assert result["ok"]
            assert (await alice.expect("PRIVMSG #ops")).endswith(":still here")
            assert gateway.client.connected
    finally:
        await alice.close()


async def test_invalid_utf8_uses_the_fallback(
    ngircd_server: NgircdServer, caplog: pytest.LogCaptureFixture
) -> None:
    port = ngircd_server.port
    alice = await Peer.connect(port, "alice", "#ops")
    try:
        async with running(irc_config(port, channels=["#ops"])) as (_gateway, layer):
            await next_event(layer, "irc.joined", self=True)
            before = metric("gateway_errors_total", gateway="ops", kind="undecodable")
            with caplog.at_level(logging.WARNING, "gateway.irc"):
                await alice.send(b"PRIVMSG #ops :caf\xe9 \xff", "PRIVMSG #ops :ok ✓")
                first = await next_event(layer, "irc.receive")
                second = await next_event(layer, "irc.receive")
            assert first["text"] == "café ÿ" and second["text"] == "ok ✓"
            assert metric("gateway_errors_total", gateway="ops", kind="undecodable") == before + 1
            assert "not UTF-8; decoded as latin-1" in caplog.text
    finally:
        await alice.close()


async def test_nick_in_use_then_reclaimed(ngircd_server: NgircdServer) -> None:
    port = ngircd_server.port
    holder = await Peer.connect(port, "bot", "#ops")  # seen leaving: in a shared channel
    taken = await Peer.connect(port, "botalt")
    try:
        config = irc_config(port, channels=["#ops"], alternates=["botalt"], reclaim_interval=60)
        async with running(config) as (gateway, layer):
            connect = await next_event(layer, "irc.connect")
            assert connect["nick"] == "bot1"  # bot and botalt in use: the suffix
            await holder.send("QUIT :leaving")  # frees it: reclaimed at once, not in 60 s
            nick = await next_event(layer, "irc.nick", self=True)
            assert (nick["nick"], nick["new"]) == ("bot1", "bot")
            assert gateway.client.nick == "bot"
    finally:
        await holder.close()
        await taken.close()


async def test_burst_is_paced_in_order_without_loss(ngircd_server: NgircdServer) -> None:
    port = ngircd_server.port
    alice = await Peer.connect(port, "alice", "#ops")
    rate, burst, count = 250.0, 5, 500
    try:
        config = irc_config(port, channels=["#ops"], flood={"burst": burst, "rate": rate})
        async with running(config) as (gateway, layer):
            await next_event(layer, "irc.joined", self=True)
            results = await layer.new_channel("burst.")
            for i in range(count):
                await layer.send(
                    "ops.send",
                    {
                        "type": "irc.send",
                        "id": i,
                        "target": "#ops",
                        "text": f"line {i}",
                        "result_channel": results,
                    },
                )
            loop = asyncio.get_running_loop()
            seen, times = [], []
            while len(seen) < count:
                line = await alice.expect("PRIVMSG #ops :line ")
                seen.append(int(line.rsplit(" ", 1)[1]))
                times.append(loop.time())
            assert seen == list(range(count))  # every line, in order
            answers = [await layer.receive(results) for _ in range(count)]
            assert all(a["ok"] for a in answers)
            # never faster than configured (load can only make it slower; the bench measures both)
            measured = (count - burst) / (times[-1] - times[burst - 1])
            assert measured <= rate * 1.10, measured
            assert gateway.client.connected
            assert metric("gateway_transport_connected", gateway="ops") == 1
    finally:
        await alice.close()


async def test_server_killed_and_restarted(ngircd_server: NgircdServer) -> None:
    port = ngircd_server.port
    config = irc_config(port, channels=["#ops"], queue_timeout=30)
    async with running(config) as (_gateway, layer):
        await next_event(layer, "irc.joined", self=True, channel="#ops")
        assert (await command(layer, "ops.send", {"type": "irc.join", "channel": "#late"}))["ok"]
        await next_event(layer, "irc.joined", self=True, channel="#late")
        await asyncio.to_thread(ngircd_server.kill)
        gone = await next_event(layer, "irc.disconnect")
        assert gone["reason"]
        # sent while the server is down: waits in the outbox
        pending = asyncio.create_task(
            command(layer, "ops.send", {"type": "irc.send", "target": "#late", "text": "queued"})
        )
        await asyncio.sleep(0.3)
        assert not pending.done()
        await asyncio.to_thread(ngircd_server.start)
        await next_event(layer, "irc.connect")
        rejoined = {(await next_event(layer, "irc.joined", self=True))["channel"] for _ in range(2)}
        assert rejoined == {"#ops", "#late"}
        alice = await Peer.connect(port, "alice", "#late")
        try:
            assert (await pending)["ok"]
        finally:
            await alice.close()


async def test_commands_are_answered_when_the_server_stays_away(
    ngircd_server: NgircdServer,
) -> None:
    port = ngircd_server.port
    async with running(irc_config(port, queue_timeout=0.5)) as (_gateway, layer):
        await next_event(layer, "irc.connect")
        await asyncio.to_thread(ngircd_server.kill)
        await next_event(layer, "irc.disconnect")
        result = await command(
            layer, "ops.send", {"type": "irc.send", "target": "#x", "text": "lost?"}
        )
        assert not result["ok"] and "no connection" in result["error"]


async def test_full_outbox_refuses_and_counts(ngircd_server: NgircdServer) -> None:
    port = ngircd_server.port
    config = irc_config(port, queue=3, flood={"burst": 1, "rate": 0.5})
    async with running(config) as (_gateway, layer):
        await next_event(layer, "irc.connect")
        before = metric("gateway_dropped_total", gateway="ops", reason="outbox_full")
        text = "x" * 1500  # four lines: more than the outbox holds
        result = await command(
            layer, "ops.send", {"type": "irc.send", "target": "#x", "text": text}
        )
        assert not result["ok"] and "outbound queue full" in result["error"]
        assert metric("gateway_dropped_total", gateway="ops", reason="outbox_full") == before + 1


async def test_tls_verified_and_an_untrusted_certificate_refused(
    ngircd_tls_server: NgircdServer,
) -> None:
    server = ngircd_tls_server
    config = irc_config(server.tls_port, tls={"ca_file": str(server.certs.ca_crt)})
    config["irc"]["server"] = "localhost"
    async with running(config) as (_gateway, layer):
        assert (await next_event(layer, "irc.connect"))["server"] == f"localhost:{server.tls_port}"
    untrusted = irc_config(server.tls_port, tls={})  # the system's CAs: not our test CA
    with pytest.raises(StartupError, match="TLS: unable to get local issuer certificate"):
        async with running(untrusted):
            pass


async def test_watchdog_drops_a_silent_server_and_reconnects(ngircd_server: NgircdServer) -> None:
    async with running(irc_config(ngircd_server.port, idle_timeout=0.5)) as (_gateway, layer):
        await next_event(layer, "irc.connect")
        ngircd_server.send_signal(signal.SIGSTOP)  # alive, but silent: no PONG
        try:
            gone = await next_event(layer, "irc.disconnect")
            assert "no data from the server" in gone["reason"]
        finally:
            ngircd_server.send_signal(signal.SIGCONT)
        await next_event(layer, "irc.connect")


async def test_a_look_alike_nick_is_someone_else_on_an_ascii_server(
    ngircd_server: NgircdServer,
) -> None:
    # issue 21, item 6: ngircd announces CASEMAPPING=ascii, so acc{gw} is not acc[gw]; its PART
    # made the gateway forget the channel, and a reconnect did not rejoin it
    port = ngircd_server.port
    config = irc_config(port, nick="acc[gw]", username="accgw", channels=["#ops"])
    async with running(config) as (gateway, layer):
        await next_event(layer, "irc.joined", self=True)
        assert gateway.client.casemapping == "ascii"
        twin = await Peer.connect(port, "acc{gw}", "#ops")  # a second person under ascii
        try:
            assert (await next_event(layer, "irc.joined", nick="acc{gw}"))["self"] is False
            await twin.send("PRIVMSG #ops :hello", "PART #ops :bye")
            assert (await next_event(layer, "irc.receive", nick="acc{gw}"))["self"] is False
            assert (await next_event(layer, "irc.parted", nick="acc{gw}"))["self"] is False
            assert "#ops" in gateway.channels
        finally:
            await twin.close()
        assert gateway.client.restart("test: reconnect")
        await next_event(layer, "irc.connect")
        assert (await next_event(layer, "irc.joined", self=True))["channel"] == "#ops"


async def test_the_nick_set_by_command_survives_a_reconnect(
    ngircd_server: NgircdServer, caplog: pytest.LogCaptureFixture
) -> None:
    # issue 21, item 7: the gateway registered with the YAML's nick after every reconnect
    port = ngircd_server.port
    # a slow first retry, so alice is back in #ops before the gateway
    config = irc_config(
        port, channels=["#ops"], queue_timeout=30, reconnect={"initial": 3, "maximum": 3}
    )
    async with running(config) as (gateway, layer):
        await next_event(layer, "irc.joined", self=True)
        assert (await command(layer, "ops.send", {"type": "irc.nick", "nick": "renamed"}))["ok"]
        assert (await next_event(layer, "irc.nick", self=True))["new"] == "renamed"
        await asyncio.to_thread(ngircd_server.kill)
        await next_event(layer, "irc.disconnect")
        pending = asyncio.create_task(
            command(layer, "ops.send", {"type": "irc.send", "target": "#ops", "text": "queued"})
        )
        await asyncio.to_thread(ngircd_server.start)
        alice = await Peer.connect(port, "alice", "#ops")
        try:
            with caplog.at_level(logging.WARNING, "gateway.irc"):
                connect = await next_event(layer, "irc.connect")
            assert connect["nick"] == "renamed"
            assert (await pending)["ok"]
            line = await alice.expect("PRIVMSG #ops :queued")
            assert line.startswith(":renamed!")  # sent under the nick set last
            assert "is taken" not in caplog.text
            assert gateway.client.nick == "renamed"
        finally:
            await alice.close()


async def test_a_nick_with_brackets_registers_with_a_valid_user_name(
    ngircd_server: NgircdServer,
) -> None:
    # issue 21, item 8: USER acc[bot] is "ERROR :Invalid user name" on ngircd
    async with running(irc_config(ngircd_server.port, nick="acc[bot]", channels=["#ops"])) as (
        _gateway,
        layer,
    ):
        assert (await next_event(layer, "irc.connect"))["nick"] == "acc[bot]"
        joined = await next_event(layer, "irc.joined", self=True)
        assert (joined["nick"], joined["user"]) == ("acc[bot]", "~accbot")


async def test_a_user_name_the_server_refuses_exits_3_once(
    ngircd_server: NgircdServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    # issue 21, item 8: the refusal was retried for ever (13 WARNING lines in 12 s, never exit 3)
    config = {**irc_config(ngircd_server.port, username="acc[bot]"), "layer": redis_server.url}
    process = GatewayProcess.from_config(tmp_path, config, ready_line=None).start()
    await asyncio.to_thread(process.wait_for, "could not start", WAIT)
    code = await asyncio.to_thread(process.wait, WAIT)
    output = process.tail()
    assert code == 3, output
    assert "Invalid user name" in output
    assert output.count("could not start") == 1 and "reconnecting" not in output


async def test_every_line_of_a_waiting_command_survives_a_reconnect() -> None:
    # the outbox kept only each command's last line across a reconnect (the others carried no
    # future and went with our own JOIN/NICK lines); found with issue 24's hand-over
    gateway = IrcGateway(
        IrcGatewayConfig.model_validate(irc_config(6667, channels=["#ops"])),
        InMemoryChannelLayer(),
    )
    waiting = asyncio.create_task(gateway._send(["PRIVMSG #ops :one", "PRIVMSG #ops :two"]))
    await asyncio.sleep(0)  # queued: nothing sends while the gateway is not running
    gateway._enqueue_system("NICK bot")
    gateway.client_connected({})
    assert [line.text for line in gateway._outbox] == [
        "JOIN #ops",
        "PRIVMSG #ops :one",
        "PRIVMSG #ops :two",
    ]
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
