"""Views (issue 26, item 2) and workflow events (item 4) against the local Slack: modals opened
with a trigger_id, pushed and updated, the App Home tab published; the typed events they come
with; custom workflow steps completed or failed with their own token."""

from __future__ import annotations

import asyncio
import logging

import pytest

from core.testing import command
from core.testing.slack import FakeSlack
from tests.gateways.slack.conftest import next_event, running, slack_config

MODAL = {
    "type": "modal",
    "callback_id": "ticket_lookup",
    "title": {"type": "plain_text", "text": "Look up a ticket"},
    "submit": {"type": "plain_text", "text": "Look up"},
    "blocks": [
        {
            "type": "input",
            "block_id": "ticket",
            "label": {"type": "plain_text", "text": "Ticket"},
            "element": {"type": "plain_text_input", "action_id": "number"},
        }
    ],
}
HOME = {"type": "home", "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "3"}}]}


async def test_a_modal_opened_from_a_slash_command_pushed_and_updated(
    fake_slack: FakeSlack,
) -> None:
    async with running(slack_config(fake_slack)) as (_, layer):
        await next_event(layer, "slack.connect")
        await fake_slack.send_slash_command("/ticket")
        asked = await next_event(layer, "slack.command")
        opened = await command(
            layer,
            asked["reply_channel"],
            {"type": "slack.views_open", "trigger_id": asked["trigger_id"], "view": MODAL},
        )
        assert opened["ok"] is True, opened
        view = fake_slack.views[opened["view_id"]]
        assert view["user"] == "U0ALICE" and view["callback_id"] == "ticket_lookup"
        assert fake_slack.calls_of("views.open")[0].args["trigger_id"] == asked["trigger_id"]
        # a trigger_id is exchanged once
        again = await command(
            layer,
            "team.send",
            {"type": "slack.views_open", "trigger_id": asked["trigger_id"], "view": MODAL},
        )
        assert (again["ok"], again["error"]) == (False, "exchanged_trigger_id")

        # a button in the modal: block_actions with a fresh trigger, a view pushed on top
        await fake_slack.send_interactive(
            fake_slack.block_actions(
                [{"action_id": "more", "type": "button", "value": "1"}], view_id=view["id"]
            )
        )
        pressed = await next_event(layer, "slack.block_actions")
        assert pressed["view_id"] == view["id"] and pressed["actions"][0]["action_id"] == "more"
        pushed = await command(
            layer,
            "team.send",
            {"type": "slack.views_push", "trigger_id": pressed["trigger_id"], "view": MODAL},
        )
        assert pushed["ok"] is True
        updated = await command(
            layer,
            "team.send",
            {
                "type": "slack.views_update",
                "view_id": view["id"],
                "hash": opened["hash"],
                "view": {**MODAL, "title": {"type": "plain_text", "text": "Found it"}},
            },
        )
        assert updated["ok"] is True
        assert fake_slack.views[view["id"]]["title"]["text"] == "Found it"
        stale = await command(
            layer,
            "team.send",
            {"type": "slack.views_update", "view_id": view["id"], "hash": opened["hash"],
             "view": MODAL},
        )  # fmt: skip
        assert (stale["ok"], stale["error"]) == (False, "hash_conflict")


async def test_an_expired_trigger_id_is_slacks_error_and_the_log_says_why(
    fake_slack: FakeSlack, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, "gateway.slack")
    async with running(slack_config(fake_slack)) as (_, layer):
        await next_event(layer, "slack.connect")
        await fake_slack.send_slash_command("/ticket")
        asked = await next_event(layer, "slack.command")
        fake_slack.triggers[asked["trigger_id"]][0] -= 3.5  # issued 3.5 s ago for Slack
        late = await command(
            layer,
            "team.send",
            {"type": "slack.views_open", "trigger_id": asked["trigger_id"], "view": MODAL},
        )
        assert (late["ok"], late["error"]) == (False, "expired_trigger_id")
        assert "Slack takes a trigger_id for 3 s" in caplog.text
        unknown = await command(
            layer,
            "team.send",
            {"type": "slack.views_open", "trigger_id": "1.2.nothing", "view": MODAL},
        )
        assert (unknown["ok"], unknown["error"]) == (False, "invalid_trigger_id")


async def test_views_are_checked_before_they_leave(fake_slack: FakeSlack) -> None:
    async with running(slack_config(fake_slack)) as (_, layer):
        for bad, error in [
            ({"type": "slack.views_open", "view": MODAL}, "exactly one of 'trigger_id'"),
            (
                {
                    "type": "slack.views_open",
                    "trigger_id": "1.2.3",
                    "view": {**MODAL, "submit": None},
                },
                "'view.submit' is required with an input block",
            ),
            ({"type": "slack.views_publish", "user_id": "U1", "view": MODAL}, "of type 'home'"),
            ({"type": "slack.views_update", "view": MODAL}, "exactly one of 'view_id'"),
        ]:
            result = await command(layer, "team.send", bad)
            assert result["ok"] is False and error in str(result["error"]), (bad, result)
        assert not fake_slack.calls_of("views.open") and not fake_slack.calls_of("views.publish")


async def test_app_home_opened_is_answered_with_a_published_home_tab(
    fake_slack: FakeSlack,
) -> None:
    async with running(slack_config(fake_slack)) as (_, layer):
        await next_event(layer, "slack.connect")
        await fake_slack.send_event(
            {
                "type": "app_home_opened",
                "user": "U0ALICE",
                "channel": "D0ALICE",
                "event_ts": "1515449522000016",
                "tab": "home",
            }
        )
        opened = await next_event(layer, "slack.app_home_opened")
        assert (opened["user"], opened["tab"], opened["view"]) == ("U0ALICE", "home", None)
        published = await command(
            layer,
            opened["reply_channel"],
            {"type": "slack.views_publish", "user_id": opened["user"], "view": HOME},
        )
        assert published["ok"] is True
        assert fake_slack.home_views[("T0TEAM", "U0ALICE")]["blocks"] == HOME["blocks"]


async def test_assistant_threads_and_workflow_steps_are_typed_events(
    fake_slack: FakeSlack,
) -> None:
    async with running(slack_config(fake_slack)) as (gateway, layer):
        await next_event(layer, "slack.connect")
        thread = {
            "user_id": "U0ALICE",
            "context": {"channel_id": "C0GENERAL", "team_id": "T0TEAM", "enterprise_id": None},
            "channel_id": "D0ALICE",
            "thread_ts": "1729999327.187299",
        }
        for kind in ("assistant_thread_started", "assistant_thread_context_changed"):
            await fake_slack.send_event(
                {"type": kind, "assistant_thread": thread, "event_ts": "1715873754.429808"}
            )
            started = await next_event(layer, f"slack.{kind}")
            assert (started["user"], started["channel"], started["thread_ts"]) == (
                "U0ALICE",
                "D0ALICE",
                "1729999327.187299",
            )
            assert started["context"]["channel_id"] == "C0GENERAL"

        step = fake_slack.function_executed("sample_function", {"user_id": "U0ALICE"})
        await fake_slack.send_event(step)
        executed = await next_event(layer, "slack.function_executed")
        assert executed["callback_id"] == "sample_function"
        assert executed["inputs"] == {"user_id": "U0ALICE"}
        assert step["bot_access_token"] not in str(executed)  # a secret: not on the layer
        done = await command(
            layer,
            "team.send",
            {
                "type": "slack.function_complete",
                "function_execution_id": executed["function_execution_id"],
                "outputs": {"user_id": "U0ALICE"},
            },
        )
        assert done["ok"] is True
        call = fake_slack.calls_of("functions.completeSuccess")[0]
        assert call.token == step["bot_access_token"]  # the step's own token
        assert fake_slack.function_outcomes[executed["function_execution_id"]] == (
            "success",
            {"user_id": "U0ALICE"},
        )
        twice = await command(
            layer,
            "team.send",
            {
                "type": "slack.function_fail",
                "function_execution_id": executed["function_execution_id"],
                "error": "too late",
            },
        )
        assert (twice["ok"], twice["error"]) == (False, "execution_not_in_running_state")

        # a step whose event another replica received: the installation's bot token
        other = fake_slack.function_executed("sample_function", {})
        failed = await command(
            layer,
            "team.send",
            {
                "type": "slack.function_fail",
                "function_execution_id": other["function_execution_id"],
                "error": "no such ticket",
            },
        )
        assert failed["ok"] is True
        assert fake_slack.calls_of("functions.completeError")[-1].token == fake_slack.bot_token
        assert fake_slack.function_outcomes[other["function_execution_id"]] == (
            "error",
            "no such ticket",
        )
        assert len(gateway._function_tokens) == 1


async def test_shortcuts_message_actions_and_closed_views_are_typed(
    fake_slack: FakeSlack,
) -> None:
    async with running(slack_config(fake_slack)) as (_, layer):
        await next_event(layer, "slack.connect")
        await fake_slack.send_interactive(fake_slack.shortcut("open_ticket"))
        shortcut = await next_event(layer, "slack.shortcut")
        assert shortcut["callback_id"] == "open_ticket" and shortcut["trigger_id"]
        view_id = fake_slack.open_view({**MODAL, "notify_on_close": True})
        closed = fake_slack._interaction(
            "view_closed",
            "U0ALICE",
            "T0TEAM",
            view={k: v for k, v in fake_slack.views[view_id].items() if k != "user"},
            is_cleared=False,
        )
        await fake_slack.send_interactive(closed)
        event = await next_event(layer, "slack.view_closed")
        assert (event["view_id"], event["is_cleared"], event["callback_id"]) == (
            view_id,
            False,
            "ticket_lookup",
        )
        action = fake_slack._interaction(
            "message_action",
            "U0ALICE",
            "T0TEAM",
            callback_id="file_ticket",
            trigger_id=fake_slack.trigger(),
            channel={"id": "C0GENERAL", "name": "general"},
            message={"type": "message", "user": "U0BOB", "ts": "1700000000.000100", "text": "x"},
            response_url=fake_slack.response_url(),
        )
        await fake_slack.send_interactive(action)
        message_action = await next_event(layer, "slack.message_action")
        assert message_action["message_ts"] == "1700000000.000100"
        assert message_action["channel"] == "C0GENERAL"
        await asyncio.sleep(0)
