"""The generic consumers (gateways/*/consumers.py) under a real ``manage.py runworker``, answering
real gateways on Redis: what they send is checked on the far side of each transport, and what
they awaited (``wait=True``) is echoed back through it.

The consumers are tests/consumers_site/consumers_site/consumers.py; every process is real (the
IRC server, the broker, the relay and Slack's local stand-in are the usual fixtures).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.policy import default
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from core.layers import resolve_layer
from core.testing import (
    WAIT,
    DjangoWorker,
    GatewayProcess,
    MosquittoServer,
    NgircdServer,
    RedisServer,
    SmtpSink,
    free_port,
    receive,
)
from core.testing.slack import FakeSlack
from gateways.scheduler.consumers import SchedulerCommands
from tests.gateways.irc.conftest import Peer
from tests.gateways.mqtt.conftest import MqttTestClient, publish_properties

pytestmark = pytest.mark.timeout(180)

SITE = Path(__file__).resolve().parents[1] / "consumers_site"


@dataclass
class Site:
    """Gateways on ``redis`` and workers of the test site, all stopped after the test."""

    redis: RedisServer
    directory: Path
    processes: list[Any] = field(default_factory=list)

    async def gateway(self, config: dict[str, Any]) -> GatewayProcess:
        config = {"layer": self.redis.url, "shutdown_grace": 5, **config}
        process = GatewayProcess.from_config(self.directory, config)
        self.processes.append(process)
        return await asyncio.to_thread(process.start)

    def worker(self, *channels: str) -> DjangoWorker:
        env = {
            "GATEWAYS_LAYER": self.redis.url,
            "DJANGO_SETTINGS_MODULE": "consumers_site.settings",
        }
        worker = DjangoWorker(SITE, channels, env).start()
        self.processes.append(worker)
        return worker

    def stop(self) -> list[str]:
        """Stop everything; the output of what did not exit cleanly."""
        problems = []
        for process in reversed(self.processes):
            if process.stop() not in (0, None):
                problems.append(process.tail())
        return problems


@pytest.fixture
def site(redis_server: RedisServer, tmp_path: Path) -> Iterator[Site]:
    running = Site(redis_server, tmp_path)
    try:
        yield running
    finally:
        assert running.stop() == []


async def test_irc_reply_and_results(site: Site, ngircd_server: NgircdServer) -> None:
    port = ngircd_server.port
    irc = {"server": "127.0.0.1", "port": port, "nick": "helper", "channels": ["#lab"]}
    await site.gateway({"gateway": "irc", "name": "irc-bot", "irc": irc})
    site.worker("irc-bot")
    alice = await Peer.connect(port, "alice", "#lab")
    try:
        await alice.send("PRIVMSG #lab :!ping")
        await alice.expect("PRIVMSG #lab :alice: pong", timeout=60)
        await alice.send("PRIVMSG helper :!ping")
        await alice.expect("PRIVMSG alice :alice: pong")
        await alice.send("PRIVMSG #lab :!long")
        await alice.expect("PRIVMSG #lab :that took 2 lines")
        await alice.send("PRIVMSG #lab :!raw")
        refused = await alice.expect("PRIVMSG #lab :refused:")
        assert refused.endswith("irc.raw is disabled (set irc.raw_commands: true to allow it)")
    finally:
        await alice.close()


@pytest.fixture
async def fake_slack() -> AsyncIterator[FakeSlack]:
    fake = await FakeSlack().start()
    try:
        yield fake
    finally:
        await fake.stop()


async def test_slack_reply_react_respond_and_failure(site: Site, fake_slack: FakeSlack) -> None:
    slack = {
        "bot_token": fake_slack.bot_token,
        "app_token": fake_slack.app_token,
        "api_url": fake_slack.api_url,
        "response_url_prefix": fake_slack.hooks_url,
        "pacing": {"rate": 100, "burst": 10},
    }
    await site.gateway({"gateway": "slack", "name": "slack-bot", "slack": slack})
    site.worker("slack-bot")
    asked = "1700000000.000042"
    fake_slack.messages[("C0GENERAL", asked)] = {"type": "message", "user": "U0ALICE"}
    mention = {"type": "app_mention", "user": "U0ALICE", "text": "<@U0BOT> help", "ts": asked}
    await fake_slack.send_event({**mention, "channel": "C0GENERAL", "event_ts": asked})
    posts = await fake_slack.wait_for(lambda: fake_slack.calls_of("chat.postMessage"), 60)
    assert (posts[0].args["text"], posts[0].args["thread_ts"]) == ("on it", asked)
    await fake_slack.wait_for(lambda: fake_slack.reactions, what="the reaction")
    assert fake_slack.reactions == {("C0GENERAL", asked, "eyes")}

    await fake_slack.send_slash_command("/ticket", "42")
    await fake_slack.wait_for(lambda: fake_slack.responses, what="the answer")
    assert fake_slack.responses == [{"text": "ticket 42 is open"}]

    message = {"type": "message", "user": "U0ALICE", "text": "!fail", "ts": "1700000000.5"}
    await fake_slack.send_event({**message, "channel": "C0RANDOM", "channel_type": "channel"})

    def elsewhere() -> list[Any]:
        calls = fake_slack.calls_of("chat.postMessage")
        return [c for c in calls if c.args["channel"] != "C0GENERAL"][1:] and calls

    await fake_slack.wait_for(elsewhere, what="the failure, then its report")
    posts = [c for c in fake_slack.calls_of("chat.postMessage") if c.args["channel"] != "C0GENERAL"]
    assert [(c.args["channel"], c.args["text"]) for c in posts] == [
        ("C0NOWHERE", "lost"),
        ("C0RANDOM", "failed: channel_not_found"),
    ]


async def test_email_reply_awaited_and_auto_reply_left_alone(site: Site) -> None:
    sink = await SmtpSink().start()
    try:
        port = free_port()
        email = {
            "port": port,
            "hostname": "mail.example.com",
            "accept": ["support@example.com"],
            "verify": "off",
            "relay": {
                "host": "127.0.0.1",
                "port": sink.port,
                "tls": "none",
                "from_address": "support@example.com",
            },
        }
        await site.gateway({"gateway": "email", "name": "support", "email": email})
        site.worker("support")
        import aiosmtplib

        out_of_office = (
            b"From: Dave <dave@example.org>\r\nTo: support@example.com\r\n"
            b"Subject: Out of office\r\nMessage-ID: <o1@example.org>\r\n"
            b"Auto-Submitted: auto-replied\r\n\r\nBack on Monday.\r\n"
        )
        await aiosmtplib.send(
            out_of_office,
            sender="dave@example.org",
            recipients=["support@example.com"],
            hostname="127.0.0.1",
            port=port,
        )
        mail = (
            b"From: Carol <carol@example.org>\r\nTo: support@example.com\r\n"
            b"Subject: Printer on fire\r\nMessage-ID: <m1@example.org>\r\n\r\nHelp!\r\n"
        )
        await aiosmtplib.send(
            mail,
            sender="carol@example.org",
            recipients=["support@example.com"],
            hostname="127.0.0.1",
            port=port,
        )
        reply = await asyncio.wait_for(sink.received.get(), 60)
        audit = await asyncio.wait_for(sink.received.get(), WAIT)
    finally:
        await sink.stop()
    answer = message_from_bytes(reply.original_content)
    assert reply.rcpt_tos == ["carol@example.org"]
    assert (answer["Subject"], answer["In-Reply-To"]) == ("Re: Printer on fire", "<m1@example.org>")
    assert audit.rcpt_tos == ["audit@example.com"]
    body = message_from_bytes(audit.original_content, policy=default)
    assert body.get_content().strip() == f"<m1@example.org> answered as {answer['Message-ID']}"
    assert sink.received.empty()  # the out-of-office mail got no answer


async def test_mqtt_request_answered_with_its_correlation_data(
    site: Site, mosquitto_server: MosquittoServer
) -> None:
    mqtt = {
        "host": "127.0.0.1",
        "port": mosquitto_server.port,
        "client_id": "helpers-test",
        "subscriptions": [{"topic": "bot/ask", "qos": 1, "payload": "json"}],
    }
    await site.gateway({"gateway": "mqtt", "name": "mqtt-bot", "mqtt": mqtt})
    site.worker("mqtt-bot")
    client = MqttTestClient(mosquitto_server.port)
    try:
        client.subscribe("bot/#")
        ask = publish_properties(ResponseTopic="bot/answer", CorrelationData=b"req-1")
        await asyncio.to_thread(client.publish, "bot/ask", b'{"q": 1}', 1, False, ask)
        seen: dict[str, Any] = {}
        while "bot/answer" not in seen:
            message = await client.anext(60)
            seen[message.topic] = message
    finally:
        client.close()
    answer = seen["bot/answer"]
    assert answer.properties.CorrelationData == b"req-1"
    body = json.loads(answer.payload)
    assert body["answer"] == 42 and isinstance(body["log_mid"], int)
    assert seen["bot/log"].payload == b"asked on bot/ask"  # published, acknowledged, then answered


async def test_scheduler_later_awaited_and_fired(site: Site) -> None:
    await site.gateway({"gateway": "scheduler", "name": "timers", "scheduler": {"tick": 0.3}})
    site.worker("timer-bot")
    layer = resolve_layer(site.redis.url)
    try:
        timers = SchedulerCommands(layer, "timers.send")
        kick = await timers.add("kick", in_=0.1, channel="timer-bot", wait=True)
        assert kick is not None and kick["created"] is True
        first = await receive(layer, "timer-report", timeout=60)
        assert first["created"] is True and isinstance(first["next_fire"], float)
        fired = await receive(layer, "timer-report")
        assert fired["fired"].startswith("later.kick@")
    finally:
        await layer.close_pools()


async def test_websocket_groups_broadcast_and_http(site: Site) -> None:
    port = free_port()
    http_ws = {
        "port": port,
        "websocket": [{"path": "/chat", "channel": "chat"}],
        "http": [{"path": "/page/*", "channel": "chat"}],
    }
    await site.gateway({"gateway": "http_ws", "name": "web", "http_ws": http_ws})
    site.worker("chat")
    url = f"ws://127.0.0.1:{port}/chat"
    async with websockets.connect(url, open_timeout=60) as ann, websockets.connect(url) as bob:
        await ann.send("hello all")
        assert await asyncio.wait_for(bob.recv(), WAIT) == "hello all"
        assert await asyncio.wait_for(ann.recv(), WAIT) == "hello all"
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/page/1", timeout=WAIT)
    assert (response.status_code, response.text) == (200, "you asked for /page/1")
    assert response.headers["x-site"] == "yes"
