"""gateways/email/connection.py: the fast path for MAIL and RCPT addresses gives what aiosmtpd's
own parser gives, for every input (it only takes the plain ``<dot-atom@dot-atom>`` form)."""

from __future__ import annotations

import asyncio
import string
from typing import Any

from aiosmtpd.smtp import SMTP
from hypothesis import assume, example, given, settings
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


# -- DATA read at once: what aiosmtpd's line-by-line DATA gives, reply for reply ---------------

SIZE = 3000  # data_size_limit of both servers; the raised stream limit is SIZE + 2 * 1001


class _Recorder:
    def __init__(self) -> None:
        self.contents: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.contents.append(envelope.original_content)
        return "250 OK"


class _Owner:
    """What _Protocol asks of its SmtpServer."""

    def __init__(self) -> None:
        self.sessions: set[Any] = set()
        self.max_sessions = 10**6

    def turned_away(self) -> None:
        raise AssertionError("no cap in this test")


async def _exchange(fast: bool, stream: bytes, cuts: list[int]) -> tuple[bytes, list[bytes]]:
    """The server's replies to ``stream`` (sent in pieces cut at ``cuts``) and the mails it
    handed to its handler."""
    recorder = _Recorder()
    kwargs: dict[str, Any] = {"data_size_limit": SIZE, "enable_SMTPUTF8": True, "hostname": "h"}
    owner = _Owner()

    def protocol() -> SMTP:
        if fast:
            return _Protocol(owner, recorder, False, **kwargs)  # type: ignore[arg-type]
        return SMTP(recorder, **kwargs)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = 0
    try:
        for cut in [*sorted(set(cuts)), len(stream)]:
            writer.write(stream[start:cut])
            await writer.drain()
            await asyncio.sleep(0.002)
            start = cut
        writer.write_eof()
    except OSError:  # the server hung up first (too many bogus commands)
        pass
    try:
        replies = await asyncio.wait_for(reader.read(), 10)
    except OSError:
        replies = b"(reset)"
    writer.close()
    server.close()
    await server.wait_closed()
    return replies, recorder.contents


def _data_session(body: bytes) -> bytes:
    return b"EHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n" + body + b"QUIT\r\n"


_LINES = st.sampled_from(
    [b"", b".", b"..", b"x.", b".x", b"a\n.", b"\r", b"x\r\r", b"." * 3, b"Hallo .", b"a" * 70]
    + [b"b" * n for n in (998, 999, 1000, 1001, 1002, 1500, 2500)]
)


#: 2,520 bytes of short lines: under SIZE, and a line of 500 more crosses it
_UNDER_SIZE = (b"a" * 68 + b"\r\n") * 36


@st.composite
def _bodies(draw: Any) -> tuple[bytes, list[int]]:
    lines = draw(st.lists(_LINES, max_size=12))
    repeat = draw(st.sampled_from([1, 1, 1, 40, 80]))  # 80 x ~70 bytes: over SIZE + 2002
    body = b"".join(line + b"\r\n" for line in lines) * repeat
    assume(len(body) < 12_000)
    body += draw(st.sampled_from([b".\r\n", b".\r\n", b"x\r\n.\r\n", b"", b".\r\nNOOP\r\n"]))
    stream = _data_session(body)
    cuts = draw(st.lists(st.integers(0, len(stream)), max_size=6))
    return stream, cuts


@settings(max_examples=150, deadline=None)
@given(_bodies())
@example((_data_session(b".\r\n"), []))
@example((_data_session(b"..\r\n.\r\n"), [60, 61, 62]))
@example((_data_session(b"a\r\n.\r\n"), [59, 60, 61, 62, 63, 64]))
@example((_data_session(b"x.\r\n.x\r\n.\r\n"), []))
# a long line that crosses SIZE: aiosmtpd stops reading it (500) before counting it when it is
# longer than its stream limit (1001 + CRLF), counts it first (552) when just over 1001
@example((_data_session(_UNDER_SIZE + b"b" * 1002 + b"\r\n.\r\n"), []))
@example((_data_session(_UNDER_SIZE + b"b" * 1001 + b"\r\n.\r\n"), []))
@example((_data_session(_UNDER_SIZE + b"b" * 1000 + b"\r\n.\r\n"), []))
@example((_data_session(_UNDER_SIZE + b"b" * 999 + b"\r\n.\r\n"), [2000]))
@example((_data_session(b"a" * 1500 + b"\r\n" + b"b\r\n" * 1200 + b".\r\n"), []))
@example((_data_session(b"b\r\n" * 1200 + b"a" * 1500 + b"\r\n.\r\n"), [100, 3000]))
def test_data_at_once_answers_as_aiosmtpd_line_by_line(case: tuple[bytes, list[int]]) -> None:
    stream, cuts = case
    slow = asyncio.run(_exchange(False, stream, cuts))
    fast = asyncio.run(_exchange(True, stream, cuts))
    assert fast == slow
