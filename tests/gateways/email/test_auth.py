"""Sender authentication end to end: a DNS server of the test's own (dnslib, a free loopback
port) publishes SPF, DKIM keys and DMARC records; real clients (swaks, aiosmtplib, raw sockets)
send signed, forged, broken, forwarded and proxied mail to the gateway, which runs in process
with its resolver pointed at that server.

Domains of the test zone:

* ``good.test``: SPF allows 127.0.0.1, DKIM key ``sel``, DMARC ``p=reject``.
* ``far.test``: SPF allows only 192.0.2.10 (not us), DKIM key ``sel``, DMARC ``p=reject``.
* ``bank.test``: SPF ``-all``, DMARC ``p=reject`` (the forged From).
* ``fwd.test``: a forwarder; SPF allows 127.0.0.1, ARC key ``arc``.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.message
import email.policy
import logging
import re
import socket
import struct
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import dkim
import pytest

from core.testing import Certs, GatewayProcess, RedisServer, SmtpSink, until
from gateways.email.gateway import EmailGateway
from tests.gateways.email.test_gateway import (
    HOST,
    PASSWORD,
    RawSession,
    config,
    metric,
    receive,
    running,
    swaks,
)
from tests.gateways.email.test_hostile import banner, email_process, send_raw_mail
from tests.gateways.email.test_hostile import processes as processes_fixture
from tests.support.dns import DkimKey, DnsServer, dkim_key

pytestmark = pytest.mark.timeout(90)

processes = processes_fixture  # gateway processes started by a test, killed after it

AUTHSERV = "mx.example.com"


@pytest.fixture(scope="module")
def keys() -> dict[str, DkimKey]:
    return {"good.test": dkim_key(), "far.test": dkim_key(), "fwd.test": dkim_key()}


@pytest.fixture
def zone(keys: dict[str, DkimKey]) -> Iterator[DnsServer]:
    server = DnsServer()
    server.txt("good.test", "v=spf1 ip4:127.0.0.1 -all")
    server.txt("sel._domainkey.good.test", keys["good.test"].txt)
    server.txt("_dmarc.good.test", "v=DMARC1; p=reject; rua=mailto:d@good.test")
    server.add("mail.good.test", "A", "127.0.0.1")
    server.txt("mail.good.test", "v=spf1 a -all")
    server.txt("far.test", "v=spf1 ip4:192.0.2.10 -all")
    server.txt("sel._domainkey.far.test", keys["far.test"].txt)
    server.txt("_dmarc.far.test", "v=DMARC1; p=reject")
    server.txt("bank.test", "v=spf1 -all")
    server.txt("_dmarc.bank.test", "v=DMARC1; p=reject")
    server.txt("fwd.test", "v=spf1 ip4:127.0.0.1 -all")
    server.txt("arc._domainkey.fwd.test", keys["fwd.test"].txt)
    with server:
        yield server


def verify(zone: DnsServer, mode: str = "report", **extra: Any) -> dict[str, Any]:
    return {
        "mode": mode,
        "authserv_id": AUTHSERV,
        "dns": {"nameservers": [zone.nameserver], "timeout": 1, "budget": 3},
        **extra,
    }


@contextlib.asynccontextmanager
async def gateway_for(zone: DnsServer, mode: str = "report", **email: Any) -> AsyncIterator[Any]:
    verify_extra = email.pop("verify_extra", {})
    async with running(config(verify=verify(zone, mode, **verify_extra), **email)) as gw:
        yield gw


def message(
    author: str = "Alice <alice@good.test>", subject: str = "hello", body: str = "hi there\n"
) -> bytes:
    msg = email.message.EmailMessage()
    msg["From"] = author
    msg["To"] = "bob@example.com"
    msg["Subject"] = subject
    msg["Message-ID"] = email.utils.make_msgid(domain="good.test")
    msg.set_content(body)
    return msg.as_bytes(policy=email.policy.SMTP)


def signed(raw: bytes, domain: str, key: DkimKey, selector: str = "sel") -> bytes:
    return dkim.sign(raw, selector.encode(), domain.encode(), key.private_pem) + raw


async def send(
    port: int, data: bytes, sender: str, helo: str = "mail.good.test"
) -> aiosmtplib.SMTPResponse:
    async with aiosmtplib.SMTP(
        hostname=HOST, port=port, timeout=10, start_tls=False, local_hostname=helo
    ) as client:
        await client.mail(sender)
        await client.rcpt("bob@example.com")
        return await client.data(data)


def header(event: dict[str, Any], name: str) -> list[str]:
    return [v for n, v in event["headers"] if n.lower() == name.lower()]


# -- the verdicts ------------------------------------------------------------------------------


async def test_signed_and_aligned_mail_passes_everything(
    zone: DnsServer, keys: dict[str, DkimKey], tmp_path: Path
) -> None:
    raw = signed(message(), "good.test", keys["good.test"])
    async with gateway_for(zone, include_raw=True) as gw:
        response = await send(gw.server.port, raw, "alice@good.test")
        assert response.code == 250
        event = await receive(gw)
        auth = event["auth"]
        assert auth["client"] == HOST and auth["mode"] == "report"
        assert auth["spf"] == {
            "result": "pass",
            "domain": "good.test",
            "reason": "sender SPF authorized",
        }
        assert auth["spf_helo"]["result"] == "pass"
        assert auth["spf_helo"]["domain"] == "mail.good.test"
        assert auth["dkim"] == [
            {"result": "pass", "domain": "good.test", "selector": "sel", "reason": None}
        ]
        assert auth["dmarc"] == {
            "result": "pass",
            "domain": "good.test",
            "org_domain": "good.test",
            "policy": "reject",
            "alignment": {"spf": True, "dkim": True},
            "disposition": "none",
            "override": None,
            "reason": None,
        }
        assert auth["arc"]["result"] == "none" and auth["quarantine"] is False
        assert event["kind"] == "normal"
        # our Authentication-Results on top of the headers and of raw
        name, value = event["headers"][0]
        assert name == "Authentication-Results" and value.startswith(f"{AUTHSERV}; ")
        for result in ("spf=pass", "dkim=pass header.d=good.test", "dmarc=pass", "arc=none"):
            assert result in value
        assert event["raw"].startswith(b"Authentication-Results: mx.example.com;\r\n\t")
        # the same through swaks, byte for byte from a file
        mail_file = tmp_path / "signed.eml"
        mail_file.write_bytes(signed(message(subject="via swaks"), "good.test", keys["good.test"]))
        code, replies = await swaks(
            gw.server.port,
            "-f",
            "alice@good.test",
            "-t",
            "bob@example.com",
            "--helo",
            "mail.good.test",
            "--data",
            f"@{mail_file}",
        )
        assert code == 0, replies
        event = await receive(gw)
        assert event["subject"] == "via swaks"
        assert [d["result"] for d in event["auth"]["dkim"]] == ["pass"]
        assert event["auth"]["dmarc"]["result"] == "pass"


async def test_forged_from_fails_dmarc_and_enforce_refuses_it(zone: DnsServer) -> None:
    forged = message(author="CEO <ceo@bank.test>", subject="wire the money")
    async with gateway_for(zone) as gw:
        assert (await send(gw.server.port, forged, "someone@good.test")).code == 250
        auth = (await receive(gw))["auth"]
        assert auth["spf"]["result"] == "pass"  # good.test may send from here: not aligned
        assert auth["dkim"] == []
        dmarc = auth["dmarc"]
        assert dmarc["result"] == "fail" and dmarc["domain"] == "bank.test"
        assert dmarc["policy"] == "reject" and dmarc["disposition"] == "reject"
        assert dmarc["alignment"] == {"spf": False, "dkim": False}
    async with gateway_for(zone, "enforce") as gw:
        refused = metric("gateway_errors_total", kind="dmarc_reject")
        with pytest.raises(aiosmtplib.SMTPDataError) as answer:
            await send(gw.server.port, forged, "someone@good.test")
        assert answer.value.code == 550 and "5.7.1" in answer.value.message
        assert metric("gateway_errors_total", kind="dmarc_reject") == refused + 1
        code, replies = await swaks(
            gw.server.port, "-f", "x@good.test", "-t", "bob@example.com", "--h-From",
            "ceo@bank.test",
        )  # fmt: skip
        assert code == 26 and "*550" in replies, replies  # 26: refused after DATA
        # and a good mail still goes through under enforce
        assert (await send(gw.server.port, message(), "alice@good.test")).code == 250
        assert (await receive(gw))["auth"]["dmarc"]["result"] == "pass"


async def test_quarantine_policy_sets_the_flag_under_enforce(zone: DnsServer) -> None:
    zone.txt("_dmarc.shady.test", "v=DMARC1; p=quarantine")
    async with gateway_for(zone, "enforce") as gw:
        raw = message(author="x@shady.test")
        assert (await send(gw.server.port, raw, "x@good.test")).code == 250
        auth = (await receive(gw))["auth"]
        assert auth["dmarc"]["disposition"] == "quarantine" and auth["quarantine"] is True


async def test_broken_body_hash_fails_dkim(zone: DnsServer, keys: dict[str, DkimKey]) -> None:
    raw = signed(message(body="pay 100 EUR\n"), "good.test", keys["good.test"])
    tampered = raw.replace(b"pay 100 EUR", b"pay 900 EUR")
    async with gateway_for(zone) as gw:
        assert (await send(gw.server.port, tampered, "alice@good.test")).code == 250
        event = await receive(gw)
        (sig,) = event["auth"]["dkim"]
        assert sig["result"] == "fail" and sig["domain"] == "good.test"
        assert "body hash mismatch" in sig["reason"]
        assert "dkim=fail" in event["headers"][0][1]
        # SPF still passes aligned: DMARC passes on SPF alone
        assert event["auth"]["dmarc"]["alignment"] == {"spf": True, "dkim": False}


def spacey_body(size: int) -> str:
    """Lines full of the whitespace relaxed canonicalisation rewrites: what costs dkimpy most."""
    line = "a  b c d e f g h i j k l m n o p q r s t u v w x y z\t\n"
    return line * (size // len(line))


async def test_signature_checks_run_in_a_parser_process_under_its_cpu_limit(
    zone: DnsServer, keys: dict[str, DkimKey]
) -> None:
    # 40 signatures over 400 KB of such lines: over a second of dkimpy's CPU. In a thread of
    # the gateway it held the GIL (the event loop stalled meanwhile) with no limit at all; in a
    # parser process the CPU limit stops it, and what was not verified is a verdict
    raw = message(body=spacey_body(400_000))
    signature = dkim.sign(raw, b"sel", b"good.test", keys["good.test"].private_pem,
                          canonicalize=(b"relaxed", b"relaxed"))  # fmt: skip
    limited = {"parser": {"cpu_limit": 0.2}, "verify_extra": {"max_signatures": 50}}
    async with gateway_for(zone, **limited) as gw:
        assert (await send(gw.server.port, signature * 40 + raw, "alice@good.test")).code == 250
        auth = (await receive(gw))["auth"]
        assert len(auth["dkim"]) == 40
        for verdict in auth["dkim"]:
            assert verdict["result"] == "policy" and verdict["domain"] == "good.test"
            assert "email.parser.cpu_limit" in verdict["reason"]
        # SPF still passes aligned: the mail is judged on what could be checked
        assert auth["dmarc"]["result"] == "pass"
        # the parser process goes on with the next mail
        next_mail = signed(message(), "good.test", keys["good.test"])
        assert (await send(gw.server.port, next_mail, "alice@good.test")).code == 250
        assert [d["result"] for d in (await receive(gw))["auth"]["dkim"]] == ["pass"]


async def test_only_max_signatures_are_verified_the_from_domains_first(
    zone: DnsServer, keys: dict[str, DkimKey]
) -> None:
    raw = message(author="Alice <alice@good.test>")
    ours = signed(raw, "good.test", keys["good.test"])[: -len(raw)]
    theirs = signed(raw, "far.test", keys["far.test"])[: -len(raw)]
    # four far.test signatures on top, good.test's (the aligned one) below them
    async with gateway_for(zone, verify_extra={"max_signatures": 2}) as gw:
        assert (await send(gw.server.port, theirs * 4 + ours + raw, "x@far.test")).code == 250
        auth = (await receive(gw))["auth"]
    results = [(d["domain"], d["result"]) for d in auth["dkim"]]
    assert results == [
        ("far.test", "pass"),
        ("far.test", "policy"),
        ("far.test", "policy"),
        ("far.test", "policy"),
        ("good.test", "pass"),
    ]
    assert "email.verify.max_signatures" in auth["dkim"][1]["reason"]
    assert auth["dmarc"]["result"] == "pass" and auth["dmarc"]["alignment"]["dkim"] is True
    # the keys of signatures that are not verified are not looked up either
    assert len(zone.asked(["sel._domainkey.far.test"])) == 1


async def test_an_arc_chain_over_max_arc_sets_fails_unverified(
    zone: DnsServer, keys: dict[str, DkimKey]
) -> None:
    raw = forwarded(keys)
    async with gateway_for(zone, verify_extra={"max_arc_sets": 0}) as gw:
        assert (await send(gw.server.port, raw, "list@fwd.test", helo="fwd.test")).code == 250
        arc = (await receive(gw))["auth"]["arc"]
    assert arc["result"] == "fail" and arc["sets"] == 1
    assert "email.verify.max_arc_sets" in arc["reason"]
    assert zone.asked(["arc._domainkey.fwd.test"]) == []


async def test_large_signed_mails_do_not_freeze_the_gateway(
    tmp_path: Path,
    zone: DnsServer,
    keys: dict[str, DkimKey],
    redis_server: RedisServer,
    processes: list[GatewayProcess],
) -> None:
    # 10 MB of such lines with five signatures: seconds of dkimpy's CPU per mail, two at once
    raw = message(body=spacey_body(10_000_000))
    signature = dkim.sign(raw, b"sel", b"good.test", keys["good.test"].private_pem,
                          canonicalize=(b"relaxed", b"relaxed"))  # fmt: skip
    hostile = signature * 5 + raw
    gateway, smtp_port = email_process(
        tmp_path,
        redis_server,
        attachment_store=str(tmp_path / "store"),
        verify={"mode": "report", "dns": {"nameservers": [zone.nameserver]}},
        parser={"processes": 2, "cpu_limit": 30, "timeout": 120},
    )
    processes.append(gateway.start())
    await gateway.wait_ready(60)
    sent = [threading.Event(), threading.Event()]
    sending = [
        asyncio.create_task(asyncio.to_thread(send_raw_mail, smtp_port, hostile, done))
        for done in sent
    ]
    await asyncio.to_thread(lambda: all(done.wait(120) for done in sent))
    # while the gateway checks them: the client timeouts are what is under test
    for _ in range(3):
        health = asyncio.to_thread(gateway.get, "/healthz", 0.5)
        greeting = asyncio.to_thread(banner, smtp_port, 1.0)
        (status, _), first = await asyncio.gather(health, greeting)
        assert status == 200 and first.startswith(b"220 ")
        await asyncio.sleep(0.3)
    for task in sending:
        reply, text = await task
        assert reply == 250, text


def forwarded(keys: dict[str, DkimKey]) -> bytes:
    """far.test's signed mail, as a list at fwd.test passes it on: Subject tagged (which breaks
    far.test's signature), sealed with ARC over what fwd.test saw on arrival."""
    original = signed(message(author="Ana <ana@far.test>", subject="minutes"), "far.test",
                      keys["far.test"])  # fmt: skip
    seen = (
        b"Authentication-Results: fwd.test; dkim=pass header.d=far.test header.s=sel;"
        b" spf=pass smtp.mailfrom=ana@far.test; dmarc=pass header.from=far.test\r\n"
    )
    changed = seen + original.replace(b"Subject: minutes", b"Subject: [team] minutes")
    seal = dkim.arc_sign(changed, b"arc", b"fwd.test", keys["fwd.test"].private_pem, b"fwd.test")
    return b"".join(seal) + changed


async def test_trusted_forwarder_arc_seal_passes_and_overrides_dmarc(
    zone: DnsServer, keys: dict[str, DkimKey]
) -> None:
    raw = forwarded(keys)
    # not trusted: the chain validates, DMARC fails, enforce refuses
    async with gateway_for(zone, "enforce") as gw:
        with pytest.raises(aiosmtplib.SMTPDataError) as answer:
            await send(gw.server.port, raw, "list-bounces@fwd.test", helo="fwd.test")
        assert answer.value.code == 550
    trust = {"trusted_relays": [{"arc_domains": ["fwd.test"]}]}
    async with gateway_for(zone, "enforce", verify_extra=trust) as gw:
        response = await send(gw.server.port, raw, "list-bounces@fwd.test", helo="fwd.test")
        assert response.code == 250
        event = await receive(gw)
        auth = event["auth"]
        assert auth["arc"] == {
            "result": "pass",
            "sets": 1,
            "sealer": "fwd.test",
            "trusted": True,
            "reason": None,
        }
        assert [d["result"] for d in auth["dkim"]] == ["fail"]  # the subject tag broke it
        dmarc = auth["dmarc"]
        assert dmarc["result"] == "fail" and dmarc["override"] == "trusted_forwarder"
        assert dmarc["disposition"] == "none" and auth["quarantine"] is False
        assert "arc=pass" in event["headers"][0][1]


async def test_dns_down_is_temperror_and_the_mail_is_accepted(
    zone: DnsServer, keys: dict[str, DkimKey]
) -> None:
    zone.stop()
    raw = signed(message(), "good.test", keys["good.test"])
    async with gateway_for(zone, "enforce") as gw:
        before = metric("gateway_errors_total", kind="auth_temperror")
        assert (await send(gw.server.port, raw, "alice@good.test")).code == 250
        auth = (await receive(gw))["auth"]
        assert auth["spf"]["result"] == "temperror"
        assert auth["spf_helo"]["result"] == "temperror"
        assert [d["result"] for d in auth["dkim"]] == ["temperror"]
        assert auth["dmarc"]["result"] == "temperror"
        assert metric("gateway_errors_total", kind="auth_temperror") == before + 1
        # a forged From cannot be refused without its policy: accepted, temperror
        forged = message(author="ceo@bank.test")
        assert (await send(gw.server.port, forged, "x@good.test")).code == 250
        assert (await receive(gw))["auth"]["dmarc"]["result"] == "temperror"


async def test_a_name_whose_lookup_failed_is_not_asked_again_for_each_mail(
    zone: DnsServer,
) -> None:
    # slow.test's servers are broken: its SPF lookup times out. Every mail from there waited
    # that timeout again before its 250 (the failure was not remembered)
    zone.ignore("slow.test")
    async with gateway_for(zone) as gw:
        outages = metric("gateway_errors_total", kind="dns_outage")
        for n in range(3):
            raw = message(author="ana@slow.test", subject=f"m{n}")
            assert (await send(gw.server.port, raw, "ana@slow.test")).code == 250
            auth = (await receive(gw))["auth"]
            assert auth["spf"]["result"] == "temperror"
            if n == 0:
                asked = len(zone.asked(["slow.test"]))
        assert asked >= 1 and len(zone.asked(["slow.test"])) == asked
        # the resolver itself answers (its probe did): no outage, other domains are asked
        assert metric("gateway_errors_total", kind="dns_outage") == outages
        assert (await send(gw.server.port, message(), "alice@good.test")).code == 250
        assert (await receive(gw))["auth"]["spf"]["result"] == "pass"


async def test_dns_down_fails_lookups_at_once_and_is_logged_once(
    zone: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    # the resolver stops answering (the usual outage: queries time out). Each mail waited its
    # lookups' timeout, holding its SMTP session; now the first mails find out, the rest fail
    # at once until the resolver answers again
    domains = [f"d{n}.test" for n in range(4)]
    async with gateway_for(zone) as gw:
        outages = metric("gateway_errors_total", kind="dns_outage")
        temperrors = metric("gateway_errors_total", kind="auth_temperror")
        zone.silent = True
        with caplog.at_level(logging.INFO, "gateway.email"):
            raw = message(author="ana@first.test")
            assert (await send(gw.server.port, raw, "ana@first.test")).code == 250
            assert (await receive(gw))["auth"]["dmarc"]["result"] == "temperror"
            await until(lambda: "do not answer" in caplog.text, 30, "the outage found by the probe")
            before = len(zone.asked())
            for domain in domains:
                raw = message(author=f"ana@{domain}")
                assert (await send(gw.server.port, raw, f"ana@{domain}")).code == 250
                auth = (await receive(gw))["auth"]
                assert auth["spf"]["result"] == "temperror"
                assert auth["dmarc"]["result"] == "temperror"
            # none of them was asked for: at most the probe of the root
            assert {q for q in zone.asked()[before:]} <= {("", "NS")}
            assert not zone.asked([*domains, *(f"_dmarc.{d}" for d in domains)])
            assert metric("gateway_errors_total", kind="dns_outage") == outages + 1
            assert metric("gateway_errors_total", kind="auth_temperror") == temperrors + 5
            warnings = [r for r in caplog.records if "do not answer" in r.getMessage()]
            assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
            per_mail = [r for r in caplog.records if "some verdicts are temperror" in r.message]
            assert len(per_mail) <= 1  # only the mail that found the outage
            # the resolver answers again: the next probe ends the outage
            zone.silent = False
            await until(lambda: "answer again" in caplog.text, 30, "the outage's end")
        assert (await send(gw.server.port, message(), "alice@good.test")).code == 250
        assert (await receive(gw))["auth"]["dmarc"]["result"] == "pass"
        assert metric("gateway_errors_total", kind="dns_outage") == outages + 1


async def test_answers_are_cached(zone: DnsServer, keys: dict[str, DkimKey]) -> None:
    async with gateway_for(zone) as gw:
        for n in range(3):
            raw = signed(message(subject=f"m{n}"), "good.test", keys["good.test"])
            assert (await send(gw.server.port, raw, "alice@good.test")).code == 250
            assert (await receive(gw))["auth"]["dmarc"]["result"] == "pass"
    asked = zone.asked(["good.test", "sel._domainkey.good.test", "_dmarc.good.test"])
    assert sorted(asked) == [
        ("_dmarc.good.test", "TXT"),
        ("good.test", "TXT"),
        ("sel._domainkey.good.test", "TXT"),
    ]


async def test_verify_off_makes_no_lookups(zone: DnsServer) -> None:
    async with gateway_for(zone, "off") as gw:
        assert (await send(gw.server.port, message(), "alice@good.test")).code == 250
        event = await receive(gw)
        assert event["auth"] is None and event["headers"][0][0] != "Authentication-Results"
    assert zone.asked() == []


async def test_forged_authentication_results_of_ours_are_dropped(zone: DnsServer) -> None:
    raw = (
        f"Authentication-Results: {AUTHSERV}; dmarc=pass header.from=bank.test\r\n".encode()
        + b"Authentication-Results: other.example; spf=none\r\n"
        + message(author="ceo@bank.test")
    )
    async with gateway_for(zone) as gw:
        assert (await send(gw.server.port, raw, "x@good.test")).code == 250
        event = await receive(gw)
    results = header(event, "Authentication-Results")
    assert len(results) == 2 and "dmarc=fail" in results[0]
    assert results[1] == "other.example; spf=none"


async def test_trusted_relay_spf_is_believed(zone: DnsServer) -> None:
    # the relay (127.0.0.1 here) checked SPF for far.test against the real client: pass
    stamped = (
        b"Authentication-Results: edge.example.com; spf=pass smtp.mailfrom=ana@far.test\r\n"
        + message(author="ana@far.test")
    )
    relay = {"trusted_relays": [{"networks": ["127.0.0.0/8"], "authserv_id": "edge.example.com"}]}
    async with gateway_for(zone, "enforce", verify_extra=relay) as gw:
        assert (await send(gw.server.port, stamped, "ana@far.test")).code == 250
        auth = (await receive(gw))["auth"]
    assert auth["relay"] == "edge.example.com"
    assert auth["spf"]["result"] == "pass" and auth["dmarc"]["result"] == "pass"
    # without the trust, SPF is ours: 127.0.0.1 may not send for far.test
    async with gateway_for(zone, "report") as gw:
        assert (await send(gw.server.port, stamped, "ana@far.test")).code == 250
        auth = (await receive(gw))["auth"]
    assert auth["relay"] is None and auth["spf"]["result"] == "fail"


# -- kind ---------------------------------------------------------------------------------------


DSN = (
    b"From: Mail Delivery System <MAILER-DAEMON@mx.far.test>\r\n"
    b"To: bob@example.com\r\n"
    b"Subject: Undelivered Mail Returned to Sender\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
    b"--B\r\nContent-Type: text/plain\r\n\r\nYour mail could not be delivered.\r\n"
    b"--B\r\nContent-Type: message/delivery-status\r\n\r\n"
    b"Reporting-MTA: dns; mx.far.test\r\n\r\n"
    b"Final-Recipient: rfc822; gone@far.test\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n"
    b"--B\r\nContent-Type: text/rfc822-headers\r\n\r\nSubject: hi\r\n\r\n--B--\r\n"
)


async def test_kind_of_mail(zone: DnsServer) -> None:
    auto = message(subject="Re: hello").replace(
        b"Subject:", b"Auto-Submitted: auto-replied\r\nSubject:"
    )
    listed = message(subject="news").replace(b"Subject:", b"List-Id: <news.good.test>\r\nSubject:")
    async with gateway_for(zone, "off") as gw:
        port = gw.server.port
        for data, sender, kind in (
            (DSN, "", "bounce"),
            (auto, "alice@good.test", "auto_reply"),
            (listed, "news@good.test", "list"),
            (message(), "alice@good.test", "normal"),
        ):
            assert (await send(port, data, sender)).code == 250
            assert (await receive(gw))["kind"] == kind
        code, _ = await swaks(
            port, "-f", "", "-t", "bob@example.com", "--h-Subject", "Out of Office: back Monday"
        )
        assert code == 0
        assert (await receive(gw))["kind"] == "auto_reply"


# -- implicit TLS and PROXY protocol --------------------------------------------------------------


async def test_implicit_tls_listener(zone: DnsServer, certs: Certs, tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text(f"alice:{PASSWORD}\n")
    tls = {
        "cert_file": str(certs.server_crt),
        "key_file": str(certs.server_key),
        "implicit_port": 0,
    }
    async with gateway_for(zone, "off", tls=tls, auth={"users_file": str(users)}) as gw:
        port = gw.server.implicit_port
        assert port is not None and port != gw.server.port
        code, replies = await swaks(
            port,
            "-t",
            "bob@example.com",
            "--tlsc",
            "--tls-verify",
            "--tls-ca-path",
            str(certs.ca_crt),
            "-a",
            "PLAIN",
            "-au",
            "alice",
            "-ap",
            PASSWORD,
            "--h-Subject",
            "implicit",
        )
        assert code == 0, replies
        event = await receive(gw)
        assert event["subject"] == "implicit" and event["tls"] is True
        assert event["auth_user"] == "alice"
        # plain text on that port is no SMTP session
        code, _ = await swaks(port, "-t", "bob@example.com", "--timeout", "5")
        assert code != 0
        # STARTTLS still on the main port
        code, replies = await swaks(
            gw.server.port, "-t", "bob@example.com", "--tls", "--tls-ca-path", str(certs.ca_crt)
        )
        assert code == 0, replies
        assert (await receive(gw))["tls"] is True


def proxy_v2(source: str, port: int = 40000) -> bytes:
    """A PROXY protocol v2 header: PROXY command, TCP over IPv4, ``source`` → 127.0.0.1:25."""
    addresses = (
        socket.inet_aton(source) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", port, 25)
    )
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", 12) + addresses


async def proxied_session(port: int, header: bytes, data: bytes, sender: str) -> list[str]:
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(header)
    session = RawSession(reader, writer)
    try:
        assert (await session.reply()).startswith("220")
        await session.command(b"EHLO mail.far.test\r\n")
        writer.write(f"MAIL FROM:<{sender}>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n".encode())
        replies = await session.replies(3)
        writer.write(data + b".\r\n")
        replies.append(await session.reply())
        return replies
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_proxy_v2_header_gives_peer_and_spf_the_client_address(
    zone: DnsServer, keys: dict[str, DkimKey]
) -> None:
    proxy = {"trusted": ["127.0.0.0/8"], "timeout": 5}
    raw = message(author="ana@far.test")
    async with gateway_for(zone, proxy_protocol=proxy) as gw:
        replies = await proxied_session(gw.server.port, proxy_v2("192.0.2.10"), raw, "ana@far.test")
        assert [r[:3] for r in replies] == ["250", "250", "354", "250"], replies
        event = await receive(gw)
        assert event["peer"] == "192.0.2.10" and event["proxy"] == HOST
        auth = event["auth"]
        assert auth["client"] == "192.0.2.10"
        assert auth["spf"]["result"] == "pass"  # far.test allows 192.0.2.10 only
        assert auth["dmarc"]["result"] == "pass"
        assert "(client 192.0.2.10)" in event["headers"][0][1]
        # PROXY v1 too
        v1 = b"PROXY TCP4 192.0.2.99 127.0.0.1 40001 25\r\n"
        replies = await proxied_session(gw.server.port, v1, raw, "ana@far.test")
        assert replies[-1].startswith("250")
        event = await receive(gw)
        assert event["peer"] == "192.0.2.99" and event["auth"]["spf"]["result"] == "fail"


async def test_proxy_header_from_an_untrusted_address_is_refused(zone: DnsServer) -> None:
    proxy = {"trusted": ["10.0.0.0/8"]}
    async with gateway_for(zone, "off", proxy_protocol=proxy) as gw:
        before = metric("gateway_errors_total", kind="proxy_untrusted")
        reader, writer = await asyncio.open_connection(HOST, gw.server.port)
        writer.write(proxy_v2("192.0.2.10"))
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, no banner
        writer.close()
        assert metric("gateway_errors_total", kind="proxy_untrusted") == before + 1


# -- sending ------------------------------------------------------------------------------------


async def test_outgoing_mail_is_dkim_signed(keys: dict[str, DkimKey], tmp_path: Path) -> None:
    key_file = tmp_path / "dkim.pem"
    key_file.write_bytes(keys["good.test"].private_pem)
    sink = await SmtpSink().start()
    try:
        relay = {
            "host": HOST,
            "port": sink.port,
            "tls": "none",
            "from_address": "Help <help@good.test>",
            "dkim": {"domain": "good.test", "selector": "sel", "private_key_file": str(key_file)},
        }
        async with running(config(relay=relay)) as gw:
            result = await gw_command(
                gw,
                {
                    "type": "email.send",
                    "id": "s1",
                    "to": "Jörg <jorg@far.test>",
                    "subject": "Re: Grüße",
                    "text": "Hallo Jörg,\nwir kümmern uns darum.\n",
                    "in_reply_to": "<m1@far.test>",
                },
            )
            assert result["ok"] is True, result
            envelope: Any = await asyncio.wait_for(sink.received.get(), 10)
    finally:
        await sink.stop()
    data = envelope.original_content
    assert data.startswith(b"DKIM-Signature: ")
    assert re.search(rb"\r\nAuto-Submitted: auto-replied\r\n", data)

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        assert name == b"sel._domainkey.good.test."
        return keys["good.test"].txt.encode()

    assert dkim.verify(data, dnsfunc=dnsfunc) is True
    assert dkim.verify(data.replace(b"darum", b"nichts"), dnsfunc=dnsfunc) is False


async def gw_command(gw: EmailGateway, message: dict[str, Any]) -> dict[str, Any]:
    from core import testing

    return dict(await testing.command(gw.layer, gw.config.command_channel, message))
