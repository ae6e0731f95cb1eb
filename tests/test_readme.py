"""The README's wiring guide, run as written: its marked blocks build a fresh Django project.

Each block the guide marks with ``<!-- guide: PATH -->`` is written to PATH in a project made by
``django-admin startproject mysite`` + ``startapp support`` (``(append)`` appends), and the
commands of the ``terminals`` block run as they are, against a real Redis and a stand-in relay.
Nothing of the guide is copied here: change the README and this test follows it.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import smtplib
import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from core.testing import RedisServer, Server, SmtpSink, free_port

ROOT = Path(__file__).resolve().parents[1]
GUIDE = re.compile(r"<!-- guide: (?P<name>[^>]+?) -->\s*```\w*\n(?P<body>.*?)```", re.DOTALL)


def guide_blocks() -> dict[str, str]:
    blocks = {m["name"]: m["body"] for m in GUIDE.finditer((ROOT / "README.md").read_text())}
    assert {"mysite/settings.py (append)", "mysite/asgi.py", "terminals"} <= set(blocks)
    return blocks


def build_project(directory: Path, blocks: dict[str, str]) -> None:
    python = sys.executable
    subprocess.run([python, "-m", "django", "startproject", "mysite", str(directory)], check=True)
    subprocess.run([python, "manage.py", "startapp", "support"], cwd=directory, check=True)
    for name, body in blocks.items():
        if name == "terminals":
            continue
        path, _, mode = name.partition(" ")
        target = directory / path
        if mode == "(append)":
            target.write_text(target.read_text() + "\n" + body)
        else:
            target.write_text(body)


async def test_wiring_guide_runs_a_mail_through(redis_server: RedisServer, tmp_path: Path) -> None:
    blocks = guide_blocks()
    project = tmp_path / "project"
    project.mkdir()
    build_project(project, blocks)
    sink = await SmtpSink().start()
    smtp_port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DJANGO_SETTINGS_MODULE")}
    env.update(
        GATEWAYS_LAYER=redis_server.url,
        SMTP_PORT=str(smtp_port),
        RELAY_PORT=str(sink.port),
        PYTHONUNBUFFERED="1",
    )
    commands = [shlex.split(line) for line in blocks["terminals"].splitlines() if line.strip()]
    assert [c[:3] for c in commands] == [
        ["python", "manage.py", "rungateway"],
        ["python", "manage.py", "runworker"],
    ]
    servers: list[Server] = []
    try:
        for argv in commands:
            ready = "ready: events" if argv[2] == "rungateway" else None
            servers.append(
                Server([sys.executable, *argv[1:]], ready, 30, cwd=project, env=env, name=argv[2])
            )
        mail = EmailMessage()
        mail["From"] = "alice@example.org"
        mail["To"] = "support@example.com"
        mail["Subject"] = "printer"
        mail["Message-ID"] = "<guide-1@example.org>"
        mail.set_content("It is on fire.\n")
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as client:
            client.send_message(mail)
        try:
            envelope: Any = await asyncio.wait_for(sink.received.get(), 30)
        except TimeoutError:
            tails = "\n".join(f"--- {s.name}\n{s.tail()}" for s in servers)
            pytest.fail(f"no reply reached the relay\n{tails}")
        assert envelope.rcpt_tos == ["alice@example.org"]
        assert b"Subject: Re: printer" in envelope.original_content
        assert b"In-Reply-To: <guide-1@example.org>" in envelope.original_content
    finally:
        for server in servers:
            server.stop()
        await sink.stop()
