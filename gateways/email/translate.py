"""Pure translation between mail and layer messages: no I/O, no asyncio.

Inbound, :func:`parse_mail` turns the bytes of one SMTP DATA into the keys of ``email.receive``
with the stdlib ``email`` package and its modern policy: RFC 2047 headers decoded, the preferred
text and html bodies picked the way mail clients do (``get_body``), every other part an
attachment. Broken mail never raises: what cannot be decoded is decoded with replacement
characters and named in ``defects``, so nothing a sender wrote is dropped for being malformed.
Ordinary mail takes a cheaper path with the same keys (the plain path, below); the modern
parse is the reference, and parses whatever the plain path cannot vouch for.

Outbound, :func:`build_mail` turns the keys of ``email.send`` into an ``EmailMessage``. Every
header value is checked for CR and LF first: the policy would fold them, but a value that
carries a line break is an injection attempt or a bug, and either way the caller should know.
"""

from __future__ import annotations

import email.feedparser
import email.headerregistry
import email.policy
import email.utils
import functools
import importlib
import itertools
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.message import EmailMessage, Message
from typing import Any

__all__ = [
    "InvalidMail",
    "LimitExceeded",
    "MailLimits",
    "OutgoingMail",
    "accepts_recipient",
    "build_mail",
    "envelope_address_refusal",
    "has_bare_lf",
    "header_limit_exceeded",
    "parse_mail",
    "same_mailbox",
    "unparsed_mail",
]

# SMTPUTF8 allows UTF-8 headers; raise_on_defect=False is the default and what we want
_POLICY = email.policy.default
# an attached message written back as it came: headers not refolded, CRLF line ends; utf8
# because Python 3.13 (not 3.11) refolds every non-ASCII header into RFC 2047 encoded words
# otherwise, so an 8-bit Subject came out as =?unknown-8bit?b?…?= (issue 29); parsed from
# bytes, non-ASCII is only ever surrogate escapes, which go back out as the bytes they were
_AS_RECEIVED = _POLICY.clone(refold_source="none", linesep="\r\n", utf8=True)
_SURROGATE = re.compile("[\ud800-\udfff]")
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")  # RFC 5322 ftext: printable ASCII except ':'
# NUL and every line boundary of str.splitlines(): the policy refuses all of them in a header
# value with a bare ValueError (U+0085, U+2028, VT, FF, …), so catch them as InvalidMail first
_LINE_BREAK_OR_NUL = re.compile("[\r\n\x0b\x0c\x1c-\x1e\x85\u2028\u2029\x00]")
# C0 controls and DEL: no address in RFC 5321 (or 6531, which adds only UTF-8 above U+007F)
# holds one; NUL went raw into the log and onward to consumers
_CONTROL = re.compile("[\x00-\x1f\x7f]")
# a CR that does not start a CRLF; the stdlib parser ends a header line at it
_BARE_CR = re.compile(rb"\r(?!\n)")
_HEADER_END = re.compile(rb"^\r?\n|\r?\n\r?\n")
# headers build_mail sets itself; a command cannot override them through `headers`
_MANAGED = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "subject",
        "in-reply-to",
        "references",
        "message-id",
        "date",
        "content-type",
        "content-transfer-encoding",
        "mime-version",
    }
)


class InvalidMail(ValueError):
    """An ``email.send`` command cannot become a safe message. The text says which key."""


# -- inbound ------------------------------------------------------------------------------------


def has_bare_lf(data: bytes) -> bool:
    """True if a line ends in LF without CR (the SMTP smuggling vector, CVE-2023-51764 family)."""
    return b"\n" in data.replace(b"\r\n", b"")


def accepts_recipient(address: str, accept: Sequence[str]) -> bool:
    """Whether ``address`` is one of ``accept`` (lower-case domains or full addresses)."""
    address = address.strip().lower()
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return False
    return address in accept or domain in accept


def envelope_address_refusal(address: str, *, smtputf8: bool, sender: bool) -> str | None:
    """The SMTP reply refusing ``address`` in MAIL FROM (``sender``) or RCPT TO, or ``None``.

    aiosmtpd hands over the address decoded as UTF-8 with surrogate escapes. Refused here, at
    MAIL or RCPT, with a 5xx, since such a mail can never be delivered (issue 14, items 3, 7):

    - bytes that are not UTF-8 (the event could not be encoded: ``451`` at DATA on every retry);
    - a control character such as NUL (RFC 5321 4.1.2 has none in a mailbox);
    - non-ASCII without the ``SMTPUTF8`` parameter on MAIL (RFC 6531 3.4).
    """
    code = "553 5.1.7 Sender" if sender else "553 5.1.3 Recipient"
    if _SURROGATE.search(address):
        return f"{code} address is not valid UTF-8"
    if _CONTROL.search(address):
        return f"{code} address contains a control character"
    if not smtputf8 and not address.isascii():
        return "553 5.6.7 Non-ASCII address without SMTPUTF8 (RFC 6531)"
    return None


def same_mailbox(address: str) -> str:
    """A key under which two spellings of one recipient compare equal (the domain's case)."""
    local, at, domain = address.strip().rpartition("@")
    return f"{local}{at}{domain.lower()}" if at else address.strip()


@dataclass(frozen=True)
class MailLimits:
    """Caps on a mail's own header block, checked before it is parsed (issue 21).

    CPython's header parser takes time quadratic in the RFC 2047 encoded words of one header
    (20,000 of them: 10 s) and in the addresses or groups of one address header (30,000 empty
    groups ``a:;``: 2 s), and a mail of 512 KiB holds that many. These caps refuse such a mail
    for the price of a scan; ordinary mail is far below them. The defaults are the YAML's
    (``email.parser``).
    """

    #: header fields (Received, DKIM-Signature … included); ordinary mail has 10 to 100
    max_header_fields: int = 1000
    #: bytes of one header field, its name and folded lines included (Postfix's
    #: header_size_limit); a To of 1,000 addresses is ~40 KiB
    max_header_length: int = 100 * 1024
    #: RFC 2047 encoded words in one header field; a subject has a few, a To of 100 named
    #: recipients some 200
    max_encoded_words: int = 1000


@dataclass(frozen=True)
class LimitExceeded:
    """Why a mail was not parsed: which cap, in words, and the SMTP reply that refuses it."""

    #: ``header_fields``, ``header_length`` or ``encoded_words``
    kind: str
    #: for the log, the reply and the defect: ``header field 'To' is 120004 bytes (limit …)``
    detail: str
    reply: str


# one header field's first line, as the stdlib's feedparser sees it (its headerRE); a line
# that is neither this nor a continuation ends the header block there
_FIELD_START = re.compile(rb"[\x21-\x39\x3b-\x7e]*:")
_ENCODED_WORD = re.compile(rb"=\?[^?\s]*\?[bBqQ]\?[^?\s]*\?=")
_PRINTABLE = re.compile(rb"[^\x21-\x7e]")


def _field_name(raw: bytes, start: int) -> str:
    """The name of the field at ``start``, fit for a log line and an SMTP reply: printable
    ASCII, at most 40 characters (the sender chose it)."""
    name = raw[start : start + 41].split(b":", 1)[0][:40]
    return _PRINTABLE.sub(b"?", name).decode("ascii")


def header_limit_exceeded(raw: bytes, limits: MailLimits) -> LimitExceeded | None:
    """The first cap of ``limits`` the top-level header block of ``raw`` exceeds, or ``None``.

    One pass over the lines of the header block, which ends where the stdlib's parser ends it;
    nothing is decoded, nothing copied. Headers of MIME parts are left to the CPU limit.
    """
    spans: list[tuple[int, int]] = []  # (start, end) of each field, its last line break excluded
    position, end = 0, len(raw)
    while position < end:
        newline = raw.find(b"\n", position)
        stop = end if newline < 0 else newline + 1
        content_end = newline - (newline > position and raw[newline - 1] == 0x0D)
        if newline < 0:
            content_end = end
        if content_end == position:
            break  # the empty line after the header block
        first = raw[position]
        if first in (0x20, 0x09):  # a folded line continues the field before it
            if spans:
                spans[-1] = (spans[-1][0], content_end)
        elif _FIELD_START.match(raw, position) or raw.startswith(b"From ", position):
            if len(spans) == limits.max_header_fields:
                return LimitExceeded(
                    "header_fields",
                    f"more than {limits.max_header_fields} header fields",
                    f"552 5.3.4 Message header has more than {limits.max_header_fields} fields",
                )
            spans.append((position, content_end))
        else:
            break  # the parser ends the headers here (MissingHeaderBodySeparatorDefect)
        if spans and spans[-1][1] - spans[-1][0] > limits.max_header_length:
            name = _field_name(raw, spans[-1][0])
            return LimitExceeded(
                "header_length",
                f"header field {name!r} is longer than {limits.max_header_length} bytes",
                f"552 5.3.4 Header field {name} is longer than {limits.max_header_length} bytes",
            )
        position = stop
    for field_start, field_end in spans:
        words = len(_ENCODED_WORD.findall(raw, field_start, field_end))
        if words > limits.max_encoded_words:
            name = _field_name(raw, field_start)
            return LimitExceeded(
                "encoded_words",
                f"header field {name!r} has {words} RFC 2047 encoded words "
                f"(limit {limits.max_encoded_words})",
                f"554 5.6.0 Header field {name} has more than {limits.max_encoded_words} "
                "encoded words",
            )
    return None


def unparsed_mail(raw: bytes, defect: str) -> dict[str, Any]:
    """The ``email.receive`` keys of a mail handed on without parsing (``over_limit: raw``).

    Every parsed key is empty; the mail as received is the one attachment, of type
    ``message/rfc822`` (stored like any attachment when it is large), and ``defect`` says why.
    """
    return {
        "message_id": None,
        "subject": None,
        "from": None,
        "to": [],
        "cc": [],
        "reply_to": [],
        "date": None,
        "in_reply_to": None,
        "references": [],
        "headers": [],
        "text": None,
        "html": None,
        "attachments": [
            {"filename": None, "content_type": "message/rfc822", "size": len(raw), "content": raw}
        ],
        "defects": [defect],
    }


def _bare_cr_in_headers(raw: bytes, defects: list[str]) -> bytes:
    """``raw`` with each bare CR in the top-level header block replaced by a space.

    The header blocks of MIME parts follow in :func:`_bare_cr_in_part_headers`.

    The stdlib parser ends a header line at a bare CR, so ``Subject: x\rX-Injected: yes``
    reached consumers as two headers, with no defect (issue 14, item 6). A space keeps the
    text of the header and its line where the sender put them, and the defect says so.
    """
    blank = _HEADER_END.search(raw)
    end = len(raw) if blank is None else blank.start()
    if not _BARE_CR.search(raw, 0, end):
        return raw
    defects.append("BareCarriageReturnInHeaderDefect")
    return _BARE_CR.sub(b" ", raw[:end]) + raw[end:]


def _bare_cr_in_part_headers(raw: bytes, msg: Message) -> bytes | None:
    """``raw`` with bare CRs in the header blocks of MIME parts replaced, or ``None`` if none.

    Part headers decide what a part is (``Content-Type: text/plain\rContent-Disposition: …``
    split the same way). Only the lines between a delimiter of a boundary the parser found and
    the next empty line are touched: a bare CR in a body is content and stays.
    """
    boundaries = set()
    for part in msg.walk():
        boundary = part.get_boundary()
        if boundary:
            boundaries.add(boundary.encode("utf-8", "surrogateescape"))
    if not boundaries:
        return None
    lines = raw.split(b"\n")
    in_header = changed = False
    for i, line in enumerate(lines):
        text = line[:-1] if line.endswith(b"\r") and i < len(lines) - 1 else line
        if in_header:
            if not text:
                in_header = False
            elif b"\r" in text:
                lines[i] = text.replace(b"\r", b" ") + line[len(text) :]
                changed = True
        elif text.startswith(b"--"):
            # "--boundary" opens a part's headers; "--boundary--" closes the multipart
            in_header = text[2:].rstrip(b" \t") in boundaries
    return b"\n".join(lines) if changed else None


def _text(value: Any) -> str:
    return str(value) if value is not None else ""


def _header_value(msg: Message, name: str, source: Any, defects: list[str]) -> str:
    """The decoded value of one header line, or its source text if it does not parse.

    A Message-ID that does not parse: Python 3.11 raises for ``<`` and ``<>`` (IndexError)
    where 3.13 returns a header with an InvalidHeaderDefect, and both return ``foo`` or
    ``<a b@c>`` with a defect (``str()`` of the last is ``<a``). Either way the event carries
    what the sender wrote and one defect naming the header, on every Python (issue 29).
    """
    try:
        value = msg.policy.header_fetch_parse(name, source)
        broken = isinstance(value, email.headerregistry.MessageIDHeader) and bool(
            getattr(value, "defects", ())
        )
    except Exception:  # the header registry raises on some malformed values
        broken = True
    if broken:
        defects.append(f"{name}: malformed {_text(source)[:60]!r}")
        return _text(source)
    return str(value)


def _header(msg: Message, name: str, defects: list[str]) -> str | None:
    """The first ``name`` header decoded (:func:`_header_value`), ``None`` if there is none."""
    wanted = name.lower()
    for key, source in msg.raw_items():
        if key.lower() == wanted:
            return _header_value(msg, key, source, defects)
    return None


def _addresses(msg: Message, name: str, defects: list[str]) -> list[str]:
    try:
        values = msg.get_all(name) or []
        out: list[str] = []
        for value in values:
            groups = getattr(value, "addresses", None)
            if groups is None:
                out.append(str(value))
            else:
                out.extend(str(a) for a in groups)
        return out
    except Exception as exc:
        defects.append(f"{name}: {exc}")
        return []


def _ids(value: str | None) -> list[str]:
    return re.findall(r"<[^<>\s]+>", value or "")


def _date(msg: Message, defects: list[str]) -> str | None:
    try:
        raw = msg.get("Date")
    except Exception as exc:  # OverflowError from the header registry for a 20-digit year
        defects.append(f"Date: {exc}")
        return None
    if raw is None:
        return None
    dt = getattr(raw, "datetime", None)
    if dt is None:
        try:
            dt = email.utils.parsedate_to_datetime(str(raw))
        except (TypeError, ValueError):
            defects.append(f"Date: cannot parse {str(raw)[:60]!r}")
            return None
    return str(dt.isoformat())


def _content(part: Message, defects: list[str]) -> str | bytes:
    try:
        # strict (bodies are text/* parts), so undecodable bytes are named in defects
        return part.get_content(errors="strict")  # type: ignore[attr-defined, no-any-return]
    except (LookupError, ValueError, AssertionError, KeyError) as exc:
        # unknown charset, broken base64/quoted-printable: keep the bytes decoded leniently
        defects.append(f"{part.get_content_type()} part: {exc}")
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            payload = _text(part.get_payload()).encode("utf-8", "surrogateescape")
        if part.get_content_maintype() == "text":
            return _decode(payload, part.get_content_charset())
        return payload


def _decode(payload: bytes, charset: str | None) -> str:
    """``payload`` in ``charset`` when that is a text codec that can replace errors, else UTF-8."""
    if charset:
        try:
            return payload.decode(charset, "replace")
        except (LookupError, ValueError):
            # unknown, or a codec that is no charset: charset=base64/rot13/zlib raised
            # LookupError and charset=idna UnicodeError out of parse_mail
            pass
    return payload.decode("utf-8", "replace")


#: parsed header fields kept across messages (:class:`_HeaderFactory`), and the longest value
#: kept: at most ~4 MB however hostile the mail
HEADER_CACHE_SIZE = 2048
HEADER_CACHE_VALUE = 1024


class _HeaderFactory(email.headerregistry.HeaderRegistry):
    """The modern policy's header registry, made cheap for parsing one message.

    The stock registry builds a new class for every header it reads, and the parser reads the
    same Content-Type many times per message: that was ~90 % of the gateway's CPU per mail
    (bench/email.py). Classes are cached for the process, parsed headers for one message, and
    short ones also across messages: a support address gets the same To, Cc, From of its
    regular senders, MIME-Version and part headers in mail after mail, and an address field
    costs the header parser 40-60 us. Header objects are never changed once parsed (parse_mail
    only reads them), so sharing them is safe; the cache is a plain LRU of the parsing
    process (module state, but a pure function of the header's name and value).
    """

    _classes: dict[str, type[Any]] = {}
    _shared: OrderedDict[tuple[str, str], Any] = OrderedDict()

    def __init__(self, *, per_message: bool = True) -> None:
        super().__init__()
        #: parsed headers of this message; off for a factory used across messages
        self._per_message = per_message
        self._parsed: dict[tuple[str, str], Any] = {}
        self._failed: dict[tuple[str, str], Exception] = {}

    def __getitem__(self, name: str) -> type[Any]:
        key = name.lower()
        cls = self._classes.get(key)
        if cls is None:
            cls = self._classes[key] = super().__getitem__(name)
        return cls

    def __call__(self, name: str, value: str) -> Any:
        key = (name, value)
        header = self._parsed.get(key)
        if header is not None:
            return header
        failed = self._failed.get(key)
        if failed is not None:
            raise failed
        shared = self._shared
        header = shared.get(key)
        if header is None:
            try:
                header = super().__call__(name, value)
            except Exception as exc:
                # remembered for this message: parse_mail's modern parse, after the plain
                # path gave up, does not pay again for a header that took seconds to refuse
                if self._per_message:
                    self._failed[key] = exc
                raise
            if len(value) <= HEADER_CACHE_VALUE:
                shared[key] = header
                if len(shared) > HEADER_CACHE_SIZE:
                    shared.popitem(last=False)
        else:
            shared.move_to_end(key)
        if self._per_message:
            self._parsed[key] = header
        return header


#: the MIME headers of the plain path, across messages (_PlainPolicy)
_MIME_HEADERS = _HeaderFactory(per_message=False)


def _leaves(part: Message) -> list[Message]:
    """Every part that is not a container; an attached message counts as one part."""
    if part.get_content_maintype() == "message" or not part.is_multipart():
        return [part]
    children = part.get_payload()
    if not isinstance(children, list):
        return [part]
    return [leaf for child in children if isinstance(child, Message) for leaf in _leaves(child)]


def _attachment(part: Message, defects: list[str]) -> dict[str, Any]:
    content: str | bytes
    if part.get_content_maintype() == "message":
        inner = part.get_payload()
        if isinstance(inner, list) and inner and isinstance(inner[0], Message):
            # as received: refolding long headers broke on 8-bit bytes (UnicodeEncodeError)
            content = inner[0].as_bytes(policy=_AS_RECEIVED)
        else:
            content = _text(inner).encode("utf-8", "surrogateescape")
    else:
        # the bytes as sent, only the transfer encoding undone: get_content() decoded text/*
        # attachments by their charset and they came back re-encoded as UTF-8, with U+FFFD for
        # every byte the charset did not cover
        payload = part.get_payload(decode=True)
        content = payload if isinstance(payload, bytes) else b""
    # after decoding: get_payload(decode=True) records broken base64 on the part
    defects.extend(type(d).__name__ for d in part.defects)
    data = content.encode("utf-8", "surrogateescape") if isinstance(content, str) else content
    return {
        "filename": part.get_filename(),
        "content_type": part.get_content_type(),
        "size": len(data),
        "content": data,
    }


def parse_mail(raw: bytes) -> dict[str, Any]:
    """The message keys of ``email.receive`` parsed from ``raw``; never raises on bad mail.

    Ordinary mail takes :func:`_parse_plain` (the same keys for a third of the CPU); whatever
    that path is not sure of is parsed again by :func:`_parse_modern`, which is the reference.
    """
    # one factory for both: what the plain path parsed (or failed to) is not parsed again
    factory = _HeaderFactory()
    if not _BARE_CR.search(raw):
        try:
            return _parse_plain(raw, factory)
        except Exception:  # _NotPlain, or a value the plain path did not foresee
            pass
    return _parse_modern(raw, factory)


def _parse_modern(raw: bytes, factory: _HeaderFactory | None = None) -> dict[str, Any]:
    """:func:`parse_mail` with the modern policy throughout: every mail, however broken."""
    found: list[str] = []
    raw = _bare_cr_in_headers(raw, found)
    factory = _HeaderFactory() if factory is None else factory
    msg = email.message_from_bytes(raw, policy=_POLICY.clone(header_factory=factory))
    if msg.is_multipart() and _BARE_CR.search(raw):
        cleaned = _bare_cr_in_part_headers(raw, msg)
        if cleaned is not None:
            found.append("BareCarriageReturnInHeaderDefect")
            policy = _POLICY.clone(header_factory=_HeaderFactory())
            msg = email.message_from_bytes(cleaned, policy=policy)
    defects: list[str] = [*found, *(type(d).__name__ for d in msg.defects)]
    headers: list[list[str]] = []
    for name, value in msg.raw_items():
        headers.append([name, _header_value(msg, name, value, defects)])
    text = html = None
    body_parts: set[int] = set()
    for subtype in ("plain", "html"):
        try:
            part = msg.get_body(preferencelist=(subtype,))
        except Exception as exc:
            defects.append(f"body: {exc}")
            part = None
        if part is None:
            continue
        body_parts.add(id(part))
        content = _content(part, defects)
        defects.extend(type(d).__name__ for d in part.defects)  # found decoding: bad base64
        value = content if isinstance(content, str) else content.decode("utf-8", "replace")
        value = value.replace("\r\n", "\n")  # SMTP carries CRLF; people and code expect \n
        if subtype == "plain":
            text = value
        else:
            html = value
    attachments = [
        _attachment(part, defects) for part in _leaves(msg) if id(part) not in body_parts
    ]
    message_id = _header(msg, "Message-ID", defects)
    keys: dict[str, Any] = {
        "message_id": message_id.strip() if message_id else None,
        "subject": _header(msg, "Subject", defects),
        "from": next(iter(_addresses(msg, "From", defects)), None),
        "to": _addresses(msg, "To", defects),
        "cc": _addresses(msg, "Cc", defects),
        "reply_to": _addresses(msg, "Reply-To", defects),
        "date": _date(msg, defects),
        "in_reply_to": next(iter(_ids(_header(msg, "In-Reply-To", defects))), None),
        "references": _ids(_header(msg, "References", defects)),
        "headers": headers,
        "text": text,
        "html": html,
        "attachments": attachments,
    }
    keys = _utf8(keys, defects)
    keys["defects"] = _utf8(sorted(set(defects)), [])
    return keys


# -- the feedparser's boundary pattern, without compiling a regex per mail ----------------------
#
# For every multipart the stdlib's feedparser compiles '(?P<sep>' + re.escape('--' + boundary)
# + ')(?P<end>--)?…$' and only ever calls its match() on one line at a time. Boundaries are
# unique per mail, so re's cache never helps: that compile was a fifth of parse_mail's CPU
# (75 us of ~400 on the benchmark's mail). :class:`_FeedparserRe` stands in for the ``re``
# module inside email.feedparser (and only there, and only in the parser processes:
# :func:`use_boundary_matcher`): a pattern of that shape becomes a
# :class:`_BoundaryPattern`, which answers match() as the regex does: the separator as a
# literal prefix, then the (constant, cached) rest of the pattern matched from its end. Any
# other pattern, or one it does not read exactly, goes to re.compile.

_REGEX_SPECIAL = frozenset(".^$*+?{}[]|()\\")


class _BoundaryPattern:
    """The compiled boundary pattern: ``match(line)`` as the regex's."""

    __slots__ = ("_rest", "_separator", "_size")

    def __init__(self, separator: str, rest: re.Pattern[str]) -> None:
        self._separator = separator
        self._size = len(separator)
        self._rest = rest

    def match(self, line: str) -> re.Match[str] | None:
        if not line.startswith(self._separator):
            return None
        return self._rest.match(line, self._size)


def _boundary_pattern(pattern: Any, flags: int) -> _BoundaryPattern | None:
    """``pattern`` as a :class:`_BoundaryPattern` if it is ``(?P<sep>literal)rest``."""
    head = "(?P<sep>"
    if flags or not isinstance(pattern, str) or not pattern.startswith(head):
        return None
    literal: list[str] = []
    i, end = len(head), len(pattern)
    while i < end:
        char = pattern[i]
        if char == "\\":
            if i + 1 == end or pattern[i + 1].isalnum():  # \d, \n, \1…: not a literal
                return None
            literal.append(pattern[i + 1])
            i += 2
        elif char == ")":
            rest = pattern[i + 1 :]
            if "(?P<sep>" in rest or "(?P=sep)" in rest:
                return None
            return _BoundaryPattern("".join(literal), re.compile(rest))
        elif char in _REGEX_SPECIAL:
            return None
        else:
            literal.append(char)
            i += 1
    return None


class _FeedparserRe:
    """The ``re`` module as email.feedparser sees it: :func:`_boundary_pattern` first."""

    def __getattr__(self, name: str) -> Any:
        return getattr(re, name)

    @staticmethod
    def compile(pattern: Any, flags: int = 0) -> Any:
        found = _boundary_pattern(pattern, flags)
        return found if found is not None else re.compile(pattern, flags)


def use_boundary_matcher() -> None:
    """Give email.feedparser :class:`_FeedparserRe` for its ``re``, for the whole process.

    Called by the parser processes only (:func:`gateways.email.parser_pool.child_main`), which
    do nothing but parse: importing this module changes nothing in the gateway's or a worker's
    process (a Django project parsing mail of its own keeps the stdlib as it is). Idempotent.
    """
    if vars(email.feedparser).get("re") is re:
        vars(email.feedparser)["re"] = _FeedparserRe()


# -- the plain path: ordinary mail for a third of the CPU ------------------------------------------
#
# The modern policy parses every header it is asked for into a tree of tokens, and the Message
# methods ask for Content-Type again and again: most of parse_mail's CPU (issue 21's profile).
# The plain path parses with compat32, where header values stay strings, and decodes only what
# the event carries. It vouches for a mail only where its answer is the modern one by
# construction, and otherwise raises, so that _parse_modern parses the mail (a mail without
# defects, headers in ASCII, no attached message, no bare CR):
#
# * the MIME structure: the feedparser takes the same decisions under both policies when every
#   Content-Type, Content-Transfer-Encoding and Content-Disposition reads the same as text, so
#   each of them is parsed by the modern header registry (cached: part headers repeat) and must
#   come out as written; the values are unfolded as the modern policy unfolds them;
# * unstructured headers: the value itself, RFC 2047 words decoded by the stdlib's own
#   ``email._encoded_words.decode`` with the modern parser's rules for whitespace between two
#   words; a word that is not clean (a defect, an unknown charset, bytes that do not decode)
#   goes to the header registry;
# * Date: ``parsedate_to_datetime`` and ``format_datetime``, as the registry's DateHeader does;
#   a Message-ID of the form <dot-atom@dot-atom> as written; every other structured header
#   (addresses, MIME-Version) from the header registry, as before;
# * bodies: the modern ``get_body`` and ``get_content`` rules, written out for compat32 parts;
# * the tree itself: :func:`_split_simple` builds the one the feedparser would, with
#   ``str.find`` instead of a generator per line (a quarter of a plain parse's instructions on
#   the benchmark's mail), for well-formed mail only; anything else the feedparser splits;
# * header lookups: :class:`_PlainMessage` indexes the fields by name.


class _NotPlain(Exception):
    """The plain path cannot vouch for this mail: :func:`_parse_modern` parses it."""


class _PlainPolicy(email.policy.Compat32):
    """compat32 with each header value unfolded as the modern policy unfolds it before parsing,
    and the MIME headers (Content-Type, -Transfer-Encoding, -Disposition) fetched as the
    modern policy fetches them, as objects of its header registry: the Message methods that
    read them (content type, parameters, boundary, filename, transfer encoding), the
    feedparser's included, read the same text as on a modern message. Every other header is
    a plain string."""

    def header_source_parse(self, sourcelines: list[str]) -> tuple[str, str]:
        name, value = super().header_source_parse(sourcelines)
        if "\n" in value or "\r" in value:
            value = value.replace("\r", "").replace("\n", "")
        return name, value

    def header_fetch_parse(self, name: str, value: str) -> Any:
        if name.lower() not in _MIME_FIELDS:
            return super().header_fetch_parse(name, value)
        if len(value) <= HEADER_CACHE_VALUE:
            fetched = _plain_mime_header_cached(name, value)
        else:
            fetched = _plain_mime_header(name, value)
        if fetched is None:
            raise _NotPlain(name)
        return fetched


class _PlainMessage(Message):
    """compat32's Message whose header lookups (``get``, and so ``[]``, ``get_param``,
    ``get_content_type``, …) go through an index by lower-case name instead of lowering
    every field name on each call: one parse looks up Content-Type some 30 times.

    The index is rebuilt whenever the field list is a different list or has a different
    length (the feedparser appends fields; ``del`` and ``set_boundary`` assign a new list),
    and ``replace_header``, the one change in place, drops it. The first field of a name
    wins, as in ``Message.get``."""

    _index: dict[str, tuple[str, Any]] | None = None
    _index_of: tuple[int, int] = (0, -1)

    def get(self, name: str, failobj: Any = None) -> Any:
        headers: list[tuple[str, Any]] = self._headers  # type: ignore[attr-defined]
        index = self._index
        if index is None or self._index_of != (id(headers), len(headers)):
            index = {}
            for field, value in headers:
                index.setdefault(field.lower(), (field, value))
            self._index, self._index_of = index, (id(headers), len(headers))
        found = index.get(name.lower())
        if found is None:
            return failobj
        return self.policy.header_fetch_parse(*found)

    def replace_header(self, _name: str, _value: Any) -> None:
        self._index = None
        super().replace_header(_name, _value)


class _NotSimple(Exception):
    """:func:`_split_simple` cannot vouch for this mail's structure: the feedparser splits it."""


#: a header field's first line as the feedparser takes it (a name of printable ASCII, a colon)
_FIELD_LINE = re.compile(r"[\041-\071\073-\176]+:")
#: what may follow ``--boundary`` on a boundary line (the feedparser's boundary regex)
_BOUNDARY_TAIL = re.compile(r"(--)?[ \t]*(\r\n|\r|\n)?$")
_EOL_AT_END = re.compile(r"(\r\n|\r|\n)\Z")


def _split_simple(raw: bytes) -> _PlainMessage:
    """The message tree ``email.message_from_bytes(raw, _class=_PlainMessage,
    policy=_PLAIN_POLICY)`` builds, for well-formed mail, without the feedparser's line-by-line
    generators (half of a plain parse); :class:`_NotSimple` for anything else (a line the
    feedparser would record a defect for, an attached message, a digest, a part without a
    blank line after its header, boundary lines next to each other, no close delimiter).
    ``raw`` has no bare CR (a line break to the feedparser): :func:`parse_mail` sends such mail
    to the modern parse before it gets here. tests/gateways/email/test_plain_parse.py compares
    both trees."""
    text = raw.decode("ascii", "surrogateescape")  # as BytesParser does
    return _split_part(text, 0, len(text))


def _split_part(text: str, start: int, end: int) -> _PlainMessage:
    """The message in ``text[start:end]``; see :func:`_split_simple`. Lines end after each
    LF (the last one may have none); boundary lines are found with ``str.find``."""
    msg = _PlainMessage(policy=_PLAIN_POLICY)
    field: list[str] = []
    at = start
    while True:
        if at >= end:
            raise _NotSimple("no blank line after the header")
        stop = text.find("\n", at, end)
        stop = end if stop < 0 else stop + 1
        line, at = text[at:stop], stop
        if line == "\r\n" or line == "\n":
            break
        if line[0] in " \t":
            if not field:
                raise _NotSimple("the header starts with a continuation line")
            field.append(line)
        elif _FIELD_LINE.match(line):
            if field:
                msg.set_raw(*_PLAIN_POLICY.header_source_parse(field))
            field = [line]
        else:
            raise _NotSimple("not a header line")
    if field:
        msg.set_raw(*_PLAIN_POLICY.header_source_parse(field))
    maintype = msg.get_content_maintype()
    if maintype == "message":
        raise _NotSimple("an attached message")
    if maintype != "multipart":
        msg.set_payload(text[at:end])
        return msg
    boundary = msg.get_boundary()
    encoding = str(msg.get("content-transfer-encoding", "8bit")).lower()
    if boundary is None or msg.get_content_subtype() == "digest":
        raise _NotSimple("no boundary, or a digest")
    if encoding not in ("7bit", "8bit", "binary"):
        raise _NotSimple("a multipart with a transfer encoding")
    separator = "--" + boundary
    # (start, end, close delimiter) of each boundary line, up to the close delimiter
    marks: list[tuple[int, int, bool]] = []
    position = at
    while True:
        found = text.find(separator, position, end)
        if found < 0:
            break
        line_end = text.find("\n", found, end)
        position = line_end = end if line_end < 0 else line_end + 1
        if found == at or text[found - 1] == "\n":
            tail = _BOUNDARY_TAIL.match(text, found + len(separator), line_end)
            if tail is not None:
                marks.append((found, line_end, tail.group(1) is not None))
                if tail.group(1) is not None:
                    break
    if len(marks) < 2 or marks[0][2] or not marks[-1][2]:
        raise _NotSimple("no part, or no close delimiter")
    if marks[0][0] > at:
        msg.preamble = _EOL_AT_END.sub("", text[at : marks[0][0]], count=1)
    for (_, first, _), (after, _, _) in itertools.pairwise(marks):
        if after == first:
            raise _NotSimple("boundary lines next to each other")
        part = _split_part(text, first, after)
        # RFC 2046: the line break before a boundary belongs to the boundary
        if part.get_content_maintype() == "multipart":
            if part.epilogue == "":
                part.epilogue = None
            elif part.epilogue is not None:
                part.epilogue = _EOL_AT_END.sub("", part.epilogue, count=1)
        else:
            # (the str as stored: compat32's get_payload() decodes 8-bit text with the charset)
            stored: str = part._payload  # type: ignore[attr-defined]
            part.set_payload(_EOL_AT_END.sub("", stored, count=1))
        msg.attach(part)
    # after the close delimiter, everything is epilogue (only the very last line of the text
    # can end without a line break, so a close delimiter without one has nothing after it)
    msg.epilogue = text[marks[-1][1] : end]
    return msg


def _plain_mime_header(name: str, value: str) -> Any:
    """What :class:`_PlainPolicy` fetches for the MIME header ``name``: ``value`` itself (a
    settled Content-Type), a header of the registry, or ``None`` (not plain)."""
    if not value.isascii() or _CONTROL_BUT_TAB.search(value):
        return None
    if _settled_content_type(name, value):
        return value
    return _MIME_HEADERS(name, value)


#: :func:`_plain_mime_header` of the values up to HEADER_CACHE_VALUE long: a mail's
#: Content-Type is fetched some 30 times in one parse (the feedparser, ``get_content_type``,
#: the body and attachment walks) and is checked once. The registry's headers are immutable.
_plain_mime_header_cached = functools.lru_cache(maxsize=256)(_plain_mime_header)


_PLAIN_POLICY = _PlainPolicy()
#: header names the registry parses with a structured class; every other one is unstructured
_STRUCTURED = frozenset(
    name
    for name, cls in email.headerregistry.HeaderRegistry().registry.items()
    if not issubclass(cls, email.headerregistry.UnstructuredHeader)
)
_DATES = frozenset({"date", "resent-date", "orig-date"})
_MIME_FIELDS = frozenset({"content-type", "content-transfer-encoding", "content-disposition"})
#: ASCII controls other than TAB: str.lstrip() in the modern parser takes some for whitespace
_CONTROL_BUT_TAB = re.compile("[\x00-\x08\x0a-\x1f\x7f]")
_WSP_RUN = re.compile("([ \t]+)")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_MESSAGE_ID = re.compile(rf"<{_ATEXT}(?:\.{_ATEXT})*@{_ATEXT}(?:\.{_ATEXT})*>")
_HEX = frozenset("0123456789abcdefABCDEF")
#: the stdlib's own decoder of one RFC 2047 word, the one the modern header parser calls:
#: (text, charset, language, defects); a private module, so looked up once here
_decode_word: Callable[[str], tuple[str, str, str, list[Any]]] = importlib.import_module(
    "email._encoded_words"
).decode
# a Content-Type as the registry writes it back: type/subtype; name="value"; … (the registry
# quotes every value, writes "; " between parameters and keeps the first of two same names)
_MIME_NAME = r"[A-Za-z0-9.+_-]+"
_SETTLED_TYPE = re.compile(rf"{_MIME_NAME}/{_MIME_NAME}")
_SETTLED_PARAMETER = re.compile(rf'; ({_MIME_NAME})="[^"\\\x00-\x1f\x7f]+"')


def _settled_content_type(name: str, value: str) -> bool:
    """Whether ``value`` is a Content-Type the header registry reads as written (its
    ``str()`` is ``value``): then it needs no parsing. A unique boundary made every mail's
    top-level Content-Type a new parse."""
    if len(name) != 12 or name.lower() != "content-type":
        return False
    found = _SETTLED_TYPE.match(value)
    if found is None:
        return False
    position, names = found.end(), set()
    while position < len(value):
        parameter = _SETTLED_PARAMETER.match(value, position)
        if parameter is None:
            return False
        key = parameter.group(1).lower()
        if key in names:
            return False
        names.add(key)
        position = parameter.end()
    return True


def _encoded_word(token: str) -> str | None:
    """The text of ``token``, one whole RFC 2047 word as the modern parser reads it
    (``get_encoded_word``), or ``None`` if it is anything less clean."""
    head, sep, rest = token[2:].partition("?=")
    if not sep:
        return None
    if len(rest) > 1 and rest[0] in _HEX and rest[1] in _HEX and head.count("?") < 2:
        # "?=" that is a Q escape right after the encoding letter, as the modern parser sees it
        more, sep, rest = rest.partition("?=")
        if not sep:
            return None
        head = f"{head}?={more}"
    if rest:
        return None
    try:
        text, _, _, defects = _decode_word(f"=?{head}?=")
    except (ValueError, KeyError):
        return None
    if defects or _SURROGATE.search(text):
        return None
    return str(text)


def _plain_unstructured(value: str) -> str | None:
    """The modern policy's text of an unstructured header (``get_unstructured``): the value,
    its encoded words decoded, the whitespace between two encoded words dropped; ``None``
    where a word is not clean."""
    if "=?" not in value:
        return value
    pieces = _WSP_RUN.split(value)  # tokens at even places, whitespace at odd ones
    encoded = [False] * len(pieces)
    for i in range(0, len(pieces), 2):
        token = pieces[i]
        if "=?" not in token:
            continue
        if not token.startswith("=?"):
            return None
        text = _encoded_word(token)
        if text is None:
            return None
        pieces[i] = text
        encoded[i] = True
    for i in range(1, len(pieces), 2):
        if encoded[i - 1] and encoded[i + 1]:
            pieces[i] = ""
    return "".join(pieces)


def _decoded(factory: _HeaderFactory, name: str, value: str) -> str:
    """``str()`` of the modern policy's header ``name`` with the (unfolded) ``value``."""
    if not value.isascii():
        raise _NotPlain(name)
    key = name.lower()
    if key not in _STRUCTURED:
        if not _CONTROL_BUT_TAB.search(value):
            text = _plain_unstructured(value)
            if text is not None:
                return text
    elif key in _DATES:
        when = email.utils.parsedate_to_datetime(value)  # ValueError: not plain
        return email.utils.format_datetime(when)
    elif _settled_content_type(name, value):
        return value
    elif key == "message-id":
        if _PLAIN_MESSAGE_ID.fullmatch(value) and "=?" not in value:
            return value
        header = factory(name, value)
        if header.defects:
            raise _NotPlain(name)
        return str(header)
    return str(factory(name, value))


def _plain_parts(part: Message) -> list[Message]:
    children = part.get_payload()
    if not isinstance(children, list):
        raise _NotPlain("multipart without parts")
    return [child for child in children if isinstance(child, Message)]


def _plain_body(root: Message, part: Message, subtype: str, factory: _HeaderFactory) -> Any:
    """``root.get_body(preferencelist=(subtype,))`` of the modern policy (``_find_body``)."""
    disposition: Any = part.get("content-disposition")  # a registry header: _PlainPolicy
    if disposition is not None and disposition.content_disposition == "attachment":
        return None
    maintype, sub = part.get_content_type().split("/")
    if maintype == "text":
        return part if sub == subtype else None
    if maintype != "multipart" or not root.is_multipart():
        return None
    if sub != "related":
        for child in _plain_parts(part):
            found = _plain_body(root, child, subtype, factory)
            if found is not None:
                return found
        return None
    candidate = None
    start = part.get_param("start")
    if start:
        for child in _plain_parts(part):
            content_id = child.get("content-id")
            if content_id is not None and _decoded(factory, "Content-ID", content_id) == start:
                candidate = child
                break
    if candidate is None:
        children = _plain_parts(part)
        candidate = children[0] if children else None
    return None if candidate is None else _plain_body(root, candidate, subtype, factory)


def _plain_payload(part: Message) -> bytes:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes) or part.defects:  # broken base64 is recorded on the part
        raise _NotPlain("payload")
    return payload


def _parse_plain(raw: bytes, factory: _HeaderFactory) -> dict[str, Any]:
    """:func:`parse_mail` of a plain mail, or :class:`_NotPlain` (any exception: not plain)."""
    msg: Message
    try:
        msg = _split_simple(raw)
    except _NotSimple:
        msg = email.message_from_bytes(raw, _class=_PlainMessage, policy=_PLAIN_POLICY)
    for part in msg.walk():
        if part.defects or part.get_content_maintype() == "message":
            raise _NotPlain("defects or an attached message")
    headers: list[list[str]] = []
    first: dict[str, str] = {}
    for name, value in msg.raw_items():
        text = _decoded(factory, name, value)
        headers.append([name, text])
        first.setdefault(name.lower(), text)
    bodies: dict[str, str | None] = {"plain": None, "html": None}
    body_parts: set[int] = set()
    for subtype in bodies:
        part = _plain_body(msg, msg, subtype, factory)
        if part is None:
            continue
        body_parts.add(id(part))
        charset = part.get_param("charset", "ASCII")
        if not isinstance(charset, str):
            raise _NotPlain("charset")
        body = _plain_payload(part).decode(charset, "strict")
        bodies[subtype] = body.replace("\r\n", "\n")
    attachments = []
    for part in _leaves(msg):
        if id(part) not in body_parts:
            content = _plain_payload(part)
            attachments.append(
                {
                    "filename": part.get_filename(),
                    "content_type": part.get_content_type(),
                    "size": len(content),
                    "content": content,
                }
            )
    addresses: dict[str, list[str]] = {"from": [], "to": [], "cc": [], "reply-to": []}
    for name, value in msg.raw_items():
        found = addresses.get(name.lower())
        if found is not None:
            found.extend(str(a) for a in factory(name, value).addresses)
    date = first.get("date")
    message_id = first.get("message-id")
    keys: dict[str, Any] = {
        "message_id": message_id.strip() if message_id else None,
        "subject": first.get("subject"),
        "from": next(iter(addresses["from"]), None),
        "to": addresses["to"],
        "cc": addresses["cc"],
        "reply_to": addresses["reply-to"],
        "date": None if date is None else _plain_date(msg),
        "in_reply_to": next(iter(_ids(first.get("in-reply-to"))), None),
        "references": _ids(first.get("references")),
        "headers": headers,
        "text": bodies["plain"],
        "html": bodies["html"],
        "attachments": attachments,
    }
    defects: list[str] = []
    keys = _utf8(keys, defects)
    keys["defects"] = _utf8(sorted(set(defects)), [])
    return keys


def _plain_date(msg: Message) -> str:
    return str(email.utils.parsedate_to_datetime(str(msg.get("date"))).isoformat())


def _utf8(value: Any, defects: list[str]) -> Any:
    """``value`` with the surrogate escapes of raw 8-bit header bytes decoded as UTF-8.

    The parser keeps such bytes as lone surrogates (in addresses, for one), which no codec can
    encode: msgpack refused the whole event. Bytes that are not UTF-8 become U+FFFD.
    """
    if isinstance(value, str):
        if not _SURROGATE.search(value):
            return value
        defects.append("UndecodableBytesDefect")
        try:
            raw = value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a surrogate that stands for no byte
            raw = value.encode("utf-8", "replace")
        return raw.decode("utf-8", "replace")
    if isinstance(value, list):
        return [_utf8(item, defects) for item in value]
    if isinstance(value, dict):
        return {key: _utf8(item, defects) for key, item in value.items()}
    return value


# -- outbound -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutgoingMail:
    """What the relay needs: the message, the envelope sender and every recipient (bcc too)."""

    message: EmailMessage
    sender: str
    recipients: list[str]


def _clean(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidMail(f"{key}: must be a string, got {type(value).__name__}")
    if _LINE_BREAK_OR_NUL.search(value):
        raise InvalidMail(f"{key}: must not contain CR, LF (or another line break) or NUL")
    return value


def _one_or_many(key: str, value: Any) -> list[Any]:
    """A command key that takes a string or a list of them, as a list (``None``: empty)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise InvalidMail(f"{key}: must be a string or a list of strings")
    return items


def _address_list(key: str, value: Any) -> list[str]:
    out = []
    for i, item in enumerate(_one_or_many(key, value)):
        text = _clean(f"{key}[{i}]", item)
        found = email.utils.getaddresses([text])
        name, addr = found[0] if len(found) == 1 else ("", "")
        local, at, domain = addr.rpartition("@")
        if not at or not local or not domain or any(c in addr for c in ' ,;<>"'):
            raise InvalidMail(f"{key}[{i}]: {text!r} is not an email address")
        if not name:
            out.append(addr)
            continue
        try:
            # Address, not formataddr(): formataddr() pre-encodes a non-ASCII name as one
            # RFC 2047 word, and the stdlib before the gh-121284 fix refolds such a word with
            # its specials bare, so "Jöhn <evil@example.net>" became an address of its own
            out.append(str(email.headerregistry.Address(name, addr_spec=addr)))
        except Exception as exc:  # ValueError, NonASCIILocalPartDefect: the registry's verdict
            raise InvalidMail(f"{key}[{i}]: {text!r} is not an email address ({exc})") from None
    return out


def _bare(address: str) -> str:
    return email.utils.parseaddr(address)[1]


def _message_ids(key: str, value: Any) -> list[str]:
    out = []
    for i, item in enumerate(_one_or_many(key, value)):
        text = _clean(f"{key}[{i}]", item).strip()
        if not text:
            continue
        if not text.startswith("<"):
            text = f"<{text}>"
        if not re.fullmatch(r"<[^<>\s]+>", text):
            raise InvalidMail(f"{key}[{i}]: {text!r} is not a Message-ID")
        out.append(text)
    return out


def _custom_headers(value: Any) -> list[tuple[str, str]]:
    if value is None:
        return []
    pairs = list(value.items()) if isinstance(value, Mapping) else value
    if not isinstance(pairs, list):
        raise InvalidMail("headers: must be a mapping or a list of [name, value] pairs")
    out = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise InvalidMail(f"headers[{i}]: must be a [name, value] pair")
        name = _clean(f"headers[{i}] name", pair[0])
        if not _HEADER_NAME.match(name):
            raise InvalidMail(f"headers[{i}]: {name!r} is not a valid header name")
        if name.lower() in _MANAGED:
            raise InvalidMail(f"headers[{i}]: {name} is set from its own key, not headers")
        out.append((name, _clean(f"headers.{name}", pair[1])))
    return out


def build_mail(
    command: Mapping[str, Any], *, default_from: str | None, message_id_domain: str
) -> OutgoingMail:
    """The message ``email.send`` describes; raise :class:`InvalidMail` naming the bad key."""
    known = {
        "to",
        "cc",
        "bcc",
        "from",
        "reply_to",
        "subject",
        "text",
        "html",
        "attachments",
        "headers",
        "in_reply_to",
        "references",
    }
    unknown = sorted(set(command) - known)
    if unknown:
        raise InvalidMail(f"unknown keys {unknown}")
    to = _address_list("to", command.get("to"))
    cc = _address_list("cc", command.get("cc"))
    bcc = _address_list("bcc", command.get("bcc"))
    if not (to or cc or bcc):
        raise InvalidMail("to: at least one recipient is needed in to, cc or bcc")
    senders = _address_list("from", command.get("from") or default_from)
    if len(senders) != 1:
        raise InvalidMail("from: needed (or set email.relay.from_address)")
    msg = EmailMessage(policy=_POLICY)
    msg["From"] = senders[0]
    if to:
        msg["To"] = ", ".join(to)
    if cc:
        msg["Cc"] = ", ".join(cc)
    reply_to = _address_list("reply_to", command.get("reply_to"))
    if reply_to:
        msg["Reply-To"] = ", ".join(reply_to)
    msg["Subject"] = _clean("subject", command.get("subject", ""))
    msg["Date"] = email.utils.formatdate(localtime=False)
    msg["Message-ID"] = email.utils.make_msgid(domain=message_id_domain)
    in_reply_to = _message_ids("in_reply_to", command.get("in_reply_to"))
    if len(in_reply_to) > 1:
        raise InvalidMail("in_reply_to: one Message-ID")
    references = _message_ids("references", command.get("references"))
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to[0]
        if in_reply_to[0] not in references:
            references.append(in_reply_to[0])
    if references:
        msg["References"] = " ".join(references)
    custom = _custom_headers(command.get("headers"))
    for i, (name, value) in enumerate(custom):
        try:
            msg[name] = value
        except Exception as exc:  # the header registry: a second Sender, an unparsable address
            raise InvalidMail(f"headers[{i}]: {name}: {str(exc) or type(exc).__name__}") from None
    if in_reply_to and not any(name.lower() == "auto-submitted" for name, _ in custom):
        # RFC 3834 5: a reply sent by a program says so, so that the other side's
        # auto-responder does not answer it (a mail loop); `Auto-Submitted: no` in headers
        # marks a reply a person wrote
        msg["Auto-Submitted"] = "auto-replied"
    text, html = command.get("text"), command.get("html")
    for key, body in (("text", text), ("html", html)):
        if body is not None and not isinstance(body, str):
            raise InvalidMail(f"{key}: must be a string")
    if html is not None and text is None:
        msg.set_content(html, subtype="html")
    else:
        msg.set_content(text or "")
        if html is not None:
            msg.add_alternative(html, subtype="html")
    attachments = command.get("attachments") or []
    if not isinstance(attachments, list):
        raise InvalidMail("attachments: must be a list")
    for i, item in enumerate(attachments):
        if not isinstance(item, Mapping):
            raise InvalidMail(f"attachments[{i}]: must be a mapping")
        filename = _clean(f"attachments[{i}].filename", item.get("filename", "attachment"))
        ctype = _clean(
            f"attachments[{i}].content_type", item.get("content_type", "application/octet-stream")
        )
        maintype, slash, subtype = ctype.partition("/")
        if not slash or not maintype or not subtype:
            raise InvalidMail(f"attachments[{i}].content_type: {ctype!r} is not type/subtype")
        content = item.get("content")
        if isinstance(content, str):
            content = content.encode("utf-8")
        if not isinstance(content, bytes):
            raise InvalidMail(f"attachments[{i}].content: must be bytes or a string")
        msg.add_attachment(content, maintype=maintype, subtype=subtype, filename=filename)
    recipients = [_bare(a) for a in (*to, *cc, *bcc)]
    return OutgoingMail(msg, _bare(senders[0]), list(dict.fromkeys(recipients)))
