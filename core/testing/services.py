"""Real servers on free ports: Redis, Mosquitto, ngircd, InspIRCd with Atheme (SASL)."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Self

from core.testing.base import (
    HOST,
    OUTPUT_LINES,
    WAIT,
    ManagedProcess,
    Server,
    ServerError,
    ServiceMissing,
    _make_tmpdir,
    _remove_tmpdir,
    free_ports,
    require_binary,
)
from core.testing.certs import Certs, make_certs

# --------------------------------------------------------------------------------------------
# Services: one server with a directory, ports and a life cycle


class _Service(ManagedProcess):
    """Shared life cycle of the service classes; see the module docstring."""

    name = "service"
    binary = ""
    ready = ""
    port_count = 1

    def __init__(self, *, timeout: float = 15.0) -> None:
        super().__init__()
        self.timeout = timeout
        self._tmpdir: Path | None = None
        self._ports = free_ports(self.port_count)

    def __repr__(self) -> str:
        state = "running" if self.alive else "stopped"
        return f"<{type(self).__name__} ports={self._ports} {state}>"

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

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the running process."""
        if self.server is not None:
            self.server.send_signal(sig)

    def terminate(self) -> int | None:
        """SIGTERM (SIGKILL after a timeout), keeping directory and ports; the exit status."""
        return self.server.stop(signal.SIGTERM) if self.server is not None else None

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


class _TlsService(_Service):
    """A service with an optional TLS port (``_ports[1]``) and throw-away certificates.

    The certificates are made once per directory (:meth:`_server_certs` from ``_prepare``), so
    a restart keeps them and a start after :meth:`stop` makes new ones.
    """

    def __init__(self, *, tls: bool, timeout: float) -> None:
        super().__init__(timeout=timeout)
        self.tls = tls
        self._certs: Certs | None = None

    @property
    def tls_port(self) -> int:
        """The TLS port (only with ``tls=True``)."""
        if not self.tls:
            raise RuntimeError(f"this {type(self).__name__} was created without tls=True")
        return self._ports[1]

    @property
    def certs(self) -> Certs:
        """The certificates of the TLS port (only with ``tls=True``, after start)."""
        if self._certs is None:
            raise RuntimeError("no certificates: create with tls=True and call start() first")
        return self._certs

    def _server_certs(self) -> Certs:
        if self._certs is None:
            self._certs = make_certs(self.tmpdir / "certs")
        return self._certs

    def start(self) -> Self:
        if self._tmpdir is None:
            self._certs = None  # a new directory: the old certificates went with the old one
        return super().start()


class MosquittoServer(_TlsService):
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
        super().__init__(tls=tls, timeout=timeout)
        self.password = password
        self.require_client_cert = require_client_cert
        self.persistent = persistent
        self.websockets = websockets
        self.extra_config = list(extra_config)

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
            certs = self._server_certs()
            lines += [
                f"listener {self.tls_port} {HOST}",
                f"cafile {certs.ca_crt}",
                f"certfile {certs.server_crt}",
                f"keyfile {certs.server_key}",
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


class NgircdServer(_TlsService):
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
        super().__init__(tls=tls, timeout=timeout)
        self.flood_control = flood_control
        self.extra_config = list(extra_config)

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
            certs = self._server_certs()
            dh = self.tmpdir / "dh.pem"
            dh.write_text(_FFDHE2048_PEM)
            lines += [
                "[SSL]",
                f"CertFile = {certs.server_crt}",
                f"KeyFile = {certs.server_key}",
                f"DHFile = {dh}",
                f"Ports = {self.tls_port}",
            ]
        lines += self.extra_config
        self.config_path.write_text("\n".join(lines) + "\n")


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
