"""DKIM and ARC signatures of one mail, checked against keys fetched before: CPU only.

This runs in a parser process (:mod:`gateways.email.parser_pool`), never in the gateway's: dkimpy
canonicalises and hashes in Python and in long ``re.sub`` calls that hold the GIL, so a large
signed mail (10 MB of short lines: 0.7 s of CPU per relaxed signature) in a worker thread
stalled the event loop for 0.1-0.3 s at a time, and 50 signatures on it for half a minute of
CPU. In a parser process the mail's work runs under ``email.parser.cpu_limit`` like its parse.

The gateway resolves the selector keys first (asynchronously, on its loop) and sends a
:class:`SignatureRequest`: plain values only, so it travels as msgpack. Only the first
``max_signatures`` signatures are verified (those of the From domain's organisational domain
first, then in header order); the others get ``policy`` ("not verified"). A mail with more than
``max_arc_sets`` ARC sets gets ARC ``fail`` without any hashing. Both limits are verdicts: the
mail is never refused for them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dkim

from gateways.email.verdicts import ArcVerdict, DkimVerdict

__all__ = [
    "MIN_KEY_BITS",
    "SignatureRequest",
    "decode_result",
    "encode_result",
    "over_cpu_limit",
    "prefer_order",
    "verify_request",
    "verify_signatures",
]

#: DKIM's and ARC's minimum RSA key size (RFC 8301: 1024 bits)
MIN_KEY_BITS = 1024

# dkimpy logs every failed signature at ERROR: the reason is in our verdict instead
_DKIM_LOG = logging.getLogger("gateway.email.dkimpy")
_DKIM_LOG.addHandler(logging.NullHandler())
_DKIM_LOG.propagate = False


@dataclass(frozen=True)
class SignatureRequest:
    """What a parser process needs to check one mail's signatures."""

    raw: bytes
    #: ``selector._domainkey.domain`` → its TXT record (None: none published)
    keys: Mapping[str, bytes | None]
    #: names whose lookup failed (→ ``temperror``)
    failed: frozenset[str]
    #: ARC sets on the mail (ARC-Seal headers)
    arc_sets: int
    max_signatures: int
    max_arc_sets: int
    #: the From domain's organisational domain: its signatures are verified first
    prefer: str | None = None

    def as_list(self) -> list[Any]:
        return [
            self.raw,
            dict(self.keys),
            sorted(self.failed),
            self.arc_sets,
            self.max_signatures,
            self.max_arc_sets,
            self.prefer,
        ]

    @classmethod
    def from_list(cls, value: Sequence[Any]) -> SignatureRequest:
        raw, keys, failed, arc_sets, max_signatures, max_arc_sets, prefer = value
        return cls(raw, keys, frozenset(failed), arc_sets, max_signatures, max_arc_sets, prefer)


def prefer_order(domains: Sequence[str | None], prefer: str | None) -> list[int]:
    """Indexes of signatures by ``d=`` in the order they are verified: the organisational
    domain ``prefer`` and its subdomains first (DMARC needs those), then header order."""

    def aligned(domain: str | None) -> bool:
        return bool(prefer and domain and (domain == prefer or domain.endswith("." + prefer)))

    first = [i for i, d in enumerate(domains) if aligned(d)]
    return first + [i for i, d in enumerate(domains) if not aligned(d)]


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("ascii", "replace")


def _domain_of(value: bytes) -> str | None:
    try:
        tags = dkim.util.parse_tag_value(value)
        return str(tags[b"d"].decode("ascii").strip().lower())
    except (dkim.util.InvalidTagValueList, KeyError, UnicodeDecodeError):
        return None


def verify_request(request: SignatureRequest) -> tuple[list[DkimVerdict], ArcVerdict]:
    """Every DKIM signature of the mail (at most ``max_signatures`` verified), then its ARC
    chain, against the prefetched keys."""
    return verify_signatures(
        request.raw,
        request.keys,
        request.failed,
        request.arc_sets,
        max_signatures=request.max_signatures,
        max_arc_sets=request.max_arc_sets,
        prefer=request.prefer,
    )


def verify_signatures(
    raw: bytes,
    keys: Mapping[str, bytes | None],
    failed: frozenset[str],
    arc_sets: int,
    *,
    max_signatures: int,
    max_arc_sets: int,
    prefer: str | None = None,
) -> tuple[list[DkimVerdict], ArcVerdict]:
    """The DKIM verdicts of ``raw`` in header order, and its ARC verdict.

    A signature whose key name is neither in ``keys`` nor in ``failed`` was not looked up (the
    gateway fetches keys for the signatures it means to verify): it gets ``policy`` too.
    """

    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        return keys.get(name.decode("ascii", "replace").lower().rstrip("."))

    try:
        signer = dkim.DKIM(raw, logger=_DKIM_LOG, minkey=MIN_KEY_BITS)
    except dkim.DKIMException as exc:
        return [DkimVerdict("permerror", None, None, str(exc))], ArcVerdict("permerror", arc_sets)
    values = [value for name, value in signer.headers if name.lower() == b"dkim-signature"]
    order = prefer_order([_domain_of(v) for v in values], prefer)
    verdicts: list[DkimVerdict | None] = [None] * len(values)
    for idx in order[:max_signatures]:
        verdicts[idx] = _verify_one(signer, idx, keys, failed, lookup)
    for idx in order[max_signatures:]:
        verdicts[idx] = _not_verified(
            values[idx],
            f"not verified: only {max_signatures} signatures are (email.verify.max_signatures)",
        )
    if arc_sets > max_arc_sets:
        arc = ArcVerdict(
            "fail",
            arc_sets,
            reason=f"not verified: {arc_sets} ARC sets, more than email.verify.max_arc_sets "
            f"({max_arc_sets})",
        )
    elif arc_sets:
        arc = _verify_arc(raw, failed, arc_sets, lookup)
    else:
        arc = ArcVerdict("none")
    return [v for v in verdicts if v is not None], arc


def _not_verified(value: bytes, reason: str) -> DkimVerdict:
    try:
        tags = dkim.util.parse_tag_value(value)
    except dkim.util.InvalidTagValueList:
        tags = {}
    b = re.sub(rb"\s+", b"", tags.get(b"b", b""))[:8].decode("ascii", "replace") or None
    return DkimVerdict("policy", _text(tags.get(b"d")), _text(tags.get(b"s")), reason, b)


def _verify_one(
    signer: dkim.DKIM,
    idx: int,
    keys: Mapping[str, bytes | None],
    failed: frozenset[str],
    lookup: Any,
) -> DkimVerdict:
    try:
        prep = signer.verify_headerprep(idx)
    except dkim.ValidationError as exc:  # expired, or d= and i= disagree
        return DkimVerdict("fail", _text(signer.domain), _text(signer.selector), str(exc))
    except dkim.DKIMException as exc:
        return DkimVerdict("permerror", None, None, str(exc))
    if not prep:
        return DkimVerdict("permerror", None, None, "unreadable signature")
    sig = prep[0]
    domain, selector = _text(sig[b"d"]), _text(sig[b"s"])
    b = re.sub(rb"\s+", b"", sig.get(b"b", b""))[:8].decode("ascii", "replace") or None
    name = f"{selector}._domainkey.{domain}".lower()
    if name in failed:
        return DkimVerdict("temperror", domain, selector, f"key lookup for {name} failed", b)
    if name not in keys:
        return DkimVerdict("policy", domain, selector, "not verified: its key was not looked up", b)
    txt = keys[name]
    if not txt:
        return DkimVerdict("permerror", domain, selector, f"no key published at {name}", b)
    try:
        dkim.evaluate_pk(name.encode(), txt)
        ok = signer.verify(idx, dnsfunc=lookup)
    except dkim.ValidationError as exc:
        return DkimVerdict("fail", domain, selector, str(exc), b)
    except dkim.DKIMException as exc:
        return DkimVerdict("permerror", domain, selector, str(exc), b)
    if ok:
        return DkimVerdict("pass", domain, selector, None, b)
    return DkimVerdict("fail", domain, selector, "signature did not verify", b)


def _verify_arc(raw: bytes, failed: frozenset[str], arc_sets: int, lookup: Any) -> ArcVerdict:
    try:
        cv, results, reason = dkim.ARC(raw, logger=_DKIM_LOG, minkey=MIN_KEY_BITS).verify(
            dnsfunc=lookup
        )
    except Exception as exc:  # dkimpy raises more than DKIMException on mangled ARC sets
        return ArcVerdict("fail", arc_sets, reason=f"{type(exc).__name__}: {exc}")
    newest = results[0] if results else {}
    sealer = _text(newest.get("as-domain"))
    aar = _text(newest.get("aar-value"))
    result = {dkim.CV_Pass: "pass", dkim.CV_None: "none"}.get(cv, "fail")
    if result == "fail" and any(
        f"{_text(r.get(k + '-selector'))}._domainkey.{_text(r.get(k + '-domain'))}".lower()
        in failed
        for r in results
        for k in ("as", "ams")
    ):
        result, reason = "temperror", "an ARC key lookup failed"
    return ArcVerdict(result, arc_sets, sealer, False, None if result == "pass" else reason, aar)


# -- across the pipe ----------------------------------------------------------------------------


def encode_result(dkim_verdicts: Sequence[DkimVerdict], arc: ArcVerdict) -> dict[str, Any]:
    """The verdicts as msgpack-safe values (a parser process's answer)."""
    return {
        "dkim": [[v.result, v.domain, v.selector, v.reason, v.b] for v in dkim_verdicts],
        "arc": [arc.result, arc.sets, arc.sealer, arc.reason, arc.aar],
    }


def decode_result(value: Mapping[str, Any]) -> tuple[list[DkimVerdict], ArcVerdict]:
    """:func:`encode_result` read back."""
    dkim_verdicts = [DkimVerdict(*item) for item in value["dkim"]]
    result, sets, sealer, reason, aar = value["arc"]
    return dkim_verdicts, ArcVerdict(result, sets, sealer, False, reason, aar)


def over_cpu_limit(
    signatures: Sequence[tuple[str | None, str | None]], arc_sets: int, detail: str
) -> tuple[list[DkimVerdict], ArcVerdict]:
    """The verdicts of a mail whose signature checks went over the parser's CPU limit:
    ``policy`` for each DKIM signature (``(domain, selector)``), ARC ``fail``."""
    reason = f"not verified: {detail} (email.parser.cpu_limit)"
    dkim_verdicts = [DkimVerdict("policy", d, s, reason) for d, s in signatures]
    arc = ArcVerdict("fail", arc_sets, reason=reason) if arc_sets else ArcVerdict("none")
    return dkim_verdicts, arc
