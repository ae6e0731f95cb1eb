"""End to end: real ``websockets`` and ``httpx`` clients → gateway-http-ws (uvicorn) → Redis →
``manage.py runworker live echo`` (examples/live) and back, with every process real."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from pathlib import Path

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from core.testing import free_port
from tests.gateways.http_ws.conftest import SECRET, Web
from tests.support.example import EXAMPLES, example_project


async def test_connect_accept_echo_close(web: Web) -> None:
    async with websockets.connect(f"{web.ws}/echo", subprotocols=["v2.chat", "v1.chat"]) as ws:
        assert ws.subprotocol == "v2.chat"
        await ws.send("héllo")
        assert await ws.recv() == "héllo"
        await ws.send(b"\x00\xff binary")
        assert await ws.recv() == b"\x00\xff binary"
        # one connection's messages reach the consumer, and come back, in order
        for i in range(200):
            await ws.send(f"m{i}")
        assert [await ws.recv() for _ in range(200)] == [f"m{i}" for i in range(200)]
        await ws.send("close")  # the consumer closes with 4000
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4000
        assert closed.value.rcvd.reason == "asked to"
    async with websockets.connect(f"{web.ws}/echo") as ws:
        assert ws.subprotocol is None


async def test_handshake_refusals(web: Web) -> None:
    with pytest.raises(InvalidStatus) as refused:  # the consumer said websocket.close
        await websockets.connect(f"{web.ws}/echo?reject=1")
    assert refused.value.response.status_code == 403
    with pytest.raises(InvalidStatus) as unanswered:  # nobody answered within connect_timeout
        await websockets.connect(f"{web.ws}/echo?silent=1", open_timeout=30)
    assert unanswered.value.response.status_code == 504
    # a page from another site may not open sockets here (same origin only by default)
    with pytest.raises(InvalidStatus) as foreign:
        await websockets.connect(f"{web.ws}/echo", origin="https://evil.example")
    assert foreign.value.response.status_code == 403
    async with websockets.connect(f"{web.ws}/echo", origin=f"http://127.0.0.1:{web.port}") as ws:
        await ws.send("same origin")
        assert await ws.recv() == "same origin"
    # not bridged: the in-process application (--app) answers, and its
    # AllowedHostsOriginValidator refuses a client that sends no Origin
    with pytest.raises(InvalidStatus) as unrouted:
        await websockets.connect(f"{web.ws}/nowhere")
    assert unrouted.value.response.status_code == 403


async def test_message_over_the_limit_closes_1009(web: Web) -> None:
    async with websockets.connect(f"{web.ws}/echo", max_size=None) as ws:
        await ws.send("x" * 4096)  # the limit itself passes
        assert len(await ws.recv()) == 4096
        await ws.send("x" * 4097)
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.sent is not None or closed.value.rcvd is not None
        code = (closed.value.rcvd or closed.value.sent).code  # type: ignore[union-attr]
        assert code == 1009


async def test_group_broadcast_reaches_50_sockets(web: Web) -> None:
    sockets = [await websockets.connect(f"{web.ws}/echo?group=room") for _ in range(50)]
    try:
        # every socket is in the group once its own echo came back (group_add ran before accept)
        await sockets[0].send("broadcast:hello all")
        got = await asyncio.gather(*(asyncio.wait_for(ws.recv(), 30) for ws in sockets))
        assert got == ["hello all"] * 50
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets))


async def test_http_request_response(web: Web) -> None:
    async with httpx.AsyncClient(base_url=web.http, timeout=30) as client:
        response = await client.post("/api/echo?a=1&b=2", content=b"body bytes")
        assert response.status_code == 200
        assert response.headers["x-bridge"] == "yes"
        echo = response.json()
        assert echo["method"] == "POST"
        assert echo["path"] == "/api/echo"
        assert echo["query_string"] == "a=1&b=2"
        assert echo["body"] == "body bytes"
        assert echo["headers"]["content-length"] == "10"
        assert echo["client"][0] == "127.0.0.1"

        async with client.stream("GET", "/api/stream") as streamed:
            assert streamed.status_code == 200
            assert streamed.headers.get("transfer-encoding") == "chunked"
            assert b"".join([c async for c in streamed.aiter_bytes()]) == b"one two three"

        assert (await client.get("/api/silent")).status_code == 504
        too_big = await client.post("/api/echo", content=b"x" * 4097)
        assert too_big.status_code == 413
        # paths that are not bridged reach the in-process Django app (--app)
        status = await client.get("/status/")
        assert status.status_code == 200 and status.json() == {"mails": 0, "readings": 0}
        assert (await client.get("/not/anywhere")).status_code == 404


def sign(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


async def test_webhook_signatures(web: Web) -> None:
    body = json.dumps({"zen": "Keep it logically awesome."}).encode()
    async with (
        websockets.connect(f"{web.ws}/live") as page,
        httpx.AsyncClient(base_url=web.http, timeout=30) as client,
    ):
        missing = await client.post("/hooks/github", content=body)
        bad = await client.post(
            "/hooks/github",
            content=body,
            headers={"X-Hub-Signature-256": sign(body, "wrong"), "X-GitHub-Event": "bad"},
        )
        tampered = await client.post(
            "/hooks/github",
            content=body + b" ",
            headers={"X-Hub-Signature-256": sign(body), "X-GitHub-Event": "tampered"},
        )
        assert [missing.status_code, bad.status_code, tampered.status_code] == [401, 401, 401]
        good = await client.post(
            "/hooks/github",
            content=body,
            headers={"X-Hub-Signature-256": sign(body), "X-GitHub-Event": "ping"},
        )
        assert good.status_code == 202
        # only the good one reached the consumer, which shows it on the live page
        line = json.loads(await asyncio.wait_for(page.recv(), 30))
        assert (line["source"], line["summary"]) == ("webhook", "ping on /hooks/github")
        await page.send(json.dumps({"say": "after the hooks"}))
        assert json.loads(await asyncio.wait_for(page.recv(), 30))["summary"] == "after the hooks"


async def test_sigterm_closes_sockets_with_1001(web: Web) -> None:
    assert web.gateway is not None
    async with websockets.connect(f"{web.ws}/echo") as ws:
        await ws.send("before")
        assert await ws.recv() == "before"
        assert await asyncio.to_thread(web.gateway.stop) == 0, web.gateway.tail()
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001


async def test_one_process_on_memory_layer(tmp_path: Path) -> None:
    """`gateways run web.yaml --app …` on memory://: the page, the echo consumer over the
    in-process layer, the Django view and the hosted chat, in one process with no Redis."""
    port = free_port()
    env = {"WEB_PORT": str(port), "HEALTH_PORT": "0"}
    project = await asyncio.to_thread(example_project, tmp_path, env=env)
    argv = [
        "gateways",
        "run",
        str(EXAMPLES / "web.yaml"),
        "--app",
        "example.asgi:application",
        "--layer",
        "memory://",
    ]
    server = await asyncio.to_thread(project.server, argv, "ready: events", name="gateways run")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            page = await client.get("/")
            assert page.status_code == 200 and "<title>channels-gateways: live" in page.text
            assert (await client.get("/status/")).json() == {"mails": 0, "readings": 0}
        async with websockets.connect(f"ws://127.0.0.1:{port}/echo") as ws:
            await ws.send("in one process")
            assert await ws.recv() == "in one process"
        # the chat (rooms: no ChannelNameRouter entry) is hosted in the same process
        origin = f"http://127.0.0.1:{port}"
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws/chat/one/", origin=origin) as ws:
            await ws.send(json.dumps({"message": "hosted here"}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 30)) == {"message": "hosted here"}
    finally:
        assert await asyncio.to_thread(server.stop) == 0, server.tail()
