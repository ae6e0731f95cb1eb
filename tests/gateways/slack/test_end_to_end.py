"""End to end: Slack (the local stand-in) → gateway-slack → Redis → manage.py runworker (the
example team app, reading the database) → slack.send / slack.respond → Slack. Every process is
real; the gateway knows Slack only by its base URL."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, CookieJar

from core.testing import RedisServer, free_port
from core.testing.slack import EventsApiClient, FakeSlack, SlackCall
from tests.gateways.slack.conftest import SECRET, gateway_process
from tests.support.example import ExampleProject, example_project

JOINED_EVENT = {
    "type": "member_joined_channel",
    "user": "U0ALICE",
    "channel": "C0GENERAL",
    "channel_type": "C",
    "event_ts": "1700000000.000200",
}


def _slack_env(fake_slack: FakeSlack) -> dict[str, str]:
    return {
        "SLACK_BOT_TOKEN": fake_slack.bot_token,
        "SLACK_APP_TOKEN": fake_slack.app_token,
        "SLACK_API_URL": fake_slack.api_url,
        "SLACK_RESPONSE_URL_PREFIX": fake_slack.hooks_url,
    }


def _ticket(project: ExampleProject, number: int, subject: str) -> None:
    project.execute(
        "INSERT INTO mail_mail (id, event_id, message_id, mail_from, subject, text, "
        "attachment_count, received_at, reply_message_id, reply_error, kind, dmarc) VALUES "
        f"({number}, 'e{number}', '<m{number}@x>', 'carol@example.org', ?, '', 0, "
        "'2026-01-01 00:00:00', '', '', 'normal', '')",
        subject,
    )


async def _welcomed(fake_slack: FakeSlack, user: str, *, send: bool = True) -> SlackCall:
    """The welcome the example app posts for ``user`` (a join sent first with ``send``)."""
    if send:
        await fake_slack.send_event({**JOINED_EVENT, "user": user})

    def welcome() -> list[SlackCall]:
        return [
            c
            for c in fake_slack.calls_of("chat.postMessage")
            if str(c.args.get("text", "")).startswith(f"Welcome <@{user}>!")
        ]

    found: list[SlackCall] = await fake_slack.wait_for(welcome, 60, f"the welcome of {user}")
    return found[0]


pytestmark = pytest.mark.timeout(180)


async def test_welcome_and_ticket_command(
    tmp_path: Path, redis_server: RedisServer, fake_slack: FakeSlack
) -> None:
    slack = {
        "SLACK_BOT_TOKEN": fake_slack.bot_token,
        "SLACK_APP_TOKEN": fake_slack.app_token,
        "SLACK_API_URL": fake_slack.api_url,
        "SLACK_RESPONSE_URL_PREFIX": fake_slack.hooks_url,
    }
    project = await asyncio.to_thread(example_project, tmp_path, redis_server.url, env=slack)
    project.execute(
        "INSERT INTO mail_mail (id, event_id, message_id, mail_from, subject, text, "
        "attachment_count, received_at, reply_message_id, reply_error, kind, dmarc) VALUES "
        "(42, 'e42', '<m42@x>', 'carol@example.org', 'Printer on fire', '', 0, "
        "'2026-01-01 00:00:00', '', '', 'normal', '')"
    )
    gateway = await asyncio.to_thread(project.gateway("slack.yaml").start)
    worker = project.worker("team-slack")
    try:
        joined = await fake_slack.send_event(
            {
                "type": "member_joined_channel",
                "user": "U0ALICE",
                "channel": "C0GENERAL",
                "channel_type": "C",
                "team": "T0TEAM",
                "event_ts": "1700000000.000200",
            }
        )
        await fake_slack.wait_ack(joined)
        posts = await fake_slack.wait_for(
            lambda: fake_slack.calls_of("chat.postMessage"), 60, "the welcome"
        )
        assert posts[0].args["channel"] == "C0GENERAL"
        assert posts[0].args["text"].startswith("Welcome <@U0ALICE>!")
        assert posts[0].token == fake_slack.bot_token

        asked = await fake_slack.send_slash_command("/ticket", "42")
        await fake_slack.wait_ack(asked)
        await fake_slack.wait_for(lambda: fake_slack.responses, 60, "the answer")
        assert fake_slack.responses == [
            {
                "response_type": "ephemeral",
                "text": "#42 'Printer on fire' from carol@example.org (open)",
            }
        ]
    finally:
        await asyncio.to_thread(worker.stop)
        code = await asyncio.to_thread(gateway.stop)
    assert code == 0, gateway.tail()
    assert fake_slack.bot_token not in gateway.tail()
    assert fake_slack.app_token not in gateway.tail()


def _values(number: str | None = None, picked: str | None = None) -> dict[str, Any]:
    """The modal's state.values as Slack sends them on submission."""
    option = {"text": {"type": "plain_text", "text": f"#{picked}"}, "value": picked}
    return {
        "ticket": {"number": {"type": "plain_text_input", "value": number}},
        "search": {"subject": {"type": "external_select", "selected_option": picked and option}},
    }


async def test_the_ticket_modal_its_search_and_the_home_tab(
    tmp_path: Path, redis_server: RedisServer, fake_slack: FakeSlack
) -> None:
    """Issue 26: a modal opened from a slash command, an external select served options, a
    submission answered with field errors inside the acknowledgement, an App Home published on
    app_home_opened; by the example app under a real runworker."""
    project = await asyncio.to_thread(
        example_project, tmp_path, redis_server.url, env=_slack_env(fake_slack)
    )
    _ticket(project, 42, "Printer on fire")
    gateway = await asyncio.to_thread(project.gateway("slack.yaml").start)
    worker = project.worker("team-slack")
    try:
        await _welcomed(fake_slack, "U0ALICE")  # the worker takes events now

        asked = await fake_slack.send_slash_command("/ticket")
        await fake_slack.wait_ack(asked)
        opened = await fake_slack.wait_for(lambda: fake_slack.calls_of("views.open"), 60)
        (view_id,) = fake_slack.views
        assert fake_slack.views[view_id]["callback_id"] == "ticket_lookup"
        assert fake_slack.triggers[opened[0].args["trigger_id"]][3] is True  # exchanged

        search = fake_slack.block_suggestion(
            "subject", "printer", block_id="search", view_id=view_id
        )
        searched = await fake_slack.send_interactive(search)
        await fake_slack.wait_ack(searched, 60)
        assert fake_slack.ack_payloads[searched] == {
            "options": [
                {"text": {"type": "plain_text", "text": "#42 Printer on fire"}, "value": "42"}
            ]
        }

        bad = await fake_slack.send_interactive(
            fake_slack.view_submission(view_id, _values("forty-two"))
        )
        await fake_slack.wait_ack(bad, 60)
        assert fake_slack.ack_payloads[bad] == {
            "response_action": "errors",
            "errors": {"ticket": "Type a ticket number such as 42"},
        }
        good = await fake_slack.send_interactive(
            fake_slack.view_submission(view_id, _values(picked="42"))
        )
        await fake_slack.wait_ack(good, 60)
        shown = fake_slack.ack_payloads[good]
        assert shown is not None and shown["response_action"] == "update"
        assert shown["view"]["title"]["text"] == "Ticket #42"

        await fake_slack.send_event(
            {
                "type": "app_home_opened",
                "user": "U0ALICE",
                "channel": "D0ALICE",
                "tab": "home",
                "event_ts": "1515449522000016",
            }
        )
        home = await fake_slack.wait_for(
            lambda: fake_slack.home_views.get(("T0TEAM", "U0ALICE")), 60, "the home tab"
        )
        assert "1 open ticket*" in json.dumps(home["blocks"])
        assert "Printer on fire" in json.dumps(home["blocks"])
        assert gateway.metric("gateway_slack_answers_total", outcome="answered") == 3
        assert gateway.metric("gateway_slack_answers_total", outcome="timeout") == 0
    finally:
        await asyncio.to_thread(worker.stop)
        code = await asyncio.to_thread(gateway.stop)
    assert code == 0, gateway.tail()


async def test_two_workspaces_through_the_oauth_redirect_with_token_rotation(
    tmp_path: Path, redis_server: RedisServer, fake_slack: FakeSlack
) -> None:
    """Issue 26: an app installed in two workspaces through the OAuth redirect, both receiving
    events and their commands routed to the right token; a rotated token refreshed before it
    expired; the example app under a real runworker, the gateway a real process."""
    one, two = fake_slack.add_team("T0ONE", "One"), fake_slack.add_team("T0TWO", "Two")
    fake_slack.rotation = 8.0  # tokens expire 8 s after they are issued
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = {
        "gateway": "slack",
        "name": "team-slack",
        "slack": {
            "transport": "events_api",
            "signing_secret": SECRET,
            "events_api": {"port": port},
            "api_url": fake_slack.api_url,
            "response_url_prefix": fake_slack.hooks_url,
            "pacing": {"rate": 100, "burst": 10},
            "oauth": {
                "client_id": fake_slack.client_id,
                "client_secret": fake_slack.client_secret,
                "scopes": ["chat:write", "commands", "channels:read"],
                "authorize_url": fake_slack.authorize_url,
                "redirect_uri": f"{base}/slack/oauth_redirect",
                "refresh_before": 6,
            },
        },
    }
    project = await asyncio.to_thread(example_project, tmp_path, redis_server.url)
    _ticket(project, 42, "Printer on fire")
    events = EventsApiClient(f"{base}/slack/events", SECRET)
    async with gateway_process(tmp_path, config, redis_server.url) as gateway:
        worker = project.worker("team-slack")
        try:
            for team in (one, two):
                fake_slack.install_into(team.id)
                async with (
                    ClientSession(cookie_jar=CookieJar(unsafe=True)) as browser,
                    browser.get(f"{base}/slack/install") as page,
                ):
                    assert page.status == 200, await page.text()
            for team in (one, two):
                joined = {**JOINED_EVENT, "user": f"U0NEW{team.id}"}
                status, _ = await events.event(joined, team=team.id, bot_user=team.bot_user)
                assert status == 200
                post = await _welcomed(fake_slack, f"U0NEW{team.id}", send=False)
                assert (post.team, post.token) == (team.id, fake_slack.tokens_of(team.id)[-1])

            form = fake_slack.slash_command("/ticket", "42", team=two.id)
            assert (await events.slash_command(form))[0] == 200
            await fake_slack.wait_for(lambda: fake_slack.responses, 60, "the answer")
            assert "Printer on fire" in fake_slack.responses[-1]["text"]

            # token rotation: the first token of One is renewed before it expires, and after
            # it expired One's events are still answered, with the new token
            first = fake_slack.tokens_of(one.id)[0]
            expires = fake_slack.tokens[first].expires_at
            assert expires is not None
            await fake_slack.wait_for(
                lambda: [c for c in fake_slack.calls_of("oauth.v2.access") if c.args.get(
                    "grant_type") == "refresh_token"],
                30,
                "a refresh",
            )  # fmt: skip
            assert time.time() < expires
            await asyncio.sleep(max(0.0, expires - time.time() + 0.5))
            joined = {**JOINED_EVENT, "user": "U0LATE"}
            assert (await events.event(joined, team=one.id, bot_user=one.bot_user))[0] == 200
            post = await _welcomed(fake_slack, "U0LATE", send=False)
            assert post.team == one.id and post.token != first
            assert post.token in fake_slack.tokens_of(one.id)
            assert gateway.metric("gateway_slack_token_refreshes_total", outcome="failed") == 0
        finally:
            await events.close()
            await asyncio.to_thread(worker.stop)
    for team in (one, two):
        for token in fake_slack.tokens_of(team.id):
            assert token not in gateway.tail()
    assert fake_slack.client_secret not in gateway.tail()
