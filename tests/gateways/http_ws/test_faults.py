"""Redis killed under open sockets: clients get 1013 (or 503 for HTTP) while it is down, sockets
that stayed quiet keep working once it is back, the gateway never hangs and its memory stays
bounded while a client floods it (uvicorn stops reading a socket until the bridge took the
previous message, so TCP pushes back on the client)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from tests.gateways.http_ws.conftest import Web


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def echo(ws: websockets.ClientConnection, text: str) -> None:
    await ws.send(text)
    assert await asyncio.wait_for(ws.recv(), 30) == text


async def test_redis_killed_under_open_sockets(web: Web) -> None:
    assert web.gateway is not None
    quiet = await websockets.connect(f"{web.ws}/echo")
    talkers = [await websockets.connect(f"{web.ws}/echo") for _ in range(5)]
    flooder = await websockets.connect(f"{web.ws}/echo", write_limit=2**16)
    for ws in [quiet, *talkers, flooder]:
        await echo(ws, "warm up")
    before = rss_kib(web.gateway.pid)

    web.redis.kill()
    # sockets that talk while the layer is gone are closed with 1013 (try again later)
    for ws in talkers:
        await ws.send("while redis is down")
    for ws in talkers:
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(ws.recv(), 30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013

    async def flood() -> None:
        for _ in range(5000):
            await flooder.send("x" * 4000)  # 20 MB offered; the send blocks once TCP is full

    with contextlib.suppress(TimeoutError, ConnectionClosed):
        await asyncio.wait_for(flood(), 5)
    async with httpx.AsyncClient(base_url=web.http, timeout=30) as client:
        assert (await client.get("/api/echo")).status_code == 503
    after = rss_kib(web.gateway.pid)
    assert after - before < 20_000, f"gateway grew from {before} to {after} KiB"

    web.redis.restart()
    # the gateway and the worker reconnect by themselves; the quiet socket still works
    deadline = asyncio.get_running_loop().time() + 30
    async with httpx.AsyncClient(base_url=web.http, timeout=30) as client:
        while (await client.get("/api/echo")).status_code != 200:
            assert asyncio.get_running_loop().time() < deadline, web.gateway.tail()
    await echo(quiet, "after the restart")
    async with websockets.connect(f"{web.ws}/echo") as fresh:
        await echo(fresh, "new socket")
    await flooder.close()
    await quiet.close()
    assert await asyncio.to_thread(web.gateway.stop) == 0, web.gateway.tail()
