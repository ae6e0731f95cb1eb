"""Sender authentication for incoming mail, and DKIM signing of outgoing mail.

:class:`MailAuthenticator` answers "who sent this mail?" with one
:class:`~gateways.email.verdicts.AuthVerdict` per mail; the gateway calls it from its DATA hook
and puts the verdict into ``email.receive``. The libraries do the protocols, this module only
feeds them answers from the one asynchronous, cached resolver:

* DNS: dnspython's asyncio resolver with its LRU cache (answers kept for their TTL). Every mail
  has a time budget for all its lookups together; what is not answered in time, or fails, is a
  ``temperror`` verdict, and the mail is accepted all the same. A failed lookup is remembered
  for ``dns.failure_ttl`` seconds, and when the resolvers themselves stop answering (a probe
  of the root's NS records gets no answer either) every lookup fails at once until a probe
  gets one: DNS down made every mail wait its lookups' timeout before its 250, holding SMTP
  sessions and connection slots meanwhile. One WARNING and one count per outage.
* SPF: spf3 (pyspf's maintained release). Its evaluation is synchronous and asks for DNS through
  the module function ``spf.DNSLookup``, the plug point pyspf's own tests replace too. Ours
  answers from the mail's lookups so far and notes what it lacks; the evaluation (microseconds)
  is replayed on the event loop once the missing names are resolved asynchronously, until it
  asks for nothing new. Names already in the resolver's cache are answered at once, so with a
  warm cache the evaluation runs once.
* DKIM and ARC: dkimpy. The selector keys are fetched first (their names are in the signature
  headers; at most ``max_signatures`` of them, at most ``max_arc_sets`` ARC sets), then a
  parser process verifies against them (:mod:`gateways.email.signatures`), under the parser's
  CPU limit: dkimpy's hashing holds the GIL and stalled the event loop from a thread.
* DMARC: the record is fetched here; the evaluation is :func:`verdicts.evaluate_dmarc`.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import logging
import random
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dkim
import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import spf

from gateways.email.config import DkimSigningConfig, DnsConfig, TrustedRelay, VerifyConfig
from gateways.email.parser_pool import ParseOutcome
from gateways.email.signatures import (
    SignatureRequest,
    decode_result,
    over_cpu_limit,
    prefer_order,
)
from gateways.email.verdicts import (
    ArcVerdict,
    AuthVerdict,
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

__all__ = [
    "DkimSigner",
    "DnsTempError",
    "MailAuthenticator",
    "Resolver",
    "SignatureVerifier",
    "SignaturesLost",
]

log = logging.getLogger("gateway.email")

# dkimpy logs every failed signature at ERROR: the reason is in our verdict instead
_DKIM_LOG = logging.getLogger("gateway.email.dkimpy")
_DKIM_LOG.addHandler(logging.NullHandler())
_DKIM_LOG.propagate = False

#: seconds between two probes of resolvers that do not answer
PROBE_INTERVAL = 5.0
#: failed lookups remembered at most (each for dns.failure_ttl)
MAX_FAILURES = 10_000
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
    """dnspython's asyncio resolver with a cache; every lookup is capped by a deadline.

    Temporary failures are remembered for ``failure_ttl`` seconds (RFC 2308 7.1 allows up to
    five minutes), so a name whose servers are broken costs one timeout, not one per mail.
    When a lookup fails, a probe asks the resolvers for the root's NS records (which a working
    resolver always has): no answer to it either means the resolvers are down, and until a
    probe (every :data:`PROBE_INTERVAL` s) gets an answer every lookup that is not cached fails
    at once. ``on_outage(True)`` / ``on_outage(False)`` is called when that starts and ends.
    """

    def __init__(self, config: DnsConfig, on_outage: Callable[[bool], None] | None = None) -> None:
        self.timeout = config.timeout
        self.failure_ttl = config.failure_ttl
        self.problem: str | None = None
        self.on_outage = on_outage
        #: loop time when the resolvers stopped answering; None while they answer
        self.down_since: float | None = None
        #: lookups failed at once during the current (or last) outage
        self.failed_fast = 0
        self._failures: OrderedDict[tuple[str, str], tuple[float, DnsTempError]] = OrderedDict()
        #: records by (name, qtype) until their expiry (epoch seconds, as dnspython's cache):
        #: a hit in dnspython's own cache still cost ~150 us of its resolution machinery
        self._answers: OrderedDict[tuple[str, str], tuple[float, list[Any]]] = OrderedDict()
        self._cache_size = config.cache_size
        self._probe: asyncio.Task[None] | None = None
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
        # the probe: the same servers, no cache (a cached answer says nothing about them now)
        self._prober = dns.asyncresolver.Resolver(configure=False)
        self._prober.nameservers = self._resolver.nameservers
        self._prober.timeout = config.timeout

    @property
    def nameservers(self) -> str:
        return ", ".join(str(n) for n in self._resolver.nameservers) or "none"

    def peek(self, name: str, qtype: str) -> list[Any] | DnsTempError | None:
        """What :meth:`lookup` would give at once, without asking anyone: the cached records,
        a remembered failure (or the resolvers being down), or None (it would ask)."""
        remembered = self._failures.get((name.lower().rstrip("."), qtype))
        if remembered is not None and remembered[0] > asyncio.get_running_loop().time():
            return remembered[1]
        cached = self.cached(name, qtype)
        if cached is None and self.down_since is not None:
            return DnsTempError(f"{name} {qtype}: the DNS resolvers do not answer")
        return cached

    def cached(self, name: str, qtype: str) -> list[Any] | None:
        """The records of ``name`` if the cache holds an answer (no I/O), else None."""
        hit = self._answers.get((name.lower().rstrip("."), qtype))
        if hit is not None and hit[0] > time.time():
            return hit[1]
        cache = self._resolver.cache
        if cache is None:
            return None
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException:
            return None
        answer = cache.get((qname, dns.rdatatype.from_text(qtype), dns.rdataclass.IN))
        if answer is None:
            return None
        return list(answer.rrset) if answer.rrset is not None else []

    async def lookup(self, name: str, qtype: str, deadline: float) -> list[Any]:
        """The records of ``name``; ``[]`` when there are none (NXDOMAIN, NODATA, a name that
        cannot exist). Raise :class:`DnsTempError` for everything that may pass."""
        now = asyncio.get_running_loop().time()
        remaining = deadline - now
        if remaining <= 0:
            raise DnsTempError(f"{name} {qtype}: the mail's DNS time budget is spent")
        if self.problem is not None:
            raise DnsTempError(self.problem)
        key = (name.lower().rstrip("."), qtype)
        hit = self._answers.get(key)
        if hit is not None:
            if hit[0] > time.time():
                self._answers.move_to_end(key)
                return hit[1]
            del self._answers[key]
        remembered = self._failures.get(key)
        if remembered is not None:
            if remembered[0] > now:
                raise remembered[1]
            del self._failures[key]
        if self.down_since is not None:
            cached = self.cached(name, qtype)
            if cached is not None:
                return cached
            self.failed_fast += 1
            raise DnsTempError(
                f"{name} {qtype}: the DNS resolvers do not answer "
                f"(for {now - self.down_since:.0f} s)"
            )
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
            raise self._failed(key, f"{name} {qtype}: timed out") from None
        except dns.resolver.NoNameservers:
            raise self._failed(key, f"{name} {qtype}: no server answered (SERVFAIL)") from None
        except dns.exception.DNSException as exc:
            raise self._failed(key, f"{name} {qtype}: {exc}") from None
        records = list(answer.rrset) if answer.rrset is not None else []
        if self._cache_size:
            self._answers[key] = (answer.expiration, records)
            self._answers.move_to_end(key)
            if len(self._answers) > self._cache_size:
                self._answers.popitem(last=False)
        return records

    async def txt(self, name: str, deadline: float) -> list[bytes]:
        """Every TXT record of ``name``, its strings joined."""
        return [b"".join(r.strings) for r in await self.lookup(name, "TXT", deadline)]

    def _failed(self, key: tuple[str, str], why: str) -> DnsTempError:
        error = DnsTempError(why)
        if self.failure_ttl > 0:
            now = asyncio.get_running_loop().time()
            self._failures[key] = (now + self.failure_ttl, error)
            self._failures.move_to_end(key)
            while len(self._failures) > MAX_FAILURES:
                self._failures.popitem(last=False)
        if self._probe is None and self.down_since is None:
            self._probe = asyncio.create_task(self._watch())
        return error

    async def _watch(self) -> None:
        """Probe until the resolvers answer; an outage starts with the first probe that gets
        no answer and ends with the first that does."""
        loop = asyncio.get_running_loop()
        try:
            while not await self._resolvers_answer():
                if self.down_since is None:
                    self.down_since = loop.time()
                    self.failed_fast = 0
                    if self.on_outage is not None:
                        self.on_outage(True)
                await asyncio.sleep(PROBE_INTERVAL)
            if self.down_since is not None:
                self.down_since = None
                self._failures.clear()  # what failed for the outage may answer now
                if self.on_outage is not None:
                    self.on_outage(False)
        finally:
            self._probe = None

    async def _resolvers_answer(self) -> bool:
        """Whether the resolvers answer at all (the root's NS records; NXDOMAIN counts)."""
        try:
            await self._prober.resolve(
                ".", "NS", lifetime=self.timeout, raise_on_no_answer=False, search=False
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return True
        except dns.exception.DNSException:
            return False
        return True

    def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()


# -- SPF ----------------------------------------------------------------------------------------


@dataclass
class _SpfLookups:
    """The answers one mail's SPF evaluation has had, and the names it asked for in vain."""

    resolver: Resolver
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
        # a warm cache answers here, so the evaluation need not run again after a lookup
        peeked = lookups.resolver.peek(*key)
        if peeked is None:
            lookups.missing.add(key)
            raise spf.TempError(f"DNS {name} {qtype}: not yet resolved")
        value = lookups.known[key] = (
            peeked if isinstance(peeked, DnsTempError) else _spf_records(key[0], key[1], peeked)
        )
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


# -- DKIM and ARC (in a parser process) --------------------------------------------------------


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


class SignaturesLost(Exception):
    """The parser process checking a mail's signatures died, hung or failed (a bug of ours):
    nothing is known about the mail, so it gets 451 like a lost parse."""

    def __init__(self, outcome: ParseOutcome) -> None:
        super().__init__(outcome.detail)
        self.outcome = outcome


#: checks a mail's signatures in a parser process (``ParserPool.verify`` with its wait)
SignatureVerifier = Callable[[SignatureRequest], Awaitable[ParseOutcome]]


# -- the authenticator --------------------------------------------------------------------------


class MailAuthenticator:
    """SPF, DKIM, DMARC and ARC for one gateway; :meth:`check` once per mail."""

    def __init__(
        self,
        config: VerifyConfig,
        authserv_id: str,
        verifier: SignatureVerifier,
        on_outage: Callable[[bool], None] | None = None,
    ) -> None:
        self.config = config
        self.authserv_id = config.authserv_id or authserv_id
        self.resolver = Resolver(config.dns, on_outage)
        #: where signatures are checked: a parser process (ParserPool.verify)
        self.verifier = verifier
        self._trusted_arc = {d for r in config.trusted_relays for d in r.arc_domains}

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
        self.resolver.close()

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
        for anything the mail or DNS does; raises ``ParsersBusy`` when no parser process took
        the signature check in time and :class:`SignaturesLost` when the process was lost."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.dns.budget
        fields = mapping_of(headers)
        author, author_problem = from_domain(fields.get("from", []))
        dkim_sigs = _signatures(fields.get("dkim-signature", []))
        arc_sets = len(fields.get("arc-seal", []))
        arc_sigs = (
            _signatures([*fields.get("arc-seal", []), *fields.get("arc-message-signature", [])])
            if 0 < arc_sets <= self.config.max_arc_sets
            else []
        )
        # the keys of the signatures that will be verified only: one lookup per signature
        # was another way to keep a mail waiting
        prefer = org_domain(author) if author else None
        order = prefer_order([s.domain if s else None for s in dkim_sigs], prefer)
        chosen = [dkim_sigs[i] for i in order[: self.config.max_signatures]]
        key_names = sorted({s.key_name for s in (*chosen, *arc_sigs) if s is not None})
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
            request = SignatureRequest(
                raw,
                found,
                failed,
                arc_sets,
                self.config.max_signatures,
                self.config.max_arc_sets,
                prefer,
            )
            outcome = await self.verifier(request)
            if outcome.kind == "verified":
                assert outcome.keys is not None
                dkim_verdicts, arc = decode_result(outcome.keys)
            elif outcome.kind == "cpu":
                signatures = [(s.domain, s.selector) if s else (None, None) for s in dkim_sigs]
                dkim_verdicts, arc = over_cpu_limit(signatures, arc_sets, outcome.detail)
            else:
                raise SignaturesLost(outcome)
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
        lookups = _SpfLookups(self.resolver)
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
