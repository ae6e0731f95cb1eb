"""gateways/irc/consumers.py: IrcConsumer answers in one call; IrcCommands awaits irc.result from a
real gateway on ngircd."""

from __future__ import annotations

from typing import Any

import pytest

from core.consumers import CommandFailed, InvalidCommand
from core.testing import NgircdServer
from gateways.irc.consumers import IrcCommands, IrcConsumer, irc_join, irc_send
from tests.gateways.conftest import Handle, nothing_sent, sent
from tests.gateways.irc.conftest import Peer, irc_config, next_event, running

pytestmark = pytest.mark.timeout(60)


def event(type_: str, **keys: Any) -> dict[str, Any]:
    return {"type": type_, "gateway": "ops", "id": "e1", "reply_channel": "ops.conn!1", **keys}


def said(text: str, **keys: Any) -> dict[str, Any]:
    base = {"kind": "message", "nick": "alice", "target": "#ops", "private": False, "self": False}
    return event("irc.receive", **{**base, "text": text, "plain": text, **keys})


class Bot(IrcConsumer):
    async def irc_receive(self, message: dict[str, Any]) -> None:
        await self.reply(f"{message['nick']}: {message['plain'].upper()}")

    async def irc_joined(self, message: dict[str, Any]) -> None:
        await self.reply(f"welcome {message['nick']}", kind="notice")
        await self.irc.join("#lobby")  # any other command, to the same connection

    async def irc_connect(self, message: dict[str, Any]) -> None:
        await self.reply("hello?")  # nothing to answer: raises


async def test_reply_goes_where_the_message_came_from(handle: Handle) -> None:
    bot = await handle(Bot, said("ping"))
    assert await sent(bot, "ops.conn!1") == irc_send("#ops", "alice: PING")
    bot = await handle(Bot, said("ping", target="bot", private=True))
    assert await sent(bot, "ops.conn!1") == irc_send("alice", "alice: PING")


async def test_notices_and_our_own_lines_are_never_answered(handle: Handle) -> None:
    for message in (said("ping", kind="notice"), said("ping", self=True)):
        bot = await handle(Bot, message)
        assert await nothing_sent(bot, "ops.conn!1")


async def test_other_events_and_commands(handle: Handle) -> None:
    joined = event("irc.joined", nick="bob", user="b", host="h", channel="#ops", self=False)
    bot = await handle(Bot, joined)
    assert await sent(bot, "ops.conn!1") == irc_send("#ops", "welcome bob", kind="notice")
    assert await sent(bot, "ops.conn!1") == irc_join("#lobby")
    with pytest.raises(InvalidCommand, match=r"nothing to answer in a 'irc\.connect' event"):
        await handle(Bot, event("irc.connect", server="x:6667", nick="bot", capabilities=[]))


async def test_reply_outside_a_handler_says_so() -> None:
    with pytest.raises(InvalidCommand, match="reply\\(\\) answers the event being handled"):
        await Bot().reply("hi")


async def test_results_from_a_real_gateway(ngircd_server: NgircdServer) -> None:
    port = ngircd_server.port
    async with running(irc_config(port, channels=["#ops"])) as (_, layer):
        alice = await Peer.connect(port, "alice", "#ops")
        try:
            await alice.send("PRIVMSG #ops :hello bot")
            message = await next_event(layer, "irc.receive")
            irc = IrcCommands(layer, message["reply_channel"])
            result = await irc.send("#ops", "word " * 150, wait=True)  # 750 bytes: two lines
            assert result is not None and (result["ok"], result["lines"]) == (True, 2)
            await alice.expect("PRIVMSG #ops :word")
            with pytest.raises(CommandFailed) as failed:
                await irc.raw("VERSION", wait=True)
            assert failed.value.error == (
                "irc.raw is disabled (set irc.raw_commands: true to allow it)"
            )
        finally:
            await alice.close()
