"""The parser processes: inbound mail is parsed here, never on the event loop.

CPython's header parser takes time quadratic in the RFC 2047 encoded words of a header and in
the groups of an address header: one mail under the advertised SIZE, from any client, froze the
whole gateway (every session, /healthz) for 10-20 s (issue 21). And an ordinary mail costs
about 1 ms of CPU to parse, which on the loop capped throughput at one core. So every mail goes
to one of a few child processes (:class:`ParserPool`, ``email.parser``):

* the parent writes the mail's bytes to a free child's stdin (a 4-byte length, then the bytes)
  and reads one msgpack frame back: the ``email.receive`` keys, or why there are none. Nothing
  is pickled; the keys are msgpack-safe already, as the layer needs them;
* a child first checks the header caps (:func:`translate.header_limit_exceeded`), then parses
  under a CPU timer (``ITIMER_PROF`` at ``cpu_limit``): past it the parse is abandoned, the
  child answers "over the CPU limit" and exits, and a fresh one takes its place. ``RLIMIT_CPU``
  a few seconds later is the kernel's backstop for a parse stuck in C code: ``SIGXCPU`` ends
  the child, which counts as over the limit too;
* a child that dies, or has not answered after ``timeout`` wall-clock seconds (it is killed), is
  replaced; the mail it had gets 451 (the mail is not known to be at fault), no other mail is
  touched. A child that dies while idle is replaced as well;
* mails wait for a free child in arrival order, at most ``max_queued`` of them and each at most
  the caller's ``wait``; past either the caller gets :class:`ParsersBusy` (SMTP 451, pushback).

The children ignore SIGINT and SIGTERM (Ctrl-C and ``systemctl stop`` reach the whole process
group: the parent drains first and then closes their stdin) and exit at end of input, also when
the parent died. This module imports nothing heavy at the top: the children import it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import resource
import signal
import sys
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

import msgpack

from gateways.email.translate import LimitExceeded, MailLimits, header_limit_exceeded, parse_mail

if TYPE_CHECKING:
    from core.metrics import GatewayMetrics
    from gateways.email.config import ParserConfig

__all__ = [
    "ParseOutcome",
    "ParserPool",
    "ParserStartError",
    "ParsersBusy",
    "child_main",
    "parse_within_limits",
]

log = logging.getLogger("gateway.email")

#: CPU seconds past cpu_limit after which the kernel ends a child (SIGXCPU): a parse the CPU
#: timer could not interrupt (stuck in C code)
HARD_CPU_MARGIN = 1
#: seconds a new child may take to import and say it is ready
START_TIMEOUT = 60.0
#: seconds a closing child may take to exit after its stdin closed
CLOSE_TIMEOUT = 5.0
#: after the CPU limit, the timer fires again this often (CPU seconds) in case a bare
#: ``except:`` in the stdlib swallowed the first interruption (email._header_value_parser has one)
TIMER_REPEAT = 0.1
_HEADER_BYTES = 4

OutcomeKind = Literal["parsed", "limit", "cpu", "error", "died", "timeout"]


class ParsersBusy(Exception):
    """No parser took the mail: the queue is full or the caller's wait ran out (SMTP 451)."""


class ParserStartError(Exception):
    """A parser process could not be started (at gateway start: exit code 3)."""


@dataclass(frozen=True)
class ParseOutcome:
    """What became of one mail in a parser.

    ``parsed``: ``keys`` holds the ``email.receive`` keys. ``limit``: a header cap refused it
    before parsing (``limit`` says which). ``cpu``: the parse went over ``cpu_limit``.
    ``error``: ``parse_mail`` raised (a bug of ours; ``detail`` is the child's traceback).
    ``died`` / ``timeout``: the child died, or was killed after ``timeout`` s; ``detail`` says
    how. The last two are not the mail's fault as far as anyone can tell.
    """

    kind: OutcomeKind
    keys: dict[str, Any] | None = None
    limit: LimitExceeded | None = None
    detail: str = ""


# -- the child: a plain loop, one mail at a time ------------------------------------------------


class _OverCpuLimit(BaseException):
    """Raised by the CPU timer. A BaseException, so that parse_mail's ``except Exception``
    clauses (which turn a parser's error into a defect) do not swallow it."""


def parse_within_limits(raw: bytes, limits: MailLimits) -> list[Any]:
    """A child's answer for ``raw``, before msgpack: ``["parsed", keys]`` or
    ``["limit", kind, detail, reply]``."""
    exceeded = header_limit_exceeded(raw, limits)
    if exceeded is not None:
        return ["limit", exceeded.kind, exceeded.detail, exceeded.reply]
    return ["parsed", parse_mail(raw)]


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _write_frame(sink: BinaryIO, answer: list[Any]) -> None:
    try:
        payload = msgpack.packb(answer, use_bin_type=True)
    except Exception:  # keys that are not msgpack-safe: a bug of parse_mail
        payload = msgpack.packb(["error", traceback.format_exc()], use_bin_type=True)
    sink.write(len(payload).to_bytes(_HEADER_BYTES, "big"))
    sink.write(payload)
    sink.flush()


def child_main(
    settings: dict[str, Any],
    work: Callable[[bytes, MailLimits], list[Any]] = parse_within_limits,
) -> None:
    """The child's life: read a mail from stdin, answer on stdout, until end of input."""
    limits = MailLimits(**settings["limits"])
    cpu_limit = float(settings["cpu_limit"])
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGXCPU would dump core
    # the frames get private descriptors: whatever prints goes to stderr, reads get nothing
    source = os.fdopen(os.dup(0), "rb")
    sink = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    armed = [False]

    def on_timer(signum: int, frame: Any) -> None:
        if armed[0]:
            raise _OverCpuLimit

    signal.signal(signal.SIGPROF, on_timer)
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    _write_frame(sink, ["ready", os.getpid()])
    while True:
        head = source.read(_HEADER_BYTES)
        if len(head) < _HEADER_BYTES:
            return  # the parent closed our stdin (or died)
        size = int.from_bytes(head, "big")
        raw = source.read(size)
        if len(raw) < size:
            return
        started = _cpu_seconds()
        ceiling = math.ceil(started + cpu_limit) + HARD_CPU_MARGIN
        if hard == resource.RLIM_INFINITY or ceiling < hard:
            resource.setrlimit(resource.RLIMIT_CPU, (ceiling, hard))
        answer: list[Any]
        armed[0] = True
        signal.setitimer(signal.ITIMER_PROF, cpu_limit, TIMER_REPEAT)
        try:
            answer = work(raw, limits)
            armed[0] = False
        except _OverCpuLimit:
            answer = ["cpu", _cpu_seconds() - started]
        except Exception:
            armed[0] = False
            answer = ["error", traceback.format_exc()]
        finally:
            armed[0] = False
            signal.setitimer(signal.ITIMER_PROF, 0)
        _write_frame(sink, answer)
        if answer[0] == "cpu":
            # interrupted anywhere in the stdlib's parser: a fresh process for the next mail
            return


#: the child's command line: the parent's sys.path (as multiprocessing's spawn does), then in
_BOOT = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "from gateways.email.parser_pool import child_main; child_main(json.loads(sys.argv[2]))"
)


# -- the parent: a child seen from the event loop -----------------------------------------------


class _ChildLost(Exception):
    def __init__(self, kind: OutcomeKind, detail: str) -> None:
        super().__init__(detail)
        self.kind: OutcomeKind = kind
        self.detail = detail


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit status {code}"


class _Child:
    """One parser process and its two pipes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.pid = process.pid

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    async def read_answer(self) -> list[Any]:
        stdout = self.process.stdout
        assert stdout is not None
        head = await stdout.readexactly(_HEADER_BYTES)
        payload = await stdout.readexactly(int.from_bytes(head, "big"))
        answer = msgpack.unpackb(payload, raw=False)
        if not isinstance(answer, list) or not answer:
            raise _ChildLost("died", f"parser process {self.pid} answered {type(answer).__name__}")
        return answer

    async def exchange(self, raw: bytes) -> list[Any]:
        stdin = self.process.stdin
        assert stdin is not None
        stdin.write(len(raw).to_bytes(_HEADER_BYTES, "big"))
        stdin.write(raw)
        await stdin.drain()
        return await self.read_answer()

    async def exit_status(self) -> str:
        """How the process ended; waits for it a little (its pipes close just before)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.process.wait(), CLOSE_TIMEOUT)
        return _describe_exit(self.process.returncode)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()

    async def close(self) -> None:
        """End of input, so the child exits once it finished what it has; killed after a while."""
        stdin = self.process.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), CLOSE_TIMEOUT)
        except TimeoutError:
            self.kill()
            await self.process.wait()


class ParserPool:
    """``processes`` parser children, a bounded queue of mails waiting for one, and their care.

    :meth:`start` once (raises :class:`ParserStartError`), :meth:`parse` per mail,
    :meth:`close` at the end. ``metrics`` counts in ``gateway_errors_total`` the kinds
    ``parser_died`` (a child ended unasked) and ``parser_timeout`` (a child killed after
    ``timeout``); the caller counts what it answers.
    """

    def __init__(
        self,
        config: ParserConfig,
        metrics: GatewayMetrics | None = None,
        *,
        name: str = "email",
        work: str | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.name = name
        #: how many children the pool keeps
        self.size = config.processes or min(4, os.cpu_count() or 1)
        self._settings = {
            "limits": {
                "max_header_fields": config.max_header_fields,
                "max_header_length": config.max_header_length,
                "max_encoded_words": config.max_encoded_words,
            },
            "cpu_limit": config.cpu_limit,
        }
        # tests run a child with another work function ("module:function")
        self._boot = _BOOT if work is None else _boot_with(work)
        self._children: set[_Child] = set()
        self._idle: deque[_Child] = deque()
        self._waiters: deque[asyncio.Future[_Child]] = deque()
        self._jobs: set[asyncio.Task[ParseOutcome]] = set()
        self._care: set[asyncio.Task[None]] = set()  # watchers and replacements
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every child and wait until each said it is ready."""
        started = await asyncio.gather(
            *(self._spawn() for _ in range(self.size)), return_exceptions=True
        )
        children = [c for c in started if isinstance(c, _Child)]
        failures = [e for e in started if isinstance(e, BaseException)]
        for child in children:
            self._adopt(child)
        if failures:
            await self.close()
            raise ParserStartError(str(failures[0])) from failures[0]
        log.info("%s: %d parser process(es) started", self.name, len(children))

    async def close(self) -> None:
        """Close every child (end of input; killed after a while) and forget queued mails."""
        self._closing = True
        for task in [*self._care, *self._jobs]:
            task.cancel()
        for waiter in self._waiters:
            waiter.cancel()
        self._waiters.clear()
        children, self._children = list(self._children), set()
        self._idle.clear()
        await asyncio.gather(*(child.close() for child in children), return_exceptions=True)
        await asyncio.gather(*self._care, *self._jobs, return_exceptions=True)

    def readiness(self) -> list[str]:
        if self._closing or self._children:
            return []
        return ["no parser process running (starting new ones)"]

    @property
    def pids(self) -> list[int]:
        """The process ids of the live children (for tests and operators)."""
        return sorted(child.pid for child in self._children)

    @property
    def queued(self) -> int:
        """Mails waiting for a free parser."""
        return sum(not waiter.done() for waiter in self._waiters)

    # -- parsing ---------------------------------------------------------------------------

    async def parse(self, raw: bytes, *, wait: float) -> ParseOutcome:
        """Parse ``raw`` in a child. Raises :class:`ParsersBusy` when no child takes it within
        ``wait`` seconds or the queue is full. A caller that is cancelled (its SMTP client left)
        does not disturb the child: the answer is read and dropped, the child reused."""
        child = await self._acquire(wait)
        job = asyncio.create_task(self._run(child, raw))
        self._jobs.add(job)
        job.add_done_callback(_forget_job(self._jobs))
        return await asyncio.shield(job)

    async def _run(self, child: _Child, raw: bytes) -> ParseOutcome:
        try:
            answer = await asyncio.wait_for(child.exchange(raw), self.config.timeout)
        except TimeoutError:
            child.kill()
            await child.exit_status()
            self._replace(child)
            self._count("parser_timeout")
            return ParseOutcome(
                "timeout",
                detail=f"parser process {child.pid} did not answer within "
                f"{self.config.timeout:g} s (email.parser.timeout); killed",
            )
        except asyncio.CancelledError:
            child.kill()  # the pool is closing
            raise
        except Exception as exc:
            # end of its output, a broken pipe, or bytes that are no answer: gone or out of step
            if not isinstance(exc, asyncio.IncompleteReadError | ConnectionError):
                child.kill()
            status = await child.exit_status()
            self._replace(child)
            if child.process.returncode == -signal.SIGXCPU:
                return ParseOutcome("cpu", detail=f"parser process {child.pid} {status}")
            self._count("parser_died")
            reason = exc.detail if isinstance(exc, _ChildLost) else status
            if not isinstance(exc, asyncio.IncompleteReadError | ConnectionError | _ChildLost):
                reason = f"{status} after a garbled answer ({type(exc).__name__}: {exc})"
            return ParseOutcome("died", detail=f"parser process {child.pid} {reason}")
        return self._outcome(child, answer)

    def _outcome(self, child: _Child, answer: list[Any]) -> ParseOutcome:
        kind = answer[0]
        if kind == "cpu":
            self._replace(child)  # it exits after this answer
            used = float(answer[1]) if len(answer) > 1 else math.nan
            return ParseOutcome("cpu", detail=f"stopped after {used:.1f} s of CPU")
        self._release(child)
        if kind == "parsed":
            return ParseOutcome("parsed", keys=answer[1])
        if kind == "limit":
            return ParseOutcome("limit", limit=LimitExceeded(*answer[1:4]))
        return ParseOutcome("error", detail=str(answer[1]) if len(answer) > 1 else "")

    # -- the queue -------------------------------------------------------------------------

    async def _acquire(self, wait: float) -> _Child:
        if self._closing:
            raise ParsersBusy("shutting down")
        while self._idle:
            child = self._idle.popleft()
            if child.alive:
                return child
        if self.queued >= self.config.max_queued:
            raise ParsersBusy(
                f"{self.config.max_queued} mails already wait for a parser "
                "(email.parser.max_queued)"
            )
        waiter: asyncio.Future[_Child] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(wait):
                return await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._release(waiter.result())  # handed over just as we gave up
            if isinstance(exc, TimeoutError):
                raise ParsersBusy(f"no parser free within {wait:g} s") from None
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def _release(self, child: _Child) -> None:
        if self._closing or child not in self._children or not child.alive:
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(child)
                return
        self._idle.append(child)

    # -- children ---------------------------------------------------------------------------

    async def _spawn(self) -> _Child:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            self._boot,
            json.dumps(sys.path),
            json.dumps(self._settings),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        child = _Child(process)
        try:
            hello = await asyncio.wait_for(child.read_answer(), START_TIMEOUT)
        except (asyncio.IncompleteReadError, TimeoutError, _ChildLost, ValueError) as exc:
            child.kill()
            status = await child.exit_status()
            raise ParserStartError(
                f"parser process {child.pid} did not start ({status}; {type(exc).__name__}); "
                "its error, if any, is on stderr"
            ) from None
        if hello[0] != "ready":
            child.kill()
            await child.exit_status()
            raise ParserStartError(f"parser process {child.pid} said {hello[0]!r}, not ready")
        return child

    def _adopt(self, child: _Child) -> None:
        self._children.add(child)
        self._care_for(self._watch(child))
        self._release(child)

    def _care_for(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self._care.add(task)
        task.add_done_callback(self._care.discard)

    async def _watch(self, child: _Child) -> None:
        """Replace a child that ends while idle (out of memory, killed by an operator)."""
        await child.process.wait()
        if self._closing or child not in self._children or child not in self._idle:
            return  # closing, already replaced, or busy: _run sees it
        self._idle.remove(child)
        self._count("parser_died")
        log.warning(
            "%s: parser process %d ended while idle (%s); starting another",
            self.name,
            child.pid,
            _describe_exit(child.process.returncode),
        )
        self._replace(child)

    def _replace(self, child: _Child) -> None:
        if child not in self._children:
            return
        self._children.discard(child)
        with contextlib.suppress(ValueError):
            self._idle.remove(child)
        if child.alive:
            child.kill()
        if not self._closing:
            self._care_for(self._respawn())

    async def _respawn(self) -> None:
        delay = 0.5
        while not self._closing:
            try:
                child = await self._spawn()
            except (ParserStartError, OSError) as exc:
                log.error(
                    "%s: could not start a parser process (%s); retrying in %.1f s",
                    self.name,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            if self._closing:
                await child.close()
            else:
                self._adopt(child)
            return

    def _count(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.error(kind)


def _forget_job(jobs: set[asyncio.Task[ParseOutcome]]) -> Callable[[asyncio.Task[Any]], None]:
    def forget(job: asyncio.Task[Any]) -> None:
        jobs.discard(job)
        if not job.cancelled():
            job.exception()  # retrieved: its caller may have left (the SMTP client hung up)

    return forget


def _boot_with(work: str) -> str:
    module, _, function = work.partition(":")
    return (
        "import importlib, json, sys; sys.path[:] = json.loads(sys.argv[1]); "
        "from gateways.email.parser_pool import child_main; "
        f"work = getattr(importlib.import_module({module!r}), {function!r}); "
        "child_main(json.loads(sys.argv[2]), work)"
    )
