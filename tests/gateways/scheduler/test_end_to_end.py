"""End to end: examples/scheduler.yaml under ``gateway-scheduler`` → Redis → ``manage.py
runworker timers`` (TimerConsumer) records each fire; the consumer's ``scheduler.add`` on the
fire's reply_channel comes back to it as a one-shot; the heartbeat reaches the MQTT gateway's
command channel as the mqtt.publish the YAML wrote. Every process is real."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from pathlib import Path

import pytest

from core.layers import resolve_layer
from core.testing import RedisServer, until
from tests.support.example import example_project

pytestmark = pytest.mark.timeout(180)


def fires(db: Path) -> list[tuple[str, str]]:
    try:
        with contextlib.closing(sqlite3.connect(db)) as conn, conn:
            return list(conn.execute("SELECT schedule, note FROM timers_fire ORDER BY id"))
    except sqlite3.OperationalError:  # not migrated yet, or locked for a moment
        return []


async def test_fires_reach_the_worker_and_its_one_shot_comes_back(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    timers = {"ASK_BACK_EVERY": "2s", "FOLLOW_UP_SECONDS": "1", "HEARTBEAT_EVERY": "1s"}
    project = await asyncio.to_thread(example_project, tmp_path, redis_server.url, env=timers)
    db = project.db
    # from tmp_path: a relative SCHEDULER_STATE would land there, not in the checkout
    scheduler = await asyncio.to_thread(project.gateway("scheduler.yaml", cwd=tmp_path).start)
    worker = project.worker("timers")
    layer = resolve_layer(redis_server.url)
    try:
        heartbeat = await asyncio.wait_for(layer.receive("sensors.send"), 30)
        assert heartbeat == {
            "type": "mqtt.publish",
            "topic": "gateways/timers/heartbeat",
            "payload": "alive",
            "qos": 0,
        }
        rows = await until(
            lambda: [r for r in fires(db) if r[0].startswith("follow-up.")],
            timeout=60,
            what="the consumer's one-shot fired back to it",
        )
        assert rows[0][1] == "follow-up of ask-back"
        assert any(schedule == "ask-back" for schedule, _ in fires(db))
        # the digest, fired by hand as the scheduler would at 18:00: the day's mail, mailed
        with contextlib.closing(sqlite3.connect(db)) as conn, conn:
            conn.execute(
                "INSERT INTO mail_mail (event_id, message_id, mail_from, subject, text, "
                "attachment_count, received_at, reply_message_id, reply_error, kind, dmarc) VALUES "
                "('e1', '<m1@x>', 'carol@example.org', 'Printer on fire', '', 0, "
                "datetime('now'), '', '', 'normal', '')"
            )
        now = time.time()
        await layer.send(
            "timers",
            {
                "type": "scheduler.fire",
                "gateway": "timers",
                "id": f"daily-digest@{now}",
                "time": now,
                "reply_channel": "timers.send",
                "schedule": "daily-digest",
                "scheduled_time": now,
                "scheduled_local": "",
                "fire_time": now,
                "missed": 0,
                "zone": "Europe/Berlin",
            },
        )
        digest = await asyncio.wait_for(layer.receive("support-mail.send"), 30)
        assert digest["type"] == "email.send" and digest["to"] == ["team@example.com"]
        assert "1 mail(s)" in digest["subject"]
        assert "carol@example.org: Printer on fire" in digest["text"]
    finally:
        await layer.close_pools()  # or its Redis connections leak into the next test
        await asyncio.to_thread(worker.stop)
        assert await asyncio.to_thread(scheduler.stop) == 0, scheduler.tail()
