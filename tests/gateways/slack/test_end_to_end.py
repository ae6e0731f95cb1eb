"""End to end: Slack (the local stand-in) → gateway-slack → Redis → manage.py runworker (the
example team app, reading the database) → slack.send / slack.respond → Slack. Every process is
real; the gateway knows Slack only by its base URL."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from core.testing import RedisServer, example_project
from core.testing.slack import FakeSlack

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
