"""core.client.ReconnectingClient against a real loopback TCP server that we stop and restart.

The server speaks a three-line protocol: ``HELLO <password>`` is answered ``OK`` or ``DENIED``,
``PING`` is answered ``PONG`` (unless the server plays dead). Events are read from a real
in-memory channel layer through the gateway's EventBuffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal

import pytest
from channels.layers import InMemoryChannelLayer

import core.client
from core.client import (
    TRANSITIONS,
    ClientEvent,
    ClientState,
    ClientStateError,
    ConnectFailed,
    ReconnectingClient,
)
from core.config import GatewayConfig
from core.retry import Backoff, StartupError
from core.service import EventBuffer, Gateway
from core.testing import free_port, metric

pytestmark = pytest.mark.timeout(60)

PASSWORD = "s3cret"


class LineServer:
    """A real TCP server on 127.0.0.1:``port`` that can be killed and brought back."""

    def __init__(self, port: int, *, mode: str = "normal") -> None:
        self.port = port
        self.mode = mode  # normal | deny | silent | flap | mute
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.pings = 0
        self.answered_five = asyncio.Event()

    async def start(self) -> LineServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def kill(self) -> None:
        """Stop listening and drop every connection, as a crashed server would."""
        if self.server is not None:
            self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        if self.server is not None:
            await self.server.wait_closed()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            hello = await reader.readline()
            if self.mode == "mute":
                await reader.read()  # never answers
                return
            if hello.decode().split() != ["HELLO", PASSWORD] or self.mode == "deny":
                writer.write(b"DENIED\n")
                return
            writer.write(b"OK\n")
            if self.mode == "flap":
                return
            while line := await reader.readline():
                if line == b"PING\n":
                    self.pings += 1
                    if self.mode != "silent":
                        writer.write(b"PONG\n")
                    if self.pings >= 5:
                        self.answered_five.set()
        except (ConnectionError, OSError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()


class LineConfig(GatewayConfig):
    gateway: Literal["line"] = "line"


class LineGateway(Gateway[LineConfig]):
    """A gateway that only records what its client tells it (the ClientListener)."""

    protocol = "line"
    config_model = LineConfig

    def __init__(self, name: str) -> None:
        super().__init__(LineConfig(name=name), InMemoryChannelLayer())
        self.buffer = EventBuffer(self, 100)
        self.heard: list[str] = []

    def client_connected(self, details: Mapping[str, Any]) -> None:
        self.heard.append(f"connected {dict(details)}")

    def client_disconnected(self, reason: str) -> None:
        self.heard.append(f"disconnected {reason}")

    async def next_event(self) -> dict[str, Any]:
        message: dict[str, Any] = await asyncio.wait_for(self.layer.receive(self.name), 20)
        return message


class LineClient(ReconnectingClient):
    """The smallest real subclass: the three hooks over asyncio streams."""

    def __init__(self, gateway: LineGateway, port: int, password: str, **options: Any) -> None:
        options.setdefault("backoff", Backoff(0.01, 0.05))
        super().__init__(
            gateway,
            server=f"127.0.0.1:{port}",
            listener=gateway,
            events=gateway.buffer,
            **options,
        )
        self.port = port
        self.password = password
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.reason: str | None = None
        self.probes = 0

    async def _connect(self) -> Mapping[str, Any]:
        self.reason = None
        # OSError (connection refused) is left to the base class on purpose
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.write(f"HELLO {self.password}\n".encode())
        answer = await self.reader.readline()
        if answer == b"DENIED\n":
            raise ConnectFailed("the server refused our password", fatal=True)
        if answer != b"OK\n":
            raise ConnectFailed(f"unexpected greeting {answer!r}")
        return {"user": "bot"}

    async def _wait_lost(self) -> str:
        assert self.reader is not None
        while await self.reader.readline():
            self.heard()
        return self.reason or "the server closed the connection"

    async def _disconnect(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _probe(self) -> None:
        self.probes += 1
        assert self.writer is not None
        self.writer.write(b"PING\n")

    def _abort(self, reason: str) -> None:
        self.reason = reason
        if self.writer is not None:
            self.writer.transport.abort()


@pytest.fixture
async def gateway(request: pytest.FixtureRequest) -> AsyncIterator[LineGateway]:
    gw = LineGateway("line-" + re.sub(r"[^a-zA-Z0-9]+", "-", request.node.name)[:80])
    gw.buffer.start()
    yield gw
    await gw.buffer.flush(0)


@pytest.fixture
async def servers() -> AsyncIterator[list[LineServer]]:
    made: list[LineServer] = []
    yield made
    for server in made:
        await server.kill()


@contextlib.asynccontextmanager
async def started(client: LineClient) -> AsyncIterator[LineClient]:
    await client.start()
    try:
        yield client
    finally:
        await client.close()


async def test_bad_credentials_on_the_first_attempt_stop_the_start(
    gateway: LineGateway, servers: list[LineServer]
) -> None:
    servers.append(await LineServer(free_port()).start())
    client = LineClient(gateway, servers[0].port, "wrong")
    with pytest.raises(StartupError, match="refused our password"):
        await client.start()
    assert client.state is ClientState.CLOSED
    assert metric("gateway_retries_total", gateway=gateway.name, kind="connect") == 0
    assert servers[0].writers == set()  # the refused attempt's socket was closed


async def test_a_server_that_is_down_is_retried_until_it_is_up(
    gateway: LineGateway, servers: list[LineServer]
) -> None:
    port = free_port()
    async with started(LineClient(gateway, port, PASSWORD)) as client:
        assert client.state in (ClientState.WAITING, ClientState.CONNECTING)
        assert "ConnectionRefusedError" in (client.last_error or "")
        assert client.readiness() == [f"not connected to 127.0.0.1:{port}: {client.last_error}"]
        servers.append(await LineServer(port).start())
        await client.wait_connected(20)
        event = await gateway.next_event()
        assert event["type"] == "line.connect"
        assert event["server"] == f"127.0.0.1:{port}" and event["user"] == "bot"
        assert client.readiness() == [] and client.last_error is None
        assert metric("gateway_transport_connected", gateway=gateway.name) == 1
        assert metric("gateway_retries_total", gateway=gateway.name, kind="connect") >= 1
    assert gateway.heard[0] == "connected {'user': 'bot'}"
    assert gateway.heard[-1] == "disconnected gateway stopped"
    assert metric("gateway_transport_connected", gateway=gateway.name) == 0


async def test_a_lost_connection_is_reported_and_restored(
    gateway: LineGateway, servers: list[LineServer]
) -> None:
    server = await LineServer(free_port()).start()
    servers.append(server)
    async with started(LineClient(gateway, server.port, PASSWORD)) as client:
        assert (await gateway.next_event())["type"] == "line.connect"
        await server.kill()
        lost = await gateway.next_event()
        assert lost["type"] == "line.disconnect"
        assert lost["reason"] == "the server closed the connection"
        assert metric("gateway_transport_connected", gateway=gateway.name) == 0
        assert client.readiness() != []
        await server.start()
        assert (await gateway.next_event())["type"] == "line.connect"
        assert client.connected
    assert gateway.heard[:3] == [
        "connected {'user': 'bot'}",
        "disconnected the server closed the connection",
        "connected {'user': 'bot'}",
    ]


@pytest.mark.parametrize(("stable_after", "reset"), [(3600.0, False), (0.0, True)])
async def test_backoff_resets_only_after_a_stable_connection(
    gateway: LineGateway, servers: list[LineServer], stable_after: float, reset: bool
) -> None:
    server = await LineServer(free_port(), mode="flap").start()  # accepts, then hangs up
    servers.append(server)
    backoff = Backoff(0.001, 10.0)
    client = LineClient(gateway, server.port, PASSWORD, backoff=backoff, stable_after=stable_after)
    async with started(client):
        for _ in range(3):
            while (await gateway.next_event())["type"] != "line.disconnect":
                pass
        # every connection lasted ~0 s: "stable" only when stable_after is 0
        if reset:
            assert backoff.attempts <= 1
        else:
            assert backoff.attempts >= 3


class MisbehavingClient(LineClient):
    """Blames the peer for every loss, as the IRC client does for a flood."""

    async def _wait_lost(self) -> str:
        reason = await super()._wait_lost()
        self.misbehaved()
        return reason


async def test_a_connection_dropped_for_misbehaving_never_resets_the_backoff(
    gateway: LineGateway, servers: list[LineServer]
) -> None:
    server = await LineServer(free_port(), mode="flap").start()
    servers.append(server)
    backoff = Backoff(0.001, 10.0)
    client = MisbehavingClient(gateway, server.port, PASSWORD, backoff=backoff, stable_after=0.0)
    async with started(client):
        for _ in range(3):
            while (await gateway.next_event())["type"] != "line.disconnect":
                pass
        assert backoff.attempts >= 3  # "stable" by its length, but it misbehaved


async def test_restart_reconnects_at_once(gateway: LineGateway, servers: list[LineServer]) -> None:
    server = await LineServer(free_port()).start()
    servers.append(server)
    # a backoff of an hour: only a reconnect that skips it can finish within the test
    client = LineClient(gateway, server.port, PASSWORD, backoff=Backoff(3600.0, 3600.0))
    assert not client.restart("nothing to restart yet")
    async with started(client):
        # right after start(), before the client began to watch the connection
        assert client.restart("fetching what was left")
        assert client.state is ClientState.RESTARTING and not client.connected
        assert client.readiness() == [
            f"not connected to 127.0.0.1:{server.port}: fetching what was left"
        ]
        assert (await gateway.next_event())["type"] == "line.connect"
        lost = await gateway.next_event()
        assert (lost["type"], lost["reason"]) == ("line.disconnect", "fetching what was left")
        assert (await gateway.next_event())["type"] == "line.connect"
        assert client.connected and client.backoff.attempts == 0
        assert client.restart("once more")  # from a connection being watched
        assert (await gateway.next_event())["reason"] == "once more"
        assert (await gateway.next_event())["type"] == "line.connect"
    assert gateway.heard[-1] == "disconnected gateway stopped"


async def test_the_watchdog_drops_a_silent_connection(
    gateway: LineGateway, servers: list[LineServer]
) -> None:
    server = await LineServer(free_port(), mode="silent").start()
    servers.append(server)
    async with started(LineClient(gateway, server.port, PASSWORD, idle_timeout=0.2)) as client:
        assert (await gateway.next_event())["type"] == "line.connect"
        lost = await gateway.next_event()
        assert lost["type"] == "line.disconnect"
        assert lost["reason"].startswith("no data from the server for")
        assert client.probes >= 1 and server.pings >= 1
        assert (await gateway.next_event())["type"] == "line.connect"  # and it reconnects


async def test_the_watchdog_keeps_a_connection_that_answers(
    gateway: LineGateway, servers: list[LineServer]
) -> None:
    server = await LineServer(free_port()).start()
    servers.append(server)
    async with started(LineClient(gateway, server.port, PASSWORD, idle_timeout=0.05)) as client:
        assert (await gateway.next_event())["type"] == "line.connect"
        await asyncio.wait_for(server.answered_five.wait(), 20)
        assert client.connected
    assert [h for h in gateway.heard if h.startswith("disconnected")] == [
        "disconnected gateway stopped"
    ]


async def test_an_attempt_without_an_answer_times_out_and_is_retried(
    gateway: LineGateway, servers: list[LineServer]
) -> None:
    server = await LineServer(free_port(), mode="mute").start()
    servers.append(server)
    async with started(LineClient(gateway, server.port, PASSWORD, connect_timeout=0.1)) as client:
        assert client.last_error == "no answer within 0.1 s"
        server.mode = "normal"
        await client.wait_connected(20)


async def test_close_is_idempotent(gateway: LineGateway, servers: list[LineServer]) -> None:
    server = await LineServer(free_port()).start()
    servers.append(server)
    client = LineClient(gateway, server.port, PASSWORD)
    await client.start()
    await client.close()
    await client.close()
    assert client.state is ClientState.CLOSED
    assert gateway.heard.count("disconnected gateway stopped") == 1
    with pytest.raises(ClientStateError, match="'retry' is not possible while closed"):
        await client.start()


def test_the_state_table_in_the_docstring_is_the_code() -> None:
    doc = core.client.__doc__ or ""
    states = tuple(f"``{state.name}``" for state in ClientState)
    rows = [line for line in doc.splitlines() if line.startswith(states)]
    header = next(line for line in doc.splitlines() if line.startswith("state "))
    columns = [ClientEvent(name) for name in header.split()[1:]]
    starts = [m.start() for m in re.finditer(r"\S+", header)][1:]
    table: dict[ClientState, dict[ClientEvent, ClientState]] = {}
    for row in rows:
        state = ClientState[row.split()[0].strip("`")]
        table[state] = {}
        for column, at in zip(columns, starts, strict=True):
            cell = row[at:].split(" ", 1)[0].strip() if len(row) > at else ""
            if cell:
                table[state][column] = ClientState[cell]
    assert table == {state: dict(events) for state, events in TRANSITIONS.items()}
