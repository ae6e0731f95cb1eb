"""Ports, binaries, the one-process harness (:class:`Server`) and last-resort cleanup."""

from __future__ import annotations

import atexit
import collections
import contextlib
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

HOST = "127.0.0.1"
"""The loopback address every helper binds to."""

OUTPUT_LINES = 200
"""How many output lines a server keeps for error messages."""

#: generous: a loaded CI machine may be slow, and nothing here measures speed
WAIT = 30.0

_QUEUE_LIMIT = 10_000
_STOP_TIMEOUT = 10.0
_KILL_TIMEOUT = 5.0


# --------------------------------------------------------------------------------------------
# Ports, binaries, errors


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago.

    The sockets are held open together, so the ports are guaranteed to differ from each other.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((HOST, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


class ServiceMissing(Exception):
    """A binary or feature a test needs is not available here; ``str()`` is the reason."""


class ServerError(RuntimeError):
    """A server did not become ready, or exited; the message ends with its last output lines."""


INSTALL_HINT = (
    "`.ci/run` installs every service the tests use on Debian; the "
    '"Services the tests start" section of docs/development.md lists the packages'
)
"""Where a skip message sends the reader."""


def _swaks_has_tls(path: str) -> str | None:
    # swaks only *recommends* libnet-ssleay-perl: without it the binary runs but every
    # STARTTLS/AUTH test fails with "TLS not available: requires Net::SSLeay" (issue 6)
    try:
        done = subprocess.run(
            [path, "--support"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"'swaks --support' failed: {exc}"
    output = done.stdout + done.stderr
    if "TLS supported" in output:
        return None
    line = next((x for x in output.splitlines() if "TLS" in x), "no TLS line in its output")
    return f"swaks cannot do TLS ({line.strip(' *=')}): install libnet-ssleay-perl"


#: binaries whose mere presence is not enough: a check returning the missing capability
_CAPABILITIES: dict[str, Callable[[str], str | None]] = {"swaks": _swaks_has_tls}
_checked: dict[str, str | None] = {}


def require_binary(name: str) -> str:
    """Return the full path of the executable ``name``, or raise :class:`ServiceMissing`.

    Some binaries are also checked for the capability the tests use (``swaks`` must support
    TLS), so a half-installed tool is reported like a missing one.
    """
    path = shutil.which(name)
    if path is None:
        raise ServiceMissing(f"{name!r} is not installed (not found on PATH); {INSTALL_HINT}")
    check = _CAPABILITIES.get(name)
    if check is not None:
        if path not in _checked:
            _checked[path] = check(path)
        problem = _checked[path]
        if problem is not None:
            raise ServiceMissing(f"{problem}; {INSTALL_HINT}")
    return path


# --------------------------------------------------------------------------------------------
# Last-resort cleanup


_live_lock = threading.Lock()
_live_servers: set[Server] = set()
_live_dirs: set[str] = set()


def _cleanup_at_exit() -> None:
    """Kill every server still running and remove every directory still registered."""
    with _live_lock:
        servers = list(_live_servers)
        dirs = list(_live_dirs)
    for server in servers:
        with contextlib.suppress(Exception):
            server.kill()
    for path in dirs:
        shutil.rmtree(path, ignore_errors=True)


atexit.register(_cleanup_at_exit)


def _make_tmpdir(prefix: str) -> Path:
    path = tempfile.mkdtemp(prefix=prefix)
    with _live_lock:
        _live_dirs.add(path)
    return Path(path)


def _remove_tmpdir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    with _live_lock:
        _live_dirs.discard(str(path))


# --------------------------------------------------------------------------------------------
# One process


class Server:
    """One child process whose output (stdout and stderr merged) is read line by line.

    A daemon thread drains the pipe (a full pipe would freeze the server) into a queue read by
    :meth:`wait_for`, and into :attr:`output`, the last ``OUTPUT_LINES`` lines, which are
    appended to every error message. Pass the same ``output`` deque to successive processes to
    keep one history across restarts.

    The constructor returns once a line containing ``ready`` was printed (immediately when
    ``ready`` is None). If that does not happen within ``timeout`` seconds, or the process exits
    first, the process is killed and :class:`ServerError` is raised.
    """

    def __init__(
        self,
        argv: Sequence[str],
        ready: str | None = None,
        timeout: float = 15.0,
        *,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        output: collections.deque[str] | None = None,
        name: str | None = None,
    ) -> None:
        self.argv = list(argv)
        self.name = name or os.path.basename(self.argv[0])
        self.output: collections.deque[str] = (
            output if output is not None else collections.deque(maxlen=OUTPUT_LINES)
        )
        self.lines: queue.Queue[str | None] = queue.Queue(maxsize=_QUEUE_LIMIT)
        self._output_lock = threading.Lock()
        self._eof = threading.Event()
        self.proc: subprocess.Popen[str] = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            start_new_session=True,  # a Ctrl-C in the terminal does not reach it; we stop it
        )
        with _live_lock:
            _live_servers.add(self)
        self._reader = threading.Thread(
            target=self._drain, name=f"{self.name}-{self.proc.pid}-output", daemon=True
        )
        self._reader.start()
        if ready is not None:
            try:
                self.wait_for(ready, timeout)
            except BaseException:
                self.stop(signal.SIGKILL)
                raise

    def __repr__(self) -> str:
        return f"<Server {self.name} pid={self.pid} returncode={self.proc.returncode}>"

    @property
    def pid(self) -> int:
        """The process ID."""
        return self.proc.pid

    @property
    def alive(self) -> bool:
        """True while the process has not exited."""
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status (negative signal number if killed by a signal), None while running."""
        return self.proc.poll()

    def _put(self, item: str | None) -> None:
        while True:
            try:
                self.lines.put_nowait(item)
                return
            except queue.Full:  # nobody is reading: drop the oldest line, never block the pipe
                with contextlib.suppress(queue.Empty):
                    self.lines.get_nowait()

    def _drain(self) -> None:
        stream = self.proc.stdout
        try:
            if stream is not None:
                for line in stream:
                    line = line.rstrip("\r\n")
                    with self._output_lock:
                        self.output.append(line)
                    self._put(line)
        except (OSError, ValueError):  # the pipe was closed under us by stop()
            pass
        finally:
            self._eof.set()
            self._put(None)

    def tail(self, count: int = OUTPUT_LINES) -> str:
        """The last ``count`` output lines, joined with newlines."""
        with self._output_lock:
            lines = list(self.output)
        return "\n".join(lines[-count:])

    def error(self, message: str) -> ServerError:
        """Build a :class:`ServerError` for ``message`` with the recent output appended."""
        text = self.tail()
        detail = f"\n--- last output of {self.name} (pid {self.pid}) ---\n{text}" if text else ""
        return ServerError(f"{self.name}: {message}{detail}")

    def drain(self) -> list[str]:
        """Remove and return the lines not yet consumed by :meth:`wait_for`, without waiting.

        Call it before provoking a line you then wait for, so an older one cannot match.
        """
        lines: list[str] = []
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return lines
            if line is None:
                self._put(None)  # keep the end marker for the next reader
                return lines
            lines.append(line)

    def wait_for(self, needle: str | tuple[str, ...], timeout: float = 15.0) -> str:
        """Consume output lines until one contains ``needle`` (or, given a tuple, any of
        them) and return it.

        Raises :class:`ServerError` if the process exits first, and :class:`TimeoutError` if
        no such line arrives within ``timeout`` seconds.
        """
        needles = (needle,) if isinstance(needle, str) else needle
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self.lines.get(timeout=max(0.001, remaining))
            except queue.Empty:
                err = self.error(f"no line containing {needle!r} within {timeout:g} s")
                raise TimeoutError(str(err)) from None
            if line is None:
                self._put(None)
                try:
                    code = self.proc.wait(timeout=_KILL_TIMEOUT)
                except subprocess.TimeoutExpired:
                    code = None
                raise self.error(f"exited with status {code} before printing {needle!r}")
            if any(one in line for one in needles):
                return line

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the process if it is still running."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = _STOP_TIMEOUT) -> int:
        """Send ``sig`` and wait for the exit; SIGKILL if it takes over ``timeout`` seconds.

        Returns the exit status (negative signal number when killed by a signal). Idempotent.
        """
        self.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # a hung stop is a bug to find: keep what the process said last next to the failure
            print(
                f"{self.name}: no exit {timeout:.0f} s after signal {sig}; SIGKILL. Last output:\n"
                f"{self.tail()}",
                file=sys.stderr,
            )
            self.send_signal(signal.SIGKILL)
            try:
                code = self.proc.wait(timeout=_KILL_TIMEOUT)
            except subprocess.TimeoutExpired:
                raise self.error("did not exit after SIGKILL") from None
        with _live_lock:
            _live_servers.discard(self)
        # A grandchild may still hold the pipe open: read what is there, do not wait for it.
        self._reader.join(timeout=1.0)
        if not self._reader.is_alive() and self.proc.stdout is not None:
            self.proc.stdout.close()  # else a ResourceWarning when the Popen is collected
        return code

    def kill(self) -> int:
        """SIGKILL the process (the crash case) and return its exit status. Idempotent."""
        return self.stop(signal.SIGKILL)

    def wait(self, timeout: float = _STOP_TIMEOUT) -> int:
        """Wait for the process to exit by itself; its exit status, with all its output read.

        ``subprocess.TimeoutExpired`` if it is still running after ``timeout`` seconds.
        """
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=timeout)  # the last lines are in :attr:`output` after this
        return code


# --------------------------------------------------------------------------------------------
# A process that is started, stopped and restarted


class ManagedProcess:
    """What a restartable helper process shares: :attr:`server` (the current :class:`Server`,
    None before the first start) and :attr:`output`, its last lines across restarts.

    Subclasses (the services, :class:`~core.testing.DjangoWorker`,
    :class:`~core.testing.GatewayProcess`) implement :meth:`start` and :meth:`stop`; a ``with``
    block starts and stops them.
    """

    def __init__(self, output_lines: int = OUTPUT_LINES) -> None:
        self.output: collections.deque[str] = collections.deque(maxlen=output_lines)
        self.server: Server | None = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> int | None:
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.server is not None and self.server.alive

    @property
    def pid(self) -> int | None:
        """The PID of the current process, None before the first start."""
        return self.server.pid if self.server is not None else None

    @property
    def returncode(self) -> int | None:
        """The exit status of the last process, None while running or before the first start."""
        return self.server.returncode if self.server is not None else None

    def tail(self, count: int = OUTPUT_LINES) -> str:
        """The last ``count`` output lines, across restarts."""
        return "\n".join(list(self.output)[-count:])

    def wait_for(self, needle: str | tuple[str, ...], timeout: float = 15.0) -> str:
        """Wait for an output line of the running process containing ``needle`` (or any of a
        tuple of them; blocking)."""
        if self.server is None:
            raise RuntimeError(f"{type(self).__name__} was never started")
        return self.server.wait_for(needle, timeout)

    def kill(self) -> int | None:
        """SIGKILL (the crash case); the exit status (None if never started). Idempotent."""
        return self.server.kill() if self.server is not None else None

    def wait(self, timeout: float = _STOP_TIMEOUT) -> int | None:
        """Wait for an exit the process makes by itself (see :meth:`Server.wait`)."""
        return self.server.wait(timeout) if self.server is not None else None
