"""The email gateway against real SMTP clients (smtplib, raw sockets, swaks), in process.

Bad input of issue 2: relay attempts, oversize mail, AUTH before TLS, SMTP smuggling sequences,
8-bit junk and malformed MIME — each answered correctly, and the next client is still served.
"""

from __future__ import annotations

import asyncio
import smtplib
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from channels.layers import InMemoryChannelLayer

from core.testing import Certs, SmtpSink, make_certs
from gateways.email.config import EmailGatewayConfig
from gateways.email.gateway import EmailGateway
from tests.conftest import service


def config(**email: Any) -> EmailGatewayConfig:
    return EmailGatewayConfig.model_validate(
        {
            "gateway": "email",
            "name": "inbox",
            "shutdown_grace": 5,
            "email": {"port": 0, "accept": ["example.com"], **email},
        }
    )


async def start(
    cfg: EmailGatewayConfig, layer: Any = None
) -> tuple[EmailGateway, asyncio.Task[None]]:
    gateway = EmailGateway(cfg, layer or InMemoryChannelLayer())
    task = asyncio.create_task(gateway.run())
    await asyncio.wait_for(gateway.started.wait(), 5)
    return gateway, task


@pytest.fixture
async def gateway() -> AsyncIterator[EmailGateway]:
    gw, task = await start(config(max_message_size=20_000))
    yield gw
    gw.stop()
    await asyncio.wait_for(task, 10)


async def receive(gateway: EmailGateway, timeout: float = 5) -> dict[str, Any]:
    message: dict[str, Any] = await asyncio.wait_for(gateway.layer.receive("inbox"), timeout)
    return message


def smtp(gateway: EmailGateway) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", gateway.server.port, timeout=10)


def sendmail(gateway: EmailGateway, data: bytes, rcpt: str = "a@example.com") -> tuple[int, bytes]:
    """MAIL, RCPT, DATA with smtplib; the final answer."""
    with smtp(gateway) as client:
        client.ehlo()
        client.mail("sender@example.org")
        code, _ = client.rcpt(rcpt)
        if code != 250:
            return code, b""
        return client.data(data)


MAIL = (
    b"From: =?utf-8?q?J=C3=B6rg?= <jorg@example.org>\r\nTo: a@example.com\r\n"
    b"Subject: hello\r\nMessage-ID: <m1@example.org>\r\n\r\nbody\r\n"
)


async def test_accepts_and_delivers_every_envelope_key(gateway: EmailGateway) -> None:
    code, _ = await asyncio.to_thread(sendmail, gateway, MAIL)
    assert code == 250
    event = await receive(gateway)
    assert event["type"] == "email.receive" and event["gateway"] == "inbox"
    assert event["id"] == "<m1@example.org>" and event["reply_channel"] == "inbox.send"
    assert isinstance(event["time"], float)
    assert event["mail_from"] == "sender@example.org" and event["rcpt_to"] == ["a@example.com"]
    assert event["peer"] == "127.0.0.1" and event["tls"] is False and event["auth_user"] is None
    assert event["from"] == "Jörg <jorg@example.org>" and event["text"] == "body\n"


async def test_relay_attempt_is_550_and_next_client_served(gateway: EmailGateway) -> None:
    code, _ = await asyncio.to_thread(sendmail, gateway, MAIL, "victim@elsewhere.net")
    assert code == 550
    code, _ = await asyncio.to_thread(sendmail, gateway, MAIL)
    assert code == 250
    assert (await receive(gateway))["rcpt_to"] == ["a@example.com"]


async def test_oversize_is_552(gateway: EmailGateway) -> None:
    big = MAIL + (b"x" * 76 + b"\r\n") * 400

    def declared_size() -> int:
        with smtp(gateway) as client:
            client.ehlo()
            code, _ = client.mail("s@example.org", ["SIZE=500000"])
            return code

    assert await asyncio.to_thread(declared_size) == 552
    assert (await asyncio.to_thread(sendmail, gateway, big))[0] == 552
    assert (await asyncio.to_thread(sendmail, gateway, MAIL))[0] == 250


async def test_swaks_relay_oversize_and_8bit(gateway: EmailGateway, tmp_path: Path) -> None:
    swaks = service("swaks")
    base = [swaks, "-s", "127.0.0.1", "-p", str(gateway.server.port), "-f", "s@example.org"]

    async def run(*args: str) -> int:
        proc = await asyncio.create_subprocess_exec(
            *base, *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        return await asyncio.wait_for(proc.wait(), 30)

    assert await run("-t", "x@evil.example.net") == 24  # no RCPT accepted
    body = tmp_path / "body.txt"
    body.write_text(("x" * 75 + "\n") * 400)
    assert await run("-t", "a@example.com", "--body", f"@{body}") == 26  # 552 after DATA
    assert (
        await run(
            "-t",
            "a@example.com",
            "--add-header",
            "MIME-Version: 1.0",
            "--add-header",
            "Content-Type: text/plain; charset=utf-8",
            "--add-header",
            "Content-Transfer-Encoding: 8bit",
            "--body",
            "Grüße, café ✓",
        )
        == 0
    )
    assert (await receive(gateway))["text"].strip() == "Grüße, café ✓"
    csv = tmp_path / "report.csv"
    csv.write_text("a,b\n1,2\n")
    assert (
        await run(
            "-t",
            "a@example.com",
            "--attach-type",
            "text/csv",
            "--attach-name",
            "report.csv",
            "--attach",
            f"@{csv}",
        )
        == 0
    )
    attachments = (await receive(gateway))["attachments"]
    assert [(a["filename"], a["content"]) for a in attachments] == [("report.csv", b"a,b\n1,2\n")]


def raw_session(port: int, script: bytes) -> list[str]:
    """Send ``script`` on a raw socket after the banner; every reply line until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220")
        sock.sendall(script)
        sock.shutdown(socket.SHUT_WR)
        return [line.decode().strip() for line in reader]


async def test_smuggling_sequences_do_not_end_data(gateway: EmailGateway) -> None:
    for fake_end in (b"\n.\n", b"\r\n.\n", b"\n.\r\n"):
        script = (
            b"EHLO x\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<a@example.com>\r\nDATA\r\n"
            b"Subject: one\r\n\r\nfirst"
            + fake_end
            + b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<a@example.com>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nsecond\r\n.\r\nQUIT\r\n"
        )
        replies = await asyncio.to_thread(raw_session, gateway.server.port, script)
        # one DATA, ended by the real <CR><LF>.<CR><LF>: refused for its bare LF, nothing queued
        assert sum(r.startswith("354") for r in replies) == 1, replies
        assert any(r.startswith("550 5.5.2") for r in replies), replies
    with pytest.raises(TimeoutError):
        await receive(gateway, timeout=0.5)
    assert (await asyncio.to_thread(sendmail, gateway, MAIL))[0] == 250
    assert (await receive(gateway))["subject"] == "hello"


async def test_bare_lf_accepted_when_configured() -> None:
    gw, task = await start(config(bare_lf="accept"))
    try:
        script = (
            b"EHLO x\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<a@example.com>\r\nDATA\r\n"
            b"Subject: lf\r\n\r\nline\nother\n.\nstill body\r\n.\r\nQUIT\r\n"
        )
        replies = await asyncio.to_thread(raw_session, gw.server.port, script)
        assert any(r.startswith("250 2.0.0") for r in replies), replies
        event = await receive(gw)
        assert "still body" in event["text"]  # <LF>.<LF> did not end DATA
    finally:
        gw.stop()
        await task


async def test_malformed_mime_and_junk_are_delivered_with_defects(gateway: EmailGateway) -> None:
    junk = (
        b"Subject: \xff\xfe junk\r\nMessage-ID: <junk@x>\r\nContent-Type: multipart/mixed; "
        b"boundary=B\r\n\r\n--B\r\nContent-Type: text/plain; charset=no-such-charset\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n!!not base64!!\r\n"
    )
    assert (await asyncio.to_thread(sendmail, gateway, junk))[0] == 250
    event = await receive(gateway)
    assert event["id"] == "<junk@x>"
    assert event["defects"], event
    assert "\ufffd" in event["subject"] or "junk" in event["subject"]
    assert (await asyncio.to_thread(sendmail, gateway, MAIL))[0] == 250


async def test_full_layer_is_451_then_accepted() -> None:
    layer = InMemoryChannelLayer(capacity=1)
    gw, task = await start(config(accept_timeout=0.3), layer)
    try:
        await layer.send("inbox", {"type": "filler"})
        assert (await asyncio.to_thread(sendmail, gw, MAIL))[0] == 451
        assert (await layer.receive("inbox"))["type"] == "filler"
        assert (await asyncio.to_thread(sendmail, gw, MAIL))[0] == 250
        assert (await layer.receive("inbox"))["id"] == "<m1@example.org>"
    finally:
        gw.stop()
        await task


async def test_our_bug_is_451_never_5xx(
    gateway: EmailGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(raw: bytes) -> dict[str, Any]:
        raise RuntimeError("parser bug")

    monkeypatch.setattr("gateways.email.gateway.parse_mail", broken)
    assert (await asyncio.to_thread(sendmail, gateway, MAIL))[0] == 451


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return make_certs(tmp_path)


def tls_config(certs: Certs, tmp_path: Path) -> EmailGatewayConfig:
    users = tmp_path / "users"
    users.write_text("alice:s3cret-pw\n")
    return config(
        tls={"cert_file": str(certs.server_crt), "key_file": str(certs.server_key)},
        auth={"users_file": str(users)},
    )


async def test_auth_only_after_starttls(certs: Certs, tmp_path: Path) -> None:
    gw, task = await start(tls_config(certs, tmp_path))
    context = ssl.create_default_context(cafile=str(certs.ca_crt))

    def before_tls() -> None:
        with smtp(gw) as client:
            client.ehlo()
            assert not client.has_extn("auth")
            code, _ = client.docmd("AUTH", "PLAIN AGFsaWNlAHMzY3JldC1wdw==")
            assert code == 538, code  # encryption required for requested authentication

    def wrong_password() -> int:
        with smtp(gw) as client:
            client.starttls(context=context)
            try:
                client.login("alice", "wrong")
            except smtplib.SMTPAuthenticationError as exc:
                return exc.smtp_code
            return 0

    def with_tls() -> None:
        with smtp(gw) as client:
            client.starttls(context=context)
            client.login("alice", "s3cret-pw")
            client.sendmail("s@example.org", ["a@example.com"], MAIL)

    try:
        await asyncio.to_thread(before_tls)
        assert await asyncio.to_thread(wrong_password) == 535
        await asyncio.to_thread(with_tls)
        event = await receive(gw)
        assert event["tls"] is True and event["auth_user"] == "alice"
    finally:
        gw.stop()
        await task


async def test_swaks_auth_before_tls_and_with_tls(certs: Certs, tmp_path: Path) -> None:
    swaks = service("swaks")
    gw, task = await start(tls_config(certs, tmp_path))
    base = [
        swaks,
        "-s",
        "127.0.0.1",
        "-p",
        str(gw.server.port),
        "-f",
        "s@example.org",
        "-t",
        "a@example.com",
        "-a",
        "PLAIN",
        "-au",
        "alice",
        "-ap",
        "s3cret-pw",
    ]

    async def run(*args: str) -> int:
        proc = await asyncio.create_subprocess_exec(
            *base, *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        return await asyncio.wait_for(proc.wait(), 30)

    try:
        assert await run() == 28  # host did not advertise authentication before STARTTLS
        assert await run("--tls", "--tls-verify", "--tls-ca-path", str(certs.ca_crt)) == 0
        assert (await receive(gw))["auth_user"] == "alice"
    finally:
        gw.stop()
        await task


async def test_email_send_result_threading_and_retry() -> None:
    sink = await SmtpSink(replies=["451 4.3.0 busy, try later"]).start()
    gw, task = await start(
        config(
            relay={
                "host": "127.0.0.1",
                "port": sink.port,
                "tls": "none",
                "from_address": "bot@example.com",
                "retries": 2,
                "retry_max_delay": 1,
            }
        )
    )
    layer = gw.layer
    try:
        await layer.send(
            "inbox.send",
            {
                "type": "email.send",
                "id": "c1",
                "result_channel": "results",
                "to": "Bob <bob@example.org>",
                "subject": "Re: hi",
                "text": "answer",
                "in_reply_to": "<orig@example.org>",
                "references": ["<root@example.org>"],
            },
        )
        result = await asyncio.wait_for(layer.receive("results"), 15)
        assert result["ok"] is True and result["id"] == "c1", result
        envelope: Any = await asyncio.wait_for(sink.received.get(), 5)
        assert sink.attempts == 2  # the 451 was retried
        assert envelope.rcpt_tos == ["bob@example.org"]
        text = envelope.original_content.decode()
        assert "In-Reply-To: <orig@example.org>" in text
        assert "References: <root@example.org> <orig@example.org>" in text
        assert f"Message-ID: {result['message_id']}" in text

        sink.replies = ["554 5.7.1 rejected"]
        bad = [
            {"type": "email.send", "id": "c2", "to": "a@b.c", "subject": "x\r\nBcc: e@f.g"},
            {"type": "email.send", "id": "c3", "subject": "no recipient"},
            {"type": "email.send", "id": "c4", "to": "a@b.c", "colour": "red"},
            {"type": "email.bogus", "id": "c5"},
            {"type": "email.send", "id": "c6", "to": "a@b.c", "text": "x"},  # relay says 554
        ]
        for command in bad:
            await layer.send("inbox.send", {**command, "result_channel": "results"})
        results = {}
        for _ in bad:
            r = await asyncio.wait_for(layer.receive("results"), 15)
            results[r["id"]] = r
        assert all(r["ok"] is False for r in results.values()), results
        assert "CR, LF" in results["c2"]["error"]
        assert "at least one recipient" in results["c3"]["error"]
        assert "unknown keys ['colour']" in results["c4"]["error"]
        assert "unknown command 'email.bogus'" in results["c5"]["error"]
        assert "554" in results["c6"]["error"]
        # still serving
        await layer.send(
            "inbox.send",
            {"type": "email.send", "id": "c7", "to": "a@b.c", "result_channel": "results"},
        )
        assert (await asyncio.wait_for(layer.receive("results"), 15))["ok"] is True
    finally:
        gw.stop()
        await task
        await sink.stop()


async def test_stop_finishes_mail_in_data() -> None:
    """SIGTERM during DATA: the mail being handed to the layer gets its 250 before the exit."""

    class SlowLayer(InMemoryChannelLayer):  # type: ignore[misc]
        release = asyncio.Event()

        async def send(self, channel: str, message: dict[str, Any]) -> None:
            if message.get("type") == "email.receive":
                await self.release.wait()
            await super().send(channel, message)

    layer = SlowLayer()
    gw, task = await start(config(), layer)
    sending = asyncio.create_task(asyncio.to_thread(sendmail, gw, MAIL))
    await asyncio.sleep(0.3)
    gw.stop()
    await asyncio.sleep(0.2)
    assert not task.done()
    layer.release.set()
    assert (await asyncio.wait_for(sending, 10))[0] == 250
    await asyncio.wait_for(task, 10)
    assert (await layer.receive("inbox"))["id"] == "<m1@example.org>"


async def test_refused_mail_leaves_no_stored_attachment(tmp_path: Path) -> None:
    from email.message import EmailMessage
    from email.policy import SMTP as SMTP_POLICY

    layer = InMemoryChannelLayer(capacity=1)
    store = tmp_path / "store"
    gw, task = await start(
        config(accept_timeout=0.3, attachment_store=str(store), max_inline_attachment=10), layer
    )
    mail = EmailMessage()
    mail["From"], mail["To"], mail["Message-ID"] = "s@example.org", "a@example.com", "<att@x>"
    mail.set_content("see attached")
    mail.add_attachment(
        b"0123456789" * 100, maintype="application", subtype="pdf", filename="x.pdf"
    )
    try:
        await layer.send("inbox", {"type": "filler"})  # layer full: the mail gets 451
        assert (await asyncio.to_thread(sendmail, gw, mail.as_bytes(policy=SMTP_POLICY)))[0] == 451
        assert not any(store.glob("*")), list(store.glob("*"))
        await layer.receive("inbox")
        assert (await asyncio.to_thread(sendmail, gw, mail.as_bytes(policy=SMTP_POLICY)))[0] == 250
        event = await layer.receive("inbox")
        [attachment] = event["attachments"]
        assert attachment["content"] is None
        assert await asyncio.to_thread(Path(attachment["path"]).read_bytes) == b"0123456789" * 100
        assert len(list(store.glob("*"))) == 1
    finally:
        gw.stop()
        await task
