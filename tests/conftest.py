"""Shared fixtures: real servers on free loopback ports (see core/testing/).

A missing binary skips the test with the reason, except when the environment variable ``CI`` is
set: there it fails, so CI never passes by skipping.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn, Protocol, TypeVar

# Hypothesis imports its optimiser lazily, deep inside a running property test; pytest rewrites
# the asserts of a plugin's modules as they are imported, and CPython 3.11.7 then fails to
# parse it there ("SystemError: AST constructor recursion depth mismatch"; seen in 3 of 9 runs
# of tests/gateways/scheduler alone). Imported here, at the top of the stack, it parses once.
import hypothesis.internal.conjecture.optimiser  # noqa: F401
import pytest

from core.testing import (
    Certs,
    InspircdServer,
    MosquittoServer,
    NgircdServer,
    RedisClusterServers,
    RedisServer,
    ReplicatedRedis,
    ServiceMissing,
    make_certs,
    require_binary,
)
from tests.support.example import ExampleProject, example_project

MQTT_USER = ("alice", "s3cret")
"""The credentials of ``mosquitto_password_server``."""


class _Startable(Protocol):
    binary: str

    def start(self) -> object: ...

    def stop(self) -> object: ...


S = TypeVar("S", bound=_Startable)


def missing(reason: str) -> NoReturn:
    """Skip the current test with ``reason``; fail it instead when ``CI`` is set."""
    if os.environ.get("CI"):
        pytest.fail(f"required service missing in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def service(binary: str) -> str:
    """Return the path of ``binary``; skip (locally) or fail (``CI`` set) if it is missing."""
    try:
        return require_binary(binary)
    except ServiceMissing as exc:
        missing(str(exc))


def start_or_skip(server: S) -> S:
    """Start ``server``; a missing binary or feature skips (or fails in CI) the test."""
    service(server.binary)
    try:
        server.start()
    except ServiceMissing as exc:
        missing(str(exc))
    return server


@pytest.fixture
def start_service() -> Iterator[Callable[[S], S]]:
    """Factory: ``start_service(RedisServer(extra_args=[...]))`` starts it, stops it after."""
    started: list[_Startable] = []

    def start(server: S) -> S:
        started.append(server)
        return start_or_skip(server)

    yield start
    for server in reversed(started):
        server.stop()


def _run(server: S) -> Iterator[S]:
    start_or_skip(server)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh ``redis-server`` (no persistence)."""
    yield from _run(RedisServer())


@pytest.fixture
def durable_redis_server() -> Iterator[RedisServer]:
    """A ``redis-server`` with an fsync-always AOF: data survives ``kill()`` + ``restart()``."""
    yield from _run(RedisServer(durable=True))


@pytest.fixture
def redis_cluster() -> Iterator[RedisClusterServers]:
    """A local Redis Cluster: 3 masters with a replica each (``.url``: its layer path)."""
    yield from _run(RedisClusterServers())


@pytest.fixture
def replicated_redis() -> Iterator[ReplicatedRedis]:
    """A Redis master (``.master``) and its replica (``.replica``; ``.promote()``)."""
    yield from _run(ReplicatedRedis())


@pytest.fixture
def sentinel_redis() -> Iterator[ReplicatedRedis]:
    """A master, its replica and a Sentinel watching them (``.sentinel_host``)."""
    yield from _run(ReplicatedRedis(sentinel=True))


@pytest.fixture
def mosquitto_server() -> Iterator[MosquittoServer]:
    """An anonymous mosquitto broker on ``.port``."""
    yield from _run(MosquittoServer())


@pytest.fixture
def mosquitto_tls_server() -> Iterator[MosquittoServer]:
    """A broker with a plain ``.port`` and a TLS ``.tls_port``; CA in ``.certs.ca_crt``."""
    yield from _run(MosquittoServer(tls=True))


@pytest.fixture
def mosquitto_password_server() -> Iterator[MosquittoServer]:
    """A broker that only accepts ``MQTT_USER`` (``.password``), no anonymous clients."""
    yield from _run(MosquittoServer(password=MQTT_USER))


@pytest.fixture
def mosquitto_persistent_server() -> Iterator[MosquittoServer]:
    """A broker persisting to ``.db_path``: use ``restart()`` or ``save_and_kill()``."""
    yield from _run(MosquittoServer(persistent=True))


@pytest.fixture
def mosquitto_websockets_server() -> Iterator[MosquittoServer]:
    """A broker with a plain ``.port`` and an MQTT-over-WebSocket ``.ws_port``."""
    yield from _run(MosquittoServer(websockets=True))


@pytest.fixture
def ngircd_server() -> Iterator[NgircdServer]:
    """ngircd on ``.port`` with flood control off."""
    yield from _run(NgircdServer())


@pytest.fixture
def ngircd_tls_server() -> Iterator[NgircdServer]:
    """ngircd with a plain ``.port`` and a TLS ``.tls_port``; CA in ``.certs.ca_crt``."""
    yield from _run(NgircdServer(tls=True))


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    """A throwaway CA with server (localhost, 127.0.0.1) and client certificates."""
    try:
        return make_certs(tmp_path / "certs")
    except ServiceMissing as exc:
        missing(str(exc))


@pytest.fixture
def inspircd_server() -> Iterator[InspircdServer]:
    """InspIRCd + Atheme on ``.port`` with SASL PLAIN; ``.register(account, password)``."""
    yield from _run(InspircdServer())


@pytest.fixture
def project(tmp_path: Path, redis_server: RedisServer) -> ExampleProject:
    """The example Django project on ``redis_server``, its database migrated in ``tmp_path``.

    Add what one test needs to ``project.env`` (``SMTP_PORT``, ``IRC_PORT``…) before starting
    ``project.worker(…)`` or ``project.gateway("….yaml")``.
    """
    return example_project(tmp_path, redis_server.url)
