"""Crowds against real processes: one ``group_send`` reaches 1,000 sockets held by two
gateway-http-ws processes and two ``runworker rooms`` workers; 1,000 connections that never send
a request neither shut out pages and webhooks nor stay open for ever."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from pathlib import Path

import httpx
import pytest
import websockets

from core.testing import RedisServer, free_port
from tests.gateways.http_ws.conftest import SECRET, chat_project, start_worker, wait_page

WAIT = 60


@pytest.mark.replicas
async def test_one_group_send_reaches_1000_sockets(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    ports = [free_port(), free_port()]
    project = await asyncio.to_thread(chat_project, tmp_path, redis_server)
    gateways = [
        project.gateway("web.yaml", env={"WEB_PORT": str(port), "HEALTH_PORT": str(free_port())})
        for port in ports
    ]
    workers = []
    sockets: list[websockets.ClientConnection] = []
    try:
        for gateway in gateways:
            await asyncio.to_thread(gateway.start)
        workers = [await asyncio.to_thread(start_worker, project, "rooms") for _ in range(2)]
        for port in ports:
            await asyncio.to_thread(wait_page, port)
        for n in range(1000):
            port = ports[n % 2]
            sockets.append(
                await websockets.connect(
                    f"ws://127.0.0.1:{port}/ws/chat/everyone/",
                    origin=f"http://127.0.0.1:{port}",
                    open_timeout=WAIT,
                )
            )
        await sockets[0].send(json.dumps({"message": "to all of you"}))

        async def hears(ws: websockets.ClientConnection) -> str:
            return str(json.loads(await asyncio.wait_for(ws.recv(), WAIT))["message"])

        heard = await asyncio.gather(*(hears(ws) for ws in sockets))
        assert heard == ["to all of you"] * 1000
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
        for worker in workers:
            await asyncio.to_thread(worker.stop)
        for gateway in gateways:
            await asyncio.to_thread(gateway.stop)


async def test_1000_idle_connections_shut_out_nothing(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Connections that never send a request (or their headers slowly) once made every page and
    webhook 503 for as long as they stayed: they count against no cap now, and are closed after
    ``header_timeout``."""
    port = free_port()
    env = {"WEB_PORT": str(port), "WEB_HEADER_TIMEOUT": "3", "WEBHOOK_SECRET": SECRET}
    project = await asyncio.to_thread(chat_project, tmp_path, redis_server, **env)
    gateway = project.gateway("web.yaml")
    worker = None
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        await asyncio.to_thread(gateway.start)
        worker = await asyncio.to_thread(start_worker, project, "live", "rooms")
        await asyncio.to_thread(wait_page, port)
        body = json.dumps({"zen": "Keep it logically awesome."}).encode()
        signature = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        headers = {"X-Hub-Signature-256": signature, "X-GitHub-Event": "ping"}
        for _ in range(1000):
            idle.append(await asyncio.open_connection("127.0.0.1", port))
        # served "within 1 s": that is the client's whole timeout
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=1) as client:
            assert (await client.get("/chat/")).status_code == 200
            posted = await client.post("/hooks/github", content=body, headers=headers)
            assert posted.status_code == 202
        # and the idle connections are closed by the gateway, not left open for ever
        closed = await asyncio.gather(*(asyncio.wait_for(r.read(), WAIT) for r, _ in idle))
        assert closed == [b""] * 1000
        timeouts = await asyncio.to_thread(
            gateway.metric, "gateway_errors_total", kind="header_timeout"
        )
        assert timeouts >= 1000
    finally:
        for _, writer in idle:
            writer.close()
        if worker is not None:
            await asyncio.to_thread(worker.stop)
        await asyncio.to_thread(gateway.stop)
