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
