"""Pure sender-authentication logic: what the lookups mean, not how they are made.

No I/O, no asyncio: :mod:`gateways.email.auth` does the DNS and the cryptography (spf3, dkimpy)
and hands the outcomes here, where they become one :class:`AuthVerdict` — the ``auth`` key of
``email.receive`` and the ``Authentication-Results`` header (RFC 8601, written with ``authres``).
The same goes for :func:`classify`, which says what kind of mail a message is from its headers.

House rules:

* Every result word is one of RFC 8601's for its method (``pass``, ``fail``, ``softfail``,
  ``neutral``, ``none``, ``temperror``, ``permerror``); ``policy`` only for a DKIM signature
  the gateway chose not to verify (over ``max_signatures`` or the CPU limit).
* DMARC follows RFC 7489 section 6.6: the RFC5322.From domain, the record at ``_dmarc.<domain>``
  or else at its organisational domain (the Public Suffix List, via ``publicsuffixlist``),
  identifier alignment (relaxed: same organisational domain; strict: same domain), ``sp`` for
  subdomains, ``pct`` sampling (the draw is an argument, so the function stays pure) and ``t=y``
  testing mode (DMARCbis), both of which lower the disposition one step.
* A DNS failure is ``temperror`` and never blocks a mail; only ``enforce`` with a DMARC ``fail``
  whose disposition is ``reject`` refuses one (:func:`smtp_refusal`).
* Verdicts of others are believed only where the configuration says so: the top
  ``Authentication-Results`` of a trusted relay that connected to us (its SPF verdict replaces
  ours, since our peer is the relay), and the ``ARC-Authentication-Results`` of a trusted sealer
  whose chain validated (an ARC override of a DMARC failure, ``trusted_forwarder``).
"""

from __future__ import annotations

import email.utils
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import authres
import authres.arc
import authres.dmarc
from dkim.util import InvalidTagValueList, parse_tag_value
from publicsuffixlist import PublicSuffixList

__all__ = [
    "ArcVerdict",
    "AuthVerdict",
    "DkimVerdict",
    "DmarcRecord",
    "DmarcVerdict",
    "MailKind",
    "SpfVerdict",
    "authentication_results",
    "classify",
    "evaluate_dmarc",
    "event_headers",
    "from_domain",
    "mapping_of",
    "org_domain",
    "parse_dmarc_record",
    "relay_results",
    "select_dmarc_record",
    "smtp_refusal",
    "trusted_arc_override",
]

MailKind = Literal["bounce", "auto_reply", "list", "normal"]
Disposition = Literal["none", "quarantine", "reject"]

_DOWNGRADE: dict[str, Disposition] = {"reject": "quarantine", "quarantine": "none", "none": "none"}


# -- verdicts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpfVerdict:
    """SPF (RFC 7208) for one identity: ``mailfrom`` (MAIL FROM, or postmaster@HELO for a null
    sender) or ``helo``."""

    result: str
    #: the domain checked (None when there was nothing to check)
    domain: str | None
    #: the identity as RFC 8601 names it: the MAIL FROM address, or the HELO name
    identity: str | None = None
    reason: str | None = None

    def as_event(self) -> dict[str, Any]:
        return {"result": self.result, "domain": self.domain, "reason": self.reason}


@dataclass(frozen=True)
class DkimVerdict:
    """One DKIM-Signature (RFC 6376), in header order."""

    result: str
    domain: str | None
    selector: str | None
    reason: str | None = None
    #: the first 8 characters of ``b=`` (RFC 6008 ``header.b``), to tell signatures apart
    b: str | None = None

    def as_event(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "domain": self.domain,
            "selector": self.selector,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class ArcVerdict:
    """ARC chain validation (RFC 8617)."""

    result: str
    #: ARC sets on the mail
    sets: int = 0
    #: ``d=`` of the newest ARC-Seal (the last hop that sealed the mail)
    sealer: str | None = None
    #: the sealer is one of ``trusted_relays[].arc_domains`` and the chain passed
    trusted: bool = False
    reason: str | None = None
    #: the newest set's ARC-Authentication-Results value (what the sealer saw)
    aar: str | None = None

    def as_event(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "sets": self.sets,
            "sealer": self.sealer,
            "trusted": self.trusted,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class DmarcRecord:
    """The tags of a DMARC record that decide a verdict (RFC 7489 6.3)."""

    policy: Disposition
    subdomain_policy: Disposition
    adkim: Literal["r", "s"] = "r"
    aspf: Literal["r", "s"] = "r"
    pct: int = 100
    testing: bool = False


@dataclass(frozen=True)
class DmarcVerdict:
    """DMARC for the RFC5322.From domain."""

    result: str
    domain: str | None = None
    org_domain: str | None = None
    #: the policy that applied (``p``, or ``sp`` for a subdomain); None without a record
    policy: Disposition | None = None
    spf_aligned: bool = False
    dkim_aligned: bool = False
    #: what the policy asks for this mail after pct/testing/overrides: none, quarantine, reject
    disposition: Disposition = "none"
    #: why the disposition is milder than the policy (RFC 7489 PolicyOverrideType)
    override: str | None = None
    reason: str | None = None

    def as_event(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "domain": self.domain,
            "org_domain": self.org_domain,
            "policy": self.policy,
            "alignment": {"spf": self.spf_aligned, "dkim": self.dkim_aligned},
            "disposition": self.disposition,
            "override": self.override,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class AuthVerdict:
    """Everything known about who sent a mail: the ``auth`` key of ``email.receive``."""

    mode: Literal["report", "enforce"]
    authserv_id: str
    #: the address SPF was checked against (the SMTP client, behind PROXY the proxied one)
    client: str | None
    spf: SpfVerdict
    spf_helo: SpfVerdict
    dkim: tuple[DkimVerdict, ...]
    dmarc: DmarcVerdict
    arc: ArcVerdict
    #: authserv_id of the trusted relay whose Authentication-Results were believed
    relay: str | None = None

    @property
    def quarantine(self) -> bool:
        """``enforce`` and DMARC asks to quarantine: the consumer should hold the mail."""
        return self.mode == "enforce" and self.dmarc.disposition == "quarantine"

    def as_event(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "client": self.client,
            "spf": self.spf.as_event(),
            "spf_helo": self.spf_helo.as_event(),
            "dkim": [d.as_event() for d in self.dkim],
            "dmarc": self.dmarc.as_event(),
            "arc": self.arc.as_event(),
            "relay": self.relay,
            "quarantine": self.quarantine,
        }


# -- domains ------------------------------------------------------------------------------------


@functools.cache
def _psl() -> PublicSuffixList:
    # the list bundled with publicsuffixlist; loading it takes ~30 ms, so once, on first use
    return PublicSuffixList()


@functools.lru_cache(maxsize=4096)
def org_domain(domain: str) -> str:
    """The organisational domain (RFC 7489 3.2): one label below the public suffix.

    Kept for the few thousand domains seen last: the list lookup took ~40 us and ran five
    times per mail (bench/email.py's profile)."""
    domain = domain.lower().rstrip(".")
    return _psl().privatesuffix(domain) or domain


def from_domain(values: Sequence[str]) -> tuple[str | None, str | None]:
    """The RFC5322.From domain from the ``From`` header values, or ``(None, why not)``.

    RFC 7489 6.6.1: a mail with no From, several From fields or several addresses in one has
    no single author domain; DMARC cannot be applied and says so (``permerror``).
    """
    if not values:
        return None, "no From header"
    if len(values) > 1:
        return None, "several From headers"
    return _one_from_domain(values[0])


@functools.lru_cache(maxsize=4096)
def _one_from_domain(value: str) -> tuple[str | None, str | None]:
    # a regular sender's From is the same in every mail; getaddresses costs ~50 us
    addresses = [a for _, a in email.utils.getaddresses([value]) if a]
    if len(addresses) != 1:
        return None, "From holds no single address" if addresses else "From has no address"
    _, at, domain = addresses[0].rpartition("@")
    domain = domain.strip().lower().rstrip(".")
    if not at or not domain or not re.fullmatch(r"[a-z0-9.-]+", domain) or ".." in domain:
        return None, "From address has no valid domain"
    return domain, None


def _aligned(identifier: str | None, author: str, mode: str) -> bool:
    if not identifier:
        return False
    identifier = identifier.lower().rstrip(".")
    if mode == "s":
        return identifier == author
    return org_domain(identifier) == org_domain(author)


# -- DMARC --------------------------------------------------------------------------------------


def select_dmarc_record(texts: Iterable[bytes]) -> bytes | None:
    """The one TXT record that starts ``v=DMARC1`` (RFC 7489 6.6.3), or None.

    Several such records are treated as none at all, as the RFC says.
    """
    found = [t for t in texts if re.match(rb"v\s*=\s*DMARC1\s*(;|$)", t)]
    return found[0] if len(found) == 1 else None


def parse_dmarc_record(text: bytes) -> DmarcRecord:
    """The record's tags (dkimpy's tag=value parser: DMARC uses DKIM's syntax); ValueError if
    it is unusable (no valid ``p``)."""
    try:
        tags = {k.lower(): v.strip().lower() for k, v in parse_tag_value(text).items()}
    except InvalidTagValueList as exc:
        raise ValueError(f"bad DMARC record: {exc}") from None
    policies = ("none", "quarantine", "reject")
    policy = tags.get(b"p", b"").decode("ascii", "replace")
    if policy not in policies:
        raise ValueError(f"bad DMARC record: p={policy!r}")
    sub = tags.get(b"sp", b"").decode("ascii", "replace")
    try:
        pct = min(100, max(0, int(tags.get(b"pct", b"100"))))
    except ValueError:
        pct = 100  # RFC 7489 6.3: an invalid value is ignored, the default applies
    return DmarcRecord(
        policy=policy,
        subdomain_policy=sub if sub in policies else policy,
        adkim="s" if tags.get(b"adkim") == b"s" else "r",
        aspf="s" if tags.get(b"aspf") == b"s" else "r",
        pct=pct,
        testing=tags.get(b"t") == b"y",
    )


def evaluate_dmarc(
    author: str | None,
    record: DmarcRecord | None,
    record_domain: str | None,
    spf: SpfVerdict,
    dkim: Sequence[DkimVerdict],
    *,
    sample: float = 0.0,
    problem: str | None = None,
    temporary: bool = False,
) -> DmarcVerdict:
    """RFC 7489 6.6 for the From domain ``author`` with the ``record`` found at ``record_domain``.

    ``problem`` says why there is no record (``temporary``: a DNS failure → temperror, else
    none); ``sample`` in [0, 100) is the pct draw: the policy applies when ``sample < pct``.
    """
    if author is None:
        return DmarcVerdict("permerror", reason=problem)
    org = org_domain(author)
    if record is None:
        result = "temperror" if temporary else "none"
        return DmarcVerdict(result, author, org, reason=problem)
    spf_ok = spf.result == "pass" and _aligned(spf.domain, author, record.aspf)
    dkim_ok = any(d.result == "pass" and _aligned(d.domain, author, record.adkim) for d in dkim)
    policy = record.policy if record_domain == author else record.subdomain_policy
    if spf_ok or dkim_ok:
        return DmarcVerdict("pass", author, org, policy, spf_ok, dkim_ok)
    disposition: Disposition = policy
    override = None
    if record.testing:
        disposition, override = _DOWNGRADE[disposition], "policy_test_mode"
    elif sample >= record.pct:
        disposition, override = _DOWNGRADE[disposition], "sampled_out"
    reason = "neither SPF nor DKIM passed aligned with the From domain"
    return DmarcVerdict("fail", author, org, policy, False, False, disposition, override, reason)


# -- the verdicts of others ---------------------------------------------------------------------


def _parse_results(value: str) -> authres.AuthenticationResultsHeader | None:
    try:
        return authres.AuthenticationResultsHeader.parse_value(value)
    except Exception:  # authres raises its own SyntaxError and ValueError for junk
        return None


def _property(result: Any, ptype: str, name: str) -> str | None:
    """A result's ``ptype.name`` value (authres parses unregistered methods generically)."""
    for prop in getattr(result, "properties", None) or []:
        if str(prop.type).lower() == ptype and str(prop.name).lower() == name:
            return str(prop.value).lower().rstrip(".")
    return None


def relay_results(headers: Sequence[Sequence[str]], authserv_id: str) -> SpfVerdict | None:
    """The SPF verdict of the topmost ``Authentication-Results`` from ``authserv_id``.

    Only called for a relay that connected to us from a trusted network: it stamped the mail
    last, so its header is the topmost of its name (a sender's forgery would be below it).
    """
    wanted = authserv_id.lower()
    for name, value in headers:
        if name.lower() != "authentication-results":
            continue
        parsed = _parse_results(value)
        if parsed is None or str(parsed.authserv_id).lower() != wanted:
            continue
        for res in parsed.results:
            mailfrom = _property(res, "smtp", "mailfrom") if res.method == "spf" else None
            if mailfrom is not None:
                domain = mailfrom.rpartition("@")[2].lower() or None
                return SpfVerdict(
                    str(res.result).lower(), domain, mailfrom, f"as seen by {authserv_id}"
                )
        return SpfVerdict("none", None, None, f"{authserv_id} gave no spf result")
    return None


def trusted_arc_override(dmarc: DmarcVerdict, arc: ArcVerdict) -> DmarcVerdict:
    """A DMARC failure turned into a ``trusted_forwarder`` override, if a trusted sealer saw a
    DMARC pass (or an aligned SPF or DKIM pass) before it forwarded the mail (RFC 8617 7.2)."""
    if dmarc.result != "fail" or not arc.trusted or arc.result != "pass" or not arc.aar:
        return dmarc
    # the AAR value is "i=N; authserv-id; results"
    parsed = _parse_results(re.sub(r"^\s*i\s*=\s*\d+\s*;\s*", "", arc.aar))
    if parsed is None or dmarc.domain is None:
        return dmarc
    vouched = False
    for res in parsed.results:
        result = str(res.result).lower()
        if res.method == "dmarc" and result == "pass":
            vouched = vouched or _property(res, "header", "from") == dmarc.domain
        elif res.method == "dkim" and result == "pass":
            vouched = vouched or _aligned(_property(res, "header", "d"), dmarc.domain, "r")
    if not vouched:
        return dmarc
    reason = f"ARC sealer {arc.sealer} (trusted) saw a DMARC pass"
    return replace(dmarc, disposition="none", override="trusted_forwarder", reason=reason)


# -- what becomes of a verdict ------------------------------------------------------------------


def smtp_refusal(verdict: AuthVerdict) -> str | None:
    """The reply refusing the mail at the end of DATA, or None to accept it."""
    if verdict.mode != "enforce" or verdict.dmarc.disposition != "reject":
        return None
    return (
        f"550 5.7.1 Unauthenticated mail from {verdict.dmarc.domain} is refused by its DMARC policy"
    )


def _comment(text: str | None) -> str | None:
    # RFC 8601 comments are ctext: printable ASCII without parentheses or backslashes
    if not text:
        return None
    return re.sub(r"[^\x21-\x27\x2a-\x5b\x5d-\x7e]+", " ", text)[:200].strip() or None


def authentication_results(verdict: AuthVerdict) -> str:
    """The value of our ``Authentication-Results`` header (RFC 8601), one line."""
    spf = verdict.spf
    results: list[authres.BaseAuthenticationResult] = []
    client = f"client {verdict.client}" if verdict.client else None
    if verdict.relay:
        client = f"as seen by trusted relay {verdict.relay}"
    if spf.identity and "@" in spf.identity:
        results.append(
            authres.SPFAuthenticationResult(
                result=spf.result, result_comment=_comment(client), smtp_mailfrom=spf.identity
            )
        )
    helo = verdict.spf_helo
    if helo.identity:
        results.append(
            authres.SPFAuthenticationResult(
                result=helo.result, result_comment=_comment(client), smtp_helo=helo.identity
            )
        )
    if not results:
        results.append(authres.SPFAuthenticationResult(result=spf.result))
    for sig in verdict.dkim:
        res = authres.DKIMAuthenticationResult(
            result=sig.result,
            result_comment=_comment(sig.reason if sig.result != "pass" else None),
            header_d=sig.domain,
            header_s=sig.selector,
        )
        if sig.b:
            res.properties.append(authres.AuthenticationResultProperty("header", "b", sig.b))
        results.append(res)
    if not verdict.dkim:
        results.append(authres.DKIMAuthenticationResult(result="none"))
    dmarc = verdict.dmarc
    detail = [f"p={dmarc.policy}"] if dmarc.policy else []
    if dmarc.override:
        detail.append(f"override={dmarc.override}")
    results.append(
        authres.dmarc.DMARCAuthenticationResult(
            result=dmarc.result,
            result_comment=_comment(" ".join(detail)),
            header_from=dmarc.domain,
        )
    )
    arc = verdict.arc
    arc_detail = f"sets={arc.sets} sealer={arc.sealer}" if arc.sets else None
    results.append(
        authres.arc.ARCAuthenticationResult(result=arc.result, result_comment=_comment(arc_detail))
    )
    header = authres.AuthenticationResultsHeader(authserv_id=verdict.authserv_id, results=results)
    return str(header).partition(": ")[2]


# -- what kind of mail --------------------------------------------------------------------------

# Subjects of vacation and out-of-office replies that carry none of the RFC 3834 headers
# (Exchange, Gmail, Thunderbird, Zimbra defaults in the usual languages)
_VACATION_SUBJECT = re.compile(
    r"^\s*(auto(matic)?[ -]?(reply|response|antwort)|out of (the )?office|abwesend|"
    r"abwesenheitsnotiz|r[ée]ponse automatique|absence|risposta automatica|"
    r"respuesta autom[áa]tica|automatisch antwoord|vacation|on vacation|away from)\b",
    re.IGNORECASE,
)
_BOUNCE_SUBJECT = re.compile(
    r"^\s*(undeliver(ed|able)|delivery (status notification|failure|has failed)|"
    r"mail delivery (failed|system)|returned mail|failure notice|nondeliverable|"
    r"unzustellbar|non remis|message not delivered)",
    re.IGNORECASE,
)
_DAEMON = re.compile(r"^(mailer-daemon|postmaster|mail-daemon)@", re.IGNORECASE)
_AUTO_HEADERS = ("x-autoreply", "x-autorespond", "x-auto-reply", "x-autoresponder")


def _content_type(value: str) -> tuple[str, dict[str, str]]:
    main, _, rest = value.partition(";")
    params = {}
    for item in rest.split(";"):
        key, eq, val = item.partition("=")
        if eq:
            params[key.strip().lower()] = val.strip().strip('"').lower()
    return main.strip().lower(), params


def classify(
    headers: Sequence[Sequence[str]], mail_from: str | None, part_types: Iterable[str]
) -> MailKind:
    """What kind of mail this is, so a consumer never answers a machine (RFC 3834 section 2).

    ``bounce``: a DSN (RFC 3464: ``multipart/report; report-type=delivery-status`` or a
    ``message/delivery-status`` part), or a null sender (``MAIL FROM:<>``) from a mailer daemon
    or with a non-delivery subject. ``auto_reply``: ``Auto-Submitted`` other than ``no``, a
    read receipt (MDN), ``Precedence: auto_reply``, ``X-Autoreply``-style headers, a vacation
    subject, or any other null-sender mail. ``list``: ``List-Id``/``List-Post``/
    ``List-Unsubscribe``, or ``Precedence: bulk/list/junk``. Else ``normal``.
    """
    fields: dict[str, list[str]] = {}
    for name, value in headers:
        fields.setdefault(name.lower(), []).append(value)

    def first(name: str) -> str:
        return (fields.get(name) or [""])[0].strip()

    ctype, params = _content_type(first("content-type"))
    types = {t.lower() for t in part_types}
    report = params.get("report-type", "") if ctype == "multipart/report" else ""
    if report == "delivery-status" or "message/delivery-status" in types:
        return "bounce"
    null_sender = mail_from is not None and mail_from.strip("<> ") == ""
    subject = first("subject")
    if null_sender and (_DAEMON.match(_bare(first("from"))) or _BOUNCE_SUBJECT.match(subject)):
        return "bounce"
    auto = first("auto-submitted").lower().split(";")[0].strip()
    precedence = first("precedence").lower()
    if (
        (auto and auto != "no")
        or report == "disposition-notification"
        or "message/disposition-notification" in types
        or precedence == "auto_reply"
        or any(fields.get(h) for h in _AUTO_HEADERS)
        or _VACATION_SUBJECT.match(subject)
    ):
        return "auto_reply"
    if any(fields.get(h) for h in ("list-id", "list-post", "list-unsubscribe")) or precedence in (
        "bulk",
        "list",
        "junk",
    ):
        return "list"
    if null_sender:
        return "auto_reply"
    return "normal"


def _bare(value: str) -> str:
    return email.utils.parseaddr(value)[1]


def event_headers(
    headers: Sequence[Sequence[str]], results: str, authserv_id: str
) -> list[list[str]]:
    """``headers`` with ours on top and any ``Authentication-Results`` claiming our
    ``authserv_id`` removed: a sender's forgery of our verdict (RFC 8601 section 5)."""
    ours = authserv_id.lower()
    kept = [
        list(h)
        for h in headers
        if h[0].lower() != "authentication-results" or not _claims(h[1], ours)
    ]
    return [["Authentication-Results", results], *kept]


def _claims(value: str, authserv_id: str) -> bool:
    parsed = _parse_results(value)
    if parsed is not None:
        return str(parsed.authserv_id).lower() == authserv_id
    # unparsable: compare the first token, which is where the authserv-id stands
    return value.strip().split(";")[0].strip().lower() == authserv_id


def mapping_of(headers: Sequence[Sequence[str]]) -> Mapping[str, list[str]]:
    """Header values by lower-case name, in order."""
    out: dict[str, list[str]] = {}
    for name, value in headers:
        out.setdefault(name.lower(), []).append(value)
    return out
