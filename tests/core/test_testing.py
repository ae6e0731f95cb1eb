"""The server helpers of core/testing/ against the real binaries."""

from __future__ import annotations

import queue
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import redis
from paho.mqtt.enums import CallbackAPIVersion

from core.testing import (
    Certs,
    DjangoWorker,
    MosquittoServer,
    NgircdServer,
    RedisServer,
    Server,
    ServerError,
    ServiceMissing,
    free_ports,
    make_certs,
    require_binary,
)
from tests.conftest import MQTT_USER, service


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def _redis_ping(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64)


# ---------------------------------------------------------------------------------------------
# Generic pieces


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_require_binary() -> None:
    assert require_binary("sh").endswith("/sh")
    with pytest.raises(ServiceMissing, match="no-such-binary-xyz"):
        require_binary("no-such-binary-xyz")


def test_swaks_without_tls_counts_as_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # what `apt-get install --no-install-recommends swaks` gives: no Net::SSLeay (issue 6)
    fake = tmp_path / "swaks"
    fake.write_text(
        "#!/bin/sh\necho '=== Basic AUTH supported'\n"
        "echo '*** TLS not available: requires Net::SSLeay' >&2\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ServiceMissing, match=r"libnet-ssleay-perl.*\.ci/run"):
        require_binary("swaks")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="required service missing in CI"):
        service("swaks")


def test_server_early_exit_reports_status_and_output() -> None:
    with pytest.raises(ServerError, match=r"(?s)status 3.*boom"):
        Server(["sh", "-c", "echo boom; exit 3"], ready="never printed", timeout=5)


def test_server_timeout_kills_the_process() -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"(?s)never printed.*hello"):
        Server(["sh", "-c", "echo hello; exec sleep 30"], ready="never printed", timeout=0.3)
    assert time.monotonic() - started < 5


def test_server_stop_is_idempotent_and_escalates() -> None:
    # The shell ignores SIGTERM: stop() must SIGKILL after its timeout instead of hanging.
    server = Server(["sh", "-c", "trap '' TERM; echo up; while :; do sleep 0.05; done"], "up")
    assert server.stop(timeout=0.3) == -9
    assert server.stop() == -9
    assert server.kill() == -9
    assert not server.alive


# ---------------------------------------------------------------------------------------------
# Redis


def test_redis_ping_raw_socket(redis_server: RedisServer) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert _redis_ping(redis_server.port).startswith(b"+PONG")


def test_redis_durable_restart_keeps_list(durable_redis_server: RedisServer) -> None:
    server = durable_redis_server
    port, pid = server.port, server.pid
    with redis.Redis(port=port) as client:
        for i in range(50):
            client.rpush("items", i)
    assert server.kill() == -9
    server.restart()
    assert server.port == port and server.pid != pid
    with redis.Redis(port=port) as client:
        assert client.llen("items") == 50
        assert client.lrange("items", 0, 1) == [b"0", b"1"]


def test_redis_kill_restart_same_port_without_durability(redis_server: RedisServer) -> None:
    port, old_pid = redis_server.port, redis_server.pid
    with redis.Redis(port=port) as client:
        client.set("k", "v")
    redis_server.kill()
    assert old_pid is not None and not _alive(old_pid)
    with pytest.raises(OSError):
        _redis_ping(port)
    redis_server.restart()
    assert redis_server.port == port
    assert _redis_ping(port).startswith(b"+PONG")
    with redis.Redis(port=port) as client:
        assert client.get("k") is None  # nothing was persisted


def test_redis_stop_cleans_up() -> None:
    server = RedisServer()
    try:
        server.start()
        tmpdir, pid = server.tmpdir, server.pid
        assert tmpdir.is_dir() and pid is not None
    finally:
        assert server.stop() == 0
    assert server.stop() == 0  # idempotent
    assert not tmpdir.exists()
    assert not _alive(pid)


# ---------------------------------------------------------------------------------------------
# Mosquitto


class Mqtt:
    """A paho 2 client running its network loop in a thread, collecting messages."""

    def __init__(
        self,
        port: int,
        *,
        client_id: str = "",
        clean_session: bool = True,
        auth: tuple[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
        transport: Any = "tcp",
    ) -> None:
        self.port = port
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            transport=transport,
        )
        self.client.reconnect_delay_set(5, 5)
        if auth is not None:
            self.client.username_pw_set(*auth)
        if tls is not None:
            self.client.tls_set_context(tls)
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connack: queue.Queue[Any] = queue.Queue()
        self.subacks: queue.Queue[Any] = queue.Queue()
        self.session_present = False
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.session_present = bool(flags.session_present)
        self.connack.put(rc)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        self.messages.put((message.topic, message.payload))

    def _on_subscribe(self, client: Any, userdata: Any, mid: Any, rcs: Any, props: Any) -> None:
        self.subacks.put(rcs)

    def connect(self) -> Any:
        """Connect and return the CONNACK reason code."""
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        return self.connack.get(timeout=5)

    def subscribe(self, topic: str, qos: int = 0) -> None:
        self.client.subscribe(topic, qos)
        rcs = self.subacks.get(timeout=5)
        assert not any(rc.is_failure for rc in rcs)

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        self.client.publish(topic, payload, qos).wait_for_publish(timeout=5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_mosquitto_pub_sub(mosquitto_server: MosquittoServer) -> None:
    sub, pub = Mqtt(mosquitto_server.port), Mqtt(mosquitto_server.port)
    try:
        assert not sub.connect().is_failure
        sub.subscribe("t/#")
        assert not pub.connect().is_failure
        pub.publish("t/a", b"\x00hello\xff", qos=1)
        assert sub.messages.get(timeout=5) == ("t/a", b"\x00hello\xff")
    finally:
        sub.close()
        pub.close()


def test_mosquitto_tls_with_ca(mosquitto_tls_server: MosquittoServer, certs: Certs) -> None:
    server = mosquitto_tls_server
    client = Mqtt(server.tls_port, tls=server.certs.client_context())
    try:
        assert not client.connect().is_failure
        client.subscribe("x")
        client.publish("x", b"over tls", qos=1)
        assert client.messages.get(timeout=5) == ("x", b"over tls")
    finally:
        client.close()
    # `certs` is another CA: the broker's certificate does not verify against it.
    with (
        socket.create_connection(("127.0.0.1", server.tls_port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        certs.client_context().wrap_socket(raw, server_hostname="localhost").close()


def test_mosquitto_mutual_tls(start_service: Callable[[MosquittoServer], MosquittoServer]) -> None:
    server = start_service(MosquittoServer(tls=True, require_client_cert=True))
    client = Mqtt(server.tls_port, tls=server.certs.client_context(client_cert=True))
    try:
        assert not client.connect().is_failure
    finally:
        client.close()
    # Without a client certificate the broker ends the TLS session (in TLS 1.3, after the
    # handshake the client saw complete).
    context = server.certs.client_context()
    with (
        socket.create_connection(("127.0.0.1", server.tls_port), timeout=5) as raw,
        pytest.raises((ssl.SSLError, ConnectionError)),
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x1e\x00\x00")  # CONNECT
        if not tls.recv(4):
            raise ConnectionResetError("closed by the broker")


def test_mosquitto_password(mosquitto_password_server: MosquittoServer) -> None:
    port = mosquitto_password_server.port
    assert mosquitto_password_server.password == MQTT_USER
    good = Mqtt(port, auth=MQTT_USER)
    try:
        assert not good.connect().is_failure
    finally:
        good.close()
    for auth in (None, ("alice", "wrong"), ("mallory", "s3cret")):
        bad = Mqtt(port, auth=auth)
        try:
            rc = bad.connect()
            assert rc.is_failure, auth
            assert rc.value in (4, 5, 0x86, 0x87), rc  # bad credentials / not authorised
        finally:
            bad.close()


def test_mosquitto_persistent_session_survives_save_and_kill(
    mosquitto_persistent_server: MosquittoServer,
) -> None:
    broker = mosquitto_persistent_server
    port = broker.port
    sub = Mqtt(port, client_id="sub1", clean_session=False)
    sub.connect()
    sub.subscribe("q/#", qos=1)
    sub.close()
    pub = Mqtt(port)
    pub.connect()
    for i in range(3):
        pub.publish(f"q/{i}", f"m{i}".encode(), qos=1)
    pub.close()

    assert broker.save_and_kill() == -9
    assert broker.db_path.is_file()
    broker.restart()
    assert broker.port == port

    again = Mqtt(port, client_id="sub1", clean_session=False)
    try:
        assert not again.connect().is_failure
        assert again.session_present
        got = [again.messages.get(timeout=5) for _ in range(3)]
        assert sorted(got) == [("q/0", b"m0"), ("q/1", b"m1"), ("q/2", b"m2")]
    finally:
        again.close()


def test_mosquitto_websockets(mosquitto_websockets_server: MosquittoServer) -> None:
    client = Mqtt(mosquitto_websockets_server.ws_port, transport="websockets")
    try:
        assert not client.connect().is_failure
        client.subscribe("ws/#")
        client.publish("ws/1", b"frame", qos=1)
        assert client.messages.get(timeout=5) == ("ws/1", b"frame")
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------
# ngircd


def _irc_register(sock: socket.socket, nick: str) -> str:
    sock.sendall(f"NICK {nick}\r\nUSER {nick} 0 * :{nick}\r\n".encode())
    data = b""
    while b" 001 " not in data:
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    return data.decode()


def test_ngircd_plain_and_tls(ngircd_tls_server: NgircdServer) -> None:
    server = ngircd_tls_server
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        assert "irc.test.local" in _irc_register(sock, "plainbot")
    context = server.certs.client_context()
    with (
        socket.create_connection(("127.0.0.1", server.tls_port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert " 001 tlsbot " in _irc_register(tls, "tlsbot")
    server.kill()
    server.restart()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        _irc_register(sock, "again")


# ---------------------------------------------------------------------------------------------
# Certificates and the Django worker


def test_make_certs(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    ready = threading.Event()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with certs.server_context(require_client_cert=True).wrap_socket(
                conn, server_side=True
            ) as tls:
                ready.set()
                peer = tls.getpeercert()
                assert peer is not None
                subject = dict(rdn[0] for rdn in peer["subject"])  # type: ignore[misc]
                tls.sendall(str(subject["commonName"]).encode())

        thread = threading.Thread(target=serve)
        thread.start()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            certs.client_context(client_cert=True).wrap_socket(
                raw, server_hostname="127.0.0.1"
            ) as s,
        ):
            assert s.recv(100) == b"client"
        thread.join(5)
    assert ready.is_set()


def test_django_worker_lifecycle(tmp_path: Path) -> None:
    (tmp_path / "manage.py").write_text(
        "import os, sys, time\n"
        "print('worker', *sys.argv[1:], os.environ['WORKER_TAG'])\n"
        "time.sleep(60)\n"
    )
    worker = DjangoWorker(tmp_path, ["mail", "irc"], {"WORKER_TAG": "t1"})
    try:
        worker.start()
        assert worker.argv == [sys.executable, "manage.py", "runworker", "mail", "irc"]
        assert worker.wait_for("worker runworker mail irc t1", timeout=10)
        worker.wait_ready(lambda: "t1" in worker.tail(), timeout=5)
        first = worker.pid
        assert worker.alive
        worker.restart(kill=True)
        assert worker.alive and worker.pid != first
        worker.wait_for("worker runworker", timeout=10)
        assert worker.kill() == -9
        assert not worker.alive
        with pytest.raises(ServerError, match="exited"):
            worker.wait_ready(lambda: False, timeout=1)
    finally:
        worker.stop()
    assert worker.stop() == -9  # idempotent: the status of the killed process
