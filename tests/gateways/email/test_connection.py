"""gateways/email/connection.py: the fast path for MAIL and RCPT addresses gives what aiosmtpd's
own parser gives, for every input (it only takes the plain ``<dot-atom@dot-atom>`` form)."""

from __future__ import annotations

import string

from aiosmtpd.smtp import SMTP
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateways.email.connection import _Protocol

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
ATOM = st.text(ATEXT, min_size=1, max_size=6)
DOT_ATOM = st.lists(ATOM, min_size=1, max_size=3).map(".".join)
TAILS = st.sampled_from(
    ["", " SIZE=10", "  SIZE=10", " X ", "\tY", "x", " BODY=8BITMIME SMTPUTF8", " ", " é",
     " (comment) X", "(c)", " =x"]
)  # fmt: skip
NOISE = st.text(ATEXT + '.@<> \t"()[]:;,\\é\r\x00=', max_size=20)


def parsers(limit: int) -> tuple[SMTP, _Protocol]:
    slow, fast = SMTP.__new__(SMTP), _Protocol.__new__(_Protocol)
    slow.local_part_limit = fast.local_part_limit = limit
    return slow, fast


def outcome(parser: SMTP, arg: str) -> object:
    try:
        return parser._getaddr(arg)
    except Exception as exc:  # the stdlib's parser raises on some inputs: so must we
        return type(exc)


def both(arg: str, limit: int = 0) -> tuple[object, object]:
    slow, fast = parsers(limit)
    return outcome(slow, arg), outcome(fast, arg)


@settings(max_examples=2000)
@given(local=DOT_ATOM, domain=DOT_ATOM, tail=TAILS, insert=NOISE, at=st.integers(0, 40))
@example(local="a", domain="b.c", tail=" (x)", insert="", at=0)
@example(local="a", domain="b.c", tail="", insert='"', at=1)
def test_plain_paths_parse_as_aiosmtpd_parses_them(
    local: str, domain: str, tail: str, insert: str, at: int
) -> None:
    arg = f"<{local}@{domain}>{tail}"
    arg = arg[:at] + insert + arg[at:]
    slow, fast = both(arg)
    assert fast == slow


@given(NOISE)
def test_anything_else_parses_as_aiosmtpd_parses_it(arg: str) -> None:
    slow, fast = both(arg)
    assert fast == slow


def test_the_local_part_limit_still_applies() -> None:
    for arg in ("<abcd@x.y>", "<abc@x.y>", "<abcd@x.y> SIZE=1"):
        slow, fast = both(arg, limit=3)
        assert fast == slow
    assert both("<abcd@x.y>", limit=3)[1] == (None, None)
