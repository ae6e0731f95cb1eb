"""gateways/email/parser_pool.py: real parser processes, their limits and their care (issue 21).

Each test starts a pool of real child processes. Faults are real too: a child is killed with
SIGKILL, hung with SIGSTOP, or runs a work function from tests/gateways/email/parser_work.py
that spins in Python, sits in C code, sleeps or raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from core import testing
from core.metrics import GatewayMetrics
from gateways.email.config import ParserConfig
from gateways.email.parser_pool import ParserPool, ParsersBusy, ParserStartError
from gateways.email.translate import parse_mail
from tests.gateways.email.test_translate import PLAIN

pytestmark = pytest.mark.timeout(60)

NAME = "parsers"
WORK = "tests.gateways.email.parser_work"
MULTIPART = (
    b"From: =?utf-8?q?J=C3=B6rg?= <j@example.org>\r\nTo: a@example.com, b:;\r\n"
    b"Subject: =?utf-8?b?R3LDvMOfZQ==?=\r\nMessage-ID: <m@example.org>\r\n"
    b"Content-Type: multipart/mixed; boundary=B\r\n\r\n"
    b"--B\r\nContent-Type: text/plain; charset=latin-1\r\n\r\ncaf\xe9\r\n"
    b"--B\r\nContent-Type: application/octet-stream; name=b.bin\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\nAAH/gA=\r\n--B--\r\n"
)


def metric(kind: str) -> float:
    return testing.metric("gateway_errors_total", gateway=NAME, kind=kind)


@contextlib.asynccontextmanager
async def running(work: str | None = None, **config: Any) -> AsyncIterator[ParserPool]:
    pool = ParserPool(
        ParserConfig.model_validate({"processes": 1, **config}),
        GatewayMetrics(NAME),
        name=NAME,
        work=None if work is None else f"{WORK}:{work}",
    )
    await pool.start()
    try:
        yield pool
    finally:
        await pool.close()


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def replaced(pool: ParserPool, old: list[int]) -> list[int]:
    """Wait until the pool has as many children as it should, none of them in ``old``."""

    def fresh() -> bool:
        return len(pool.pids) == pool.size and not set(pool.pids) & set(old)

    await testing.until(fresh, 30, "a new parser process")
    return pool.pids


async def test_a_parser_process_gives_what_parse_mail_gives() -> None:
    async with running(processes=2) as pool:
        assert len(pool.pids) == 2 and os.getpid() not in pool.pids
        for raw in (PLAIN, MULTIPART, b"", b"\xff\xfe\x00junk\r\n\r\n\x80"):
            outcome = await pool.parse(raw, wait=10)
            assert outcome.kind == "parsed"
            assert outcome.keys == parse_mail(raw)  # the events stay what they were


async def test_a_mail_over_a_cap_is_not_parsed() -> None:
    async with running(max_encoded_words=2) as pool:
        outcome = await pool.parse(b"Subject: =?a?q?b?= =?a?q?b?= =?a?q?b?=\r\n\r\n", wait=10)
        assert outcome.kind == "limit" and outcome.limit is not None
        assert outcome.limit.kind == "encoded_words"
        assert outcome.limit.reply.startswith("554 5.6.0")
        assert (await pool.parse(PLAIN, wait=10)).kind == "parsed"


async def test_a_parse_over_the_cpu_limit_is_stopped_and_the_process_goes_on() -> None:
    async with running("spin", cpu_limit=0.2) as pool:
        outcome = await pool.parse(b"anything", wait=10)
        assert outcome.kind == "cpu" and "s of CPU" in outcome.detail
    async with running(cpu_limit=0.2, max_encoded_words=10**6, max_header_length=10**7) as pool:
        # the mail, with the caps lifted: 20,000 encoded words and an 8-bit one take
        # seconds (without the 8-bit word parse_mail's plain path decodes them in linear time)
        pid = pool.pids
        words = b" ".join([b"=?utf-8?q?a?="] * 20_000)
        hostile = b"Subject: " + words + " Grüße\r\n\r\nx\r\n".encode()
        assert (await pool.parse(hostile, wait=10)).kind == "cpu"
        assert (await pool.parse(PLAIN, wait=30)).keys == parse_mail(PLAIN)
        assert pool.pids == pid


async def test_a_parse_stuck_in_c_code_is_ended_by_the_kernel() -> None:
    # sum() over a range never looks at signals: the CPU timer cannot interrupt it,
    # RLIMIT_CPU ends the process with SIGXCPU about a second after the limit
    async with running("stuck_in_c", cpu_limit=0.1, timeout=60) as pool:
        old = pool.pids
        outcome = await pool.parse(b"anything", wait=10)
        assert outcome.kind == "cpu" and "SIGXCPU" in outcome.detail
        await replaced(pool, old)


async def test_a_parser_killed_mid_mail_costs_that_mail_only(tmp_path: Path) -> None:
    died = metric("parser_died")
    async with running("touch_then_sleep") as pool:
        (pid,) = pool.pids
        started = tmp_path / "started"
        killer = asyncio.create_task(pool.parse(b"sleep:%s" % str(started).encode(), wait=10))
        await testing.until(started.exists, 30, "the parse to start")
        waiting = asyncio.create_task(pool.parse(PLAIN, wait=30))  # queued behind it
        os.kill(pid, signal.SIGKILL)  # the OOM killer, an operator
        outcome = await killer
        assert outcome.kind == "died" and "SIGKILL" in outcome.detail
        # the mail queued behind it is parsed by the replacement
        assert (await waiting).keys == parse_mail(PLAIN)
        assert pid not in pool.pids
    assert metric("parser_died") == died + 1


async def test_a_hung_parser_is_killed_after_the_timeout(tmp_path: Path) -> None:
    timeouts = metric("parser_timeout")
    async with running(cpu_limit=0.5, timeout=1.0) as pool:
        (pid,) = pool.pids
        os.kill(pid, signal.SIGSTOP)
        outcome = await pool.parse(PLAIN, wait=10)
        assert outcome.kind == "timeout" and "email.parser.timeout" in outcome.detail
        await testing.until(lambda: not alive(pid), 10, "the hung parser gone")
        await replaced(pool, [pid])
        assert (await pool.parse(PLAIN, wait=30)).kind == "parsed"
    assert metric("parser_timeout") == timeouts + 1


async def test_a_parser_that_ends_while_idle_is_replaced(caplog: pytest.LogCaptureFixture) -> None:
    died = metric("parser_died")
    async with running(processes=2) as pool:
        victim = pool.pids[0]
        os.kill(victim, signal.SIGKILL)
        await replaced(pool, [victim])
        assert [(await pool.parse(PLAIN, wait=10)).kind for _ in range(4)] == ["parsed"] * 4
    assert metric("parser_died") == died + 1
    assert any("ended while idle (killed by SIGKILL)" in r.getMessage() for r in caplog.records)


async def test_a_full_queue_and_a_long_wait_are_busy(tmp_path: Path) -> None:
    async with running("touch_then_sleep", max_queued=1) as pool:
        started = tmp_path / "started"
        busy = asyncio.create_task(pool.parse(b"sleep:%s" % str(started).encode(), wait=10))
        await testing.until(started.exists, 30, "the parse to start")
        # the next mail is written behind it (PIPELINE), the one after waits in the queue
        behind = asyncio.create_task(pool.parse(PLAIN, wait=0.5))
        queued = asyncio.create_task(pool.parse(PLAIN, wait=0.5))
        await testing.until(lambda: pool.queued == 1, 10, "one mail queued")
        with pytest.raises(ParsersBusy, match="1 mails already wait"):
            await pool.parse(PLAIN, wait=10)  # at once: the queue is full
        with pytest.raises(ParsersBusy, match=r"no parser free within 0\.5 s"):
            await queued
        assert pool.queued == 0 and not behind.done()  # a parser has it: no queue timeout
    for task in (busy, behind):  # closing the pool answered both
        with pytest.raises(ParsersBusy, match="shutting down"):
            await task


async def test_a_bug_in_the_parser_is_an_error_with_its_traceback() -> None:
    async with running("broken") as pool:
        pid = pool.pids
        outcome = await pool.parse(PLAIN, wait=10)
        assert outcome.kind == "error"
        assert "RuntimeError: bug in the parser" in outcome.detail
        assert "Traceback" in outcome.detail
        assert pool.pids == pid  # the process goes on


async def test_a_caller_that_leaves_does_not_confuse_the_parser(tmp_path: Path) -> None:
    async with running(cpu_limit=5, max_encoded_words=10**6, max_header_length=10**7) as pool:
        # a slow mail whose caller leaves (its SMTP client hung up) while it is parsed
        slow = b"Subject: " + b" ".join([b"=?utf-8?q?a?="] * 3000) + b"\r\n\r\nslow\r\n"
        leaving = asyncio.create_task(pool.parse(slow, wait=10))
        await asyncio.sleep(0)
        next_mail = asyncio.create_task(pool.parse(PLAIN, wait=30))
        leaving.cancel()
        # the next mail gets its own answer, not the slow mail's
        assert (await next_mail).keys == parse_mail(PLAIN)
        with pytest.raises(asyncio.CancelledError):
            await leaving


async def test_a_parser_that_cannot_start_is_a_start_error() -> None:
    pool = ParserPool(ParserConfig(processes=2), name=NAME, work="no_such_module:parse")
    with pytest.raises(ParserStartError, match="did not start"):
        await pool.start()
    assert pool.pids == []


async def test_parsers_exit_when_the_pool_closes() -> None:
    async with running(processes=2) as pool:
        pids = pool.pids
        assert all(alive(pid) for pid in pids)
    assert not any(alive(pid) for pid in pids)
    assert pool.readiness() == []
    with pytest.raises(ParsersBusy, match="shutting down"):
        await pool.parse(PLAIN, wait=1)


def test_the_default_is_one_process_a_cpu_up_to_four() -> None:
    pool = ParserPool(ParserConfig(), name=NAME)
    assert pool.size == min(4, os.cpu_count() or 1)
    assert ParserPool(ParserConfig(processes=3), name=NAME).size == 3
