"""translate.parse_mail's plain path against the modern policy's parse, on tricky mail.

``parse_mail`` parses ordinary mail with compat32 and decodes only what the event carries
(issue 21: a third of the CPU); ``_parse_modern`` is the reference it must equal, key for key,
on every mail: the plain path either gives the same keys or hands the mail over. The corpus
holds what each shortcut could get wrong (RFC 2047 words and the whitespace between them,
address groups, charsets, nested multiparts, attachments, broken MIME), and hypothesis
recombines its headers and bodies. The plain path's ``_split_simple`` must build the
feedparser's own message tree wherever it does not hand a mail over: on the corpus and on
random MIME structures.
"""

from __future__ import annotations

import base64
import email.policy
import re
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.email import mail_with_id, sample_mail
from gateways.email import translate
from gateways.email.translate import parse_mail


def _mail(headers: list[tuple[str, str]], body: str = "hello\r\n") -> bytes:
    head = "".join(f"{name}: {value}\r\n" for name, value in headers)
    return (head + "\r\n" + body).encode("utf-8", "surrogateescape")


def _multipart(subtype: str, parts: list[str], boundary: str = "b0", extra: str = "") -> str:
    lines = [f'Content-Type: multipart/{subtype}; boundary="{boundary}"{extra}\r\n\r\n']
    for part in parts:
        lines.append(f"--{boundary}\r\n{part}\r\n")
    lines.append(f"--{boundary}--\r\n")
    return "".join(lines)


def _built() -> bytes:
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = '"Müller, Ana" <ana@example.com>'
    msg["To"] = "Support <support@example.com>, team: a@example.com, b@example.com;"
    msg["Subject"] = "Grüße \u2013 ein sehr langer Betreff " * 4
    msg["Message-ID"] = "<built.1@example.com>"
    msg.set_content("Text ä\n")
    msg.add_alternative("<p>HTML ö</p>\n", subtype="html")
    msg.add_attachment(
        b"%PDF-1.4 \x00\xff", maintype="application", subtype="pdf", filename="r.pdf"
    )
    msg.add_attachment("Grüße\n", subtype="plain", filename="notiz €.txt")
    return msg.as_bytes()


BASE = [("From", "a@example.com"), ("To", "b@example.com"), ("Message-ID", "<m1@example.com>")]
PLAIN = "Content-Type: text/plain; charset=utf-8\r\n\r\nText\r\n"
HTML = 'Content-Type: text/html; charset="utf-8"\r\n\r\n<p>x</p>\r\n'
PDF = (
    'Content-Type: application/pdf; name="a.pdf"\r\nContent-Transfer-Encoding: base64\r\n'
    'Content-Disposition: attachment; filename="a.pdf"\r\n\r\n'
    + base64.b64encode(b"%PDF \x00\x01").decode()
)

#: (label, raw): every shortcut of the plain path and what it must hand over
CORPUS: list[tuple[str, bytes]] = [
    ("bench mail", mail_with_id(sample_mail(), "c1@customer.example", 7)),
    ("built mail", _built()),
    ("two encoded words", _mail([*BASE, ("Subject", "=?utf-8?q?a?= =?utf-8?q?b?=")])),
    ("words, tab, fold", _mail([*BASE, ("Subject", "=?utf-8?q?a?=\t\r\n =?UTF-8?B?w6Q=?= x")])),
    ("word then text", _mail([*BASE, ("Subject", "x  =?iso-8859-1?q?=E4?=  y =?utf-8?q?_b_?=")])),
    ("word in an atom", _mail([*BASE, ("Subject", "abc=?utf-8?q?x?= d")])),
    ("word glued to a word", _mail([*BASE, ("Subject", "=?utf-8?q?a?==?utf-8?q?b?=")])),
    ("q escape after the letter", _mail([*BASE, ("Subject", "=?utf-8?q?=3D?= =?utf-8?q?=41")])),
    ("word with a language", _mail([*BASE, ("Subject", "=?utf-8*de?q?Gr=C3=BC=C3=9Fe?=")])),
    ("unknown charset word", _mail([*BASE, ("Subject", "=?x-nope?q?=E4?= a")])),
    ("unknown-8bit word", _mail([*BASE, ("Subject", "=?unknown-8bit?q?=E4?=")])),
    ("undecodable word", _mail([*BASE, ("Subject", "=?utf-8?q?=E4=E4?=")])),
    ("bad base64 word", _mail([*BASE, ("Subject", "=?utf-8?b?w6?= =?utf-8?b?!!!?=")])),
    ("not a word", _mail([*BASE, ("Subject", "=?utf-8?x?abc?= =? ?=")])),
    ("only whitespace subject", _mail([*BASE, ("Subject", "  ")])),
    ("empty subject", _mail([*BASE, ("Subject", "")])),
    ("two subjects", _mail([*BASE, ("Subject", "one"), ("Subject", "two")])),
    ("control in subject", _mail([*BASE, ("Subject", "a\x0c =?utf-8?q?b?= \x0b =?utf-8?q?c?=")])),
    ("8-bit subject", _mail([*BASE, ("Subject", "Grüße")])),
    ("encoded group", _mail([("To", "=?utf-8?q?T=C3=A9am?=: a@x.example, b@x.example;")])),
    ("empty groups", _mail([("To", "undisclosed-recipients:;, a:;"), ("Cc", "x: ;")])),
    ("quoted names", _mail([("From", '"a, b" <a@x.example> (comment)'), ("Reply-To", "c@d, e")])),
    ("bad address", _mail([("From", "<<@@>>"), ("To", "a@"), ("Cc", '"unterminated <a@b>')])),
    ("date forms", _mail([*BASE, ("Date", "14 Jan 25 9:26 -0000"), ("Resent-Date", "x")])),
    ("bad date", _mail([*BASE, ("Date", "yesterday")])),
    ("huge year", _mail([*BASE, ("Date", "Tue, 14 Jan 99999999999999999999 09:26:41 +0100")])),
    ("empty date", _mail([*BASE, ("Date", "")])),
    ("date with comment", _mail([*BASE, ("Date", "Tue, 14 Jan 2025 09:26:41 +0100 (CET)")])),
    ("message-id <", _mail([("Message-ID", "<")])),
    ("message-id foo", _mail([("Message-ID", "foo")])),
    ("message-id spaced", _mail([("Message-ID", "<a b@c>"), ("In-Reply-To", "<x@y> <z@w>")])),
    ("message-id quoted", _mail([("Message-ID", ' <"q x"@example.com> ')])),
    ("message-id literal", _mail([("Message-ID", "<a@[127.0.0.1]>")])),
    ("message-id word", _mail([("Message-ID", "<=?utf-8?q?a?=@b>")])),
    ("references folded", _mail([*BASE, ("References", "<a@b>\r\n\t<c@d>\r\n <e@f>")])),
    (
        "unquoted params",
        _mail([*BASE, ("Content-Type", "text/plain; charset=utf-8; format=flowed")]),
    ),
    ("ct spacing", _mail([*BASE, ("Content-Type", 'TEXT/Plain ;charset = "UTF-8" ;x=""')])),
    ("ct comment", _mail([*BASE, ("Content-Type", "text/plain (c); charset=latin1 (c)")])),
    ("ct twice", _mail([*BASE, ("Content-Type", "text/html"), ("Content-Type", "text/plain")])),
    (
        "ct param twice",
        _mail([*BASE, ("Content-Type", 'text/plain; charset="x"; charset="utf-8"')]),
    ),
    ("ct no slash", _mail([*BASE, ("Content-Type", "text")])),
    ("ct rfc 2231", _mail([*BASE, ("Content-Type", "text/plain; charset*=us-ascii'en'utf-8")])),
    (
        "latin-1 body",
        _mail([*BASE, ("Content-Type", "text/plain; charset=iso-8859-1")], "\xe4\r\n"),
    ),
    ("unknown charset body", _mail([*BASE, ("Content-Type", "text/plain; charset=x-nope")])),
    ("codec charset body", _mail([*BASE, ("Content-Type", "text/plain; charset=base64")])),
    ("utf-8 lie", _mail([*BASE, ("Content-Type", "text/plain; charset=utf-8")], "\udce4\r\n")),
    (
        "raw-unicode-escape",
        _mail([*BASE, ("Content-Type", "text/plain; charset=raw-unicode-escape")], "\\ud800\r\n"),
    ),
    ("8bit body", _mail([*BASE, ("Content-Transfer-Encoding", "8bit")], "Grüße\r\n")),
    ("bad base64 body", _mail([*BASE, ("Content-Transfer-Encoding", "base64")], "w6Q\r\n!!\r\n")),
    (
        "qp body",
        _mail([*BASE, ("Content-Transfer-Encoding", "Quoted-Printable")], "a=\r\nb=E4=\r\n"),
    ),
    ("html only", _mail([*BASE, ("Content-Type", "text/html")], "<p>x</p>\r\n")),
    ("attachment only", _mail([*BASE, ("Content-Type", "application/zip")], "PK\r\n")),
    (
        "inline text attachment",
        _mail([*BASE, ("Content-Disposition", 'attachment; filename="a.txt"')]),
    ),
    ("no headers", b"\r\nbody only\r\n"),
    ("no blank line", b"Subject: x\r\nnot a header line\r\nmore\r\n"),
    ("from line", b"From someone Tue Jan 14 09:26:41 2025\r\nSubject: x\r\n\r\nb\r\n"),
    ("bare LF", b"Subject: x\nTo: a@b\n\nline\nline\n"),
    ("bare CR", b"Subject: x\rX-Injected: yes\r\n\r\nb\r\n"),
    ("NUL header", _mail([*BASE, ("X-Nul", "a\x00b")])),
    (
        "alternative",
        _mail([*BASE, ("MIME-Version", "1.0")], "")[:-2]
        + _multipart("alternative", [PLAIN, HTML]).encode(),
    ),
    (
        "mixed > alternative + pdf + text attachment",
        _mail(BASE, "")[:-2]
        + _multipart(
            "mixed",
            [
                _multipart("alternative", [PLAIN, HTML], boundary="b1"),
                PDF,
                "Content-Type: text/plain; name=n.txt\r\nContent-Disposition: attachment;\r\n"
                " filename*=utf-8''%E2%82%AC.txt\r\n\r\nnote",
                'Content-Type: image/png\r\nContent-Disposition: inline; filename="=?utf-8?q?'
                'B=C3=BCd?=.png"\r\nContent-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=',
            ],
        ).encode(),
    ),
    (
        "related with start",
        _mail(BASE, "")[:-2]
        + _multipart(
            "related",
            [
                "Content-Type: image/gif\r\nContent-ID: <img1@x>\r\n\r\nGIF89a",
                'Content-Type: text/html; charset="utf-8"\r\nContent-ID: <root@x>\r\n\r\n<p>r</p>',
            ],
            extra='; start="<root@x>"; type="text/html"',
        ).encode(),
    ),
    (
        "related without start",
        _mail(BASE, "")[:-2]
        + _multipart("related", [HTML, "Content-Type: image/gif\r\n\r\nGIF89a"]).encode(),
    ),
    (
        "attached message",
        _mail(BASE, "")[:-2]
        + _multipart(
            "mixed", [PLAIN, "Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\nx"]
        ).encode(),
    ),
    (
        "digest",
        _mail(BASE, "")[:-2] + _multipart("digest", ["Subject: d\r\n\r\nx"]).encode(),
    ),
    ("multipart without boundary", _mail([*BASE, ("Content-Type", "multipart/mixed")])),
    (
        "boundary never closed",
        _mail(BASE, "")[:-2] + _multipart("mixed", [PLAIN]).encode()[: -len("--b0--\r\n")],
    ),
    (
        "boundary with specials",
        _mail(BASE, "")[:-2]
        + _multipart("mixed", [PLAIN, HTML], boundary="a.b+c(d)?e*f[1]$^|\\\\").encode(),
    ),
    (
        "boundary with trailing blanks and a double delimiter",
        _mail(BASE, "")[:-2]
        + b'Content-Type: multipart/mixed; boundary="q"\r\n\r\npre\r\n--q \t\r\n--q\r\n'
        + PLAIN.encode()
        + b"\r\n--q--  \r\nepilogue\r\n",
    ),
    (
        "cte on a multipart",
        _mail([*BASE, ("Content-Transfer-Encoding", "base64")], "")[:-2]
        + _multipart("mixed", [PLAIN]).encode(),
    ),
    (
        "part header with 8-bit",
        _mail(BASE, "")[:-2]
        + _multipart(
            "mixed", [PLAIN, 'Content-Type: text/plain; name="Grüße.txt"\r\n\r\nx']
        ).encode("utf-8"),
    ),
    (
        "bad base64 attachment",
        _mail(BASE, "")[:-2]
        + _multipart(
            "mixed",
            [PLAIN, "Content-Type: application/zip\r\nContent-Transfer-Encoding: base64\r\n\r\nQQ"],
        ).encode(),
    ),
]


@pytest.mark.parametrize("raw", [raw for _, raw in CORPUS], ids=[label for label, _ in CORPUS])
def test_parse_mail_equals_the_modern_parse(raw: bytes) -> None:
    assert parse_mail(raw) == translate._parse_modern(raw)


def test_ordinary_mail_takes_the_plain_path() -> None:
    plain = {label for label, raw in CORPUS if _takes_plain_path(raw)}
    assert {
        "bench mail",
        "built mail",
        "two encoded words",
        "word then text",
        "alternative",
        "mixed > alternative + pdf + text attachment",
        "related with start",
        "unquoted params",
    } <= plain
    # what it must hand over: defects, 8-bit headers, attached messages, bare CR
    assert not plain & {"8-bit subject", "attached message", "bare CR", "bad base64 body"}


def _takes_plain_path(raw: bytes) -> bool:
    if translate._BARE_CR.search(raw):  # parse_mail never tries it then
        return False
    try:
        translate._parse_plain(raw, translate._HeaderFactory())
    except Exception:
        return False
    return True


# -- hypothesis: the corpus's headers and bodies recombined ------------------------------------

_HEADERS = [
    (name, value)
    for _, raw in CORPUS
    for name, value in email.message_from_bytes(raw, policy=email.policy.compat32).items()
    if isinstance(value, str) and name.lower() not in ("content-type", "content-transfer-encoding")
]
_WORDS = st.sampled_from(
    ["=?utf-8?q?a?=", "=?utf-8?b?w6Q=?=", "x", "=?", "?=", "=?utf-8?q?=3D", "<a@b>", ";", ":"]
)
_BLANKS = st.sampled_from([" ", "  ", "\t", "\r\n ", ""])


@st.composite
def _mails(draw: Any) -> bytes:
    headers = draw(st.lists(st.sampled_from(_HEADERS), max_size=8))
    for name in draw(st.lists(st.sampled_from(["Subject", "X-Any", "To", "Content-ID"]))):
        words = draw(st.lists(st.tuples(_WORDS, _BLANKS), min_size=1, max_size=5))
        headers.append((name, "".join(w + b for w, b in words).strip() or "x"))
    ctype = draw(
        st.sampled_from(
            ["", "text/plain; charset=utf-8", 'text/html; charset="latin1"', 'text/plain; x=""']
        )
    )
    if ctype:
        headers.append(("Content-Type", ctype))
    body = draw(st.sampled_from(["plain\r\n", "Grüße\r\n", "=E4\r\n", ""]))
    return _mail(headers, body)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mails())
def test_recombined_mail_equals_the_modern_parse(raw: bytes) -> None:
    assert parse_mail(raw) == translate._parse_modern(raw)


# -- the two shortcuts for the MIME structure --------------------------------------------------

_NAME = st.text("abcXYZ019.+_-", min_size=1, max_size=6)
_QUOTED = st.text(
    "".join(chr(c) for c in range(32, 127) if chr(c) not in '"\\'), min_size=0, max_size=12
)


@settings(max_examples=500, deadline=None)
@given(
    _NAME,
    _NAME,
    st.lists(st.tuples(_NAME, _QUOTED, st.sampled_from(["; ", ";", ";  ", "; \t"]))),
)
def test_a_settled_content_type_reads_as_written(
    maintype: str, subtype: str, params: list[tuple[str, str, str]]
) -> None:
    value = f"{maintype}/{subtype}" + "".join(f'{sep}{k}="{v}"' for k, v, sep in params)
    if translate._settled_content_type("Content-Type", value):
        assert str(email.policy.default.header_factory("Content-Type", value)) == value


_FEEDPARSER_PATTERN = (
    "(?P<sep>{})(?P<end>--)?(?P<ws>[ \\t]*)(?P<linesep>\\r\\n|\\r|\\n)?$"  # email.feedparser's
)


@settings(max_examples=500, deadline=None)
@given(
    st.text(min_size=1, max_size=12),
    st.lists(
        st.tuples(st.sampled_from(["", "x", "-", "--", "--x"]), st.text(" \t-\r\nab", max_size=5))
    ),
)
def test_the_boundary_stand_in_matches_as_the_regex(boundary: str, tails: list[Any]) -> None:
    separator = "--" + boundary
    pattern = _FEEDPARSER_PATTERN.format(re.escape(separator))
    stand_in = translate._FeedparserRe.compile(pattern)
    assert isinstance(stand_in, translate._BoundaryPattern)
    regex = re.compile(pattern)
    for middle, tail in [("", ""), *tails]:
        for line in (separator + middle + tail, middle + separator + tail, separator[:-1]):
            expected, got = regex.match(line), stand_in.match(line)
            assert (expected is None) == (got is None), line
            if expected is not None and got is not None:
                assert expected.group("end", "ws", "linesep") == got.group("end", "ws", "linesep")


# -- the simple split: the feedparser's message tree, built without it -------------------------


def _tree(parse: Callable[[bytes], Any], raw: bytes) -> Any:
    """Everything of the tree ``parse(raw)`` builds (for each part: fields as stored, payload
    as stored, preamble, epilogue, default type, defects), or the type of what it raised."""
    try:
        msg = parse(raw)
    except Exception as exc:
        return type(exc)
    return [
        (
            type(part).__name__,
            list(part._headers),
            part._payload if isinstance(part._payload, str) else len(part._payload),
            part.preamble,
            part.epilogue,
            part.get_default_type(),
            [type(defect).__name__ for defect in part.defects],
        )
        for part in msg.walk()
    ]


def _feedparsed(raw: bytes) -> Any:
    return email.message_from_bytes(
        raw, _class=translate._PlainMessage, policy=translate._PLAIN_POLICY
    )


def _split_or_not(raw: bytes) -> tuple[Any, Any]:
    """(the feedparser's tree, the simple split's tree or None when it hands the mail over;
    parse_mail never gives it a mail with a bare CR)."""
    if translate._BARE_CR.search(raw):
        return _tree(_feedparsed, raw), None
    mine = _tree(translate._split_simple, raw)
    return _tree(_feedparsed, raw), None if mine is translate._NotSimple else mine


@pytest.mark.parametrize("raw", [raw for _, raw in CORPUS], ids=[label for label, _ in CORPUS])
def test_the_simple_split_builds_the_feedparsers_tree(raw: bytes) -> None:
    reference, mine = _split_or_not(raw)
    if mine is not None:
        assert mine == reference


def test_ordinary_mail_takes_the_simple_split() -> None:
    split = {label for label, raw in CORPUS if _split_or_not(raw)[1] is not None}
    assert {"bench mail", "built mail", "alternative", "related with start"} <= split
    assert "mixed > alternative + pdf + text attachment" in split  # nested multiparts
    # what the feedparser records a defect for, or parses on its own
    assert not split & {"attached message", "bare CR", "digest", "boundary never closed"}


_EOL = st.sampled_from(["\r\n", "\n"])
_BOUNDARY = st.sampled_from(["b", "b0", "bb", "=_x.y", "b b"])


@st.composite
def _text_lines(draw: Any, boundaries: list[str]) -> str:
    """Body lines, some of them almost (or exactly) a boundary line of an enclosing part."""
    near = [f"--{b}{tail}" for b in boundaries for tail in ("", "--", " ", "x", "-- ", "\t")]
    plain = ["text", "", " ", "--", "a: b"] * 3 * max(1, len(near))  # mostly ordinary lines
    lines = draw(st.lists(st.sampled_from([*plain, *near]), max_size=4))
    return "".join(line + draw(_EOL) for line in lines)


@st.composite
def _parts(draw: Any, boundaries: list[str], depth: int) -> str:
    """One MIME entity: a header (continuation lines, odd names), a blank line or none, and
    a body or, a level deeper, a multipart whose parts are drawn the same way."""
    fields = []
    for _ in range(draw(st.integers(0, 3))):
        fields.append(draw(st.sampled_from(["X-A: 1", "X-B:", "Subject: a"])))
        fields += draw(st.lists(st.sampled_from([" folded", "\tfolded", " "]), max_size=1))
    if draw(st.integers(0, 9)) == 0:  # now and then a line the feedparser finds a defect in
        bad = draw(st.sampled_from(["Bad Name: x", ":x", "From x", " folded", "no colon"]))
        fields.insert(draw(st.integers(0, len(fields))), bad)
    eol = draw(_EOL)
    if depth < 2 and draw(st.booleans()):
        boundary = draw(_BOUNDARY)
        inner = [*boundaries, boundary]
        quoted = draw(st.sampled_from([f'"{boundary}"'] * 3 + [boundary]))
        fields.append(f"Content-Type: multipart/{draw(_SUBTYPES)}; boundary={quoted}")
        body = draw(_text_lines(inner))  # preamble
        for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2, 2, 2, 3]))):
            gap = draw(st.sampled_from(["", " ", "\t  "]))
            body += f"--{boundary}{gap}{draw(_EOL)}" + draw(_parts(inner, depth + 1))
        if draw(st.integers(0, 9)):
            body += f"--{boundary}--{draw(st.sampled_from(['', ' ']))}{draw(_EOL)}"
        body += draw(_text_lines(inner))  # epilogue
    else:
        fields.append(draw(st.sampled_from(["Content-Type: text/plain", "X-C: c", ""])))
        body = draw(_text_lines(boundaries))
    head = "".join(field + eol for field in fields if field)
    blank = draw(st.sampled_from([eol] * 9 + [""]))
    return head + blank + body


_SUBTYPES = st.sampled_from(["mixed", "alternative", "related"] * 2 + ["digest"])


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_parts([], 0))
def test_the_simple_split_builds_the_feedparsers_tree_for_any_structure(text: str) -> None:
    """Random MIME structures (nested multiparts, boundary look-alikes in bodies, blanks after
    delimiters, missing close delimiters and blank lines, LF or CRLF line by line): where the
    simple split does not hand a mail to the feedparser, it builds the same tree."""
    reference, mine = _split_or_not(text.encode())
    if mine is not None:
        assert mine == reference
