"""The IRC gateway against a hostile server written here (core.testing.ScriptedIrcServer).

Issue 21: a server that floods PINGs and never reads, an endless CAP LS, 100k unparsable lines,
JOIN floods at full speed, a server that claims the gateway joined thousands of channels, NUL
and chosen msgids. Each test fails without its fix; none asserts a timing.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import pytest
from channels.exceptions import ChannelFull

from core.testing import command, metric, receive, until
from gateways.irc.connection import LINES_PER_TURN, MAX_CAPS
from gateways.irc.translate import event_id
from tests.gateways.irc.conftest import irc_config, next_event, running
from tests.support.irc import IrcSession, ScriptedIrcServer

pytestmark = pytest.mark.timeout(120)


async def test_a_server_that_never_reads_is_dropped_and_readyz_says_so() -> None:
    # item 2: the library wrote a PONG per PING into an unbounded buffer (58 → 639 MB in 40 s)
    flood = asyncio.Event()

    async def script(session: IrcSession) -> None:
        await session.register()
        if session.index == 0:
            await flood.wait()  # never reads; then floods PINGs whose PONGs pile up here
            await session.flood(lambda i: b"PING :%0400d\r\n" % i)
        else:
            await session.read_all()

    async with ScriptedIrcServer(script) as server:
        config = irc_config(server.port, flood={"burst": 100, "rate": 1000}, queue=5000)
        async with running(config) as (gateway, layer):
            await next_event(layer, "irc.connect")
            before = metric("gateway_errors_total", gateway="ops", kind="write_buffer_full")
            results = await layer.new_channel("results.")
            sent = 0

            def red() -> bool:
                return any("does not read what we send" in r for r in gateway.ready_reasons())

            async def feed() -> None:
                # long texts (8 lines each) until the kernel's buffers (MBs on loopback) and
                # then asyncio's are full
                nonlocal sent
                while not red():
                    try:
                        await layer.send(
                            "ops.send",
                            {"type": "irc.send", "id": str(sent), "target": "#ops",
                             "text": f"{sent:05d} " + "x" * 3000, "result_channel": results},
                        )  # fmt: skip
                    except ChannelFull:  # commands wait for their lines to be written
                        await asyncio.sleep(0.01)
                    else:
                        sent += 1
                        await asyncio.sleep(0)

            # our own lines wait once the server stops taking them, and /readyz says why
            await asyncio.wait_for(feed(), 90)
            assert gateway.client.connected  # waiting, not dropped: it may read again
            assert gateway._outbox  # the rest waits in the bounded outbox, not in a socket
            assert metric("gateway_errors_total", gateway="ops", kind="write_buffer_full") == before

            flood.set()  # now PINGs: their PONGs go past the limit
            gone = await next_event(layer, "irc.disconnect")
            assert "does not read what we send" in gone["reason"]
            assert metric("gateway_errors_total", gateway="ops", kind="write_buffer_full") == (
                before + 1
            )
            await next_event(layer, "irc.connect")
            # what waited in the outbox goes out on the new connection; every command answered
            answers = [await receive(layer, results) for _ in range(sent)]
            assert all(a["ok"] for a in answers), [a for a in answers if not a["ok"]][:3]
            second = await server.session(1)
            await until(lambda: any("PRIVMSG #ops" in line for line in second.received))


async def test_an_endless_cap_ls_is_cut_off() -> None:
    # item 3: CAP LS continuations were all kept (1.8 GB in 20 s)
    async def script(session: IrcSession) -> None:
        await session.expect("CAP")
        await session.flood(
            lambda i: (
                b":hostile.test CAP * LS * :"
                + b" ".join(b"cap%d-%d=value" % (i, j) for j in range(30))
                + b"\r\n"
            )
        )

    async with (
        ScriptedIrcServer(script) as server,
        running(irc_config(server.port), ready=False) as (gateway, _layer),
    ):
        await until(
            lambda: metric("gateway_errors_total", gateway="ops", kind="cap_flood") >= 1,
            what="the CAP LS flood counted",
        )
        await server.session(1)  # dropped, then tried again (with backoff)
        assert "CAP LS goes on past" in (gateway.client.last_error or "")
        assert len(gateway.client._offered) <= MAX_CAPS + 30
        assert gateway.ready_reasons()


async def test_a_flood_of_unparsable_lines_is_one_warning_and_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # item 4: 100k unparsable lines were 77 MB of WARNING lines
    count = 20_000

    async def script(session: IrcSession) -> None:
        await session.register()
        await session.flood(lambda i: b" unparsable line %d\r\n" % i, count)
        session.send(":alice!a@h PRIVMSG #ops :after the flood")
        await session.drain()
        await session.read_all()

    async with ScriptedIrcServer(script) as server:
        name = "logflood"  # the repeat filter keeps kinds per integration
        before = metric("gateway_errors_total", gateway=name, kind="bad_line")
        with caplog.at_level(logging.WARNING, "gateway.irc"):
            async with running(irc_config(server.port, name=name)) as (gateway, layer):
                message = await next_event(layer, "irc.receive", on=name)
                assert message["text"] == "after the flood"  # the connection survived
                assert gateway.client.connected
        assert metric("gateway_errors_total", gateway=name, kind="bad_line") == before + count
        skipped = [r for r in caplog.records if "could not parse" in r.getMessage()]
        assert len(skipped) == 1, len(skipped)


async def test_a_join_flood_is_pushed_back_not_dropped(caplog: pytest.LogCaptureFixture) -> None:
    # item 5: a JOIN flood dropped 97 % of its events while the layer was empty
    count = 3000

    async def script(session: IrcSession) -> None:
        await session.register()
        await session.flood(lambda i: b":u%d!u@h JOIN #ops\r\n" % i, count)
        await session.read_all()

    async with ScriptedIrcServer(script) as server:
        before_drops = metric("gateway_dropped_total", gateway="ops", reason="buffer_full")
        before_pushback = metric("gateway_pushback_total", gateway="ops")
        config = irc_config(server.port, buffer=50)
        with caplog.at_level(logging.WARNING, "gateway.irc"):
            async with running(config, capacity=100) as (gateway, layer):
                # nobody reads the layer yet: it fills, the buffer fills, reading pauses
                await until(
                    lambda: metric("gateway_pushback_total", gateway="ops") > before_pushback,
                    what="reading paused",
                )
                await until(lambda: gateway.stall.stalled, what="the stall WARNING")
                nicks = []
                for _ in range(count):
                    nicks.append((await next_event(layer, "irc.joined"))["nick"])
                assert nicks == [f"u{i}" for i in range(count)]  # every one, in order
        drops = metric("gateway_dropped_total", gateway="ops", reason="buffer_full")
        assert drops == before_drops
        stalled = [r.getMessage() for r in caplog.records if ": stalled:" in r.getMessage()]
        assert stalled and "stops reading from the IRC server" in stalled[0]


async def test_a_large_read_is_handled_in_turns() -> None:
    # item 5: a whole read (thousands of lines) was parsed in one callback, the loop frozen
    count = 3000
    go = asyncio.Event()

    async def script(session: IrcSession) -> None:
        await session.register()
        await go.wait()
        session.send(b"".join(b":a!a@h PRIVMSG #ops :%d\r\n" % i for i in range(count)))
        await session.drain()
        await session.read_all()

    async with (
        ScriptedIrcServer(script) as server,
        running(irc_config(server.port), capacity=10_000) as (gateway, layer),
    ):
        seen = 0
        handle_event = gateway.irc_event

        def counting(event: Any) -> None:
            nonlocal seen
            seen += event.type == "pubmsg"
            handle_event(event)

        gateway.irc_event = counting  # type: ignore[method-assign]
        go.set()
        samples = []
        deadline = asyncio.get_running_loop().time() + 30
        while seen < count:  # one sample per turn of the event loop
            samples.append(seen)
            await asyncio.sleep(0)
            assert asyncio.get_running_loop().time() < deadline, f"{seen} of {count} handled"
        steps = [b - a for a, b in itertools.pairwise(samples)]
        assert max(steps) <= 2 * LINES_PER_TURN, max(steps)
        assert len({s for s in samples if 0 < s < count}) >= count // LINES_PER_TURN // 2
        assert (await next_event(layer, "irc.receive"))["text"] == "0"


async def test_a_self_join_flood_is_not_adopted_wholesale(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # item 5: a server claimed the gateway joined 253k channels; all were kept and rejoined
    count = 2000
    release = asyncio.Event()

    async def script(session: IrcSession) -> None:
        nick = await session.register()
        if session.index == 0:
            await session.flood(lambda i: f":{nick}!b@h JOIN #c{i}\r\n".encode(), count)
            session.send(f":alice!a@h PRIVMSG {nick} :done")
            await session.drain()
            await release.wait()
        else:
            await session.read_all()

    async with ScriptedIrcServer(script) as server:
        name = "selfjoin"
        before = metric("gateway_errors_total", gateway=name, kind="too_many_channels")
        config = irc_config(server.port, name=name, channels=["#ops"], max_channels=20)
        with caplog.at_level(logging.WARNING, "gateway.irc"):
            async with running(config, capacity=10_000) as (gateway, layer):
                await next_event(layer, "irc.receive", on=name, text="done")
                assert len(gateway.channels) == 20  # #ops and the first 19
                adopted = metric("gateway_errors_total", gateway=name, kind="too_many_channels")
                assert adopted == before + count - 19
                release.set()  # the server hangs up; the reconnect rejoins 20, not 2000
                await next_event(layer, "irc.connect", on=name)
                result = await command(
                    layer, f"{name}.send", {"type": "irc.send", "target": "#ops", "text": "hi"}
                )
                assert result["ok"]
                second = await server.session(1)
                await until(lambda: any(" :hi" in line for line in second.received))
                joins = [line for line in second.received if line.startswith("JOIN ")]
                assert len(joins) == 20 and joins[0] == "JOIN #ops"
                refused = await command(
                    layer, f"{name}.send", {"type": "irc.join", "channel": "#one-more"}
                )
                assert not refused["ok"] and "max_channels" in str(refused["error"])
        warned = [r for r in caplog.records if "the server joined us to" in r.getMessage()]
        assert len(warned) == 1


async def test_nul_is_stripped_and_msgids_are_scoped_by_server() -> None:
    # item 10: NUL reached text/target; a server's msgid was the id verbatim (collisions)
    async def script(session: IrcSession) -> None:
        await session.register()
        session.send(b"@msgid=same-id :al\0ice!a@h PRIVMSG #o\0ps :he\0llo")
        await session.drain()
        await session.read_all()

    async with ScriptedIrcServer(script) as one, ScriptedIrcServer(script) as two:
        ids = []
        for server, host in ((one, "127.0.0.1"), (two, "localhost")):
            config = irc_config(server.port)
            config["irc"]["server"] = host
            async with running(config) as (_gateway, layer):
                message = await next_event(layer, "irc.receive")
                assert (message["nick"], message["target"], message["text"]) == (
                    "alice",
                    "#ops",
                    "hello",
                )
                assert message["tags"]["msgid"] == "same-id"  # the server's own, as sent
                assert message["id"] == event_id(f"{host}:{server.port}", "same-id")
                ids.append(message["id"])
        assert ids[0] != ids[1]  # the same msgid from two servers: two events


async def test_connect_and_disconnect_carry_the_process_channel() -> None:
    # item 9: irc.connect carried the shared command channel as reply_channel
    async def script(session: IrcSession) -> None:
        await session.register()
        if session.index == 0:
            session.send("ERROR :Closing link (restart)")
            await session.drain()
            return
        await session.read_all()

    async with (
        ScriptedIrcServer(script) as server,
        running(irc_config(server.port), ready=False) as (gateway, layer),
    ):
        connect = await next_event(layer, "irc.connect")
        assert connect["reply_channel"] == gateway.reply_channel
        disconnect = await next_event(layer, "irc.disconnect")
        assert disconnect["reply_channel"] == gateway.reply_channel
        assert "Closing link" in disconnect["reason"]
