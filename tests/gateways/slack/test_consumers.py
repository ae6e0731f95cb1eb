"""gateways/slack/consumers.py: SlackConsumer answers in one call, where Slack expects it."""

from __future__ import annotations

from typing import Any

import pytest

from core.consumers import InvalidCommand
from gateways.slack.consumers import SlackConsumer, slack_react, slack_respond, slack_send
from tests.gateways.conftest import Handle, sent

TS = "1700000000.000100"


def event(type_: str, **keys: Any) -> dict[str, Any]:
    return {"type": type_, "gateway": "team", "id": "Ev1", "reply_channel": "team.send", **keys}


class Bot(SlackConsumer):
    async def slack_mention(self, message: dict[str, Any]) -> None:
        await self.reply("on it", thread=True)
        await self.react("eyes")

    async def slack_message(self, message: dict[str, Any]) -> None:
        await self.reply("seen")

    async def slack_command(self, message: dict[str, Any]) -> None:
        await self.reply("ticket #42 is open")

    async def slack_joined(self, message: dict[str, Any]) -> None:
        await self.react("wave")  # a join is no message: raises


async def test_a_mention_is_answered_in_a_thread_and_reacted_to(handle: Handle) -> None:
    bot = await handle(Bot, event("slack.mention", channel="C1", user="U1", ts=TS, thread_ts=None))
    assert await sent(bot, "team.send") == slack_send("C1", "on it", thread_ts=TS)
    assert await sent(bot, "team.send") == slack_react("C1", TS, "eyes")


async def test_a_message_in_a_thread_is_answered_in_that_thread(handle: Handle) -> None:
    bot = await handle(Bot, event("slack.message", channel="C1", ts=TS, thread_ts="1.000001"))
    assert await sent(bot, "team.send") == slack_send("C1", "seen", thread_ts="1.000001")


async def test_a_slash_command_is_answered_through_its_response_url(handle: Handle) -> None:
    url = "https://hooks.slack.com/commands/T1/1/x"
    bot = await handle(
        Bot, event("slack.command", command="/ticket", channel="C1", response_url=url)
    )
    assert await sent(bot, "team.send") == slack_respond(url, "ticket #42 is open")


async def test_react_needs_a_message(handle: Handle) -> None:
    with pytest.raises(InvalidCommand, match="has no message to react to"):
        await handle(Bot, event("slack.joined", channel="C1", user="U1"))
