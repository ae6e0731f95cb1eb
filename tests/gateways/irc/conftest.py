"""Helpers for the IRC gateway tests: a second, real IRC connection (the other side) and an
in-process gateway on an in-memory layer. The servers come from tests/conftest.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from channels.layers import InMemoryChannelLayer

from core.testing import WAIT, receive, run_gateway
from gateways.irc.config import IrcGatewayConfig
from gateways.irc.gateway import IrcGateway


class Peer:
    """A plain asyncio IRC client: the person on the other side of the gateway."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.lines: list[str] = []

    @classmethod
    async def connect(cls, port: int, nick: str, *channels: str) -> Peer:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        peer = cls(reader, writer)
        user = "".join(c for c in nick if c.isalnum()) or "peer"  # ngircd refuses [] there
        await peer.send(f"NICK {nick}", f"USER {user} 0 * :{nick}")
        await peer.expect(" 001 ")
        for channel in channels:
            await peer.send(f"JOIN {channel}")
            await peer.expect(" 366 ")
        return peer

    async def send(self, *lines: str | bytes) -> None:
        for line in lines:
            data = line if isinstance(line, bytes) else line.encode()
            self.writer.write(data + b"\r\n")
        await self.writer.drain()

    async def line(self, timeout: float = WAIT) -> str:
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), timeout)
            if not raw:
                raise ConnectionError("the server closed the peer's connection")
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            if text.startswith("PING "):
                await self.send("PONG " + text[5:])
                continue
            self.lines.append(text)
            return text

    async def expect(self, needle: str, timeout: float = WAIT) -> str:
        while True:
            text = await self.line(timeout)
            if needle in text:
                return text

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.send("QUIT :bye")
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def irc_config(port: int, name: str = "ops", **irc: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "server": "127.0.0.1",
        "port": port,
        "nick": "bot",
        "flood": {"burst": 10, "rate": 200},
        "reconnect": {"initial": 0.1, "maximum": 0.5},
    }
    section.update(irc)
    return {"gateway": "irc", "name": name, "shutdown_grace": 5, "irc": section}


@contextlib.asynccontextmanager
async def running(
    config: dict[str, Any], *, ready: bool = True, capacity: int = 1000
) -> AsyncIterator[tuple[IrcGateway, Any]]:
    """The gateway in this process on an in-memory layer (``capacity`` per channel); with
    ``ready`` the block starts once /readyz would answer 200."""
    layer = InMemoryChannelLayer(capacity=capacity)
    gateway = IrcGateway(IrcGatewayConfig.model_validate(config), layer)
    async with run_gateway(gateway, ready=ready):
        yield gateway, layer


async def next_event(layer: Any, type_: str, on: str = "ops", **keys: Any) -> dict[str, Any]:
    """The next event of ``type_`` (with ``keys``) on layer channel ``on``; others skipped."""
    return await receive(layer, on, type_, **keys)
