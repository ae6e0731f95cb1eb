"""Sender authentication for incoming mail, and DKIM signing of outgoing mail.

:class:`MailAuthenticator` answers "who sent this mail?" with one
:class:`~gateways.email.verdicts.AuthVerdict` per mail; the gateway calls it from its DATA hook
and puts the verdict into ``email.receive``. The libraries do the protocols, this module only
feeds them answers from the one asynchronous, cached resolver:

* DNS: dnspython's asyncio resolver with its LRU cache (answers kept for their TTL). Every mail
  has a time budget for all its lookups together; what is not answered in time, or fails, is a
  ``temperror`` verdict, and the mail is accepted all the same.
* SPF: spf3 (pyspf's maintained release). Its evaluation is synchronous and asks for DNS through
  the module function ``spf.DNSLookup``, the plug point pyspf's own tests replace too. Ours
  answers from the mail's lookups so far and notes what it lacks; the evaluation (microseconds)
  is replayed on the event loop once the missing names are resolved asynchronously, until it
  asks for nothing new.
* DKIM and ARC: dkimpy. The selector keys are fetched first (their names are in the signature
  headers), then dkimpy verifies against them in a worker thread
  (:func:`verify_signatures`: plain arguments, so it can move to a process pool), which keeps
  body hashing of a large mail off the event loop.
* DMARC: the record is fetched here; the evaluation is :func:`verdicts.evaluate_dmarc`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import ipaddress
import logging
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dkim
import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver
import spf

from gateways.email.config import DkimSigningConfig, DnsConfig, TrustedRelay, VerifyConfig
from gateways.email.verdicts import (
    ArcVerdict,
    AuthVerdict,
    DkimVerdict,
    DmarcRecord,
    SpfVerdict,
    evaluate_dmarc,
    from_domain,
    mapping_of,
    org_domain,
    parse_dmarc_record,
    relay_results,
    select_dmarc_record,
    trusted_arc_override,
)

__all__ = ["DkimSigner", "DnsTempError", "MailAuthenticator", "Resolver", "verify_signatures"]

log = logging.getLogger("gateway.email")

# dkimpy logs every failed signature at ERROR: the reason is in our verdict instead
_DKIM_LOG = logging.getLogger("gateway.email.dkimpy")
_DKIM_LOG.addHandler(logging.NullHandler())
_DKIM_LOG.propagate = False

#: DKIM's and ARC's minimum RSA key size (RFC 8301: 1024 bits)
MIN_KEY_BITS = 1024
#: SPF evaluations per identity: each round resolves at least one new name, and RFC 7208 allows
#: 10 DNS mechanisms, 2 void lookups, 10 MX and 10 PTR names each
_MAX_SPF_ROUNDS = 40
_DOMAIN = re.compile(r"^[A-Za-z0-9_.-]+$")


class DnsTempError(Exception):
    """A lookup failed in a way that may pass (timeout, SERVFAIL, the budget spent)."""


# -- DNS ----------------------------------------------------------------------------------------


def _nameserver(entry: str) -> dns.nameserver.Do53Nameserver:
    host, port = entry, 53
    match = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:]+)(?::(\d+))?", entry)
    if match is not None:
        host = match.group(1) or match.group(3)
        port = int(match.group(2) or match.group(4) or 53)
    return dns.nameserver.Do53Nameserver(host, port)


class Resolver:
    """dnspython's asyncio resolver with a cache; every lookup is capped by a deadline."""

    def __init__(self, config: DnsConfig) -> None:
        self.timeout = config.timeout
        self.problem: str | None = None
        try:
            self._resolver = dns.asyncresolver.Resolver(configure=not config.nameservers)
        except dns.resolver.NoResolverConfiguration as exc:
            # no /etc/resolv.conf: every lookup becomes a temperror, said once here
            self.problem = f"no DNS resolver configured ({exc}); set email.verify.dns"
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = []
        if config.nameservers:
            self._resolver.nameservers = [_nameserver(e) for e in config.nameservers]
        self._resolver.cache = (
            dns.resolver.LRUCache(config.cache_size) if config.cache_size else None
        )
        # one try per server within the lookup's lifetime; dnspython retries within it
        self._resolver.timeout = config.timeout

    async def lookup(self, name: str, qtype: str, deadline: float) -> list[Any]:
        """The records of ``name``; ``[]`` when there are none (NXDOMAIN, NODATA, a name that
        cannot exist). Raise :class:`DnsTempError` for everything that may pass."""
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise DnsTempError(f"{name} {qtype}: the mail's DNS time budget is spent")
        if self.problem is not None:
            raise DnsTempError(self.problem)
        try:
            answer = await self._resolver.resolve(
                name,
                qtype,
                lifetime=min(self.timeout, remaining),
                raise_on_no_answer=False,
                search=False,
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.name.NameTooLong):
            return []
        except (dns.name.EmptyLabel, dns.name.LabelTooLong, dns.name.BadEscape):
            return []
        except dns.exception.Timeout:
            raise DnsTempError(f"{name} {qtype}: timed out") from None
        except dns.resolver.NoNameservers:
            raise DnsTempError(f"{name} {qtype}: no server answered (SERVFAIL)") from None
        except dns.exception.DNSException as exc:
            raise DnsTempError(f"{name} {qtype}: {exc}") from None
        return list(answer.rrset) if answer.rrset is not None else []

    async def txt(self, name: str, deadline: float) -> list[bytes]:
        """Every TXT record of ``name``, its strings joined."""
        return [b"".join(r.strings) for r in await self.lookup(name, "TXT", deadline)]


# -- SPF ----------------------------------------------------------------------------------------


@dataclass
class _SpfLookups:
    """The answers one mail's SPF evaluation has had, and the names it asked for in vain."""

    known: dict[tuple[str, str], list[Any] | DnsTempError] = field(default_factory=dict)
    missing: set[tuple[str, str]] = field(default_factory=set)


_SPF_LOOKUPS: contextvars.ContextVar[_SpfLookups] = contextvars.ContextVar("spf_lookups")


def _spf_dns(name: str, qtype: str, strict: Any = True, timeout: Any = None) -> list[Any]:
    """``spf.DNSLookup``: answers in pyspf's format from the running evaluation's lookups."""
    lookups = _SPF_LOOKUPS.get(None)
    if lookups is None:
        raise spf.TempError("DNS: spf evaluation outside MailAuthenticator")
    key = (name.lower().rstrip("."), qtype.upper())
    value = lookups.known.get(key)
    if value is None:
        lookups.missing.add(key)
        raise spf.TempError(f"DNS {name} {qtype}: not yet resolved")
    if isinstance(value, DnsTempError):
        raise spf.TempError(f"DNS {value}")
    return value


# the plug point pyspf documents by use (its test suite replaces it); only this module runs SPF
spf.DNSLookup = _spf_dns


def _spf_records(name: str, qtype: str, records: Sequence[Any]) -> list[Any]:
    """dnspython records in the shape pyspf's own dnspython driver gives them."""
    key = (name, qtype)
    if qtype in ("A", "AAAA"):
        return [(key, r.address) for r in records]
    if qtype == "MX":
        return [(key, (r.preference, r.exchange.to_text(True))) for r in records]
    if qtype == "PTR":
        return [(key, r.target.to_text(True)) for r in records]
    if qtype in ("TXT", "SPF"):
        return [(key, tuple(r.strings)) for r in records]
    return []


# -- DKIM and ARC (in a worker) -----------------------------------------------------------------


@dataclass(frozen=True)
class _Signature:
    domain: str
    selector: str

    @property
    def key_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}".lower()


def _signatures(values: Sequence[str]) -> list[_Signature | None]:
    out: list[_Signature | None] = []
    for value in values:
        try:
            tags = dkim.util.parse_tag_value(value.encode("utf-8", "replace"))
            domain = tags[b"d"].decode("ascii").strip().lower()
            selector = tags[b"s"].decode("ascii").strip().lower()
        except (dkim.util.InvalidTagValueList, KeyError, UnicodeDecodeError):
            out.append(None)
            continue
        ok = _DOMAIN.match(domain) and _DOMAIN.match(selector)
        out.append(_Signature(domain, selector) if ok else None)
    return out


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("ascii", "replace")


def verify_signatures(
    raw: bytes, keys: Mapping[str, bytes | None], failed: frozenset[str], arc_sets: int
) -> tuple[list[DkimVerdict], ArcVerdict]:
    """Every DKIM signature of ``raw``, then its ARC chain, against the prefetched ``keys``.

    ``keys`` maps ``selector._domainkey.domain`` to its TXT record (None: there is none);
    ``failed`` holds the names whose lookup failed (→ ``temperror``). CPU only: the body is
    canonicalised and hashed once per signature.
    """

    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        return keys.get(name.decode("ascii", "replace").lower().rstrip("."))

    verdicts: list[DkimVerdict] = []
    try:
        signer = dkim.DKIM(raw, logger=_DKIM_LOG, minkey=MIN_KEY_BITS)
    except dkim.DKIMException as exc:
        return [DkimVerdict("permerror", None, None, str(exc))], ArcVerdict("permerror", arc_sets)
    count = sum(1 for name, _ in signer.headers if name.lower() == b"dkim-signature")
    for idx in range(count):
        verdicts.append(_verify_one(signer, idx, keys, failed, lookup))
    arc = _verify_arc(raw, keys, failed, arc_sets, lookup) if arc_sets else ArcVerdict("none")
    return verdicts, arc


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
    txt = keys.get(name)
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


def _verify_arc(
    raw: bytes,
    keys: Mapping[str, bytes | None],
    failed: frozenset[str],
    arc_sets: int,
    lookup: Any,
) -> ArcVerdict:
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


# -- the authenticator --------------------------------------------------------------------------


class MailAuthenticator:
    """SPF, DKIM, DMARC and ARC for one gateway; :meth:`check` once per mail."""

    def __init__(self, config: VerifyConfig, authserv_id: str) -> None:
        self.config = config
        self.authserv_id = config.authserv_id or authserv_id
        self.resolver = Resolver(config.dns)
        self._trusted_arc = {d for r in config.trusted_relays for d in r.arc_domains}
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def relay_for(self, client: str | None) -> TrustedRelay | None:
        """The trusted relay ``client`` is, by its address."""
        if client is None:
            return None
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return None
        for relay in self.config.trusted_relays:
            if any(address in net for net in relay.networks):
                return relay
        return None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def check(
        self,
        raw: bytes,
        headers: Sequence[Sequence[str]],
        *,
        client: str | None,
        helo: str | None,
        mail_from: str | None,
    ) -> AuthVerdict:
        """The verdict on one mail (``headers`` as ``parse_mail`` decoded them). Never raises
        for anything the mail or DNS does."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.dns.budget
        fields = mapping_of(headers)
        author, author_problem = from_domain(fields.get("from", []))
        dkim_sigs = _signatures(fields.get("dkim-signature", []))
        arc_sets = len(fields.get("arc-seal", []))
        arc_sigs = (
            _signatures([*fields.get("arc-seal", []), *fields.get("arc-message-signature", [])])
            if arc_sets
            else []
        )
        key_names = sorted({s.key_name for s in (*dkim_sigs, *arc_sigs) if s is not None})
        relay = self.relay_for(client)
        if relay is not None:
            assert relay.authserv_id is not None  # config: networks need it
            believed = relay_results(headers, relay.authserv_id)
            spf_mailfrom = believed or SpfVerdict(
                "none", None, None, f"no Authentication-Results from {relay.authserv_id}"
            )
            spf_helo = SpfVerdict("none", None, None, "the client is a trusted relay")
            keys, dmarc_found = await asyncio.gather(
                self._keys(key_names, deadline), self._dmarc_record(author, deadline)
            )
        else:
            spf_mailfrom, spf_helo, keys, dmarc_found = await asyncio.gather(
                self._spf_mailfrom(client, mail_from, helo, deadline),
                self._spf_helo(client, helo, deadline),
                self._keys(key_names, deadline),
                self._dmarc_record(author, deadline),
            )
        found, failed = keys
        if dkim_sigs or arc_sets:
            dkim_verdicts, arc = await loop.run_in_executor(
                self._pool(), verify_signatures, raw, found, failed, arc_sets
            )
        else:
            dkim_verdicts, arc = [], ArcVerdict("none")
        if arc.result == "pass" and arc.sealer in self._trusted_arc:
            arc = ArcVerdict(arc.result, arc.sets, arc.sealer, True, arc.reason, arc.aar)
        record, record_domain, problem, temporary = dmarc_found
        dmarc = evaluate_dmarc(
            author,
            record,
            record_domain,
            spf_mailfrom,
            dkim_verdicts,
            sample=random.uniform(0, 100),
            problem=author_problem or problem,
            temporary=temporary,
        )
        dmarc = trusted_arc_override(dmarc, arc)
        return AuthVerdict(
            mode="enforce" if self.config.mode == "enforce" else "report",
            authserv_id=self.authserv_id,
            client=client,
            spf=spf_mailfrom,
            spf_helo=spf_helo,
            dkim=tuple(dkim_verdicts),
            dmarc=dmarc,
            arc=arc,
            relay=relay.authserv_id if relay is not None else None,
        )

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            # two: the machine's cores; hashing releases the GIL for large bodies
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=2, thread_name_prefix="email-dkim"
            )
        return self._executor

    async def _spf_mailfrom(
        self, client: str | None, mail_from: str | None, helo: str | None, deadline: float
    ) -> SpfVerdict:
        sender = (mail_from or "").strip()
        identity: str | None
        if sender:
            domain = sender.rpartition("@")[2].lower() or None
            identity = sender
        else:  # a null sender is checked as postmaster@HELO (RFC 7208 2.4)
            domain = _helo_domain(helo)
            identity = f"postmaster@{domain}" if domain else None
        if client is None or not domain:
            return SpfVerdict("none", domain, identity, "nothing to check")
        result, why = await self._spf(client, sender, helo or "", deadline)
        return SpfVerdict(result, domain, identity, why)

    async def _spf_helo(self, client: str | None, helo: str | None, deadline: float) -> SpfVerdict:
        domain = _helo_domain(helo)
        if client is None or domain is None:
            return SpfVerdict("none", domain, domain, "HELO is no domain name")
        result, why = await self._spf(client, "", domain, deadline)
        return SpfVerdict(result, domain, domain, why)

    async def _spf(self, client: str, sender: str, helo: str, deadline: float) -> tuple[str, str]:
        lookups = _SpfLookups()
        for _ in range(_MAX_SPF_ROUNDS):
            token = _SPF_LOOKUPS.set(lookups)
            try:
                result, _code, explanation = spf.query(i=client, s=sender, h=helo).check()
            except Exception as exc:  # pyspf on an address it cannot take apart
                return "permerror", f"{type(exc).__name__}: {exc}"
            finally:
                _SPF_LOOKUPS.reset(token)
            if not lookups.missing:
                return str(result), str(explanation)
            missing, lookups.missing = sorted(lookups.missing), set()
            answers = await asyncio.gather(
                *(self.resolver.lookup(n, t, deadline) for n, t in missing),
                return_exceptions=True,
            )
            for (name, qtype), answer in zip(missing, answers, strict=True):
                if isinstance(answer, DnsTempError):
                    lookups.known[(name, qtype)] = answer
                elif isinstance(answer, BaseException):
                    raise answer
                else:
                    lookups.known[(name, qtype)] = _spf_records(name, qtype, answer)
        return "temperror", "SPF evaluation needed too many lookups"

    async def _keys(
        self, names: Sequence[str], deadline: float
    ) -> tuple[dict[str, bytes | None], frozenset[str]]:
        answers = await asyncio.gather(
            *(self.resolver.txt(n, deadline) for n in names), return_exceptions=True
        )
        found: dict[str, bytes | None] = {}
        failed = set()
        for name, answer in zip(names, answers, strict=True):
            if isinstance(answer, DnsTempError):
                failed.add(name)
            elif isinstance(answer, BaseException):
                raise answer
            else:
                # a selector with several TXT records: the one that looks like a key
                keyish = [t for t in answer if b"p=" in t] or answer
                found[name] = keyish[0] if keyish else None
        return found, frozenset(failed)

    async def _dmarc_record(
        self, author: str | None, deadline: float
    ) -> tuple[DmarcRecord | None, str | None, str | None, bool]:
        """(record, where it was found, why there is none, whether that may pass)."""
        if author is None:
            return None, None, None, False
        for domain in dict.fromkeys((author, org_domain(author))):
            try:
                text = select_dmarc_record(await self.resolver.txt(f"_dmarc.{domain}", deadline))
            except DnsTempError as exc:
                return None, None, f"DMARC record lookup failed: {exc}", True
            if text is not None:
                try:
                    return parse_dmarc_record(text), domain, None, False
                except ValueError as exc:
                    return None, None, str(exc), False
        return None, None, "no DMARC record", False


def _helo_domain(helo: str | None) -> str | None:
    name = (helo or "").strip().lower().rstrip(".")
    if not name or name.startswith("[") or "." not in name or not _DOMAIN.match(name):
        return None
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name
    return None


# -- signing ------------------------------------------------------------------------------------


class DkimSigner:
    """Signs outgoing mail with the key of ``email.relay.dkim`` (dkimpy)."""

    def __init__(self, config: DkimSigningConfig) -> None:
        self.config = config
        self._key = config.private_key.get_secret_value().strip().encode("ascii")
        self._headers = (
            [h.encode("ascii") for h in config.headers] if config.headers is not None else None
        )
        try:  # sign once now: a key dkimpy cannot use is a start-up error, not a failed send
            self.sign(b"From: check@example.com\r\nSubject: key check\r\n\r\nbody\r\n")
        except dkim.DKIMException as exc:
            raise ValueError(f"email.relay.dkim.private_key is not usable: {exc}") from None

    def sign(self, message: bytes) -> bytes:
        """``message`` (CRLF line ends) with a ``DKIM-Signature`` header on top."""
        header: bytes = dkim.sign(
            message,
            self.config.selector.encode("ascii"),
            self.config.domain.encode("ascii"),
            self._key,
            signature_algorithm=self.config.algorithm.encode("ascii"),
            include_headers=self._headers,
            canonicalize=(b"relaxed", b"relaxed"),
            logger=_DKIM_LOG,
        )
        return header + message
