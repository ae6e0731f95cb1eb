"""Helpers that start real servers for integration tests and benchmarks.

Every server runs in the foreground on free loopback ports, keeps its state in a fresh temporary
directory, and is stopped by PID. The recipes (arguments, config files, ready lines) are the
tested ones the README's "Services the tests start" section lists (``.ci/run`` installs them).

Life cycle shared by every service class (:class:`RedisServer`, :class:`MosquittoServer`,
:class:`NgircdServer`):

* ``start()`` starts the process (creating the temporary directory on first use) and returns once
  the server printed its ready line.
* ``kill()`` sends SIGKILL (the crash case) and ``terminate()`` sends SIGTERM (a clean shutdown);
  both keep the directory and the ports, so ``restart()`` or ``start()`` brings the same server
  back with its data.
* ``restart()`` stops the process if it is running (SIGTERM, or SIGKILL with ``kill=True``) and
  starts it again on the same ports in the same directory.
* ``stop()`` is final: SIGTERM (SIGKILL after a timeout), then the directory is removed. It is
  idempotent and never hangs.

Processes and directories that are still alive when the interpreter exits are killed and removed
by an :mod:`atexit` handler, so an interrupted test run leaves no orphans behind.

Nothing here imports pytest: the fixtures live in ``tests/conftest.py``.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import os
import queue
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = [
    "Certs",
    "DjangoWorker",
    "MosquittoServer",
    "NgircdServer",
    "RedisServer",
    "Server",
    "ServerError",
    "ServiceMissing",
    "SmtpSink",
    "free_port",
    "free_ports",
    "make_certs",
    "require_binary",
]

HOST = "127.0.0.1"
"""The loopback address every helper binds to."""

OUTPUT_LINES = 200
"""How many output lines a server keeps for error messages."""

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
    "`.ci/run` installs every service the tests use on Debian; the README's "
    '"Services the tests start" section lists the packages'
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

    def wait_for(self, needle: str, timeout: float = 15.0) -> str:
        """Consume output lines until one contains ``needle`` and return it.

        Raises :class:`ServerError` if the process exits first, and :class:`TimeoutError` if
        no such line arrives within ``timeout`` seconds.
        """
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
            if needle in line:
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


# --------------------------------------------------------------------------------------------
# Certificates


@dataclasses.dataclass(frozen=True)
class Certs:
    """PEM files of a throwaway CA, a server certificate and a client certificate.

    The server certificate is valid for ``localhost`` and ``127.0.0.1``; the client
    certificate (common name ``client``) is signed by the same CA, for mutual TLS.
    """

    dir: Path
    ca_crt: Path
    ca_key: Path
    server_crt: Path
    server_key: Path
    client_crt: Path
    client_key: Path

    def client_context(self, *, client_cert: bool = False) -> ssl.SSLContext:
        """An SSL context trusting this CA, presenting the client certificate if asked."""
        context = ssl.create_default_context(cafile=str(self.ca_crt))
        if client_cert:
            context.load_cert_chain(str(self.client_crt), str(self.client_key))
        return context

    def server_context(self, *, require_client_cert: bool = False) -> ssl.SSLContext:
        """An SSL context serving the server certificate (for servers written in Python)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca_crt))
        context.load_cert_chain(str(self.server_crt), str(self.server_key))
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
        return context


def make_certs(directory: str | os.PathLike[str]) -> Certs:
    """Write a CA, a server and a client certificate (ECDSA P-256) into ``directory``.

    File names: ``ca.crt ca.key server.crt server.key client.crt client.key``. Uses ``trustme``;
    raises :class:`ServiceMissing` if it is not installed.
    """
    try:
        import trustme
    except ImportError:
        raise ServiceMissing(
            "the 'trustme' package is not installed (pip install trustme)"
        ) from None
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="channels-gateways tests")
    server = ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
    client = ca.issue_cert("client.test.local", common_name="client")
    certs = Certs(
        dir=path,
        ca_crt=path / "ca.crt",
        ca_key=path / "ca.key",
        server_crt=path / "server.crt",
        server_key=path / "server.key",
        client_crt=path / "client.crt",
        client_key=path / "client.key",
    )
    ca.cert_pem.write_to_path(str(certs.ca_crt))
    ca.private_key_pem.write_to_path(str(certs.ca_key))
    server.cert_chain_pems[0].write_to_path(str(certs.server_crt))
    server.private_key_pem.write_to_path(str(certs.server_key))
    client.cert_chain_pems[0].write_to_path(str(certs.client_crt))
    client.private_key_pem.write_to_path(str(certs.client_key))
    for key in (certs.ca_key, certs.server_key, certs.client_key):
        key.chmod(0o600)
    return certs


# --------------------------------------------------------------------------------------------
# Services: one server with a directory, ports and a life cycle


class _Service:
    """Shared life cycle of the service classes; see the module docstring."""

    name = "service"
    binary = ""
    ready = ""
    port_count = 1

    def __init__(self, *, timeout: float = 15.0) -> None:
        self.timeout = timeout
        self.output: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES)
        self.server: Server | None = None
        self._tmpdir: Path | None = None
        self._ports = free_ports(self.port_count)

    def __repr__(self) -> str:
        state = "running" if self.alive else "stopped"
        return f"<{type(self).__name__} ports={self._ports} {state}>"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- to override -------------------------------------------------------------------------

    def _argv(self, path: str) -> list[str]:
        """The command line, given the full path of the binary."""
        raise NotImplementedError

    def _prepare(self) -> None:
        """Write config files etc. into :attr:`tmpdir` (called again if ports are re-picked)."""

    def _check_failure(self, error: ServerError) -> None:
        """Turn a start failure into :class:`ServiceMissing` when it means a missing feature."""

    # -- public ------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The address the server listens on: ``127.0.0.1``."""
        return HOST

    @property
    def port(self) -> int:
        """The main (plain) port; fixed from construction, kept across restarts."""
        return self._ports[0]

    @property
    def tmpdir(self) -> Path:
        """The state directory (exists from the first start until :meth:`stop`)."""
        if self._tmpdir is None:
            raise RuntimeError(f"{type(self).__name__} has no directory: call start() first")
        return self._tmpdir

    @property
    def alive(self) -> bool:
        """True while the server process runs."""
        return self.server is not None and self.server.alive

    @property
    def pid(self) -> int | None:
        """The PID of the current process, None before the first start."""
        return self.server.pid if self.server is not None else None

    def tail(self, count: int = OUTPUT_LINES) -> str:
        """The last ``count`` output lines, across restarts."""
        return "\n".join(list(self.output)[-count:])

    def start(self) -> Self:
        """Start the server (no-op if running) and wait for its ready line."""
        if self.alive:
            return self
        path = require_binary(self.binary)
        fresh = self._tmpdir is None
        if fresh:
            self._tmpdir = _make_tmpdir(f"cgw-{self.name}-")
            try:
                self._prepare()
            except BaseException:
                self._discard_tmpdir()
                raise
        attempts = 3 if fresh else 1
        for attempt in range(attempts):
            try:
                self.server = Server(
                    self._argv(path),
                    self.ready,
                    self.timeout,
                    cwd=self.tmpdir,
                    output=self.output,
                    name=self.name,
                )
                return self
            except ServerError as error:
                if fresh and "already in use" in str(error) and attempt + 1 < attempts:
                    self._ports = free_ports(self.port_count)  # lost a race for the port
                    self._prepare()
                    continue
                if fresh:
                    self._discard_tmpdir()
                self._check_failure(error)
                raise
        raise AssertionError("unreachable")

    def wait_for(self, needle: str, timeout: float = 15.0) -> str:
        """Wait for an output line of the running process containing ``needle``."""
        if self.server is None:
            raise RuntimeError(f"{type(self).__name__} was never started")
        return self.server.wait_for(needle, timeout)

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the running process."""
        if self.server is not None:
            self.server.send_signal(sig)

    def terminate(self) -> int | None:
        """SIGTERM (SIGKILL after a timeout), keeping directory and ports; the exit status."""
        return self.server.stop(signal.SIGTERM) if self.server is not None else None

    def kill(self) -> int | None:
        """SIGKILL (a crash), keeping directory and ports for :meth:`restart`; the exit status."""
        return self.server.kill() if self.server is not None else None

    def restart(self, *, kill: bool = False) -> Self:
        """Stop the process if running (SIGTERM, or SIGKILL if ``kill``), start it again.

        Same ports, same directory: persisted data survives.
        """
        if kill:
            self.kill()
        else:
            self.terminate()
        return self.start()

    def stop(self) -> int | None:
        """Stop for good: SIGTERM (SIGKILL after a timeout), then remove the directory.

        Idempotent; returns the exit status of the last process (None if never started). A later
        :meth:`start` begins afresh in a new directory.
        """
        try:
            return self.terminate()
        finally:
            self._discard_tmpdir()

    def _discard_tmpdir(self) -> None:
        if self._tmpdir is not None:
            _remove_tmpdir(self._tmpdir)
            self._tmpdir = None


class RedisServer(_Service):
    """``redis-server`` on a free port, state in a temporary directory, RDB snapshots off.

    With ``durable=True`` every write is appended and fsynced (``--appendonly yes
    --appendfsync always``), so data survives :meth:`kill` + :meth:`restart`. ``extra_args`` are
    appended to the command line (e.g. ``["--maxmemory", "10mb"]``).
    """

    name = "redis"
    binary = "redis-server"
    ready = "Ready to accept connections"

    def __init__(
        self, *, durable: bool = False, extra_args: Iterable[str] = (), timeout: float = 15.0
    ) -> None:
        super().__init__(timeout=timeout)
        self.durable = durable
        self.extra_args = list(extra_args)

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``, for channels_redis and redis-py."""
        return f"redis://{HOST}:{self.port}/0"

    def _argv(self, path: str) -> list[str]:
        argv = [path, "--port", str(self.port), "--bind", HOST, "--dir", str(self.tmpdir)]
        argv += ["--save", "", "--daemonize", "no", "--logfile", ""]
        if self.durable:
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            argv += ["--appendonly", "no"]
        return argv + self.extra_args


class MosquittoServer(_Service):
    """Mosquitto 2 broker with a plain listener on :attr:`port` and optional extras.

    * ``password=(user, secret)``: anonymous access off, a password file with that one user
      (applies to every listener).
    * ``tls=True``: a second listener on :attr:`tls_port` with certificates from
      :func:`make_certs` (see :attr:`certs`); ``require_client_cert=True`` makes it mutual TLS.
    * ``persistent=True``: ``mosquitto.db`` in the directory, written on SIGTERM and on
      :meth:`save_and_kill`.
    * ``websockets=True``: an MQTT-over-WebSocket listener on :attr:`ws_port`.
    * ``extra_config``: more lines appended to ``mosquitto.conf``.
    """

    name = "mosquitto"
    binary = "mosquitto"
    ready = " running"
    port_count = 3

    def __init__(
        self,
        *,
        password: tuple[str, str] | None = None,
        tls: bool = False,
        require_client_cert: bool = False,
        persistent: bool = False,
        websockets: bool = False,
        extra_config: Iterable[str] = (),
        timeout: float = 15.0,
    ) -> None:
        super().__init__(timeout=timeout)
        self.password = password
        self.tls = tls
        self.require_client_cert = require_client_cert
        self.persistent = persistent
        self.websockets = websockets
        self.extra_config = list(extra_config)
        self._certs: Certs | None = None

    @property
    def tls_port(self) -> int:
        """The TLS listener's port (only with ``tls=True``)."""
        if not self.tls:
            raise RuntimeError("this MosquittoServer was created without tls=True")
        return self._ports[1]

    @property
    def ws_port(self) -> int:
        """The WebSocket listener's port (only with ``websockets=True``)."""
        if not self.websockets:
            raise RuntimeError("this MosquittoServer was created without websockets=True")
        return self._ports[2]

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT`` for the plain listener."""
        return f"mqtt://{HOST}:{self.port}"

    @property
    def certs(self) -> Certs:
        """The certificates of the TLS listener (only with ``tls=True``, after start)."""
        if self._certs is None:
            raise RuntimeError("no certificates: create with tls=True and call start() first")
        return self._certs

    @property
    def config_path(self) -> Path:
        """``mosquitto.conf`` in the directory."""
        return self.tmpdir / "mosquitto.conf"

    @property
    def db_path(self) -> Path:
        """Where the persistence file is written (only meaningful with ``persistent=True``)."""
        return self.tmpdir / "mosquitto.db"

    def _argv(self, path: str) -> list[str]:
        return [path, "-c", str(self.config_path)]

    def _prepare(self) -> None:
        lines = []
        if os.geteuid() == 0:
            lines.append("user root")  # else it switches to 'mosquitto', locked out of tmpdir
        lines += ["log_dest stderr", f"listener {self.port} {HOST}"]
        if self.password is not None:
            passwd = self.tmpdir / "passwd"
            user, secret = self.password
            tool = require_binary("mosquitto_passwd")
            done = subprocess.run(
                [tool, "-c", "-b", str(passwd), user, secret],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if done.returncode != 0:
                raise ServerError(f"mosquitto_passwd failed ({done.returncode}): {done.stderr}")
            lines += ["allow_anonymous false", f"password_file {passwd}"]
        else:
            lines.append("allow_anonymous true")
        if self.persistent:
            lines += ["persistence true", f"persistence_location {self.tmpdir}/"]
        else:
            lines.append("persistence false")
        if self.tls:
            if self._certs is None:
                self._certs = make_certs(self.tmpdir / "certs")
            lines += [
                f"listener {self.tls_port} {HOST}",
                f"cafile {self._certs.ca_crt}",
                f"certfile {self._certs.server_crt}",
                f"keyfile {self._certs.server_key}",
            ]
            if self.require_client_cert:
                lines.append("require_certificate true")
        if self.websockets:
            lines += [f"listener {self.ws_port} {HOST}", "protocol websockets"]
        lines += self.extra_config
        self.config_path.write_text("\n".join(lines) + "\n")

    _NO_WEBSOCKETS = "websockets support not available"

    def _check_failure(self, error: ServerError) -> None:
        if self.websockets and self._NO_WEBSOCKETS in str(error).lower():
            raise ServiceMissing(
                "this mosquitto build has no WebSocket support (built without libwebsockets)"
            ) from error

    def start(self) -> Self:
        """Start the broker (no-op if running) and wait for ``... running``.

        Raises :class:`ServiceMissing` if ``websockets=True`` and this mosquitto build cannot
        serve MQTT over WebSockets.
        """
        if self._tmpdir is None:
            self._certs = None
        super().start()
        if self.websockets and self._NO_WEBSOCKETS in self.tail().lower():
            self.stop()  # older builds only warn, and open a plain MQTT listener instead
            raise ServiceMissing(
                "this mosquitto build has no WebSocket support (built without libwebsockets)"
            )
        return self

    def save_and_kill(self, timeout: float = 10.0) -> int | None:
        """Crash with a known state: save the database (SIGUSR1), then SIGKILL.

        Waits for ``Saving in-memory database`` and for ``mosquitto.db`` to be replaced (it is
        written aside and renamed a few ms later), so everything the broker held before this
        call is on disk. Requires ``persistent=True``. Returns the exit status.
        """
        if not self.persistent:
            raise RuntimeError("save_and_kill() needs MosquittoServer(persistent=True)")
        if self.server is None or not self.server.alive:
            raise RuntimeError("the broker is not running")
        before = _inode(self.db_path)
        self.server.drain()
        self.server.send_signal(signal.SIGUSR1)
        self.server.wait_for("Saving in-memory database", timeout)
        deadline = time.monotonic() + timeout
        while (after := _inode(self.db_path)) is None or after == before:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    str(self.server.error(f"{self.db_path} was not rewritten within {timeout} s"))
                )
            time.sleep(0.002)
        return self.kill()


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


# The fixed RFC 7919 ffdhe2048 group (``openssl genpkey -genparam -algorithm DH -pkeyopt
# dh_param:ffdhe2048``). Without a DHFile, GnuTLS generates parameters at every start (up to 2 s).
_FFDHE2048_PEM = """\
-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


class NgircdServer(_Service):
    """ngircd (server name ``irc.test.local``) on :attr:`port`, plus :attr:`tls_port` if ``tls``.

    Connection, join and nick-length limits are lifted. Flood control is off
    (``MaxPenaltyTime = 0``) unless ``flood_control=True``, which keeps ngircd's defaults
    (3 commands, then a 1 s penalty each; the sender stalls on TCP backpressure).
    """

    name = "ngircd"
    binary = "ngircd"
    ready = "ready."
    port_count = 2
    server_name = "irc.test.local"

    def __init__(
        self,
        *,
        tls: bool = False,
        flood_control: bool = False,
        extra_config: Iterable[str] = (),
        timeout: float = 15.0,
    ) -> None:
        super().__init__(timeout=timeout)
        self.tls = tls
        self.flood_control = flood_control
        self.extra_config = list(extra_config)
        self._certs: Certs | None = None

    @property
    def tls_port(self) -> int:
        """The TLS port (only with ``tls=True``)."""
        if not self.tls:
            raise RuntimeError("this NgircdServer was created without tls=True")
        return self._ports[1]

    @property
    def certs(self) -> Certs:
        """The certificates of the TLS port (only with ``tls=True``, after start)."""
        if self._certs is None:
            raise RuntimeError("no certificates: create with tls=True and call start() first")
        return self._certs

    @property
    def config_path(self) -> Path:
        """``ngircd.conf`` in the directory."""
        return self.tmpdir / "ngircd.conf"

    def _argv(self, path: str) -> list[str]:
        return [path, "-n", "-f", str(self.config_path)]

    def _prepare(self) -> None:
        # No PidFile on purpose: as root ngircd drops to 'nobody' and cannot write in tmpdir.
        lines = [
            "[Global]",
            f"Name = {self.server_name}",
            "Info = test server",
            f"Listen = {HOST}",
            f"Ports = {self.port}",
            "MotdPhrase = test server",
            "[Limits]",
            "MaxConnectionsIP = 0",
            "MaxJoins = 0",
            "MaxNickLength = 30",
        ]
        if not self.flood_control:
            lines.append("MaxPenaltyTime = 0")
        lines += ["[Options]", "DNS = no", "Ident = no", "PAM = no"]
        if self.tls:
            if self._certs is None:
                self._certs = make_certs(self.tmpdir / "certs")
            dh = self.tmpdir / "dh.pem"
            dh.write_text(_FFDHE2048_PEM)
            lines += [
                "[SSL]",
                f"CertFile = {self._certs.server_crt}",
                f"KeyFile = {self._certs.server_key}",
                f"DHFile = {dh}",
                f"Ports = {self.tls_port}",
            ]
        lines += self.extra_config
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self) -> Self:
        """Start ngircd (no-op if running) and wait for its ``ready.`` line."""
        if self._tmpdir is None:
            self._certs = None
        return super().start()


# --------------------------------------------------------------------------------------------
# Django worker


class DjangoWorker:
    """``python manage.py runworker CHANNEL…`` in ``project_dir``, as a managed child process.

    ``env`` is merged over :data:`os.environ` (``PYTHONUNBUFFERED=1`` is added so log lines arrive
    promptly). Output goes into :attr:`output` like a :class:`Server`'s. There is no ready line:
    :meth:`start` returns right after the spawn; use :meth:`wait_ready` with a probe (e.g. a
    round trip through the layer) or :meth:`wait_for` on a log line.
    """

    def __init__(
        self,
        project_dir: str | os.PathLike[str],
        channels: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        python: str = sys.executable,
        extra_args: Iterable[str] = (),
    ) -> None:
        self.project_dir = Path(project_dir)
        self.channels = list(channels)
        self.env = dict(env or {})
        self.python = python
        self.extra_args = list(extra_args)
        self.output: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES)
        self.server: Server | None = None

    def __repr__(self) -> str:
        return f"<DjangoWorker {self.channels} pid={self.pid} alive={self.alive}>"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def argv(self) -> list[str]:
        """The command line."""
        return [self.python, "manage.py", "runworker", *self.channels, *self.extra_args]

    @property
    def alive(self) -> bool:
        """True while the worker process runs."""
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

    def start(self) -> Self:
        """Spawn the worker (no-op if running); returns at once."""
        if self.alive:
            return self
        if not (self.project_dir / "manage.py").is_file():
            raise FileNotFoundError(f"no manage.py in {self.project_dir}")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.server = Server(
            self.argv, None, cwd=self.project_dir, env=env, output=self.output, name="runworker"
        )
        return self

    def wait_ready(
        self, probe: Callable[[], bool], timeout: float = 15.0, interval: float = 0.05
    ) -> None:
        """Call ``probe`` until it returns True; raise if the worker exits or time runs out.

        Exceptions from ``probe`` count as "not yet"; the last one is chained on timeout.
        """
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            if self.server is None:
                raise RuntimeError("DjangoWorker was never started")
            if not self.server.alive:
                raise self.server.error(f"exited with status {self.server.returncode}")
            try:
                if probe():
                    return
            except Exception as exc:  # any failure means "not ready yet"
                last = exc
            if time.monotonic() > deadline:
                err = self.server.error(f"not ready within {timeout:g} s")
                raise TimeoutError(str(err)) from last
            time.sleep(interval)

    def wait_for(self, needle: str, timeout: float = 15.0) -> str:
        """Wait for an output line containing ``needle`` (see :meth:`Server.wait_for`)."""
        if self.server is None:
            raise RuntimeError("DjangoWorker was never started")
        return self.server.wait_for(needle, timeout)

    def stop(self, timeout: float = _STOP_TIMEOUT) -> int | None:
        """SIGTERM, SIGKILL after ``timeout`` s; the exit status. Idempotent."""
        return self.server.stop(signal.SIGTERM, timeout) if self.server is not None else None

    def kill(self) -> int | None:
        """SIGKILL the worker; the exit status. Idempotent."""
        return self.server.kill() if self.server is not None else None

    def restart(self, *, kill: bool = False) -> Self:
        """Stop (SIGTERM, or SIGKILL if ``kill``) and spawn again."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start()


# --------------------------------------------------------------------------------------------
# SMTP sink


class SmtpSink:
    """An aiosmtpd server on the running event loop that collects what it is sent.

    Stands in for the outbound relay in tests and benchmarks. ``replies`` is a list of SMTP
    answers to give to the next DATA commands before accepting (``["451 4.3.0 busy"]`` makes the
    first delivery fail temporarily).
    """

    def __init__(self, replies: Sequence[str] = ()) -> None:
        import asyncio

        self.replies = list(replies)
        self.received: asyncio.Queue[object] = asyncio.Queue()
        self.attempts = 0
        self._server: asyncio.Server | None = None

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        self.attempts += 1
        if self.replies:
            return self.replies.pop(0)
        await self.received.put(envelope)
        return "250 OK"

    async def start(self) -> SmtpSink:
        import asyncio

        from aiosmtpd.smtp import SMTP

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: SMTP(self), HOST, 0)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


# ============================================================================================
# Shared test helpers for every gateway (issue 8). Kept at the end of this module, in one
# section, until core/testing becomes a package; everything below is async-aware and may import
# core (the service classes above do not).
#
#   ManualClock       a core.clock.Clock that moves only when the test says so
#   until()           wait for a condition, bounded (for state nothing signals)
#   metric()          the value of a Prometheus series in this process (summed over labels)
#   command()         send a command with a fresh result channel; its <proto>.result
#   run_gateway()     run a Gateway in this process until the block ends; wait for readiness
#   GatewayProcess    python -m gateways.<proto>.cli as a child process with a health port
#   InspircdServer    InspIRCd 3 linked with Atheme services: an IRC server with SASL PLAIN

import asyncio  # noqa: E402
import heapq  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from collections.abc import AsyncIterator  # noqa: E402
from typing import Any  # noqa: E402

import yaml  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from core.metrics import REGISTRY  # noqa: E402
from core.service import Gateway  # noqa: E402
from core.types import ChannelLayer  # noqa: E402

__all__ += [
    "WAIT",
    "GatewayProcess",
    "InspircdServer",
    "ManualClock",
    "command",
    "metric",
    "metric_from_text",
    "run_gateway",
    "until",
]

#: generous: a loaded CI machine may be slow, and nothing here measures speed
WAIT = 30.0


class ManualClock:
    """A :class:`core.clock.Clock` for tests: time stands still until :meth:`advance`.

    ``sleep()`` parks the caller until the clock is advanced past its deadline;
    :meth:`advance` wakes sleepers in deadline order and lets each run to its next ``await``.
    :meth:`sleeping` waits until ``count`` callers sleep, to synchronise with the code under
    test without a real delay.
    """

    def __init__(self, monotonic: float = 0.0, wall: float = 1_700_000_000.0) -> None:

        self._now = monotonic
        self._wall_offset = wall - monotonic
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = 0
        self._changed = asyncio.Event()

    def monotonic(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    @property
    def sleepers(self) -> int:
        """Callers parked in :meth:`sleep` now."""
        return sum(1 for _, _, future in self._sleepers if not future.done())

    async def sleep(self, seconds: float) -> None:
        import heapq

        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._seq += 1
        heapq.heappush(self._sleepers, (self._now + seconds, self._seq, future))
        self._changed.set()
        await future

    async def sleeping(self, count: int, timeout: float = WAIT) -> None:
        """Return once at least ``count`` callers sleep on this clock."""

        async def wait() -> None:
            while self.sleepers < count:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, waking every sleeper whose deadline passed."""

        target = self._now + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            when, _, future = heapq.heappop(self._sleepers)
            self._now = max(self._now, when)
            if not future.done():
                future.set_result(None)
                await _settle()
        self._now = target
        await _settle()


async def _settle(rounds: int = 10) -> None:
    """Let tasks that were just woken run up to their next real wait."""

    for _ in range(rounds):
        await asyncio.sleep(0)


async def until(
    predicate: Callable[[], object], timeout: float = WAIT, what: str = "", interval: float = 0.02
) -> object:
    """Poll ``predicate`` until it returns something truthy and return that (bounded).

    For state that nothing signals (a metric, a file, an HTTP probe); prefer awaiting an event
    or a message where there is one. ``TimeoutError`` names ``what``.
    """

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (result := predicate()):
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        await asyncio.sleep(interval)
    return result


def _matching_sum(
    samples: Iterable[tuple[str, Mapping[str, str], float]], name: str, **labels: str
) -> float:
    total = 0.0
    for sample_name, sample_labels, value in samples:
        if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items()):
            total += value
    return total


def metric(name: str, **labels: str) -> float:
    """The sum of this process's samples of ``name`` carrying ``labels`` (0 when none).

    ``metric("gateway_dropped_total", gateway="sensors", reason="too_large")``.
    """

    samples = (
        (sample.name, sample.labels, sample.value)
        for family in REGISTRY.collect()
        for sample in family.samples
    )
    return _matching_sum(samples, name, **labels)


def metric_from_text(text: str, name: str, **labels: str) -> float:
    """Like :func:`metric`, over a /metrics page (Prometheus text format)."""

    samples = (
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    )
    return _matching_sum(samples, name, **labels)


async def command(
    layer: ChannelLayer, channel: str, message: Mapping[str, object], *, timeout: float = WAIT
) -> dict[str, object]:
    """Send ``message`` on ``channel`` with a fresh result channel; return the result message."""

    result_channel = await layer.new_channel("test-result.")
    await layer.send(channel, {"id": "test", **message, "result_channel": result_channel})
    return await asyncio.wait_for(layer.receive(result_channel), timeout)


@contextlib.asynccontextmanager
async def run_gateway(
    gateway: Gateway[Any], *, ready: bool = True, timeout: float = WAIT
) -> AsyncIterator[Gateway[Any]]:
    """Run ``gateway`` in this process for the block; stop it and await its exit afterwards.

    Start-up errors (``StartupError``) are raised here. With ``ready`` the block starts once
    ``/readyz`` would answer 200 (every :meth:`Gateway.ready_reasons` cleared).
    """

    task = asyncio.create_task(gateway.run())
    started = asyncio.create_task(gateway.started.wait())
    try:
        await asyncio.wait({task, started}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raises why it could not start
        if not gateway.started.is_set():
            raise TimeoutError(f"{gateway.name} did not start within {timeout:g} s")
        if ready:
            await until(lambda: not gateway.ready_reasons(), timeout, f"{gateway.name} ready")
        yield gateway
    finally:
        started.cancel()
        gateway.stop()
        await asyncio.wait_for(asyncio.gather(task, started, return_exceptions=True), timeout)
    task.result()  # run() must end cleanly after stop()


class GatewayProcess:
    """``python -m gateways.<proto>.cli --config FILE`` as a child process with a health port.

    Build it with :meth:`from_config` (writes the YAML with a free health port), then
    :meth:`start` (returns once the gateway logged ``ready: events``), :meth:`wait_ready`,
    :meth:`metric`, :meth:`stop` (SIGTERM, the exit status) or :meth:`kill`.
    """

    def __init__(
        self,
        path: Path,
        health_port: int,
        *,
        gateway: str,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.path = path
        self.health_port = health_port
        self.module = f"gateways.{gateway}.cli"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.cwd = cwd
        self.server: Server | None = None

    @classmethod
    def from_config(
        cls,
        directory: Path,
        config: Mapping[str, Any],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> GatewayProcess:
        """Write ``config`` plus ``health: {port}`` to a YAML file in ``directory``."""

        health_port = free_port()
        path = directory / f"{config['name']}-{health_port}.yaml"
        path.write_text(yaml.safe_dump({**config, "health": {"port": health_port}}))
        return cls(path, health_port, gateway=str(config["gateway"]), env=env, cwd=cwd)

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", self.module, "--config", str(self.path)]

    def start(self, timeout: float = WAIT) -> GatewayProcess:
        self.server = Server(
            self.argv, "ready: events", timeout, cwd=self.cwd, env=self.env, name="gateway"
        )
        return self

    def get(self, path: str) -> tuple[int, str]:
        """GET ``path`` on the health port: (status, body)."""

        url = f"http://{HOST}:{self.health_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    async def wait_ready(self, timeout: float = WAIT) -> None:
        """Wait until /readyz answers 200."""

        async def ready() -> bool:
            return (await asyncio.to_thread(self.get, "/readyz"))[0] == 200

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await ready():
            if loop.time() > deadline:
                raise TimeoutError(f"{self.path.name}: /readyz not 200 within {timeout:g} s")
            await asyncio.sleep(0.05)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the process's /metrics samples of ``name`` that carry ``labels``."""
        return metric_from_text(self.get("/metrics")[1], name, **labels)

    def stop(self) -> int | None:
        return self.server.stop() if self.server is not None else None

    def kill(self) -> int | None:
        return self.server.kill() if self.server is not None else None


_INSPIRCD_CONF = """\
<path configdir="{tmpdir}" datadir="{tmpdir}" logdir="{tmpdir}" runtimedir="{tmpdir}">
<server name="irc.test.local" description="test ircd" network="TestNet" id="001">
<admin name="test" nick="test" email="test@localhost">
<bind address="127.0.0.1" port="{port}" type="clients">
<bind address="127.0.0.1" port="{link_port}" type="servers">
<connect name="main" allow="*" timeout="20" pingfreq="120" hardsendq="1M" softsendq="1M"
         recvq="1M" threshold="10000" commandrate="1000000" fakelag="yes" localmax="1000"
         globalmax="1000" resolvehostnames="no" useident="no" limit="5000" maxchans="100">
<dns server="127.0.0.1" timeout="1">
<log method="file" type="* -USERINPUT -USEROUTPUT" level="default" target="{tmpdir}/inspircd.log">
<module name="cap"> <module name="sasl"> <module name="services_account">
<module name="spanningtree"> <module name="svshold"> <module name="chghost"> <module name="cban">
<link name="services.test.local" ipaddr="127.0.0.1" port="{link_port}" allowmask="127.0.0.0/8"
      sendpass="linkpass" recvpass="linkpass">
<uline server="services.test.local" silent="yes">
<sasl target="services.test.local" requiressl="no">
"""

_ATHEME_CONF = """\
loadmodule "modules/protocol/inspircd"; loadmodule "modules/backend/opensex";
loadmodule "modules/crypto/pbkdf2v2";
loadmodule "modules/nickserv/main"; loadmodule "modules/nickserv/register";
loadmodule "modules/nickserv/identify";
loadmodule "modules/saslserv/main"; loadmodule "modules/saslserv/plain";
serverinfo {
	name = "services.test.local"; desc = "Atheme IRC Services"; numeric = "00A";
	recontime = 1; netname = "TestNet"; hidehostsuffix = "users.test";
	adminname = "test"; adminemail = "test@localhost"; registeremail = "noreply@localhost";
	loglevel = { error; info; admin; network; };
	maxlogins = 100; maxusers = 0; mdlimit = 30; emaillimit = 10; emailtime = 300;
	auth = none; casemapping = rfc1459;
};
uplink "irc.test.local" {
	host = "127.0.0.1"; port = {link_port};
	send_password = "linkpass"; receive_password = "linkpass";
};
nickserv { nick = "NickServ"; user = "NickServ"; host = "services.test.local";
	real = "Nickname Services"; };
saslserv { nick = "SaslServ"; user = "SaslServ"; host = "services.test.local";
	real = "SASL Agent"; };
logfile "{tmpdir}/atheme.log" { error; info; admin; network; register; };
general { flood_msgs = 0; flood_time = 10; commit_interval = 1; language = "en"; };
"""


class IrcLines:
    """A minimal blocking IRC client for test set-up: send lines, wait for one, answer PINGs."""

    def __init__(self, port: int, timeout: float = WAIT) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.file = self.sock.makefile("r", encoding="utf-8", errors="replace", newline="\r\n")
        self.timeout = timeout

    def send(self, *lines: str) -> None:
        self.sock.sendall("".join(f"{line}\r\n" for line in lines).encode())

    def wait_for(self, *needles: str) -> str:
        """Read until a line contains one of ``needles``; return it."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            line = self.file.readline()
            if not line:
                raise ConnectionError("the IRC server closed the connection")
            line = line.rstrip("\r\n")
            if line.startswith("PING "):
                self.send("PONG " + line[5:])
            elif any(needle in line for needle in needles):
                return line
        raise TimeoutError(f"no line containing {needles!r} within {self.timeout:g} s")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.send("QUIT :bye")
        self.file.close()
        self.sock.close()


class InspircdServer(_Service):
    """InspIRCd 3 on :attr:`port` linked with Atheme services on :attr:`link_port`: SASL PLAIN.

    The recipe of ``shared/SERVICES.md`` §4. :meth:`start` returns once services are linked
    and ``CAP LS`` offers ``sasl``; if it never does, it raises :class:`ServiceMissing` (a skip
    locally, a failure under ``CI``), as it does when ``inspircd`` or ``atheme-services`` is
    not installed (Debian packages of those names). :meth:`register` creates an account.
    """

    name = "inspircd"
    binary = "inspircd"
    ready = "InspIRCd is now running as"
    port_count = 2
    server_name = "irc.test.local"

    def __init__(self, *, timeout: float = 15.0) -> None:
        super().__init__(timeout=timeout)
        self.services: Server | None = None
        self.services_output: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES)

    @property
    def link_port(self) -> int:
        """The server-link port Atheme connects to."""
        return self._ports[1]

    def _argv(self, path: str) -> list[str]:
        argv = [path, "--config", str(self.tmpdir / "inspircd.conf"), "--nofork", "--nopid"]
        if os.geteuid() == 0:
            argv.append("--runasroot")  # as root it refuses to start without it
        return argv

    def _prepare(self) -> None:
        # str.replace, not str.format: atheme.conf is full of braces
        for name, template in (("inspircd.conf", _INSPIRCD_CONF), ("atheme.conf", _ATHEME_CONF)):
            text = template.replace("{tmpdir}", str(self.tmpdir)).replace("{port}", str(self.port))
            (self.tmpdir / name).write_text(text.replace("{link_port}", str(self.link_port)))

    def start(self) -> Self:
        """Start InspIRCd, then Atheme; return once ``CAP LS`` offers SASL."""
        services = require_binary("atheme-services")
        super().start()
        if self.services is None or not self.services.alive:
            argv = [services, "-n", "-c", str(self.tmpdir / "atheme.conf"), "-D", str(self.tmpdir)]
            argv += ["-l", str(self.tmpdir / "atheme-main.log")]
            argv += ["-p", str(self.tmpdir / "atheme.pid")]
            self.services = Server(
                argv,
                "finished synching with uplink",
                self.timeout,
                cwd=self.tmpdir,
                output=self.services_output,
                name="atheme",
            )
        self._require_sasl()
        return self

    def _require_sasl(self) -> None:
        deadline = time.monotonic() + self.timeout
        caps = ""
        while time.monotonic() < deadline:
            client = IrcLines(self.port, self.timeout)
            try:
                client.send("CAP LS 302")
                caps = client.wait_for(" CAP * LS ")
            finally:
                client.close()
            if "sasl" in caps:
                return
            time.sleep(0.1)  # services are linked but not yet announced to the ircd
        raise ServiceMissing(f"InspIRCd with Atheme does not offer SASL (CAP LS: {caps!r})")

    def register(self, account: str, password: str) -> None:
        """Register ``account`` with NickServ (no e-mail step: ``auth = none``)."""
        client = IrcLines(self.port, self.timeout)
        try:
            client.send(f"NICK {account}", f"USER {account} 0 * :{account}")
            client.wait_for(" 001 ")
            client.send(f"PRIVMSG NickServ :REGISTER {password} {account}@example.com")
            client.wait_for("is now registered to")
        finally:
            client.close()

    def _stop_services(self, sig: int) -> None:
        if self.services is not None:
            self.services.stop(sig)  # first, so it saves services.db and does not relink

    def terminate(self) -> int | None:
        """SIGTERM Atheme, then InspIRCd (which exits 10 on SIGTERM)."""
        self._stop_services(signal.SIGTERM)
        return super().terminate()

    def kill(self) -> int | None:
        """SIGKILL both (a crash); :meth:`restart` brings both back with their data."""
        self._stop_services(signal.SIGKILL)
        return super().kill()
