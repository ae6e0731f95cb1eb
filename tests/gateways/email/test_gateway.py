"""EmailGateway in process, against real SMTP clients: smtplib, aiosmtplib, swaks, raw sockets.

Each test runs the gateway on port 0 with ``InMemoryChannelLayer`` (a real Redis where the test
is about Redis) and reads what it publishes with ``layer.receive``. Whether a mail was *not*
published is checked without waiting on a clock: a sentinel mail is sent after it, and the next
event on the channel must be the sentinel.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.message
import email.policy
import logging
import re
import smtplib
import socket
import subprocess
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import msgpack
import pytest
from aiosmtpd.smtp import SMTP, AuthResult
from channels.exceptions import ChannelFull
from channels.layers import InMemoryChannelLayer

from core import testing
from core.envelope import MAX_MESSAGE_BYTES, check_payload
from core.layers import resolve_layer
from core.retry import StartupError
from core.testing import Certs, RedisServer, SmtpSink, make_certs, run_gateway
from gateways.email.config import EmailGatewayConfig
from gateways.email.gateway import EmailGateway
from gateways.email.parser_pool import ParserPool
from tests.conftest import service
from tests.gateways.email.test_translate import PARSED_KEYS

pytestmark = pytest.mark.timeout(60)

NAME = "helpdesk"
HOST = "127.0.0.1"
PASSWORD = "s3cret-pw"
#: every key of an email.receive event (DESIGN §4 envelope + §5 email keys + defects)
EVENT_KEYS = {
    "type",
    "gateway",
    "id",
    "time",
    "reply_channel",
    "mail_from",
    "rcpt_to",
    "peer",
    "proxy",
    "auth_user",
    "tls",
    "kind",
    "auth",
    *PARSED_KEYS,
}


def config(**email: Any) -> EmailGatewayConfig:
    """An integration file; sender authentication off unless asked for (test_auth.py tests it
    against its own DNS server: these tests must not depend on this machine's DNS)."""
    email.setdefault("verify", "off")
    return EmailGatewayConfig.model_validate(
        {
            "gateway": "email",
            "name": NAME,
            "shutdown_grace": 5,
            "email": {
                "port": 0,
                "hostname": "mx.example.com",
                "accept": ["example.com", "support@help.example.org"],
                **email,
            },
        }
    )


@contextlib.asynccontextmanager
async def running(cfg: EmailGatewayConfig, layer: Any = None) -> AsyncIterator[EmailGateway]:
    """The gateway in process (an in-memory layer unless given one), typed as EmailGateway."""
    gateway = EmailGateway(cfg, InMemoryChannelLayer() if layer is None else layer)
    async with run_gateway(gateway):
        yield gateway


@pytest.fixture
async def gateway() -> AsyncIterator[EmailGateway]:
    async with running(config(max_message_size=20_000)) as gw:
        yield gw


async def receive(gateway: EmailGateway, channel: str = NAME) -> dict[str, Any]:
    return await testing.receive(gateway.layer, channel, timeout=10)


def metric(name: str, **labels: str) -> float:
    return testing.metric(name, gateway=NAME, **labels)


def mail(subject: str = "hello", *, body: str = "hi there\n", **headers: str) -> bytes:
    msg = email.message.EmailMessage()
    msg["From"] = "Alice <alice@example.org>"
    msg["To"] = "bob@example.com"
    msg["Subject"] = subject
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content(body)
    return msg.as_bytes(policy=email.policy.SMTP)


# -- clients ----------------------------------------------------------------------------------


def smtplib_send(
    port: int, data: bytes, rcpt: str | list[str] = "bob@example.com", sender: str = "a@x.org"
) -> tuple[int, bytes]:
    """MAIL, RCPT, DATA with smtplib (in a thread); the answer to the first refused step."""
    with smtplib.SMTP(HOST, port, timeout=10) as client:
        client.ehlo()
        code, text = client.mail(sender)
        if code != 250:
            return code, text
        for address in [rcpt] if isinstance(rcpt, str) else rcpt:
            code, text = client.rcpt(address)
            if code != 250:
                return code, text
        return client.data(data)


async def aiosmtplib_send(
    port: int, data: bytes, *, sender: str = "a@x.org", recipients: tuple[str, ...] = ()
) -> aiosmtplib.SMTPResponse:
    """MAIL, RCPT, DATA with aiosmtplib; the answer to DATA (a refusal raises SMTPDataError)."""
    async with aiosmtplib.SMTP(hostname=HOST, port=port, timeout=10, start_tls=False) as client:
        await client.mail(sender)
        for rcpt in recipients or ("bob@example.com",):
            await client.rcpt(rcpt)
        return await client.data(data)


async def data_then_hang_up(port: int, data: bytes) -> aiosmtplib.SMTPResponse:
    """MAIL, RCPT, DATA, then close without QUIT: the answer to DATA from a gateway that is
    stopping (it closes the session after it; whether a client's QUIT then fails at once or
    waits for its timeout is the client library's: aiosmtplib 3.0.1-5.1.0 wait)."""
    client = aiosmtplib.SMTP(hostname=HOST, port=port, timeout=10, start_tls=False)
    await client.connect()
    try:
        await client.mail("a@x.org")
        await client.rcpt("bob@example.com")
        return await client.data(data)
    finally:
        client.close()


SWAKS_REPLY = re.compile(r"^<([-~*][ *])\s*(\d{3})[ -]", re.MULTILINE)


async def swaks(port: int, *args: str) -> tuple[int, list[str]]:
    """Run swaks (through ``service`` so a missing swaks fails in CI); exit code and reply codes.

    A failing reply is marked with ``*`` as in swaks' own output (``*552``).
    """
    argv = [service("swaks"), "-s", HOST, "-p", str(port), "-f", "alice@example.org", *args]
    result = await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, timeout=30, check=False
    )
    codes = [("*" if "*" in m[0] else "") + m[1] for m in SWAKS_REPLY.findall(result.stdout)]
    return result.returncode, codes


def over_tls(ca: Certs, password: str | None = None) -> list[str]:
    """swaks arguments: to bob, STARTTLS verified against ``ca``, AUTH PLAIN as alice."""
    args = ["-t", "bob@example.com", "--tls", "--tls-verify", "--tls-ca-path", str(ca.ca_crt)]
    return args if password is None else [*args, "-a", "PLAIN", "-au", "alice", "-ap", password]


class RawSession:
    """A plain TCP SMTP session: write any bytes, read replies (multi-line ones joined)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, port: int) -> AsyncIterator[RawSession]:
        reader, writer = await asyncio.open_connection(HOST, port)
        session = cls(reader, writer)
        try:
            assert (await session.reply()).startswith("220")
            yield session
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def reply(self) -> str:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 10)
            if not line:
                raise ConnectionError(f"closed after {lines!r}")
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] != b"-":
                return "\n".join(lines)

    async def command(self, line: bytes) -> str:
        self.writer.write(line)
        return await self.reply()

    async def replies(self, count: int) -> list[str]:
        return [await self.reply() for _ in range(count)]


async def sentinel_is_next(gateway: EmailGateway) -> None:
    """Nothing was published before this point: the next event is a mail sent now."""
    await aiosmtplib_send(gateway.server.port, mail("sentinel"))
    assert (await receive(gateway))["subject"] == "sentinel"


# -- inbound ----------------------------------------------------------------------------------


async def test_mail_becomes_email_receive_with_every_key(gateway: EmailGateway) -> None:
    msg = email.message.EmailMessage()
    msg["From"] = "=?utf-8?q?J=C3=B6rg?= <jorg@example.org>"
    msg["To"] = "Bob <bob@example.com>"
    msg["Cc"] = "support@help.example.org"
    msg["Reply-To"] = "tickets@example.org"
    msg["Subject"] = "Grüße"
    msg["Date"] = "Tue, 05 Mar 2024 10:30:00 +0100"
    msg["Message-ID"] = "<m1@example.org>"
    msg["In-Reply-To"] = "<m0@example.org>"
    msg["References"] = "<root@example.org> <m0@example.org>"
    msg.set_content("plain body\n")
    msg.add_alternative("<p>html body</p>\n", subtype="html")
    msg.add_attachment(
        b"\x00\x01binary", maintype="application", subtype="octet-stream", filename="data.bin"
    )
    before = time.time()
    events_before = metric("gateway_events_total", type="email.receive")
    response = await aiosmtplib_send(
        gateway.server.port,
        msg.as_bytes(),
        sender="bounces@example.org",
        recipients=("bob@example.com", "Support@Help.Example.org"),
    )
    assert response.code == 250
    event = await receive(gateway)
    assert set(event) == EVENT_KEYS  # include_raw is off: no "raw"
    assert event["type"] == "email.receive" and event["gateway"] == NAME
    assert event["id"] == event["message_id"] == "<m1@example.org>"
    assert before <= event["time"] <= time.time()
    assert event["reply_channel"] == f"{NAME}.send"
    assert event["mail_from"] == "bounces@example.org"
    assert event["rcpt_to"] == ["bob@example.com", "Support@Help.Example.org"]
    assert event["peer"] == HOST and event["auth_user"] is None and event["tls"] is False
    assert event["proxy"] is None and event["kind"] == "normal" and event["auth"] is None
    assert event["subject"] == "Grüße" and event["from"] == "Jörg <jorg@example.org>"
    assert event["to"] == ["Bob <bob@example.com>"] and event["cc"] == ["support@help.example.org"]
    assert event["reply_to"] == ["tickets@example.org"]
    assert event["date"] == "2024-03-05T10:30:00+01:00"
    assert event["in_reply_to"] == "<m0@example.org>"
    assert event["references"] == ["<root@example.org>", "<m0@example.org>"]
    assert ["Subject", "Grüße"] in event["headers"]
    assert event["text"] == "plain body\n" and event["html"] == "<p>html body</p>\n"
    assert event["attachments"] == [
        {
            "filename": "data.bin",
            "content_type": "application/octet-stream",
            "size": 8,
            "content": b"\x00\x01binary",
        }
    ]
    assert event["defects"] == []
    check_payload(event)
    msgpack.packb(event, use_bin_type=True)
    assert metric("gateway_events_total", type="email.receive") == events_before + 1


async def test_mail_without_message_id_gets_a_uuid(gateway: EmailGateway) -> None:
    code, _ = await asyncio.to_thread(smtplib_send, gateway.server.port, mail())
    assert code == 250
    event = await receive(gateway)
    assert event["message_id"] is None and re.fullmatch(r"[0-9a-f]{32}", event["id"])


async def test_swaks_plain_attachment_and_8bit(gateway: EmailGateway, tmp_path: Path) -> None:
    port = gateway.server.port
    code, replies = await swaks(
        port, "-t", "bob@example.com", "--h-Subject", "plain test", "--body", "hello"
    )
    assert code == 0 and replies[-2:] == ["250", "221"], replies
    event = await receive(gateway)
    assert event["subject"] == "plain test" and event["text"].strip() == "hello"
    assert event["mail_from"] == "alice@example.org" and event["rcpt_to"] == ["bob@example.com"]

    report = tmp_path / "report.csv"
    report.write_bytes(b"name,amount\r\ntea,2\r\n")
    code, _ = await swaks(
        port,
        "-t",
        "bob@example.com",
        "--body",
        "see attached",
        "--attach-type",
        "text/csv",
        "--attach-name",
        "report.csv",
        "--attach",
        f"@{report}",
        "-n",
    )
    assert code == 0
    event = await receive(gateway)
    assert event["text"].strip() == "see attached"
    (attachment,) = event["attachments"]
    assert attachment["filename"] == "report.csv" and attachment["content_type"] == "text/csv"
    assert attachment["content"] == report.read_bytes()

    code, _ = await swaks(
        port,
        "-t",
        "bob@example.com",
        "--add-header",
        "MIME-Version: 1.0",
        "--add-header",
        "Content-Type: text/plain; charset=utf-8",
        "--add-header",
        "Content-Transfer-Encoding: 8bit",
        "--body",
        "Grüße, café ✓",
    )
    assert code == 0
    event = await receive(gateway)
    assert event["text"].strip() == "Grüße, café ✓" and event["defects"] == []


async def test_relay_attempt_is_550_and_next_client_is_served(gateway: EmailGateway) -> None:
    port = gateway.server.port
    refused = metric("gateway_errors_total", kind="relay_denied")
    code, text = await asyncio.to_thread(smtplib_send, port, mail(), "victim@elsewhere.net")
    assert code == 550 and b"Relaying denied" in text
    # look-alike domains are no better
    for rcpt in ("bob@example.com.evil.net", "bob@sub.example.com", "other@help.example.org"):
        assert (await asyncio.to_thread(smtplib_send, port, mail(), rcpt))[0] == 550
    code, replies = await swaks(port, "-t", "victim@elsewhere.net")
    assert code == 24 and "*550" in replies, replies  # 24: no RCPT accepted
    assert metric("gateway_errors_total", kind="relay_denied") == refused + 5

    def one_of_two() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP(HOST, port, timeout=10) as client:
            return client.sendmail("a@x.org", ["victim@elsewhere.net", "bob@example.com"], mail())

    # one refused and one accepted recipient: the mail goes to the accepted one only
    refused_rcpts = await asyncio.to_thread(one_of_two)
    assert list(refused_rcpts) == ["victim@elsewhere.net"]
    assert refused_rcpts["victim@elsewhere.net"][0] == 550
    assert (await receive(gateway))["rcpt_to"] == ["bob@example.com"]


async def test_too_many_recipients_is_452() -> None:
    async with running(config(max_recipients=2)) as gw:
        rcpts = ["a@example.com", "b@example.com", "c@example.com"]
        code, text = await asyncio.to_thread(smtplib_send, gw.server.port, mail(), rcpts)
        assert code == 452 and b"Too many recipients" in text


async def test_oversize_is_552(gateway: EmailGateway, tmp_path: Path) -> None:
    port = gateway.server.port  # max_message_size=20_000
    body = tmp_path / "body.txt"
    body.write_text(("x" * 75 + "\n") * 400)  # 30 kB
    code, replies = await swaks(port, "-t", "bob@example.com", "--body", f"@{body}", "-n")
    assert code == 26 and "*552" in replies, replies  # 26: refused after DATA

    def declared_size() -> tuple[int, bytes]:
        with smtplib.SMTP(HOST, port, timeout=10) as client:
            client.ehlo()
            assert client.has_extn("size") and int(client.esmtp_features["size"]) == 20_000
            return client.mail("a@x.org", ["SIZE=500000"])

    code, text = await asyncio.to_thread(declared_size)
    assert code == 552, text
    code, _ = await asyncio.to_thread(smtplib_send, port, mail(body="x" * 30_000))
    assert code == 552
    await sentinel_is_next(gateway)


async def test_smuggling_sequences_do_not_end_data(gateway: EmailGateway) -> None:
    port = gateway.server.port
    for fake_end in (b"\n.\n", b"\r\n.\n", b"\n.\r\n"):
        async with RawSession.open(port) as smtp:
            assert (await smtp.command(b"EHLO attacker.example\r\n")).startswith("250")
            smtp.writer.write(
                b"MAIL FROM:<a@x.org>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
                b"Subject: first\r\n\r\nfirst body" + fake_end + b"MAIL FROM:<evil@x.org>\r\n"
                b"RCPT TO:<bob@example.com>\r\nDATA\r\nSubject: smuggled\r\n\r\nsecond\r\n"
                b".\r\nQUIT\r\n"
            )
            replies = await smtp.replies(5)
            # one DATA only; the real end refuses the whole thing for its bare LF
            assert [r[:3] for r in replies] == ["250", "250", "354", "550", "221"], replies
            assert replies[3].startswith("550 5.5.2"), replies
    await sentinel_is_next(gateway)  # not one of the three mails was published


@pytest.mark.parametrize("fake_end", [b"\r\n.\n", b"\n.\n"])
async def test_smuggling_with_bare_lf_accepted_is_still_one_mail(fake_end: bytes) -> None:
    async with running(config(bare_lf="accept")) as gw, RawSession.open(gw.server.port) as smtp:
        assert (await smtp.command(b"EHLO attacker.example\r\n")).startswith("250")
        smtp.writer.write(
            b"MAIL FROM:<a@x.org>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
            b"Subject: first\r\n\r\nfirst body" + fake_end + b"MAIL FROM:<evil@x.org>\r\n"
            b"RCPT TO:<bob@example.com>\r\nDATA\r\nSubject: smuggled\r\n\r\nsecond\r\n.\r\n"
        )
        replies = await smtp.replies(4)
        assert [r[:3] for r in replies] == ["250", "250", "354", "250"], replies
        event = await receive(gw)
        assert event["subject"] == "first" and "Subject: smuggled" in event["text"]
        assert (await smtp.command(b"QUIT\r\n")).startswith("221")
        await sentinel_is_next(gw)  # the smuggled mail did not become an event of its own


async def test_bare_lf_session_leaves_the_gateway_serving(gateway: EmailGateway) -> None:
    async with RawSession.open(gateway.server.port) as smtp:
        await smtp.command(b"EHLO x\r\n")
        smtp.writer.write(b"MAIL FROM:<a@x.org>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
        assert [r[:3] for r in await smtp.replies(3)] == ["250", "250", "354"]
        assert (await smtp.command(b"Subject: x\n\nbare\r\n.\r\n")).startswith("550 5.5.2")
        # the same session can go on with a proper mail
        smtp.writer.write(b"MAIL FROM:<a@x.org>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
        assert [r[:3] for r in await smtp.replies(3)] == ["250", "250", "354"]
        assert (await smtp.command(b"Subject: fine\r\n\r\nok\r\n.\r\n")).startswith("250")
    assert (await receive(gateway))["subject"] == "fine"


async def test_malformed_mime_is_accepted_with_defects(gateway: EmailGateway) -> None:
    junk = (
        b"From: J\xf6rg <j@example.org>\r\nTo: bob@example.com\r\nSubject: caf\xe9\r\n"
        b"Message-ID: <junk@example.org>\r\nDate: the day after tomorrow\r\n"
        b"Content-Type: multipart/mixed; boundary=B\r\n\r\n"
        b"--B\r\nContent-Type: text/plain; charset=x-no-such-charset\r\n\r\nbody \xff\r\n"
        b"--B\r\nContent-Type: application/pdf; name=a.pdf\r\nContent-Transfer-Encoding: base64"
        b"\r\n\r\nJVBERi0x!!not base64\r\n"  # and no closing boundary
    )
    code, _ = await asyncio.to_thread(smtplib_send, gateway.server.port, junk)
    assert code == 250
    event = await receive(gateway)
    assert event["id"] == "<junk@example.org>" and event["date"] is None
    defects = " ".join(event["defects"])
    for expected in ("CloseBoundaryNotFound", "x-no-such-charset", "InvalidBase64", "Date"):
        assert expected in defects, event["defects"]
    assert event["text"].startswith("body") and event["attachments"][0]["filename"] == "a.pdf"
    msgpack.packb(event, use_bin_type=True)
    await sentinel_is_next(gateway)


async def test_full_layer_is_451_then_accepted_on_retry() -> None:
    layer = InMemoryChannelLayer(capacity=1)
    async with running(config(accept_timeout=0.3), layer) as gw:
        await layer.send(NAME, {"type": "filler"})
        with pytest.raises(ChannelFull):
            await layer.send(NAME, {"type": "filler"})
        pushback = metric("gateway_pushback_total")
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await aiosmtplib_send(gw.server.port, mail("queued", Message_ID="<q@example.org>"))
        assert refused.value.code == 451
        assert metric("gateway_pushback_total") == pushback + 1
        assert (await layer.receive(NAME))["type"] == "filler"  # the consumer catches up
        response = await aiosmtplib_send(gw.server.port, mail("queued", Message_ID="<q@ex.org>"))
        assert response.code == 250
        assert (await receive(gw))["id"] == "<q@ex.org>"


async def test_a_fault_of_ours_is_451_never_5xx(
    gateway: EmailGateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(raw: bytes, *, wait: float) -> Any:
        raise RuntimeError("bug in the parser")

    # on the loop, around the parser processes (a bug in parse_mail itself, in a parser
    # process, is tests/gateways/email/test_parser_pool.py's)
    monkeypatch.setattr(gateway.parsers, "parse", broken)
    errors = metric("gateway_errors_total", kind="smtp_session")

    def session() -> tuple[int, int]:
        with smtplib.SMTP(HOST, gateway.server.port, timeout=10) as client:
            try:
                client.sendmail("a@x.org", ["bob@example.com"], mail("first"))
            except smtplib.SMTPDataError as exc:
                first = exc.smtp_code
            monkeypatch.undo()  # the bug is fixed; the same session goes on
            client.sendmail("a@x.org", ["bob@example.com"], mail("second"))
            return first, 250

    with caplog.at_level(logging.ERROR, logger="gateway.email"):
        assert await asyncio.to_thread(session) == (451, 250)
    assert any(r.exc_info and "bug in the parser" in str(r.exc_info[1]) for r in caplog.records)
    assert metric("gateway_errors_total", kind="smtp_session") == errors + 1
    assert (await receive(gateway))["subject"] == "second"


async def test_a_bug_in_parse_mail_is_451_with_the_parsers_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw = EmailGateway(config(), InMemoryChannelLayer())
    gw.parsers = ParserPool(
        gw.settings.parser, gw.metrics, name=NAME, work="tests.gateways.email.parser_work:broken"
    )
    errors = metric("gateway_errors_total", kind="smtp_session")
    with caplog.at_level(logging.ERROR, logger="gateway.email"):
        async with run_gateway(gw):
            code, _ = await asyncio.to_thread(smtplib_send, gw.server.port, mail("x"))
    assert code == 451
    logged = [r.getMessage() for r in caplog.records if "parsing the mail" in r.getMessage()]
    assert len(logged) == 1 and "RuntimeError: bug in the parser" in logged[0]
    assert metric("gateway_errors_total", kind="smtp_session") == errors + 1


def big_mail(size: int) -> bytes:
    msg = email.message.EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "a@x.org", "bob@example.com", "big"
    msg.set_content("see attachment")
    msg.add_attachment(b"small", maintype="text", subtype="plain", filename="small.txt")
    msg.add_attachment(
        bytes(range(256)) * (size // 256),
        maintype="application",
        subtype="octet-stream",
        filename="../../big data.bin",
    )
    return msg.as_bytes(policy=email.policy.SMTP)


async def test_event_over_1mb_is_552_without_attachment_store() -> None:
    async with running(config()) as gw:
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await aiosmtplib_send(gw.server.port, big_mail(MAX_MESSAGE_BYTES + 100_000))
        assert refused.value.code == 552
        await sentinel_is_next(gw)


async def test_large_attachments_go_to_the_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    size = (MAX_MESSAGE_BYTES + 100_000) // 256 * 256
    async with running(config(attachment_store=str(store))) as gw:
        response = await aiosmtplib_send(gw.server.port, big_mail(size))
        assert response.code == 250
        event = await receive(gw)
    small, big = event["attachments"]
    assert small["content"] == b"small" and "path" not in small  # under max_inline_attachment
    assert big["content"] is None and big["size"] == size
    path = Path(big["path"])
    # the sender's "../../big data.bin" cannot leave the store
    assert path.parent == store and "/" not in path.name and path.name.endswith("big_data.bin")
    assert await asyncio.to_thread(path.read_bytes) == bytes(range(256)) * (size // 256)
    assert len(msgpack.packb(event, use_bin_type=True)) < MAX_MESSAGE_BYTES


async def test_refused_mail_leaves_no_stored_attachment(tmp_path: Path) -> None:
    layer = InMemoryChannelLayer(capacity=1)
    store = tmp_path / "store"
    cfg = config(accept_timeout=0.3, attachment_store=str(store), max_inline_attachment=10)
    msg = email.message.EmailMessage()
    msg["From"], msg["To"], msg["Message-ID"] = "a@x.org", "bob@example.com", "<att@x.org>"
    msg.set_content("see attached")
    msg.add_attachment(b"0123456789" * 100, maintype="application", subtype="pdf", filename="x.pdf")
    data = msg.as_bytes(policy=email.policy.SMTP)
    async with running(cfg, layer) as gw:
        await layer.send(NAME, {"type": "filler"})  # layer full: the mail gets 451
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await aiosmtplib_send(gw.server.port, data)
        assert refused.value.code == 451
        # the sender's retry stores it again: the refused copy must not pile up in the store
        assert not any(store.glob("*")), list(store.glob("*"))
        assert (await layer.receive(NAME))["type"] == "filler"
        assert (await aiosmtplib_send(gw.server.port, data)).code == 250
        (attachment,) = (await receive(gw))["attachments"]
    assert attachment["content"] is None
    assert await asyncio.to_thread(Path(attachment["path"]).read_bytes) == b"0123456789" * 100
    assert len(list(store.glob("*"))) == 1


async def test_include_raw() -> None:
    data = mail("raw please", Message_ID="<raw@example.org>")
    async with running(config(include_raw=True)) as gw:
        await aiosmtplib_send(gw.server.port, data)
        event = await receive(gw)
    assert event["raw"] == data and set(event) == EVENT_KEYS | {"raw"}


# -- TLS and AUTH -----------------------------------------------------------------------------


@pytest.fixture
def tls_config(certs: Certs, tmp_path: Path) -> EmailGatewayConfig:
    users = tmp_path / "users"
    users.write_text(f"alice:{PASSWORD}\n")
    return config(
        tls={"cert_file": str(certs.server_crt), "key_file": str(certs.server_key)},
        auth={"users_file": str(users)},
    )


async def test_auth_before_starttls_is_refused(
    tls_config: EmailGatewayConfig, certs: Certs
) -> None:
    async with running(tls_config) as gw:
        auth = ["-t", "bob@example.com", "-a", "PLAIN", "-au", "alice", "-ap", PASSWORD]
        code, _ = await swaks(gw.server.port, *auth)
        assert code == 28  # "Host did not advertise authentication"

        def plain_auth() -> tuple[bool, int]:
            with smtplib.SMTP(HOST, gw.server.port, timeout=10) as client:
                client.ehlo()
                advertised = client.has_extn("auth")
                code, _ = client.docmd("AUTH", "PLAIN AGFsaWNlAHMzY3JldC1wdw==")
                return advertised, code

        assert await asyncio.to_thread(plain_auth) == (False, 538)  # encryption required
        await sentinel_is_next(gw)  # and unauthenticated mail is still taken (auth optional)


async def test_starttls_and_auth_plain(tls_config: EmailGatewayConfig, certs: Certs) -> None:
    async with running(tls_config) as gw:
        code, replies = await swaks(
            gw.server.port, *over_tls(certs, PASSWORD), "--h-Subject", "over tls"
        )
        assert code == 0, replies
        event = await receive(gw)
        assert event["auth_user"] == "alice" and event["tls"] is True
        assert event["subject"] == "over tls"

        async with aiosmtplib.SMTP(
            hostname=HOST,
            port=gw.server.port,
            timeout=10,
            start_tls=True,
            tls_context=certs.client_context(),
            username="alice",
            password=PASSWORD,
        ) as client:
            await client.sendmail("a@x.org", ["bob@example.com"], mail("aiosmtplib tls"))
        event = await receive(gw)
        assert (event["auth_user"], event["tls"], event["subject"]) == (
            "alice",
            True,
            "aiosmtplib tls",
        )


async def test_certificate_is_verified(tls_config: EmailGatewayConfig, tmp_path: Path) -> None:
    other_ca = make_certs(tmp_path / "other")
    async with running(tls_config) as gw:
        code, _ = await swaks(gw.server.port, *over_tls(other_ca))
        assert code == 29  # TLS failed: certificate verify failed
        await sentinel_is_next(gw)


async def test_wrong_password_is_535_without_a_hang(
    tls_config: EmailGatewayConfig, certs: Certs
) -> None:
    async with running(tls_config) as gw:
        async with aiosmtplib.SMTP(
            hostname=HOST,
            port=gw.server.port,
            timeout=30,
            start_tls=True,
            tls_context=certs.client_context(),
        ) as client:
            # well inside the client's own 30 s timeout: a missing reply would trip this
            async with asyncio.timeout(10):
                for user, password in (("alice", "wrong"), ("mallory", PASSWORD)):
                    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
                        await client.login(user, password)
                    assert refused.value.code == 535
        code, replies = await swaks(gw.server.port, *over_tls(certs, "nope"))
        assert code == 28 and "*535" in replies, replies


async def test_auth_required(certs: Certs, tmp_path: Path) -> None:
    cfg = config(
        tls={"cert_file": str(certs.server_crt), "key_file": str(certs.server_key)},
        auth={"users": {"alice": PASSWORD}, "required": True},
    )
    async with running(cfg) as gw:
        code, replies = await swaks(
            gw.server.port, "-t", "bob@example.com", "--tls", "--tls-ca-path", str(certs.ca_crt)
        )
        assert code == 23 and "*530" in replies, replies  # MAIL refused: AUTH first


# -- commands: email.send ---------------------------------------------------------------------


@pytest.fixture
async def sink() -> AsyncIterator[SmtpSink]:
    relay = await SmtpSink().start()
    yield relay
    await relay.stop()


def relay_config(sink: SmtpSink, **relay: Any) -> EmailGatewayConfig:
    return config(
        relay={
            "host": HOST,
            "port": relay.pop("port", None) or sink.port,
            "tls": "none",
            "from_address": "Helpdesk <help@example.com>",
            "retries": 2,
            "retry_max_delay": 0.1,
            **relay,
        }
    )


async def command(gateway: EmailGateway, message: dict[str, Any]) -> dict[str, Any]:
    """Send ``message`` on the gateway's command channel; its result."""
    return dict(await testing.command(gateway.layer, gateway.config.command_channel, message))


@pytest.mark.parametrize("type_", ["email.exception", "email.DATA", "email.MAIL", "email.RCPT"])
async def test_smtp_hooks_are_not_commands(
    gateway: EmailGateway, type_: str, caplog: pytest.LogCaptureFixture
) -> None:
    # bug 1: handle_<action> was looked up by name on the object that also carries aiosmtpd's
    # hooks, so these reached handle_exception / handle_DATA / handle_MAIL
    errors = metric("gateway_errors_total", kind="smtp_session")
    with caplog.at_level(logging.WARNING, logger="gateway.email"):
        result = await command(gateway, {"type": type_, "id": "hook"})
    assert result == {
        "type": "email.result",
        "id": "hook",
        "ok": False,
        "error": f"unknown command {type_!r}",
    }
    assert metric("gateway_errors_total", kind="smtp_session") == errors
    assert f"unknown command {type_!r}" in caplog.text
    # aiosmtpd's hooks live on the server's handler object, not on the gateway
    assert not hasattr(gateway, "handle_" + type_.removeprefix("email."))
    code, _ = await asyncio.to_thread(smtplib_send, gateway.server.port, mail("still open"))
    assert code == 250
    assert (await receive(gateway))["subject"] == "still open"


async def test_the_fqdn_is_resolved_once_at_start(
    sink: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    # it was resolved on the event loop for every email.send and (by aiosmtpd) every session:
    # a slow DNS stalled the whole gateway each time; then aiosmtplib still looked it up (in a
    # thread) for the EHLO of every relay connection
    calls: list[int] = []
    others = ("core/testing/smtp.py", "/smtplib.py")  # the test's relay and its SMTP client

    def getfqdn(name: str = "") -> str:
        if not any(f.filename.endswith(others) for f in traceback.extract_stack()):
            calls.append(threading.get_ident())
        return "fqdn.example.net"

    monkeypatch.setattr(socket, "getfqdn", getfqdn)
    relay = {"host": HOST, "port": sink.port, "tls": "none", "from_address": "h@example.com"}
    async with running(config(hostname=None, relay=relay)) as gw:
        for n in range(2):
            code, _ = await asyncio.to_thread(smtplib_send, gw.server.port, mail(f"m{n}"))
            assert code == 250
            result = await command(gw, {"type": "email.send", "to": "a@example.org", "text": "x"})
            assert result["message_id"].endswith("@fqdn.example.net>")
        banner = await asyncio.to_thread(lambda: smtplib.SMTP(HOST, gw.server.port).quit())
    assert len(calls) == 1, calls  # once, at start
    assert calls.count(threading.get_ident()) == 0  # and not on the event loop
    assert banner[0] == 221
    assert sink.received.qsize() == 2


async def test_email_send_threads_the_reply(sink: SmtpSink) -> None:
    async with running(relay_config(sink)) as gw:
        result = await command(
            gw,
            {
                "type": "email.send",
                "id": "reply-1",
                "to": "Jörg <jorg@example.org>",
                "bcc": "audit@example.com",
                "subject": "Re: Grüße",
                "text": "Hello again",
                "in_reply_to": "<m1@example.org>",
                "references": ["<root@example.org>"],
                "headers": {"Auto-Submitted": "auto-replied"},
            },
        )
        assert result["type"] == "email.result" and result["id"] == "reply-1"
        assert result["ok"] is True and result["error"] is None
        assert result["refused"] == []
        envelope: Any = await asyncio.wait_for(sink.received.get(), 5)
    assert re.fullmatch(r"<[^<>@\s]+@mx\.example\.com>", result["message_id"])
    assert envelope.mail_from == "help@example.com"
    assert envelope.rcpt_tos == ["jorg@example.org", "audit@example.com"]
    sent = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
    assert sent["Message-ID"] == result["message_id"]
    assert sent["In-Reply-To"] == "<m1@example.org>"
    assert sent["References"] == "<root@example.org> <m1@example.org>"
    assert sent["Subject"] == "Re: Grüße" and sent["Auto-Submitted"] == "auto-replied"
    assert sent["From"] == "Helpdesk <help@example.com>" and "Bcc" not in sent
    assert sent.get_content().rstrip() == "Hello again"


async def test_relay_451_is_retried_then_delivered(
    sink: SmtpSink, caplog: pytest.LogCaptureFixture
) -> None:
    sink.replies = ["451 4.3.0 busy, try later"]
    retries = metric("gateway_retries_total", kind="relay")
    async with running(relay_config(sink)) as gw:
        with caplog.at_level(logging.WARNING, logger="gateway.email"):
            result = await command(gw, {"type": "email.send", "id": 7, "to": "x@example.org"})
    assert result["ok"] is True and result["id"] == "7", result
    assert sink.attempts == 2 and sink.received.qsize() == 1
    assert metric("gateway_retries_total", kind="relay") == retries + 1
    assert any("retry 1/2" in r.getMessage() and "451" in r.getMessage() for r in caplog.records)


async def test_relay_550_is_a_failed_result(sink: SmtpSink) -> None:
    sink.replies = ["550 5.7.1 no such user here"]
    async with running(relay_config(sink)) as gw:
        result = await command(gw, {"type": "email.send", "id": "c", "to": "x@example.org"})
    assert result["ok"] is False and "550" in result["error"] and "no such user" in result["error"]
    assert sink.attempts == 1  # permanent: not retried


async def test_relay_451_forever_gives_up_after_the_retries(sink: SmtpSink) -> None:
    sink.replies = ["451 4.3.0 busy"] * 10
    async with running(relay_config(sink, retries=1)) as gw:
        result = await command(gw, {"type": "email.send", "id": "c", "to": "x@example.org"})
    assert result["ok"] is False and "451" in result["error"] and sink.attempts == 2


async def test_relay_down_is_a_failed_result(sink: SmtpSink) -> None:
    port = sink.port
    await sink.stop()
    async with running(relay_config(sink, port=port, retries=0)) as gw:
        result = await command(gw, {"type": "email.send", "id": "c", "to": "x@example.org"})
    assert result["ok"] is False and result["error"]


async def test_invalid_commands_are_answered_and_the_loop_goes_on(sink: SmtpSink) -> None:
    invalid: list[tuple[dict[str, Any], str]] = [
        ({"type": "email.send", "id": "1", "subject": "x"}, "at least one recipient"),
        (
            {"type": "email.send", "id": "2", "to": "a@b.org", "subject": "x\r\nBcc: e@f.org"},
            "subject: must not contain CR, LF",
        ),
        (
            {"type": "email.send", "id": "3", "to": "a@b.org", "colour": "red"},
            "unknown keys ['colour']",
        ),
        ({"type": "email.send", "id": "4", "to": 5}, "to: must be a string or a list"),
        ({"type": "email.send", "id": "5", "to": "a@b.org", "text": 12}, "text: must be a str"),
        (
            {
                "type": "email.send",
                "id": "6",
                "to": "a@b.org",
                "headers": [["Sender", "a@b.org"], ["Sender", "c@d.org"]],
            },
            "headers[1]: Sender",
        ),
        ({"type": "email.bogus", "id": "7"}, "unknown command 'email.bogus'"),
        ({"type": "irc.send", "id": "8"}, "unknown command 'irc.send'"),
        ({"id": "9", "to": "a@b.org"}, "command has no 'type'"),
        ({"type": "email.send", "id": ["not", "a", "string"]}, "'id' must be a string"),
    ]
    async with running(relay_config(sink)) as gw:
        invalid_before = metric("gateway_commands_total", type="email.send", outcome="invalid")
        # one without a result channel: nobody hears of it, and nothing stops
        await gw.layer.send(gw.config.command_channel, {"type": "email.send"})
        for message, error in invalid:
            result = await command(gw, message)
            assert result["type"] == "email.result" and result["ok"] is False, result
            assert error in result["error"], (message, result)
        assert (await command(gw, {"type": "email.send", "id": "ok", "to": "a@b.org"}))["ok"]
        assert sink.attempts == 1  # only the valid one reached the relay
        assert metric("gateway_commands_total", type="email.send", outcome="invalid") > (
            invalid_before
        )


class TlsRelay:
    """An aiosmtpd relay that insists on STARTTLS and AUTH and may refuse some recipients."""

    def __init__(self, certs: Certs, refuse: tuple[str, ...] = ()) -> None:
        self.certs = certs
        self.refuse = set(refuse)
        self.delivered: list[tuple[Any, Any, bool]] = []
        self.server: asyncio.Server | None = None

    def authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (auth_data.login, auth_data.password) == (b"bot", PASSWORD.encode())
        return AuthResult(success=ok, handled=False, auth_data="bot" if ok else None)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address in self.refuse:
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.delivered.append((envelope, session.auth_data, session.ssl is not None))
        return "250 OK"

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[int]:
        def protocol() -> SMTP:
            return SMTP(
                self,
                hostname="relay.example.net",
                tls_context=self.certs.server_context(),
                require_starttls=True,
                auth_required=True,
                auth_require_tls=True,
                authenticator=self.authenticate,
            )

        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(protocol, HOST, 0)
        try:
            yield int(self.server.sockets[0].getsockname()[1])
        finally:
            self.server.close()
            await self.server.wait_closed()


def tls_relay_config(port: int, ca: Path, **relay: Any) -> EmailGatewayConfig:
    return config(
        relay={
            "host": HOST,
            "port": port,
            "tls": "starttls",
            "ca_file": str(ca),
            "username": "bot",
            "password": PASSWORD,
            "from_address": "help@example.com",
            "retries": 0,
            **relay,
        }
    )


async def test_relay_over_starttls_with_auth_and_refused_recipients(certs: Certs) -> None:
    relay = TlsRelay(certs, refuse=("gone@example.org", "left@example.org"))
    async with relay.serving() as port, running(tls_relay_config(port, certs.ca_crt)) as gw:
        result = await command(
            gw, {"type": "email.send", "id": "1", "to": ["ok@example.org", "gone@example.org"]}
        )
        assert result["ok"] is True, result
        assert result["refused"] == ["gone@example.org: 550 5.1.1 no such user"]
        ((envelope, auth_user, tls),) = relay.delivered
        assert envelope.rcpt_tos == ["ok@example.org"] and auth_user == "bot" and tls

        result = await command(
            gw, {"type": "email.send", "id": "2", "to": ["gone@example.org", "left@example.org"]}
        )
        assert result["ok"] is False and "all recipients refused" in result["error"]
        assert "gone@example.org: 550" in result["error"] and len(relay.delivered) == 1


async def test_relay_certificate_is_verified(certs: Certs, tmp_path: Path) -> None:
    other = make_certs(tmp_path / "other")
    relay = TlsRelay(certs)
    async with relay.serving() as port:
        async with running(tls_relay_config(port, other.ca_crt)) as gw:
            result = await command(gw, {"type": "email.send", "id": "1", "to": "a@example.org"})
            assert result["ok"] is False and "certificate verify failed" in result["error"]
        assert relay.delivered == []
        # validate_certs: false is the explicit way out (a relay with a self-made certificate)
        async with running(tls_relay_config(port, other.ca_crt, validate_certs=False)) as gw:
            result = await command(gw, {"type": "email.send", "id": "2", "to": "a@example.org"})
            assert result["ok"] is True, result
        assert len(relay.delivered) == 1


async def test_email_send_without_a_relay() -> None:
    async with running(config()) as gw:
        result = await command(gw, {"type": "email.send", "id": "1", "to": "a@b.org"})
    assert result["ok"] is False and "no relay configured" in result["error"]


# -- lifecycle --------------------------------------------------------------------------------


class SlowLayer(InMemoryChannelLayer):  # type: ignore[misc]
    """Holds every email.receive until ``release`` is set; ``entered`` says one arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        if message.get("type") == "email.receive":
            self.entered.set()
            await self.release.wait()
        await super().send(channel, message)


async def test_stop_finishes_the_mail_in_data_then_stops() -> None:
    layer = SlowLayer()
    gw = EmailGateway(config(), layer)
    task = asyncio.create_task(gw.run())
    await asyncio.wait_for(gw.started.wait(), 5)
    listener_closed = asyncio.Event()
    stop_accepting: Callable[[], None] = gw.server.stop_accepting

    def spy() -> None:
        stop_accepting()
        listener_closed.set()

    gw.server.stop_accepting = spy  # type: ignore[method-assign]
    port = gw.server.port
    async with RawSession.open(port) as idle:
        await idle.command(b"EHLO idle\r\n")
        in_flight = asyncio.create_task(data_then_hang_up(port, mail("in flight")))
        await asyncio.wait_for(layer.entered.wait(), 10)
        gw.stop()
        await asyncio.wait_for(listener_closed.wait(), 10)
        # stopping: an idle session may not start a new mail, and nobody new gets in
        assert (await idle.command(b"MAIL FROM:<a@x.org>\r\n")).startswith("421")
        with pytest.raises(OSError):
            _, writer = await asyncio.open_connection(HOST, port)
            writer.close()
        assert not task.done()  # still draining the mail in DATA
        layer.release.set()
        assert (await asyncio.wait_for(in_flight, 10)).code == 250
        await asyncio.wait_for(task, 10)
    assert (await layer.receive(NAME))["subject"] == "in flight"
    assert gw.readiness() == ["SMTP server not listening"]
    assert metric("gateway_transport_connected") == 0


async def test_readiness() -> None:
    gw = EmailGateway(config(), InMemoryChannelLayer())
    assert f"{NAME}: starting" in gw.ready_reasons()
    assert f"{NAME}: SMTP server not listening" in gw.ready_reasons()
    task = asyncio.create_task(gw.run())
    await asyncio.wait_for(gw.started.wait(), 5)
    assert gw.ready_reasons() == [] and gw.server.listening
    assert metric("gateway_transport_connected") == 1
    gw.stop()
    gw.stop()  # idempotent
    await asyncio.wait_for(task, 10)
    assert gw.readiness() == ["SMTP server not listening"]


async def test_port_taken_is_a_startup_error() -> None:
    async with running(config()) as first:
        second = EmailGateway(config(port=first.server.port), InMemoryChannelLayer())
        with pytest.raises(StartupError, match=r"cannot listen on 127\.0\.0\.1"):
            await asyncio.wait_for(second.run(), 10)


# -- on a real Redis --------------------------------------------------------------------------


async def test_redis_layer_carries_8bit_mail_and_pushes_back_while_down(
    redis_server: RedisServer,
) -> None:
    layer = resolve_layer(redis_server.url)
    worker = resolve_layer(redis_server.url)  # the consumer side: a separate connection pool
    try:
        async with running(config(accept_timeout=1.0), layer) as gw:
            junk = (
                b"From: J\xf6rg <j@example.org>\r\nTo: Z\xc3\xbc <bob@example.com>\r\n"
                b"Subject: bin\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
                b"--B\r\nContent-Type: text/plain\r\n\r\ncaf\xc3\xa9\r\n"
                b"--B\r\nContent-Type: application/octet-stream; name=b.bin\r\n"
                b"Content-Transfer-Encoding: base64\r\n\r\nAAH/gA==\r\n--B--\r\n"
            )
            code, _ = await asyncio.to_thread(smtplib_send, gw.server.port, junk)
            assert code == 250
            event = await asyncio.wait_for(worker.receive(NAME), 10)
            assert event["to"] == ["Zü <bob@example.com>"] and event["text"] == "café"
            assert event["attachments"][0]["content"] == b"\x00\x01\xff\x80"

            redis_server.kill()
            code, _ = await asyncio.to_thread(smtplib_send, gw.server.port, mail("while down"))
            assert code == 451
            assert f"{NAME}: layer unreachable" in gw.ready_reasons()
            redis_server.restart()
            code, _ = await asyncio.to_thread(smtplib_send, gw.server.port, mail("after"))
            assert code == 250
            # a fresh consumer: the old pool's connections died with the server
            await worker.close_pools()
            worker = resolve_layer(redis_server.url)
            assert (await asyncio.wait_for(worker.receive(NAME), 10))["subject"] == "after"
    finally:
        await layer.close_pools()
        await worker.close_pools()
