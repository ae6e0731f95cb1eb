"""Answers inside the acknowledgement (issue 26, item 1): a consumer's ``slack.ack`` on the
event's ``ack_channel`` becomes the Socket Mode ack's ``payload`` / the HTTP 200's JSON body,
within ``slack.answers.timeout``; late, invalid or missing answers give an empty ack, logged
and counted, and Slack never has to retry."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from core.layers import resolve_layer
from core.testing import RedisServer, free_port, metric
from core.testing.slack import EventsApiClient, FakeSlack
from gateways.slack.consumers import slack_ack
from tests.gateways.slack.conftest import SECRET, next_event, running, slack_config

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
VALUES = {"ticket": {"number": {"type": "plain_text_input", "value": "forty-two"}}}
ERRORS = {"response_action": "errors", "errors": {"ticket": "Type a ticket number such as 42"}}
OPTIONS = [{"text": {"type": "plain_text", "text": "#42 Printer on fire"}, "value": "42"}]


def answers(outcome: str) -> float:
    return metric("gateway_slack_answers_total", gateway="team", outcome=outcome)


async def answer(layer: Any, type_: str, delay: float = 0.0, **keys: Any) -> dict[str, Any]:
    """The consumer: the next ``type_`` event, answered on its ack_channel after ``delay``."""
    event = await next_event(layer, type_)
    assert isinstance(event["ack_channel"], str)
    await asyncio.sleep(delay)
    await layer.send(event["ack_channel"], slack_ack(**keys))
    return event


async def test_a_submission_is_answered_with_field_errors_inside_the_ack(
    fake_slack: FakeSlack,
) -> None:
    async with running(slack_config(fake_slack)) as (_, layer):
        await next_event(layer, "slack.connect")
        before = answers("answered")
        consumer = asyncio.create_task(
            answer(layer, "slack.view_submission", errors=ERRORS["errors"])
        )
        view_id = fake_slack.open_view(MODAL)
        submitted = await fake_slack.send_interactive(fake_slack.view_submission(view_id, VALUES))
        event = await consumer
        await fake_slack.wait_ack(submitted)
        assert fake_slack.ack_payloads[submitted] == ERRORS
        assert event["values"] == VALUES and event["view_id"] == view_id
        assert event["callback_id"] == "ticket_lookup" and event["team"] == "T0TEAM"
        assert answers("answered") == before + 1


async def test_an_external_select_is_served_options_inside_the_ack(fake_slack: FakeSlack) -> None:
    async with running(slack_config(fake_slack)) as (_, layer):
        await next_event(layer, "slack.connect")
        consumer = asyncio.create_task(answer(layer, "slack.options", options=OPTIONS))
        asked = await fake_slack.send_interactive(fake_slack.block_suggestion("subject", "print"))
        event = await consumer
        await fake_slack.wait_ack(asked)
        assert fake_slack.ack_payloads[asked] == {"options": OPTIONS}
        assert (event["action_id"], event["value"]) == ("subject", "print")


async def test_a_slash_command_is_answered_at_once_when_it_waits_for_one(
    fake_slack: FakeSlack,
) -> None:
    config = slack_config(fake_slack, answers={"wait_for": ["slack.command"]})
    async with running(config) as (_, layer):
        await next_event(layer, "slack.connect")
        consumer = asyncio.create_task(
            answer(layer, "slack.command", text="Ticket #42 is open", response_type="in_channel")
        )
        asked = await fake_slack.send_slash_command("/ticket", "42")
        await consumer
        await fake_slack.wait_ack(asked)
        assert fake_slack.ack_payloads[asked] == {
            "text": "Ticket #42 is open",
            "response_type": "in_channel",
        }


async def test_no_answer_in_time_is_an_empty_ack_and_a_late_one_is_swept(
    fake_slack: FakeSlack, caplog: pytest.LogCaptureFixture
) -> None:
    config = slack_config(fake_slack, answers={"timeout": 0.3})
    async with running(config) as (gateway, layer):
        await next_event(layer, "slack.connect")
        timeouts, late = answers("timeout"), answers("late")
        view_id = fake_slack.open_view(MODAL)
        submitted = await fake_slack.send_interactive(fake_slack.view_submission(view_id, VALUES))
        event = await next_event(layer, "slack.view_submission")
        await fake_slack.wait_ack(submitted)
        assert fake_slack.ack_payloads[submitted] is None
        assert answers("timeout") == timeouts + 1
        assert f"no slack.ack for slack.view_submission {event['id']}" in caplog.text
        # the consumer answers after all: nobody waits any more, the sweep counts and drops it
        await layer.send(event["ack_channel"], slack_ack(errors={"ticket": "late"}))
        assert gateway.answers.sweep() == 1
        assert answers("late") == late + 1
        assert fake_slack.acks.count(submitted) == 1


async def test_an_invalid_answer_is_refused_and_the_ack_is_empty(fake_slack: FakeSlack) -> None:
    async with running(slack_config(fake_slack)) as (_, layer):
        await next_event(layer, "slack.connect")
        invalid = answers("invalid")
        view_id = fake_slack.open_view(MODAL)
        submitted = await fake_slack.send_interactive(fake_slack.view_submission(view_id, VALUES))
        event = await next_event(layer, "slack.view_submission")
        # options answer a slack.options, not a submission: a result channel hears why
        await layer.send(
            event["ack_channel"],
            {"type": "slack.ack", "options": OPTIONS, "id": "a1", "result_channel": "results"},
        )
        await fake_slack.wait_ack(submitted)
        assert fake_slack.ack_payloads[submitted] is None
        result = await asyncio.wait_for(layer.receive("results"), 10)
        assert result["ok"] is False and result["id"] == "a1"
        assert "a slack.view_submission is answered with" in result["error"]
        assert answers("invalid") == invalid + 1


async def test_an_empty_answer_acknowledges_at_once(fake_slack: FakeSlack) -> None:
    config = slack_config(fake_slack, answers={"timeout": 2.9})
    async with running(config) as (_, layer):
        await next_event(layer, "slack.connect")
        empty = answers("empty")
        view_id = fake_slack.open_view(MODAL)
        submitted = await fake_slack.send_interactive(fake_slack.view_submission(view_id, VALUES))
        event = await next_event(layer, "slack.view_submission")
        await layer.send(event["ack_channel"], slack_ack(id="e1", result_channel="results"))
        result = await asyncio.wait_for(layer.receive("results"), 10)
        assert result == {"type": "slack.result", "id": "e1", "ok": True, "error": None}
        await fake_slack.wait_ack(submitted)
        assert fake_slack.ack_payloads[submitted] is None and answers("empty") == empty + 1


async def test_a_redelivery_while_the_answer_is_awaited_is_published_once(
    fake_slack: FakeSlack,
) -> None:
    config = slack_config(fake_slack, answers={"timeout": 2.9})
    async with running(config) as (_, layer):
        await next_event(layer, "slack.connect")
        view_id = fake_slack.open_view(MODAL)
        submitted = await fake_slack.send_interactive(fake_slack.view_submission(view_id, VALUES))
        event = await next_event(layer, "slack.view_submission")
        await fake_slack.redeliver()  # Slack sends the envelope again meanwhile
        await fake_slack.wait_for(
            lambda: fake_slack.pending[submitted]["retry_attempt"] == 1, what="the redelivery"
        )
        await asyncio.sleep(0.2)  # the redelivery reaches the gateway and follows the first
        await layer.send(event["ack_channel"], slack_ack(errors=ERRORS["errors"]))
        await fake_slack.wait_for(lambda: fake_slack.acks.count(submitted) == 2, what="2 acks")
        assert [p for e, p in fake_slack.acked_with if e == submitted] == [ERRORS, ERRORS]
        # published once: the next event on the channel is a marker sent now
        marker = await fake_slack.send_interactive(fake_slack.shortcut("marker"))
        assert (await next_event(layer, "slack.shortcut"))["callback_id"] == "marker"
        await fake_slack.wait_ack(marker)


async def test_an_envelope_that_takes_no_answer_has_no_ack_channel(
    fake_slack: FakeSlack,
) -> None:
    config = slack_config(fake_slack, answers={"timeout": 2.9})
    async with running(config) as (_, layer):
        await next_event(layer, "slack.connect")
        view_id = fake_slack.open_view(MODAL)
        payload = fake_slack.view_submission(view_id, VALUES)
        submitted = await fake_slack.send_interactive(payload, accepts_response_payload=False)
        event = await next_event(layer, "slack.view_submission")
        assert event["ack_channel"] is None
        await fake_slack.wait_ack(submitted, timeout=2)  # at once, not after answers.timeout


async def test_more_waiting_than_max_waiting_are_acked_without_an_answer(
    fake_slack: FakeSlack,
) -> None:
    config = slack_config(fake_slack, answers={"timeout": 2.9, "max_waiting": 1})
    async with running(config) as (_, layer):
        await next_event(layer, "slack.connect")
        skipped = answers("skipped")
        view_id = fake_slack.open_view(MODAL)
        first = await fake_slack.send_interactive(fake_slack.view_submission(view_id, VALUES))
        waiting = await next_event(layer, "slack.view_submission")
        second = await fake_slack.send_interactive(fake_slack.view_submission(view_id, VALUES))
        assert (await next_event(layer, "slack.view_submission"))["ack_channel"] is None
        await fake_slack.wait_ack(second, timeout=2)
        assert answers("skipped") == skipped + 1
        await layer.send(waiting["ack_channel"], slack_ack(errors=ERRORS["errors"]))
        await fake_slack.wait_ack(first)
        assert fake_slack.ack_payloads[first] == ERRORS


async def test_over_http_the_answer_is_the_json_body(fake_slack: FakeSlack) -> None:
    port = free_port()
    config = slack_config(
        fake_slack, transport="events_api", app_token=None, events_api={"port": port}
    )
    events = EventsApiClient(f"http://127.0.0.1:{port}/slack/events", SECRET)
    try:
        async with running(config) as (_, layer):
            view_id = fake_slack.open_view(MODAL)
            consumer = asyncio.create_task(
                answer(layer, "slack.view_submission", errors=ERRORS["errors"])
            )
            status, body = await events.interactive(fake_slack.view_submission(view_id, VALUES))
            await consumer
            assert (status, json.loads(body)) == (200, ERRORS)
            consumer = asyncio.create_task(answer(layer, "slack.options", options=OPTIONS))
            status, body = await events.interactive(fake_slack.block_suggestion("subject", "p"))
            await consumer
            assert (status, json.loads(body)) == (200, {"options": OPTIONS})
            # an event that waits for nothing: a plain 200
            assert await events.interactive(fake_slack.shortcut("open")) == (200, "")
    finally:
        await events.close()


async def test_answers_travel_through_the_redis_streams_layer(
    redis_server: RedisServer, fake_slack: FakeSlack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    layer = resolve_layer(redis_server.url)
    async with running(slack_config(fake_slack), layer) as (_, layer):
        await next_event(layer, "slack.connect")
        consumer_layer = resolve_layer(redis_server.url)  # the worker is another process
        try:
            consumer = asyncio.create_task(
                answer(consumer_layer, "slack.view_submission", errors=ERRORS["errors"])
            )
            view_id = fake_slack.open_view(MODAL)
            payload = fake_slack.view_submission(view_id, VALUES)
            submitted = await fake_slack.send_interactive(payload)
            await consumer
            await fake_slack.wait_ack(submitted)
            assert fake_slack.ack_payloads[submitted] == ERRORS
        finally:
            await consumer_layer.close_pools()
