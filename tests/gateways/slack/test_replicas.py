"""Two ``gateway-slack`` replicas of one app, each with its own Socket Mode connection, on one
Redis: Slack spreads events over the connections and redelivers on any of them; each event is
published once (the de-dup window in Redis, README "De-duplication") and acknowledged on the
connection it came on."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from core.layers import resolve_layer
from core.testing import WAIT, RedisServer, until
from core.testing.slack import TEAM, FakeSlack, event_callback
from tests.gateways.slack.conftest import gateway_process, slack_config

pytestmark = [pytest.mark.timeout(180), pytest.mark.replicas]


async def send_on(fake: FakeSlack, socket: int, number: int, retry: int = 0) -> str:
    """Event ``number`` (event id ``Ev{number}``) on the ``socket``-th open connection."""
    envelope_id = str(uuid.uuid4())
    event = {"type": "message", "channel": "C0OPS", "user": "U0ALICE", "text": f"m{number}"}
    event["ts"] = f"1700000000.{number:06d}"
    envelope = {
        "envelope_id": envelope_id,
        "type": "events_api",
        "payload": event_callback(event, f"Ev{number}", bot_user=fake.teams[TEAM].bot_user),
        "accepts_response_payload": False,
        "retry_attempt": retry,
        "retry_reason": "timeout" if retry else "",
    }
    fake.pending[envelope_id] = envelope
    await fake.open_sockets[socket].ws.send_json(envelope)
    return envelope_id


async def test_each_event_once_across_two_socket_mode_connections(
    tmp_path: Path, redis_server: RedisServer, fake_slack: FakeSlack
) -> None:
    config = slack_config(fake_slack)
    layer = resolve_layer(redis_server.url)
    texts: Counter[str] = Counter()

    async def read() -> None:
        while True:
            message: dict[str, Any] = await layer.receive("team")
            if message["type"] == "slack.message":
                texts[message["text"]] += 1

    async with (
        gateway_process(tmp_path, config, redis_server.url) as first,
        gateway_process(tmp_path, config, redis_server.url) as second,
    ):
        await fake_slack.wait_for(lambda: len(fake_slack.open_sockets) == 2, what="2 sockets")
        reader = asyncio.create_task(read())
        try:
            sent = [await send_on(fake_slack, n % 2, n) for n in range(20)]
            await fake_slack.wait_for(lambda: set(sent) <= set(fake_slack.acks), what="acks")
            # Slack's redeliveries of the first five, each on the other connection
            again = [await send_on(fake_slack, (n + 1) % 2, n, retry=1) for n in range(5)]
            await fake_slack.wait_for(lambda: set(again) <= set(fake_slack.acks), what="acks")
            last = [await send_on(fake_slack, n % 2, n) for n in (20, 21)]  # after them
            await fake_slack.wait_for(lambda: set(last) <= set(fake_slack.acks), what="acks")
            await until(lambda: texts["m20"] > 0 and texts["m21"] > 0, WAIT, "the last two")
            assert texts == Counter({f"m{n}": 1 for n in range(22)})
            # each replica published its share and dropped the other's redeliveries
            events = [
                p.metric("gateway_events_total", type="slack.message") for p in (first, second)
            ]
            assert sorted(events) == [11, 11], events
            dropped = [
                p.metric("gateway_dropped_total", reason="duplicate") for p in (first, second)
            ]
            assert sum(dropped) == 5 and all(dropped), dropped
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            await layer.close_pools()
