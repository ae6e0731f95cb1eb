"""A real DNS server on a loopback port, for tests and benchmarks of mail authentication.

:class:`DnsServer` answers UDP and TCP queries on one free port from a zone held in a dict
(dnslib encodes and decodes the wire format; its threaded ``DNSServer`` serves). Tests publish
SPF, DKIM and DMARC records for their domains and point the gateway's resolver at it
(``email.verify.dns.nameservers: ["127.0.0.1:PORT"]``). :func:`dkim_key` makes an RSA key pair
and the TXT record that publishes it. Import from this module (dnslib is a test dependency).

``stop()`` makes the server go quiet (the port is closed: queries are refused or time out), which
is how a test plays "DNS is down"; ``start()`` brings it back on the same port. ``silent = True``
plays a resolver that is down but reachable, the usual outage: queries are recorded and never
answered, so clients wait out their timeout; ``ignore(name)`` does that for one name (a domain
whose servers are broken).
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dnslib import QTYPE, RCODE, RR
from dnslib.dns import DNSError
from dnslib.server import BaseResolver, DNSServer

from core.testing.base import HOST, free_port

__all__ = ["DkimKey", "DnsServer", "dkim_key"]

#: TTL of every answer: long enough that a benchmark's lookups are all cached
TTL = 300


@dataclass(frozen=True)
class DkimKey:
    """An RSA key for DKIM: the PEM for the signer, the TXT record for the DNS."""

    private_pem: bytes
    public_b64: str

    @property
    def txt(self) -> str:
        return f"v=DKIM1; k=rsa; p={self.public_b64}"


def dkim_key(bits: int = 2048) -> DkimKey:
    """A fresh RSA key (2048 bits: about 0.1 s)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return DkimKey(pem, base64.b64encode(der).decode("ascii"))


class _ZoneResolver(BaseResolver):  # type: ignore[misc]
    def __init__(self, server: DnsServer) -> None:
        self.server = server

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        name = str(request.q.qname).lower().rstrip(".")
        qtype = QTYPE[request.q.qtype]
        with self.server.lock:
            self.server.queries.append((name, qtype))
            if self.server.silent or name in self.server.ignored:
                raise DNSError("silent")  # dnslib's handler sends nothing for it
            if self.server.servfail:
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            answers = self.server.records.get((name, qtype), [])
            exists = any(n == name for n, _ in self.server.records)
        for zone_line in answers:
            reply.add_answer(*RR.fromZone(f"{name}. {TTL} IN {qtype} {zone_line}"))
        if not answers:
            if not exists:
                reply.header.rcode = RCODE.NXDOMAIN
            # a SOA in the authority section makes the negative answer cacheable (RFC 2308)
            soa = f"{name}. {TTL} IN SOA ns.test. hostmaster.test. 1 3600 600 86400 {TTL}"
            reply.add_auth(*RR.fromZone(soa))
        return reply


def _txt_zone(text: str) -> str:
    """A TXT record's zone-file form: quoted strings of at most 255 bytes each."""
    chunks = [text[i : i + 255] for i in range(0, len(text), 255)] or [""]
    return " ".join('"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks)


class DnsServer:
    """An authoritative-looking server for whatever names a test adds (UDP and TCP)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.records: dict[tuple[str, str], list[str]] = {}
        self.queries: list[tuple[str, str]] = []
        #: answer SERVFAIL to everything (a broken upstream) while True
        self.servfail = False
        #: answer nothing at all (queries are still recorded) while True
        self.silent = False
        #: names never answered (queries recorded)
        self.ignored: set[str] = set()
        self.lock = threading.Lock()
        self._servers: list[Any] = []

    @property
    def nameserver(self) -> str:
        """``ADDRESS:PORT`` for ``email.verify.dns.nameservers``."""
        return f"{HOST}:{self.port}"

    def add(self, name: str, qtype: str, *values: str) -> DnsServer:
        """Publish records (zone-file rdata: ``"127.0.0.1"``, ``"10 mx.example.org."``)."""
        with self.lock:
            self.records.setdefault((name.lower().rstrip("."), qtype.upper()), []).extend(values)
        return self

    def txt(self, name: str, *texts: str) -> DnsServer:
        """Publish TXT records, each split into 255-byte strings as DNS needs."""
        return self.add(name, "TXT", *(_txt_zone(t) for t in texts))

    def ignore(self, name: str) -> DnsServer:
        """Never answer queries for ``name`` (they are recorded): its servers are broken."""
        with self.lock:
            self.ignored.add(name.lower().rstrip("."))
        return self

    def remove(self, name: str, qtype: str | None = None) -> None:
        with self.lock:
            for key in [k for k in self.records if k[0] == name and qtype in (None, k[1])]:
                del self.records[key]

    def asked(self, names: Iterable[str] = ()) -> list[tuple[str, str]]:
        """The queries so far (only those for ``names``, if given)."""
        wanted = {n.lower() for n in names}
        with self.lock:
            return [q for q in self.queries if not wanted or q[0] in wanted]

    def start(self) -> DnsServer:
        if not self._servers:
            resolver = _ZoneResolver(self)
            for tcp in (False, True):
                server = DNSServer(resolver, port=self.port, address=HOST, tcp=tcp, logger=_Quiet())
                server.start_thread()
                self._servers.append(server)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.stop()
            server.server.server_close()
        self._servers = []

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Quiet:
    """dnslib's logger interface, printing nothing (its default prints every query)."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None
