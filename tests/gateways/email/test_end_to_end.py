"""End to end: swaks and smtplib → gateway-email → Redis → manage.py runworker → email.send →
relay sink, with every process real."""

from __future__ import annotations

import asyncio
import smtplib
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import SMTP
from email.policy import default as default_policy

from core.testing import until
from tests.conftest import service
from tests.gateways.email.conftest import Example


async def wait_for_rows(example: Example, count: int) -> list[tuple[str, ...]]:
    """The stored mails, once ``count`` of them have their reply (or its error) recorded."""

    def answered() -> list[tuple[str, ...]] | None:
        rows = example.rows()
        return rows if len([r for r in rows if r[2] or r[3]]) >= count else None

    rows = await until(lambda: asyncio.to_thread(answered), what=f"{count} answered mails")
    assert isinstance(rows, list)
    return rows


async def test_mail_in_reply_out(example: Example) -> None:
    swaks = service("swaks")
    gateway = await asyncio.to_thread(example.project.gateway("email.yaml").start)
    worker = example.project.worker("support-mail")
    try:
        # 1. swaks, the way an MTA would deliver it
        proc = await asyncio.create_subprocess_exec(
            swaks,
            "--server",
            "127.0.0.1",
            "--port",
            str(example.smtp_port),
            "--from",
            "carol@example.org",
            "--to",
            "support@example.com",
            "--header",
            "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=",
            "--header",
            "Message-Id: <swaks-1@example.org>",
            "--header",
            "References: <older@example.org>",
            "--body",
            "hello from swaks",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, out.decode()
        assert b"250 2.0.0 OK: queued" in out

        # 2. smtplib, with a display name and Reply-To
        mail = EmailMessage()
        mail["From"] = "Dave <dave@example.org>"
        mail["Reply-To"] = "dave.replies@example.org"
        mail["To"] = "support@example.com"
        mail["Subject"] = "Printer"
        mail["Message-ID"] = "<smtplib-1@example.org>"
        mail.set_content("it is on fire")
        mail.add_attachment(b"a,b\n1,2\n", maintype="text", subtype="csv", filename="log.csv")

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", example.smtp_port, timeout=30) as client:
                client.send_message(mail)

        await asyncio.to_thread(send)

        replies = {}
        for _ in range(2):
            envelope = await asyncio.wait_for(example.sink.received.get(), 30)
            reply = BytesParser(policy=default_policy).parsebytes(envelope.original_content)
            replies[reply["In-Reply-To"]] = (envelope, reply)
        envelope, reply = replies["<swaks-1@example.org>"]
        assert envelope.rcpt_tos == ["carol@example.org"]
        assert envelope.mail_from == "support@example.com"
        assert reply["Subject"] == "Re: Grüße"
        assert reply["References"] == "<older@example.org> <swaks-1@example.org>"
        envelope, reply = replies["<smtplib-1@example.org>"]
        assert envelope.rcpt_tos == ["dave.replies@example.org"]
        assert reply["Subject"] == "Re: Printer"
        assert reply["References"] == "<smtplib-1@example.org>"

        # the consumer recorded the email.result the gateway sent back
        rows = await wait_for_rows(example, 2)
        assert sorted(r[1] for r in rows) == ["<smtplib-1@example.org>", "<swaks-1@example.org>"]
        assert all(r[2].startswith("<") and not r[3] for r in rows), rows
    finally:
        # stop from a thread: the sink on this event loop must keep answering while it drains
        await asyncio.to_thread(worker.stop)
        assert await asyncio.to_thread(gateway.stop) == 0, gateway.tail()


async def test_an_auto_reply_is_never_answered(example: Example) -> None:
    """The mail loop: our reply reaches an auto-responder, which answers it; that answer (and
    a bounce) comes back to us and must not be answered again."""
    gateway = await asyncio.to_thread(example.project.gateway("email.yaml").start)
    worker = example.project.worker("support-mail")

    def send(data: bytes, sender: str) -> None:
        with smtplib.SMTP("127.0.0.1", example.smtp_port, timeout=30) as client:
            client.sendmail(sender, ["support@example.com"], data)

    try:
        first = EmailMessage()
        first["From"] = "erin@example.org"
        first["To"] = "support@example.com"
        first["Subject"] = "VPN"
        first["Message-ID"] = "<loop-1@example.org>"
        first.set_content("it does not connect")
        await asyncio.to_thread(send, first.as_bytes(policy=SMTP), "erin@example.org")
        envelope = await asyncio.wait_for(example.sink.received.get(), 30)
        ours = BytesParser(policy=default_policy).parsebytes(envelope.original_content)
        assert ours["Auto-Submitted"] == "auto-replied"  # so erin's responder stays quiet

        # erin's responder answers anyway (RFC 3834 says it should not), as out-of-office
        # responders do; and a mailer daemon bounces one of our replies
        echo = EmailMessage()
        echo["From"] = "erin@example.org"
        echo["To"] = "support@example.com"
        echo["Subject"] = f"Automatic reply: {ours['Subject']}"
        echo["Message-ID"] = "<loop-2@example.org>"
        echo["In-Reply-To"] = ours["Message-ID"]
        echo["Auto-Submitted"] = "auto-replied"
        echo.set_content("I am out of the office until Monday.")
        await asyncio.to_thread(send, echo.as_bytes(policy=SMTP), "")
        bounce = (
            b"From: MAILER-DAEMON@mx.example.org\r\nTo: support@example.com\r\n"
            b"Subject: Undelivered Mail Returned to Sender\r\nMessage-ID: <loop-3@example.org>\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status;"
            b' boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nfailed\r\n'
            b"--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx\r\n\r\n"
            b"Final-Recipient: rfc822; x@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n"
            b"--b--\r\n"
        )
        await asyncio.to_thread(send, bounce, "")
        # a person's next mail is still answered: by then the two above were handled
        second = EmailMessage()
        second["From"] = "erin@example.org"
        second["To"] = "support@example.com"
        second["Subject"] = "VPN again"
        second["Message-ID"] = "<loop-4@example.org>"
        second.set_content("still broken")
        await asyncio.to_thread(send, second.as_bytes(policy=SMTP), "erin@example.org")
        envelope = await asyncio.wait_for(example.sink.received.get(), 30)
        reply = BytesParser(policy=default_policy).parsebytes(envelope.original_content)
        assert reply["In-Reply-To"] == "<loop-4@example.org>"

        def stored() -> list[tuple[str, ...]] | None:
            rows = example.project.rows(
                "SELECT message_id, kind, reply_message_id, reply_error FROM mail_mail"
            )
            return rows if len(rows) == 4 else None

        rows = await until(lambda: asyncio.to_thread(stored), what="4 stored mails")
        assert isinstance(rows, list)
        by_id = {r[0]: r for r in rows}
        assert by_id["<loop-2@example.org>"][1:] == ("auto_reply", "", "")
        assert by_id["<loop-3@example.org>"][1:] == ("bounce", "", "")
        assert by_id["<loop-1@example.org>"][1] == by_id["<loop-4@example.org>"][1] == "normal"
        # the worker handles one channel's mails in order: nothing else is coming
        assert example.sink.received.empty() and example.sink.attempts == 2
    finally:
        await asyncio.to_thread(worker.stop)
        assert await asyncio.to_thread(gateway.stop) == 0, gateway.tail()
