"""gateways/slack/consumers.py: SlackConsumer answers in one call, where Slack expects it."""

from __future__ import annotations

from typing import Any

import pytest

from core.consumers import InvalidCommand
from gateways.slack.consumers import (
    SlackConsumer,
    slack_ack,
    slack_function_complete,
    slack_function_fail,
    slack_react,
    slack_respond,
    slack_send,
    slack_views_open,
    slack_views_publish,
)
from tests.gateways.conftest import Handle, nothing_sent, sent

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


MODAL = {"type": "modal", "title": {"type": "plain_text", "text": "Ticket"}, "blocks": []}
HOME = {"type": "home", "blocks": []}


class Modals(SlackConsumer):
    async def slack_command(self, message: dict[str, Any]) -> None:
        await self.open_view(MODAL)

    async def slack_block_actions(self, message: dict[str, Any]) -> None:
        await self.open_view(MODAL, push=True)
        await self.update_view(HOME, hash="1.2")

    async def slack_view_submission(self, message: dict[str, Any]) -> None:
        await self.ack_with(errors={"ticket": "Not a number"})

    async def slack_options(self, message: dict[str, Any]) -> None:
        await self.ack_with(options=[{"text": {"type": "plain_text", "text": "A"}, "value": "a"}])

    async def slack_app_home_opened(self, message: dict[str, Any]) -> None:
        await self.publish_home(HOME)

    async def slack_function_executed(self, message: dict[str, Any]) -> None:
        if message["inputs"].get("ok"):
            await self.complete({"done": True})
        else:
            await self.fail("no ticket")

    async def slack_shortcut(self, message: dict[str, Any]) -> None:
        await self.ack_with()  # a shortcut takes no answer: raises


async def test_modals_open_with_the_events_trigger_in_its_workspace(handle: Handle) -> None:
    bot = await handle(
        Modals,
        event("slack.command", command="/t", trigger_id="1.2.a", team="T2", ack_channel=None),
    )
    assert await sent(bot, "team.send") == {
        **slack_views_open(MODAL, trigger_id="1.2.a"),
        "team": "T2",
    }
    bot = await handle(
        Modals,
        event("slack.block_actions", trigger_id="3.4.b", view_id="V1", team="T2", enterprise="E1"),
    )
    pushed = await sent(bot, "team.send")
    assert pushed == {
        **slack_views_open(MODAL, trigger_id="3.4.b", push=True),
        "team": "T2",
        "enterprise": "E1",
    }
    updated = await sent(bot, "team.send")
    assert updated["type"] == "slack.views_update" and updated["view_id"] == "V1"
    assert updated["hash"] == "1.2" and updated["team"] == "T2"
    bot = await handle(Modals, event("slack.app_home_opened", user="U1", tab="home", team="T2"))
    assert await sent(bot, "team.send") == slack_views_publish("U1", HOME, team="T2")


async def test_answers_go_to_the_events_ack_channel(handle: Handle) -> None:
    bot = await handle(Modals, event("slack.view_submission", ack_channel="ack!1", team="T2"))
    assert await sent(bot, "ack!1") == slack_ack(errors={"ticket": "Not a number"})
    assert await nothing_sent(bot, "team.send")
    bot = await handle(Modals, event("slack.options", ack_channel="ack!2", value="a"))
    assert (await sent(bot, "ack!2"))["options"][0]["value"] == "a"
    with pytest.raises(InvalidCommand, match=r"add slack\.view_submission to slack\.answers"):
        await handle(Modals, event("slack.view_submission", ack_channel=None))
    with pytest.raises(InvalidCommand, match="can be answered there"):
        await handle(Modals, event("slack.shortcut", callback_id="s"))
    with pytest.raises(InvalidCommand, match=r"a slack\.options is answered with"):
        slack_ack(errors={"a": "b"}, event="slack.options")


async def test_workflow_steps_complete_or_fail(handle: Handle) -> None:
    done = await handle(
        Modals, event("slack.function_executed", function_execution_id="Fx1", inputs={"ok": 1})
    )
    assert await sent(done, "team.send") == slack_function_complete("Fx1", {"done": True})
    failed = await handle(
        Modals, event("slack.function_executed", function_execution_id="Fx2", inputs={})
    )
    assert await sent(failed, "team.send") == slack_function_fail("Fx2", "no ticket")


async def test_a_reply_goes_to_the_events_workspace(handle: Handle) -> None:
    bot = await handle(Bot, event("slack.message", channel="C1", ts=TS, team="T2", enterprise="E1"))
    assert await sent(bot, "team.send") == slack_send("C1", "seen", team="T2", enterprise="E1")
    url = "https://hooks.slack.com/actions/T1/1/x"
    bot = await handle(Bot, event("slack.command", command="/t", response_url=url, team="T2"))
    assert await sent(bot, "team.send") == slack_respond(url, "ticket #42 is open")
