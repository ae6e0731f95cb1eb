"""core.logs: redaction is linear in the line, hostile text is clipped (issue 14, item 1)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from core.logs import MAX_LINE, RepeatFilter, clip, redact, setup_logging

# Runs of the characters a URL scheme is made of, and "://" repeated without an "@": the old
# pattern rescanned the rest of the run from every position (25 s for 65,535 letters).
HOSTILE = {
    "letters": "a" * 65_535,
    "long letters": "a" * (1 << 20),
    "schemes without @": "a://:" * 200_000,
    "scheme chars then ://": "x+y.z-" * 170_000 + "://",
    "password without @": "a://b:" + "c" * (1 << 20),
    "colons": "a:" * 500_000,
    # issue 21, item 16: name=value pairs, secret names, names without "="
    "parameters": "a=" * 500_000 + "password",
    "secret names": "password" * 125_000 + "=",
    "secret parameters": "?pw" * 333_333,
}


def test_redact_is_linear_on_hostile_lines() -> None:  # and changes nothing in them
    # In a child process so a quadratic regex fails this test (hours for 1 MiB) instead of
    # hanging the run; a linear one needs well under a second per line.
    code = (
        "from core.logs import redact\n"
        "import json, sys\n"
        "for line in json.load(sys.stdin).values():\n"
        "    assert redact(line) == line\n"
        "print('done')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(HOSTILE),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "done"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("redis://:pw4567@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://user:p%2Fw@h/0", "rediss://user:***@h/0"),
        ("a http://u:p@h and redis://:x@y", "a http://u:***@h and redis://:***@y"),
        ("(redis://:S3cret@h)", "(redis://:***@h)"),
        ("mail to a@example.org: ok", "mail to a@example.org: ok"),
        ("redis://host:6379/0", "redis://host:6379/0"),
    ],
)
def test_redact_url_passwords(line: str, expected: str) -> None:
    assert redact(line) == expected


def test_clip() -> None:
    assert clip("short") == "'short'"
    clipped = clip("t" * 65_535)
    assert clipped.startswith("'" + "t" * 200 + "'")
    assert clipped.endswith("(65335 more characters)")
    assert len(clip("\r\n" * 1000, 10)) < 60  # control characters shown escaped, not raw
    assert clip(12) == "'12'"


def test_formatter_cuts_overlong_lines(capfd: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO")
    logging.getLogger("gateway.test").warning("%s", "y" * (MAX_LINE * 4))
    err = capfd.readouterr().err
    assert len(err) < MAX_LINE + 200
    assert "more characters cut" in err


def test_repeated_records_pass_once_per_interval_with_a_count() -> None:
    # CPython 3.11's accept loop logs EMFILE once per waiting connection: thousands a second
    throttle = RepeatFilter(interval=3600)

    def record(msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, args, None)

    first = record("socket.accept() out of system resource\nsocket: fd=6")
    assert throttle.filter(first)
    assert not any(
        throttle.filter(record("socket.accept() out of system resource\nfd=7")) for _ in range(99)
    )
    assert throttle.filter(record("another kind %d", 1))  # other kinds are not held back
    throttle.interval = 0  # the interval passed: the next one tells how many were held
    again = record("socket.accept() out of system resource\nsocket: %s", "fd=8")
    assert throttle.filter(again)
    assert again.getMessage().endswith("(99 more like this not logged)")
    assert throttle.filter(record("socket.accept() out of system resource"))
    for n in range(RepeatFilter.MAX_KINDS + 1):  # memory stays bounded
        throttle.filter(record(f"kind {n}"))
    assert len(throttle._kinds) <= RepeatFilter.MAX_KINDS


def test_marked_only_holds_back_named_kinds_and_passes_the_rest() -> None:
    # a gateway's own logger: a peer can flood a few kinds of line, every other line must pass
    throttle = RepeatFilter(interval=3600, marked_only=True)

    def record(msg: str, repeat: str | None = None) -> logging.LogRecord:
        made = logging.LogRecord("gateway.irc", logging.WARNING, __file__, 1, msg, None, None)
        if repeat is not None:
            made.repeat = repeat
        return made

    assert all(throttle.filter(record("cannot join %s")) for _ in range(10))  # unmarked
    assert throttle.filter(record("skipped a line: %r", "ops:bad_line"))
    assert not any(throttle.filter(record("skipped a line: %r", "ops:bad_line")) for _ in range(9))
    assert throttle.filter(record("skipped a line: %r", "other:bad_line"))  # its own kind
    throttle.interval = 0
    again = record("skipped a line", "ops:bad_line")
    assert throttle.filter(again)
    assert again.getMessage().endswith("(9 more like this not logged)")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        # issue 21, item 16: redis-py takes the password from the query string
        ("redis://h:6379/0?password=S3cret&capacity=9", "redis://h:6379/0?password=***&capacity=9"),
        (
            "rediss://h/0?ssl_password=p;q&ssl_keyfile=/k",
            "rediss://h/0?ssl_password=***&ssl_keyfile=/k",
        ),
        ("h/?X-Amz-Signature=abc#top", "h/?X-Amz-Signature=***#top"),
        ("?Api-Key=a&key=&prefix=asgi", "?Api-Key=***&key=&prefix=asgi"),
        ("ValueError: token=abc refused", "ValueError: token=*** refused"),
        ("user=bob,password=a,b c", "user=bob,password=*** c"),
        ("password=a=b&auth_token=c", "password=***&auth_token=***"),
        ("'redis://h/0?pwd=***': bad", "'redis://h/0?pwd=***': bad"),  # hidden already
        ("charset=utf-8; boundary=x", "charset=utf-8; boundary=x"),
        ("keys=1 monkey=2 passage=3", "keys=1 monkey=2 passage=3"),
    ],
)
def test_redact_secret_parameters(line: str, expected: str) -> None:
    assert redact(line) == expected
