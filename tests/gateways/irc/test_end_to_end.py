"""End to end: a person on IRC → ngircd → gateway-irc → Redis → manage.py runworker (the example
ticket bot, reading the database) → irc.send → ngircd → the person. Every process is real."""

from __future__ import annotations

import asyncio

import pytest

from core.testing import NgircdServer
from tests.gateways.irc.conftest import Peer
from tests.support.example import ExampleProject

pytestmark = pytest.mark.timeout(180)


async def test_ticket_question_answered_from_the_database(
    project: ExampleProject, ngircd_server: NgircdServer
) -> None:
    project.env["IRC_PORT"] = str(ngircd_server.port)
    project.execute(
        "INSERT INTO mail_mail (id, event_id, message_id, mail_from, subject, text, "
        "attachment_count, received_at, reply_message_id, reply_error, kind, dmarc) VALUES "
        "(42, 'e42', '<m42@x>', 'carol@example.org', 'Printer on fire', '', 0, "
        "'2026-01-01 00:00:00', '', '', 'normal', '')"
    )
    gateway = await asyncio.to_thread(project.gateway("irc.yaml").start)
    worker = project.worker("ops-irc")
    alice = await Peer.connect(ngircd_server.port, "alice", "#support")
    try:
        if not any("ticketbot" in line for line in alice.lines):  # in NAMES, or joins later
            await alice.expect(":ticketbot!")
        # the worker may still be starting: ask until it answers (messages wait in Redis anyway)
        await alice.send("PRIVMSG #support :!ticket 42")
        answer = await alice.expect("PRIVMSG #support :alice: #42", timeout=60)
        assert "'Printer on fire' from carol@example.org (open)" in answer
        await alice.send("PRIVMSG ticketbot :!ticket 7")
        private = await alice.expect("PRIVMSG alice :")
        assert private.endswith("alice: no ticket #7")
    finally:
        await alice.close()
        await asyncio.to_thread(worker.stop)
        assert await asyncio.to_thread(gateway.stop) == 0, gateway.tail()
