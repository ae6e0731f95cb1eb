"""Fixtures for the email end-to-end tests: the example Django project on a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.testing import RedisServer, SmtpSink, free_port
from tests.support.example import ExampleProject, example_project


@dataclass
class Example:
    """The example project set up for examples/email.yaml, with the relay's far side."""

    project: ExampleProject
    sink: SmtpSink

    @property
    def env(self) -> dict[str, str]:
        return self.project.env

    @property
    def smtp_port(self) -> int:
        """Where gateway-email listens (``SMTP_PORT``)."""
        return int(self.env["SMTP_PORT"])

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(event_id, message_id, reply_message_id, reply_error) of every stored mail."""
        return self.project.rows(
            "SELECT event_id, message_id, reply_message_id, reply_error FROM mail_mail"
        )


async def make_example(tmp_path: Path, redis: RedisServer) -> Example:
    """The example project on ``redis``, migrated, with an SMTP sink as the relay."""
    sink = await SmtpSink().start()
    env = {"SMTP_PORT": str(free_port()), "RELAY_PORT": str(sink.port)}
    project = await asyncio.to_thread(example_project, tmp_path, redis.url, env=env)
    return Example(project, sink)


@pytest.fixture
async def example(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[Example]:
    ex = await make_example(tmp_path, redis_server)
    yield ex
    await ex.sink.stop()
