"""The helpdesk (examples/helpdesk/) the many-process way, as its README's terminals block says.

Every command of the block runs as written, from examples/helpdesk: ``manage.py migrate``, the
six gateways, each its own process, and two ``manage.py runworker`` on every channel, on a real
Redis, with ngircd, mosquitto, the Slack stand-in and a relay as the far sides. Then the story:
a mail sent with smtplib opens a ticket, announced in ``#support`` and in Slack, and the sender
gets its number back; both chats look it up (``!ticket 1``, ``/ticket 1``); a reading over the
threshold published to the broker opens a second one and an alert, and ``!close 2`` on IRC
closes it; ``gateways schedules trigger scheduler.yaml digest`` (the README's way to try the
scheduler) mails the digest of the one left open; the live page's WebSocket has had every
step.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import smtplib
import subprocess
import sys
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from core.testing import (
    READY_LINE,
    WAIT,
    MosquittoServer,
    NgircdServer,
    RedisServer,
    Server,
    SmtpSink,
    free_port,
)
from core.testing.slack import FakeSlack
from tests.gateways.irc.conftest import Peer
from tests.gateways.mqtt.conftest import MqttTestClient
from tests.support.example import EXAMPLES

pytestmark = pytest.mark.timeout(240)

HELPDESK = EXAMPLES / "helpdesk"
BLOCK = re.compile(r"<!-- helpdesk: terminals -->\s*```sh\n(?P<body>.*?)```", re.DOTALL)
CHANNELS = "helpdesk-mail helpdesk-irc helpdesk-slack helpdesk-sensors helpdesk-web helpdesk-timers"
SHOW_ROUTES = (
    "from helpdesk.asgi import application; "
    "print(*application.application_mapping['channel'].application_mapping)"
)


def terminals() -> list[list[str]]:
    found = BLOCK.search((HELPDESK / "README.md").read_text(encoding="utf-8"))
    assert found, "examples/helpdesk/README.md lost its terminals block"
    return [shlex.split(line) for line in found["body"].splitlines() if line.strip()]


def test_the_block_runs_every_gateway_and_two_workers() -> None:
    commands = terminals()
    assert commands[0] == ["export", "GATEWAYS_LAYER=redis://localhost:6379/0"]
    assert commands[1] == ["python", "manage.py", "migrate"]
    gateways = {c[0]: c[2] for c in commands if c[0].startswith("gateway-")}
    assert gateways == {
        "gateway-email": "email.yaml",
        "gateway-irc": "irc.yaml",
        "gateway-slack": "slack.yaml",
        "gateway-mqtt": "mqtt.yaml",
        "gateway-http-ws": "web.yaml",
        "gateway-scheduler": "scheduler.yaml",
    }
    workers = [c for c in commands if c[:3] == ["python", "manage.py", "runworker"]]
    assert [w[3:] for w in workers] == [CHANNELS.split()] * 2
    # and they are the channels helpdesk/asgi.py routes
    routed = subprocess.run(
        [sys.executable, "-c", SHOW_ROUTES],
        cwd=HELPDESK,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "helpdesk.settings"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert sorted(routed.stdout.split()) == sorted(CHANNELS.split())


@pytest.fixture
async def fake_slack() -> AsyncIterator[FakeSlack]:
    fake = await FakeSlack().start()
    try:
        yield fake
    finally:
        await fake.stop()


def executable(argv: list[str]) -> list[str]:
    """``python`` is this interpreter; ``gateway-*``, ``gateways`` the venv's scripts beside it."""
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    return [str(Path(sys.executable).parent / argv[0]), *argv[1:]]


async def test_the_story_through_one_process_per_gateway_and_two_workers(
    tmp_path: Path,
    redis_server: RedisServer,
    ngircd_server: NgircdServer,
    mosquitto_server: MosquittoServer,
    fake_slack: FakeSlack,
) -> None:
    sink = await SmtpSink().start()
    smtp_port, web_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DJANGO_SETTINGS_MODULE")}
    env.update(
        GATEWAYS_LAYER=redis_server.url,  # the block's export, on this test's Redis
        HELPDESK_DB=str(tmp_path / "helpdesk.sqlite3"),
        ATTACHMENT_STORE=str(tmp_path / "attachments"),
        MAIL_VERIFY="off",
        SMTP_PORT=str(smtp_port),
        RELAY_PORT=str(sink.port),
        IRC_PORT=str(ngircd_server.port),
        MQTT_PORT=str(mosquitto_server.port),
        WEB_PORT=str(web_port),
        SLACK_BOT_TOKEN=fake_slack.bot_token,
        SLACK_APP_TOKEN=fake_slack.app_token,
        SLACK_API_URL=fake_slack.api_url,
        SLACK_RESPONSE_URL_PREFIX=fake_slack.hooks_url,
        PYTHONUNBUFFERED="1",
    )
    commands = terminals()
    migrate = executable(commands[1])
    await asyncio.to_thread(subprocess.run, migrate, cwd=HELPDESK, env=env, check=True, timeout=120)
    servers: list[Server] = []
    alice = await Peer.connect(ngircd_server.port, "alice", "#support")
    try:
        for argv in commands[2:]:
            ready = READY_LINE if argv[0].startswith("gateway-") else None
            run_env = {**env, "HEALTH_PORT": str(free_port())}
            server = await asyncio.to_thread(
                Server, executable(argv), ready, WAIT, cwd=HELPDESK, env=run_env, name=argv[0]
            )
            servers.append(server)

        mail = EmailMessage()
        mail["From"] = "Alice <alice@example.org>"
        mail["To"] = "support@example.com"
        mail["Subject"] = "My printer is on fire"
        mail["Message-ID"] = "<helpdesk-1@example.org>"
        mail.set_content("Smoke on the second floor.\n")

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as client:
                client.send_message(mail)

        await asyncio.to_thread(send)
        try:  # the workers may still be starting: the mail waits for them in Redis
            announced = await alice.expect("PRIVMSG #support :New ticket #1:", timeout=90)
            posted = await fake_slack.wait_for(
                lambda: fake_slack.calls_of("chat.postMessage"), 30, "the Slack announcement"
            )
            reply: Any = await asyncio.wait_for(sink.received.get(), 30)
        except TimeoutError:
            tails = "\n".join(f"--- {s.name}\n{s.tail()}" for s in servers)
            pytest.fail(f"the story stopped\n{tails}")
        assert announced.endswith("My printer is on fire (from Alice <alice@example.org>)")
        assert posted[0].args["channel"] == "C0GENERAL"
        assert posted[0].args["text"].startswith("New ticket #1: My printer is on fire")
        assert reply.rcpt_tos == ["alice@example.org"]
        content = reply.original_content.decode()
        assert "Subject: Re: My printer is on fire" in content
        assert "In-Reply-To: <helpdesk-1@example.org>" in content
        assert "ticket #1." in content

        # whichever worker takes them, both read the same database
        await alice.send("PRIVMSG #support :!ticket 1")
        answer = await alice.expect("PRIVMSG #support :alice: #1", timeout=30)
        assert "'My printer is on fire' (open, from Alice <alice@example.org>)" in answer
        await fake_slack.send_slash_command("/ticket", "1")
        responses = await fake_slack.wait_for(lambda: fake_slack.responses, 30, "/ticket 1")
        assert responses[0]["text"].startswith("#1 'My printer is on fire' (open")

        device = await asyncio.to_thread(MqttTestClient, mosquitto_server.port)
        try:
            await asyncio.to_thread(device.subscribe, "alerts/#")
            await asyncio.to_thread(device.publish, "sensors/server-room/temperature", b"41.5")
            alert = await device.anext(30)
        finally:
            device.close()
        assert alert.topic == "alerts/server-room/temperature"
        assert json.loads(alert.payload) == {"ticket": 2, "value": 41.5, "threshold": 30.0}
        await alice.expect("PRIVMSG #support :New ticket #2: server-room temperature at 41.5")
        await alice.send("PRIVMSG #support :!close 2")
        await alice.expect("PRIVMSG #support :alice: ticket #2 closed", timeout=30)

        trigger = executable(["gateways", "schedules", "trigger", "scheduler.yaml", "digest"])
        await asyncio.to_thread(
            subprocess.run, trigger, cwd=HELPDESK, env=env, check=True, timeout=60
        )
        digest: Any = await asyncio.wait_for(sink.received.get(), 30)
        assert digest.rcpt_tos == ["team@example.com"]
        assert "Subject: Helpdesk digest: 1 open ticket(s)" in digest.original_content.decode()

        # a page opened now gets every step so far
        import websockets

        async with websockets.connect(f"ws://127.0.0.1:{web_port}/live") as page:
            lines: list[str] = []
            while not any("digest to team@example.com sent" in line for line in lines):
                frame = json.loads(await asyncio.wait_for(page.recv(), 30))
                lines.append(f"{frame['source']}: {frame['summary']}")
        for step in (
            "mail: ticket #1 opened: My printer is on fire",
            "irc: ticket #1 announced in #support",
            "slack: ticket #1 announced in C0GENERAL",
            "mail: reply to Alice <alice@example.org> for ticket #1 sent",
            "mqtt: sensors/server-room/temperature = 41.5",
            "sensor: ticket #2 opened: server-room temperature at 41.5 (over 30)",
            "irc: alice closed ticket #2",
            "scheduler: digest: 1 open ticket(s)",
        ):
            assert step in lines, lines
    finally:
        await alice.close()
        codes = [await asyncio.to_thread(server.stop) for server in reversed(servers)]
        await sink.stop()
    assert codes == [0] * len(servers), "\n".join(s.tail() for s in servers)
