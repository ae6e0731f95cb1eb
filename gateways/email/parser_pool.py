"""The parser processes: inbound mail is parsed here, never on the event loop.

CPython's header parser takes time quadratic in the RFC 2047 encoded words of a header and in
the groups of an address header: one mail under the advertised SIZE, from any client, froze the
whole gateway (every session, /healthz) for 10-20 s (issue 21). And an ordinary mail costs
0.7 ms of CPU to parse (bench/email.py's), which on the loop left every other mail waiting and
capped the gateway at one core. So every mail goes to one of a few child processes
(:class:`ParserPool`, ``email.parser``):

* the parent writes a job to a child's stdin (a 4-byte length, a kind byte, then the mail's
  bytes) and reads one msgpack frame back per job, in order: the ``email.receive`` keys, or
  why there are none. Nothing is pickled; the keys are msgpack-safe already, as the layer needs
  them. A child holds at most :data:`PIPELINE` jobs (the one it works on and the next), so
  under load neither side sleeps between two mails: a wake-up per pipe write is most of what
  the pipes cost;
* the second kind of job checks a mail's DKIM and ARC signatures
  (:mod:`gateways.email.signatures`) against keys the gateway resolved on its loop: dkimpy's
  hashing and canonicalisation are Python holding the GIL, so in a thread they stalled the
  event loop. It runs under the same CPU limit and the same care as a parse;
* a child first checks the header caps (:func:`translate.header_limit_exceeded`), then parses
  under a CPU timer (``ITIMER_PROF`` at ``cpu_limit``): past it the parse is abandoned and the
  child answers "over the CPU limit" and goes on with the next mail. ``RLIMIT_CPU`` a second
  later is the kernel's backstop for a parse stuck in C code: ``SIGXCPU`` ends the child, which
  counts as over the limit too;
* a child that dies, or has not answered a mail within ``timeout`` wall-clock seconds (it is
  killed), is replaced; the mail it was parsing gets 451 (the mail is not known to be at fault),
  the one written behind it goes back to the front of the queue. A child that dies while idle
  is replaced as well;
* mails wait for a child in arrival order, at most ``max_queued`` of them and each at most the
  caller's ``wait``; past either the caller gets :class:`ParsersBusy` (SMTP 451, pushback).

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
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

import msgpack

from gateways.email.translate import (
    LimitExceeded,
    MailLimits,
    header_limit_exceeded,
    parse_mail,
    use_boundary_matcher,
)

if TYPE_CHECKING:
    from core.metrics import GatewayMetrics
    from gateways.email.config import ParserConfig
    from gateways.email.signatures import SignatureRequest

__all__ = [
    "ParseOutcome",
    "ParserPool",
    "ParserStartError",
    "ParsersBusy",
    "child_main",
    "parse_within_limits",
    "verify_within_limits",
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

OutcomeKind = Literal["parsed", "verified", "limit", "cpu", "error", "died", "timeout"]

#: the kind byte of a job: parse a mail, or check its signatures
_PARSE = b"P"
_VERIFY = b"V"


class ParsersBusy(Exception):
    """No parser took the mail: the queue is full or the caller's wait ran out (SMTP 451)."""


class ParserStartError(Exception):
    """A parser process could not be started (at gateway start: exit code 3)."""


@dataclass(frozen=True)
class ParseOutcome:
    """What became of one mail in a parser.

    ``parsed``: ``keys`` holds the ``email.receive`` keys. ``verified``: ``keys`` holds the
    signature verdicts (:func:`gateways.email.signatures.encode_result`). ``limit``: a header
    cap refused it before parsing (``limit`` says which). ``cpu``: the job went over
    ``cpu_limit``.
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


def verify_within_limits(payload: bytes) -> list[Any]:
    """A child's answer to a signature job (``payload``: a msgpack
    :class:`~gateways.email.signatures.SignatureRequest`): ``["verified", result]``."""
    # imported on the first signed mail: a gateway with verify off never loads dkimpy here
    from gateways.email.signatures import (
        SignatureRequest,
        encode_result,
        verify_request,
    )

    request = SignatureRequest.from_list(msgpack.unpackb(payload, raw=False))
    return ["verified", encode_result(*verify_request(request))]


def _write_frame(sink: BinaryIO, answer: list[Any]) -> None:
    try:
        payload = msgpack.packb(answer, use_bin_type=True)
    except Exception:  # keys that are not msgpack-safe: a bug of parse_mail
        payload = msgpack.packb(["error", traceback.format_exc()], use_bin_type=True)
    # one write, so the parent wakes once per answer
    sink.write(len(payload).to_bytes(_HEADER_BYTES, "big") + payload)
    sink.flush()


def child_main(
    settings: dict[str, Any],
    work: Callable[[bytes, MailLimits], list[Any]] = parse_within_limits,
) -> None:
    """The child's life: read a mail from stdin, answer on stdout, until end of input."""
    limits = MailLimits(**settings["limits"])
    cpu_limit = float(settings["cpu_limit"])
    use_boundary_matcher()  # a process that only parses: no regex compiled per boundary
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
        head = source.read(_HEADER_BYTES + 1)
        if len(head) < _HEADER_BYTES + 1:
            return  # the parent closed our stdin (or died)
        size = int.from_bytes(head[:_HEADER_BYTES], "big")
        raw = source.read(size)
        if len(raw) < size:
            return
        started = time.process_time()
        ceiling = math.ceil(started + cpu_limit) + HARD_CPU_MARGIN
        if hard == resource.RLIM_INFINITY or ceiling < hard:
            resource.setrlimit(resource.RLIMIT_CPU, (ceiling, hard))
        answer: list[Any]
        armed[0] = True
        signal.setitimer(signal.ITIMER_PROF, cpu_limit, TIMER_REPEAT)
        try:
            answer = work(raw, limits) if head[-1:] == _PARSE else verify_within_limits(raw)
            armed[0] = False
        except _OverCpuLimit:
            answer = ["cpu", time.process_time() - started]
        except Exception:
            armed[0] = False
            answer = ["error", traceback.format_exc()]
        finally:
            armed[0] = False
            signal.setitimer(signal.ITIMER_PROF, 0)
        _write_frame(sink, answer)


#: the child's command line: the parent's sys.path (as multiprocessing's spawn does), then in
_BOOT = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "from gateways.email.parser_pool import child_main; child_main(json.loads(sys.argv[2]))"
)


# -- the parent: children seen from the event loop ----------------------------------------------


class _ChildLost(Exception):
    """A child's output is not a well-formed answer: it is out of step, and is replaced."""


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit status {code}"


@dataclass(eq=False)
class _Job:
    """One job on its way through the pool: a mail to parse, or signatures to check."""

    raw: bytes
    kind: bytes
    future: asyncio.Future[ParseOutcome]
    #: seconds it may wait in the queue (again after its parser was lost)
    wait: float
    queue_timer: asyncio.TimerHandle | None = None


class _Child:
    """One parser process: its pipes, the mails written to it and not answered yet, in order
    (the first is the one it parses), and the wall-clock timer of that first one."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.pid = process.pid
        self.pending: deque[_Job] = deque()
        self.deadline: asyncio.TimerHandle | None = None
        self.timed_out = False

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
            raise _ChildLost(f"answered {type(answer).__name__}, not a list")
        return answer

    def send(self, job: _Job) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        # one write: one system call for the length and the mail, and no wake-up at all while
        # the child still parses the mail before. aiosmtpd holds every mail in memory anyway,
        # so the transport may buffer what the pipe does not take at once.
        stdin.write(len(job.raw).to_bytes(_HEADER_BYTES, "big") + job.kind + job.raw)
        self.pending.append(job)

    async def exit_status(self) -> str:
        """How the process ended; waits for it a little (its pipes close just before)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.process.wait(), CLOSE_TIMEOUT)
        return _describe_exit(self.process.returncode)

    def kill(self) -> None:
        # os.kill, not Process.kill(): Popen.send_signal() polls first and so reaps a child
        # that just died, and asyncio's child watcher then reports exit status 255 instead of
        # the signal. A zombie ignores the signal; its pid is not reused until it is reaped.
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

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


#: mails written to one child at a time: the one it parses and the next, so that it never waits
#: for the parent between two mails (the wake-ups are what the pipes cost: issue 21's profile)
PIPELINE = 2


class ParserPool:
    """``processes`` parser children, a bounded queue of mails waiting for one, and their care.

    :meth:`start` once (raises :class:`ParserStartError`), :meth:`parse` per mail,
    :meth:`close` at the end. ``metrics`` counts in ``gateway_errors_total`` the kinds
    ``parser_died`` (a child ended unasked) and ``parser_timeout`` (a child killed after
    ``timeout``); the caller counts what it answers.

    Each child holds at most :data:`PIPELINE` mails; the rest wait in the pool's queue, in
    arrival order. When a child is lost, the mail it was parsing gets ``died`` / ``timeout``
    (``cpu`` for SIGXCPU) and the mails written behind it go back to the front of the queue.
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
        self._children: list[_Child] = []
        self._queue: deque[_Job] = deque()
        self._care: set[asyncio.Task[None]] = set()  # readers, losses and replacements
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
        """Close every child (end of input; killed after a while); mails still waiting get
        :class:`ParsersBusy`."""
        self._closing = True
        for task in self._care:
            task.cancel()
        children, self._children = self._children, []
        jobs = [*self._queue, *(job for child in children for job in child.pending)]
        self._queue.clear()
        for child in children:
            child.pending.clear()
            if child.deadline is not None:
                child.deadline.cancel()
        for job in jobs:
            self._fail(job, ParsersBusy("shutting down"))
        await asyncio.gather(*(child.close() for child in children), return_exceptions=True)
        await asyncio.gather(*self._care, return_exceptions=True)

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
        """Mails waiting for a parser."""
        return sum(not job.future.done() for job in self._queue)

    # -- parsing ---------------------------------------------------------------------------

    async def parse(self, raw: bytes, *, wait: float) -> ParseOutcome:
        """Parse ``raw`` in a child. Raises :class:`ParsersBusy` when the queue is full or no
        child took the mail within ``wait`` seconds. A caller that is cancelled (its SMTP client
        left) does not disturb the child: the answer is read and dropped."""
        return await self._submit(_PARSE, raw, wait)

    async def verify(self, request: SignatureRequest, *, wait: float) -> ParseOutcome:
        """Check a mail's DKIM and ARC signatures in a child (``verified``, or ``cpu`` /
        ``error`` / ``died`` / ``timeout`` as for a parse); :class:`ParsersBusy` as
        :meth:`parse`."""
        payload = msgpack.packb(request.as_list(), use_bin_type=True)
        return await self._submit(_VERIFY, payload, wait)

    async def _submit(self, kind: bytes, payload: bytes, wait: float) -> ParseOutcome:
        if self._closing:
            raise ParsersBusy("shutting down")
        job = _Job(payload, kind, asyncio.get_running_loop().create_future(), wait)
        child = None if self.queued else self._free_child()
        if child is not None:
            self._send(child, job)
        elif self.queued >= self.config.max_queued:
            raise ParsersBusy(
                f"{self.config.max_queued} mails already wait for a parser "
                "(email.parser.max_queued)"
            )
        else:
            self._enqueue(job)
        return await job.future

    def _free_child(self) -> _Child | None:
        """The child with the fewest mails, if one has room."""
        best: _Child | None = None
        for child in self._children:
            if len(child.pending) < PIPELINE and (
                best is None or len(child.pending) < len(best.pending)
            ):
                best = child
        return best

    def _send(self, child: _Child, job: _Job) -> None:
        if job.queue_timer is not None:
            job.queue_timer.cancel()
            job.queue_timer = None
        if not child.pending:
            self._arm(child)
        child.send(job)

    def _enqueue(self, job: _Job, *, front: bool = False) -> None:
        loop = asyncio.get_running_loop()
        job.queue_timer = loop.call_later(job.wait, self._waited_too_long, job)
        if front:
            self._queue.appendleft(job)
        else:
            self._queue.append(job)

    def _waited_too_long(self, job: _Job) -> None:
        with contextlib.suppress(ValueError):
            self._queue.remove(job)
        self._fail(job, ParsersBusy(f"no parser free within {job.wait:g} s"))

    def _pump(self) -> None:
        """Hand queued mails to children with room, in arrival order."""
        while self._queue:
            child = self._free_child()
            if child is None:
                return
            job = self._queue.popleft()
            if job.future.done():  # its caller left
                if job.queue_timer is not None:
                    job.queue_timer.cancel()
                continue
            self._send(child, job)

    @staticmethod
    def _fail(job: _Job, error: Exception) -> None:
        if job.queue_timer is not None:
            job.queue_timer.cancel()
        if not job.future.done():
            job.future.set_exception(error)

    @staticmethod
    def _answer(job: _Job, outcome: ParseOutcome) -> None:
        if not job.future.done():
            job.future.set_result(outcome)

    # -- answers ---------------------------------------------------------------------------

    def _arm(self, child: _Child) -> None:
        """Start the wall-clock timer of the mail the child parses now."""
        if child.deadline is not None:
            child.deadline.cancel()
        loop = asyncio.get_running_loop()
        child.deadline = loop.call_later(self.config.timeout, self._hung, child)

    def _hung(self, child: _Child) -> None:
        child.timed_out = True
        child.kill()  # its reader sees the end of the output: _lost does the rest

    async def _read(self, child: _Child) -> None:
        try:
            while True:
                answer = await child.read_answer()
                if not child.pending:
                    raise _ChildLost("answered a mail it was never given")
                job = child.pending.popleft()
                if child.deadline is not None:
                    child.deadline.cancel()
                    child.deadline = None
                if child.pending:
                    self._arm(child)
                self._answer(job, self._outcome(answer))
                self._pump()
        except Exception as exc:  # end of output, or bytes that are no answer
            self._care_for(self._lost(child, exc))

    @staticmethod
    def _outcome(answer: list[Any]) -> ParseOutcome:
        kind = answer[0]
        if kind in ("parsed", "verified"):
            return ParseOutcome(kind, keys=answer[1])
        if kind == "limit":
            return ParseOutcome("limit", limit=LimitExceeded(*answer[1:4]))
        if kind == "cpu":
            used = float(answer[1]) if len(answer) > 1 else math.nan
            return ParseOutcome("cpu", detail=f"stopped after {used:.1f} s of CPU")
        return ParseOutcome("error", detail=str(answer[1]) if len(answer) > 1 else "")

    async def _lost(self, child: _Child, error: Exception) -> None:
        """The child's output ended (it died or was killed) or went out of step: blame the mail
        it was parsing, queue the ones behind it again, start another child."""
        if self._closing or child not in self._children:
            return
        self._children.remove(child)
        if child.deadline is not None:
            child.deadline.cancel()
        blamed = child.pending.popleft() if child.pending else None
        behind, child.pending = list(child.pending), deque()
        for job in reversed(behind):
            if not job.future.done():
                self._enqueue(job, front=True)
        self._care_for(self._respawn())
        self._pump()
        if child.alive:
            child.kill()
        status = await child.exit_status()
        if isinstance(error, _ChildLost):
            status = f"{status} after a garbled answer ({error})"
        if blamed is None:
            self._count("parser_died")
            log.warning(
                "%s: parser process %d ended while idle (%s); starting another",
                self.name,
                child.pid,
                status,
            )
        elif child.timed_out:
            self._count("parser_timeout")
            detail = (
                f"parser process {child.pid} did not answer within {self.config.timeout:g} s "
                "(email.parser.timeout); killed"
            )
            self._answer(blamed, ParseOutcome("timeout", detail=detail))
        elif child.process.returncode == -signal.SIGXCPU:
            self._answer(blamed, ParseOutcome("cpu", detail=f"parser process {child.pid} {status}"))
        else:
            self._count("parser_died")
            self._answer(
                blamed, ParseOutcome("died", detail=f"parser process {child.pid} {status}")
            )

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
        self._children.append(child)
        self._care_for(self._read(child))
        self._pump()

    def _care_for(self, work: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(work)
        self._care.add(task)
        task.add_done_callback(self._care.discard)

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


def _boot_with(work: str) -> str:
    module, _, function = work.partition(":")
    return (
        "import importlib, json, sys; sys.path[:] = json.loads(sys.argv[1]); "
        "from gateways.email.parser_pool import child_main; "
        f"work = getattr(importlib.import_module({module!r}), {function!r}); "
        "child_main(json.loads(sys.argv[2]), work)"
    )
