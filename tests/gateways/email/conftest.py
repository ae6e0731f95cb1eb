"""Fixtures for the email end-to-end tests: the example Django project on a real Redis."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.testing import RedisServer, SmtpSink, free_port

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples"


@dataclass
class Example:
    """Environment shared by gateway-email, runworker and the test for one example run."""

    env: dict[str, str]
    db: Path
    smtp_port: int
    sink: SmtpSink

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(event_id, message_id, reply_message_id, reply_error) of every stored mail."""
        import sqlite3

        with sqlite3.connect(self.db, timeout=30) as db:
            return list(
                db.execute(
                    "SELECT event_id, message_id, reply_message_id, reply_error FROM mail_mail"
                )
            )


async def make_example(tmp_path: Path, redis: RedisServer) -> Example:
    sink = await SmtpSink().start()
    smtp_port = free_port()
    env = {
        "DJANGO_SETTINGS_MODULE": "example.settings",
        "EXAMPLE_LAYER": redis.url,
        "GATEWAYS_LAYER": redis.url,
        "EXAMPLE_DB": str(tmp_path / "example.sqlite3"),
        "ATTACHMENT_STORE": str(tmp_path / "attachments"),
        "SMTP_PORT": str(smtp_port),
        "RELAY_PORT": str(sink.port),
        "PYTHONPATH": str(EXAMPLES),
    }
    migrate = await asyncio.create_subprocess_exec(
        sys.executable,
        "manage.py",
        "migrate",
        "--verbosity",
        "0",
        cwd=EXAMPLES,
        env={**os.environ, **env},
    )
    assert await asyncio.wait_for(migrate.wait(), 120) == 0
    return Example(env, tmp_path / "example.sqlite3", smtp_port, sink)


@pytest.fixture
async def example(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[Example]:
    ex = await make_example(tmp_path, redis_server)
    yield ex
    await ex.sink.stop()
