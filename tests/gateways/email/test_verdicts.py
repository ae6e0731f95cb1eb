"""The pure part of sender authentication (gateways/email/verdicts.py): no DNS, no sockets."""

from __future__ import annotations

from typing import Any

import authres
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateways.email.verdicts import (
    ArcVerdict,
    AuthVerdict,
    DkimVerdict,
    DmarcRecord,
    DmarcVerdict,
    SpfVerdict,
    authentication_results,
    classify,
    evaluate_dmarc,
    event_headers,
    from_domain,
    org_domain,
    parse_dmarc_record,
    relay_results,
    select_dmarc_record,
    smtp_refusal,
    trusted_arc_override,
)

RESULTS = ["pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"]
REJECT = DmarcRecord("reject", "reject")


def spf(result: str = "pass", domain: str | None = "example.org") -> SpfVerdict:
    return SpfVerdict(result, domain, f"a@{domain}" if domain else None)


def dkim_(result: str = "pass", domain: str = "example.org") -> DkimVerdict:
    return DkimVerdict(result, domain, "sel")


@pytest.mark.parametrize(
    ("domain", "org"),
    [
        ("example.org", "example.org"),
        ("mail.example.org", "example.org"),
        ("a.b.example.co.uk", "example.co.uk"),
        ("Mail.Example.ORG.", "example.org"),
        ("x.sender.test", "sender.test"),
    ],
)
def test_org_domain(domain: str, org: str) -> None:
    assert org_domain(domain) == org


@pytest.mark.parametrize(
    ("values", "domain", "problem"),
    [
        (["Alice <alice@Example.ORG>"], "example.org", None),
        ([], None, "no From header"),
        (["a@x.org", "b@y.org"], None, "several From headers"),
        (["a@x.org, b@y.org"], None, "From holds no single address"),
        (["undisclosed"], None, "From address has no valid domain"),
    ],
)
def test_from_domain(values: list[str], domain: str | None, problem: str | None) -> None:
    assert from_domain(values) == (domain, problem)


def test_dmarc_records() -> None:
    assert select_dmarc_record([b"v=spf1 -all", b"v=DMARC1; p=none"]) == b"v=DMARC1; p=none"
    assert select_dmarc_record([b"v=DMARC1; p=none", b"v=DMARC1; p=reject"]) is None
    assert select_dmarc_record([b"v=DMARC10; p=none"]) is None
    record = parse_dmarc_record(b"v=DMARC1; p=Quarantine; sp=none; adkim=s; aspf=s; pct=20")
    assert record == DmarcRecord("quarantine", "none", "s", "s", 20, False)
    assert parse_dmarc_record(b"v=DMARC1; p=reject; pct=x; t=y") == DmarcRecord(
        "reject", "reject", pct=100, testing=True
    )
    for bad in (b"v=DMARC1; p=maybe", b"v=DMARC1; rua=mailto:x@y", b"v=DMARC1; p=reject; ;=;"):
        with pytest.raises(ValueError, match="bad DMARC record"):
            parse_dmarc_record(bad)


def test_dmarc_alignment() -> None:
    # relaxed: same organisational domain
    v = evaluate_dmarc(
        "mail.example.org", REJECT, "example.org", spf(domain="bounce.example.org"), []
    )
    assert v.result == "pass" and v.spf_aligned and not v.dkim_aligned
    # strict: the same domain only
    strict = DmarcRecord("reject", "reject", adkim="s", aspf="s")
    v = evaluate_dmarc("mail.example.org", strict, "example.org", spf(domain="example.org"), [])
    assert v.result == "fail" and v.disposition == "reject"
    # a pass for another organisation never aligns, nor a failed signature of the right one
    v = evaluate_dmarc(
        "example.org", REJECT, "example.org", spf(domain="evil.net"),
        [dkim_(domain="evil.net"), dkim_("fail")],
    )  # fmt: skip
    assert v.result == "fail" and v.reason
    v = evaluate_dmarc("example.org", REJECT, "example.org", spf("softfail"), [dkim_()])
    assert v.result == "pass" and v.dkim_aligned and v.disposition == "none"


def test_dmarc_policy_choice() -> None:
    record = DmarcRecord("reject", "quarantine")
    fail = spf("fail")
    assert evaluate_dmarc("example.org", record, "example.org", fail, []).disposition == "reject"
    sub = evaluate_dmarc("a.example.org", record, "example.org", fail, [])
    assert sub.policy == "quarantine" and sub.disposition == "quarantine"
    # pct: a draw at or above it lowers the disposition one step
    sampled = DmarcRecord("reject", "reject", pct=30)
    assert (
        evaluate_dmarc("example.org", sampled, "example.org", fail, [], sample=29.9).disposition
        == "reject"
    )
    out = evaluate_dmarc("example.org", sampled, "example.org", fail, [], sample=30)
    assert (out.disposition, out.override) == ("quarantine", "sampled_out")
    test_mode = DmarcRecord("quarantine", "quarantine", testing=True)
    out = evaluate_dmarc("example.org", test_mode, "example.org", fail, [])
    assert (out.disposition, out.override) == ("none", "policy_test_mode")


def test_dmarc_without_a_record() -> None:
    assert evaluate_dmarc(None, None, None, spf(), [], problem="no From header") == DmarcVerdict(
        "permerror", reason="no From header"
    )
    none = evaluate_dmarc("example.org", None, None, spf(), [], problem="no DMARC record")
    assert (none.result, none.org_domain, none.disposition) == ("none", "example.org", "none")
    temp = evaluate_dmarc("example.org", None, None, spf(), [], problem="timeout", temporary=True)
    assert temp.result == "temperror" and temp.disposition == "none"


@given(
    spf_result=st.sampled_from(RESULTS),
    dkim_results=st.lists(st.sampled_from(RESULTS), max_size=3),
    policy=st.sampled_from(["none", "quarantine", "reject"]),
    pct=st.integers(0, 100),
    sample=st.floats(0, 99.999),
    aligned=st.booleans(),
)
def test_dmarc_properties(
    spf_result: str,
    dkim_results: list[str],
    policy: Any,
    pct: int,
    sample: float,
    aligned: bool,
) -> None:
    domain = "example.org" if aligned else "other.net"
    record = DmarcRecord(policy, policy, pct=pct)
    v = evaluate_dmarc(
        "example.org", record, "example.org", spf(spf_result, domain),
        [dkim_(r, domain) for r in dkim_results],
        sample=sample,
    )  # fmt: skip
    passed = aligned and "pass" in [spf_result, *dkim_results]
    assert v.result == ("pass" if passed else "fail")
    order = ["none", "quarantine", "reject"]
    # never harsher than the policy; a pass is never held back
    assert order.index(v.disposition) <= order.index(policy)
    if passed:
        assert v.disposition == "none" and v.override is None
    elif sample < pct:
        assert v.disposition == policy


def verdict(mode: str = "report", **changes: Any) -> AuthVerdict:
    base: dict[str, Any] = {
        "mode": mode,
        "authserv_id": "mx.example.com",
        "client": "192.0.2.1",
        "spf": spf(),
        "spf_helo": SpfVerdict("none", "helo.example.org", "helo.example.org"),
        "dkim": (DkimVerdict("pass", "example.org", "sel", None, "abcdefgh"),),
        "dmarc": DmarcVerdict("pass", "example.org", "example.org", "reject", True, True),
        "arc": ArcVerdict("none"),
    }
    return AuthVerdict(**{**base, **changes})


def test_authentication_results_parses_back() -> None:
    text = authentication_results(
        verdict(dkim=(DkimVerdict("fail", "x.org", "s", "body hash mismatch (got b'x')"),))
    )
    assert "\r" not in text and "\n" not in text
    parsed = authres.AuthenticationResultsHeader.parse_value(text)
    assert parsed.authserv_id == "mx.example.com"
    assert [(r.method, r.result) for r in parsed.results] == [
        ("spf", "pass"),
        ("spf", "none"),
        ("dkim", "fail"),
        ("dmarc", "pass"),
        ("arc", "none"),
    ]
    assert "smtp.mailfrom=a@example.org" in text and "smtp.helo=helo.example.org" in text
    assert "(client 192.0.2.1)" in text and "header.from=example.org" in text


@given(
    reason=st.text(max_size=80),
    domain=st.from_regex(r"[a-z]{1,10}\.(org|net|test)", fullmatch=True),
)
def test_authentication_results_any_reason_stays_one_parsable_header(
    reason: str, domain: str
) -> None:
    v = verdict(dkim=(DkimVerdict("fail", domain, "sel", reason),))
    text = authentication_results(v)
    assert not any(c in text for c in "\r\n")
    parsed = authres.AuthenticationResultsHeader.parse_value(text)
    assert [r.method for r in parsed.results].count("dkim") == 1


def test_smtp_refusal_only_under_enforce_for_reject() -> None:
    failing = DmarcVerdict("fail", "bank.test", "bank.test", "reject", disposition="reject")
    assert smtp_refusal(verdict("report", dmarc=failing)) is None
    refusal = smtp_refusal(verdict("enforce", dmarc=failing))
    assert refusal is not None and refusal.startswith("550 5.7.1 ")
    quarantined = DmarcVerdict("fail", "x.test", "x.test", "quarantine", disposition="quarantine")
    assert smtp_refusal(verdict("enforce", dmarc=quarantined)) is None
    assert verdict("enforce", dmarc=quarantined).quarantine is True
    assert verdict("report", dmarc=quarantined).quarantine is False
    temp = DmarcVerdict("temperror", "bank.test")
    assert smtp_refusal(verdict("enforce", dmarc=temp)) is None


def test_trusted_arc_override() -> None:
    failing = DmarcVerdict("fail", "far.test", "far.test", "reject", disposition="reject")
    aar = "i=1; fwd.test; dkim=pass header.d=far.test; dmarc=pass header.from=far.test"
    trusted = ArcVerdict("pass", 1, "fwd.test", True, None, aar)
    out = trusted_arc_override(failing, trusted)
    assert (out.disposition, out.override, out.result) == ("none", "trusted_forwarder", "fail")
    # untrusted sealer, failed chain, or a sealer that saw no pass: no override
    for arc in (
        ArcVerdict("pass", 1, "fwd.test", False, None, aar),
        ArcVerdict("fail", 1, "fwd.test", True, None, aar),
        ArcVerdict("pass", 1, "fwd.test", True, None, "i=1; fwd.test; dkim=fail header.d=far.test"),
        ArcVerdict(
            "pass", 1, "fwd.test", True, None, "i=1; fwd.test; dmarc=pass header.from=x.test"
        ),
    ):
        assert trusted_arc_override(failing, arc) == failing


def test_relay_results() -> None:
    headers = [
        ["Authentication-Results", "edge.example; spf=softfail smtp.mailfrom=x@far.test"],
        ["Authentication-Results", "edge.example; spf=pass smtp.mailfrom=x@far.test"],
        ["Received", "from somewhere"],
    ]
    got = relay_results(headers, "Edge.Example")
    assert got is not None and (got.result, got.domain) == ("softfail", "far.test")
    assert relay_results(headers, "other.example") is None
    no_spf = relay_results([["Authentication-Results", "edge.example; dkim=none"]], "edge.example")
    assert no_spf is not None and no_spf.result == "none"


def test_event_headers_drop_forgeries_of_our_verdict() -> None:
    headers = [
        ["Authentication-Results", "MX.example.com; dmarc=pass"],
        ["Authentication-Results", "mx.example.com ; junk (((("],
        ["Authentication-Results", "other.example; spf=pass smtp.mailfrom=a@b.c"],
        ["Subject", "hi"],
    ]
    out = event_headers(headers, "mx.example.com; spf=none", "mx.example.com")
    assert out == [
        ["Authentication-Results", "mx.example.com; spf=none"],
        ["Authentication-Results", "other.example; spf=pass smtp.mailfrom=a@b.c"],
        ["Subject", "hi"],
    ]


@pytest.mark.parametrize(
    ("headers", "mail_from", "parts", "kind"),
    [
        (
            [["Content-Type", "multipart/report; report-type=delivery-status; boundary=b"]],
            "",
            [],
            "bounce",
        ),
        ([], "", ["text/plain", "message/delivery-status"], "bounce"),
        ([["From", "MAILER-DAEMON@mx.example.org"], ["Subject", "hi"]], "", [], "bounce"),
        ([["Subject", "Undelivered Mail Returned to Sender"]], "", [], "bounce"),
        # a non-delivery subject from a real sender is a person's mail
        ([["Subject", "Undelivered mail? call me"]], "a@b.org", [], "normal"),
        ([["Auto-Submitted", "auto-replied"]], "a@b.org", [], "auto_reply"),
        ([["Auto-Submitted", "Auto-Generated; owner-email=x@y"]], "a@b.org", [], "auto_reply"),
        ([["Auto-Submitted", "no"]], "a@b.org", [], "normal"),
        (
            [["Content-Type", "multipart/report; report-type=disposition-notification"]],
            "a@b.org",
            [],
            "auto_reply",
        ),
        ([["Precedence", "auto_reply"]], "a@b.org", [], "auto_reply"),
        ([["X-Autoreply", "yes"]], "a@b.org", [], "auto_reply"),
        ([["Subject", "Automatic reply: Rechnung"]], "a@b.org", [], "auto_reply"),
        ([["Subject", "Out of Office: back Monday"]], "a@b.org", [], "auto_reply"),
        ([["Subject", "Abwesenheitsnotiz: Urlaub"]], "a@b.org", [], "auto_reply"),
        ([["Subject", "Re: out of office plans"]], "a@b.org", [], "normal"),
        ([["List-Id", "<dev.lists.example.org>"]], "a@b.org", [], "list"),
        ([["List-Unsubscribe", "<mailto:u@x.org>"]], "a@b.org", [], "list"),
        ([["Precedence", "bulk"]], "a@b.org", [], "list"),
        ([["Subject", "hello"]], "", [], "auto_reply"),
        ([["Subject", "hello"]], "a@b.org", ["text/plain"], "normal"),
        ([], None, [], "normal"),
    ],
)
def test_classify(
    headers: list[list[str]], mail_from: str | None, parts: list[str], kind: str
) -> None:
    assert classify(headers, mail_from, parts) == kind


@given(
    headers=st.lists(st.tuples(st.text(max_size=20), st.text(max_size=60)), max_size=8),
    mail_from=st.none() | st.text(max_size=30),
    parts=st.lists(st.text(max_size=30), max_size=4),
)
def test_classify_never_raises(
    headers: list[tuple[str, str]], mail_from: str | None, parts: list[str]
) -> None:
    assert classify(headers, mail_from, parts) in ("bounce", "auto_reply", "list", "normal")
