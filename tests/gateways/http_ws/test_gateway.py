"""HttpWsGateway in-process (uvicorn on a free port) with a test playing the consumer on the
layer: push-back on a full channel (503 / 1013), idle timeout, invalid answers, the in-process
app, TLS, and a port already taken."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets
from channels.layers import InMemoryChannelLayer
from websockets.exceptions import ConnectionClosed, InvalidStatus

from core.layers import resolve_layer
from core.retry import StartupError
from core.testing import Certs, RedisServer, free_port, metric, run_gateway
from core.testing import receive as next_message
from gateways.http_ws.config import HttpWsGatewayConfig
from gateways.http_ws.gateway import HttpWsGateway


def config(port: int, **section: Any) -> HttpWsGatewayConfig:
    return HttpWsGatewayConfig.model_validate(
        {
            "gateway": "http_ws",
            "name": "web",
            "http_ws": {
                "port": port,
                "websocket": [{"path": "/ws"}],
                "http": [{"path": "/api/*"}],
                **section,
            },
        }
    )


async def receive(layer: Any, channel: str = "web", timeout: float = 10) -> dict[str, Any]:
    return await next_message(layer, channel, timeout=timeout)


async def open_ws(url: str, **kwargs: Any) -> websockets.ClientConnection:
    """websockets.connect as a coroutine, for a task: the handshake waits for our accept."""
    return await websockets.connect(url, **kwargs)


@pytest.fixture
async def full_redis_layer(redis_server: RedisServer) -> AsyncIterator[Any]:
    """A channels_redis layer whose channels hold 2 messages."""
    layer = resolve_layer(f"{redis_server.url}?capacity=2")
    yield layer
    await layer.close_pools()


async def test_full_channel_pushes_back_with_503_and_1013(full_redis_layer: Any) -> None:
    port = free_port()
    # the layer's capacity (2), not the gateway's inbound_capacity: the channel fills up
    settings = config(port, publish_timeout=0.3).model_copy(update={"inbound_capacity": None})
    gateway = HttpWsGateway(settings, full_redis_layer)
    async with run_gateway(gateway):
        connecting = asyncio.create_task(open_ws(f"ws://127.0.0.1:{port}/ws"))
        connect = await receive(full_redis_layer)  # the consumer takes the connect...
        await full_redis_layer.send(connect["reply_channel"], {"type": "websocket.accept"})
        ws = await connecting
        await ws.send("one")  # ...and then stops reading: 1, 2, then full
        await ws.send("two")
        await ws.send("three")
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(f"http://127.0.0.1:{port}/api/x")
        assert response.status_code == 503 and response.headers["retry-after"] == "5"
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(f"ws://127.0.0.1:{port}/ws")
        assert refused.value.response.status_code == 503
        # what the layer took is there, in order
        assert [(await receive(full_redis_layer))["text"] for _ in range(2)] == ["one", "two"]


async def test_idle_sockets_close_and_bad_answers_are_refused() -> None:
    layer = InMemoryChannelLayer()
    port = free_port()
    gateway = HttpWsGateway(config(port, idle_timeout=0.5), layer)
    async with run_gateway(gateway):
        connecting = asyncio.create_task(open_ws(f"ws://127.0.0.1:{port}/ws"))
        connect = await receive(layer)
        reply = connect["reply_channel"]
        await layer.send(reply, {"type": "websocket.accept"})
        ws = await connecting
        await layer.send(reply, {"type": "websocket.send"})  # invalid: ignored, socket stays
        await layer.send(reply, {"type": "websocket.send", "text": "still here"})
        assert await ws.recv() == "still here"
        with pytest.raises(ConnectionClosed) as closed:  # then nothing for 0.5 s
            await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        disconnect = await receive(layer)
        assert disconnect["type"] == "websocket.disconnect" and disconnect["code"] == 1001

        async with httpx.AsyncClient(timeout=10) as client:
            pending = asyncio.create_task(client.get(f"http://127.0.0.1:{port}/api/x"))
            request = await receive(layer)
            await layer.send(request["reply_channel"], {"type": "http.response", "status": 9})
            assert (await pending).status_code == 502
            assert (await client.get(f"http://127.0.0.1:{port}/other")).status_code == 404


async def test_connection_cap() -> None:
    layer = InMemoryChannelLayer()
    port = free_port()
    gateway = HttpWsGateway(config(port, max_websockets=1), layer)
    async with run_gateway(gateway):
        connecting = asyncio.create_task(open_ws(f"ws://127.0.0.1:{port}/ws"))
        connect = await receive(layer)
        await layer.send(connect["reply_channel"], {"type": "websocket.accept"})
        first = await connecting
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(f"ws://127.0.0.1:{port}/ws")
        assert refused.value.response.status_code == 503
        await first.close()
        assert (await receive(layer))["type"] == "websocket.disconnect"
        connecting = asyncio.create_task(open_ws(f"ws://127.0.0.1:{port}/ws"))  # room again
        connect = await receive(layer)
        await layer.send(connect["reply_channel"], {"type": "websocket.accept"})
        await (await connecting).close()


async def test_app_serves_the_other_paths() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"from the app"})

    port = free_port()
    gateway = HttpWsGateway(config(port), InMemoryChannelLayer())
    gateway.serve_application(app)
    async with run_gateway(gateway), httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"http://127.0.0.1:{port}/page")
    assert response.text == "from the app"


async def test_tls(certs: Certs) -> None:
    layer = InMemoryChannelLayer()
    port = free_port()
    tls = {"cert_file": str(certs.server_crt), "key_file": str(certs.server_key)}
    gateway = HttpWsGateway(config(port, tls=tls), layer)
    context = ssl.create_default_context(cafile=str(certs.ca_crt))
    async with run_gateway(gateway):
        connecting = asyncio.create_task(open_ws(f"wss://localhost:{port}/ws", ssl=context))
        connect = await receive(layer)
        assert connect["scheme"] == "wss"
        await layer.send(connect["reply_channel"], {"type": "websocket.send", "text": "secure"})
        ws = await connecting
        assert await ws.recv() == "secure"
        await ws.close()


async def test_port_taken_is_a_startup_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gateway = HttpWsGateway(config(port), InMemoryChannelLayer())
        with pytest.raises(StartupError, match="cannot listen"):
            async with run_gateway(gateway):
                pass


async def test_late_answers_to_finished_requests_are_swept(redis_server: RedisServer) -> None:
    """channels_redis buffers a message for a "!" channel nobody receives on any more, for the
    life of the process: a 504'd request's late answer, a group_send to a socket that is gone.
    The gateway drops such buffers of its own channels, never a consumer's."""
    layer = resolve_layer(redis_server.url)
    port = free_port()
    gateway = HttpWsGateway(config(port, response_timeout=0.3), layer)
    try:
        async with run_gateway(gateway), httpx.AsyncClient(timeout=10) as client:
            theirs = await layer.new_channel()  # a consumer's channel in the same process
            pending = asyncio.create_task(client.get(f"http://127.0.0.1:{port}/api/late"))
            request = await receive(layer)
            assert (await pending).status_code == 504
            reply = request["reply_channel"]
            assert "!web." in reply
            await layer.send(reply, {"type": "http.response", "status": 200})
            await layer.send(theirs, {"type": "x.y"})
            # the gateway's process-channel receiver moves both into receive_buffer
            for _ in range(200):
                if reply in layer.receive_buffer and theirs in layer.receive_buffer:
                    break
                await asyncio.sleep(0.02)
            assert reply in layer.receive_buffer and theirs in layer.receive_buffer
            assert gateway.sweep() == 1
            assert reply not in layer.receive_buffer
            assert (await asyncio.wait_for(layer.receive(theirs), 10))["type"] == "x.y"
    finally:
        await layer.close_pools()


async def test_generic_hmac_webhook() -> None:
    import hashlib
    import hmac

    layer = InMemoryChannelLayer()
    port = free_port()
    hook = {
        "path": "/hooks/shop",
        "channel": "hooks",
        "signature": "hmac-sha256",
        "header": "X-Shop-Signature",
        "secret": "s3cret",
    }
    gateway = HttpWsGateway(config(port, webhooks=[hook]), layer)
    body = b'{"order": 42}'
    good = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    async with run_gateway(gateway), httpx.AsyncClient(timeout=10) as client:
        url = f"http://127.0.0.1:{port}/hooks/shop?x=1"
        forged = b'{"order": 666}'
        bad = await client.post(url, content=forged, headers={"X-Shop-Signature": good})
        assert bad.status_code == 401
        ok = await client.post(url, content=body, headers={"X-Shop-Signature": good})
        assert ok.status_code == 202
        # the first event on the channel is the good one: the forged one (answered first)
        # never reached the layer
        event = await receive(layer, "hooks")
        assert event["type"] == "http.webhook" and event["body"] == body
        assert event["query_string"] == b"x=1" and event["reply_channel"] == "web.send"


async def test_events_carry_path_and_channel_and_a_failed_connect_is_500() -> None:
    """Every event of a socket names its path and the route's channel, so consumers that keep
    no state per socket (several runworker processes) know where it belongs."""
    layer = InMemoryChannelLayer()
    port = free_port()
    gateway = HttpWsGateway(config(port, websocket=[{"path": "/ws/*", "channel": "rooms"}]), layer)
    async with run_gateway(gateway):
        connecting = asyncio.create_task(open_ws(f"ws://127.0.0.1:{port}/ws/a?x=1"))
        connect = await receive(layer, "rooms")
        assert (connect["path"], connect["channel"], connect["raw_path"]) == (
            "/ws/a",
            "rooms",
            b"/ws/a",
        )
        assert connect["server"] == ["127.0.0.1", port] and connect["http_version"] == "1.1"
        await layer.send(connect["reply_channel"], {"type": "websocket.accept"})
        ws = await connecting
        await ws.send("hi")
        event = await receive(layer, "rooms")
        assert (event["type"], event["path"], event["channel"]) == (
            "websocket.receive",
            "/ws/a",
            "rooms",
        )
        await ws.close()
        event = await receive(layer, "rooms")
        assert (event["type"], event["path"], event["channel"]) == (
            "websocket.disconnect",
            "/ws/a",
            "rooms",
        )

        # a consumer that fails closes with 1011 before accepting: 500, not a plain refusal
        connecting = asyncio.create_task(open_ws(f"ws://127.0.0.1:{port}/ws/b"))
        connect = await receive(layer, "rooms")
        await layer.send(connect["reply_channel"], {"type": "websocket.close", "code": 1011})
        with pytest.raises(InvalidStatus) as failed:
            await connecting
        assert failed.value.response.status_code == 500


async def raw_request(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send ``data`` on a new connection and read until the server closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


async def test_request_heads_have_a_deadline() -> None:
    """A connection that sends nothing, or its headers too slowly, is closed after
    header_timeout (uvicorn has no such timeout: they stayed open for ever)."""
    layer = InMemoryChannelLayer()
    port = free_port()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"page"})

    gateway = HttpWsGateway(config(port, header_timeout=0.5, keepalive_timeout=30), layer)
    gateway.serve_application(app)
    async with run_gateway(gateway):
        assert await raw_request(port, b"") == b""  # nothing sent: closed, no answer
        assert await raw_request(port, b"GET /page HTTP/1.1\r\nHost: x\r\n") == b""  # no blank line
        # a complete head is served; on the kept-alive connection the next head is due again
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /page HTTP/1.1\r\nHost: x\r\n\r\n")
        response = await asyncio.wait_for(reader.readuntil(b"page\r\n0\r\n\r\n"), 10)
        assert response.startswith(b"HTTP/1.1 200")
        writer.write(b"GET /page HTTP/1.1\r\n")  # and then nothing more
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
    assert metric("gateway_errors_total", gateway="web", kind="header_timeout") >= 3


async def test_websockets_and_requests_have_caps_of_their_own() -> None:
    """The WebSocket cap does not shut out webhooks and pages, nor the request cap sockets."""
    import hashlib
    import hmac

    layer = InMemoryChannelLayer()
    port = free_port()
    hook = {"path": "/hook", "channel": "hooks", "secret": "s"}
    gateway = HttpWsGateway(config(port, max_websockets=1, max_requests=1, webhooks=[hook]), layer)
    body = b"{}"
    signature = "sha256=" + hmac.new(b"s", body, hashlib.sha256).hexdigest()
    async with run_gateway(gateway), httpx.AsyncClient(timeout=10) as client:
        connecting = asyncio.create_task(open_ws(f"ws://127.0.0.1:{port}/ws"))
        connect = await receive(layer)
        await layer.send(connect["reply_channel"], {"type": "websocket.accept"})
        first = await connecting
        with pytest.raises(InvalidStatus) as refused:  # the socket cap is reached...
            await websockets.connect(f"ws://127.0.0.1:{port}/ws")
        assert refused.value.response.status_code == 503
        url = f"http://127.0.0.1:{port}/hook"
        hooked = await client.post(url, content=body, headers={"X-Hub-Signature-256": signature})
        assert hooked.status_code == 202  # ...and the webhook still gets in
        wrong = await client.get(url)
        assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
        # one request in progress reaches the request cap; sockets are not counted in it
        pending = asyncio.create_task(client.get(f"http://127.0.0.1:{port}/api/slow"))
        request = await receive(layer)
        second = await client.get(f"http://127.0.0.1:{port}/api/other")
        assert second.status_code == 503 and second.headers["retry-after"] == "5"
        await layer.send(request["reply_channel"], {"type": "http.response", "status": 200})
        assert (await pending).status_code == 200
        await first.close()


async def test_a_silent_worker_loses_its_sockets_and_requests() -> None:
    """The test plays the hosting workers (gateways/http_ws/README.md, "The bridge's own
    messages"): a socket bound to a worker that stops sending heartbeats is re-bound to another
    one with its unconfirmed events replayed; a request held by one is answered 502."""
    layer = InMemoryChannelLayer()
    port = free_port()
    gateway = HttpWsGateway(config(port, worker_timeout=3, rebind_timeout=10), layer)
    async with run_gateway(gateway), httpx.AsyncClient(timeout=10) as client:
        connecting = asyncio.create_task(open_ws(f"ws://127.0.0.1:{port}/ws"))
        connect = await receive(layer)
        assert connect["rebind"] is False and connect["window"] == 32
        reply, first = connect["reply_channel"], connect["id"]
        hosted = {"bind": first, "host": "worker-a", "acked": 0}
        await layer.send(reply, {"type": "websocket.accept", **hosted})
        ws = await connecting
        for text in ("one", "two"):
            await ws.send(text)
        got = [await receive(layer, "worker-a") for _ in range(2)]
        assert [(e["text"], e["seq"], e["bind"], e["path"]) for e in got] == [
            ("one", 1, first, "/ws"),
            ("two", 2, first, "/ws"),
        ]
        await layer.send(reply, {"type": "http_ws.ack", **hosted, "acked": 1})
        # a heartbeat naming a socket the gateway does not know: the answer says it is gone
        beat = {"type": "http_ws.heartbeat", "host": "worker-a", "held": [["nope", "x", 0]]}
        await layer.send(connect["control"], beat)
        alive = await receive(layer, "worker-a")
        assert alive["type"] == "http_ws.alive" and alive["gone"] == [["nope", "x"]]

        # worker-a goes quiet: after worker_timeout the connect goes out again
        again = await receive(layer, timeout=10)
        assert again["rebind"] is True and again["seq"] == 1 and again["id"] != first
        assert again["reply_channel"] == reply and again["path"] == "/ws"
        rebound = {"bind": again["id"], "host": "worker-b", "acked": 1}
        await layer.send(reply, {"type": "websocket.accept", **rebound})  # swallowed
        replayed = await receive(layer, "worker-b")
        assert (replayed["text"], replayed["seq"], replayed["bind"]) == ("two", 2, again["id"])
        await ws.send("three")
        assert (await receive(layer, "worker-b"))["seq"] == 3
        # worker-a's late messages are not worker-b's socket's any more
        await layer.send(reply, {"type": "websocket.send", "text": "stale", **hosted})
        await layer.send(reply, {"type": "websocket.send", "text": "fresh", **rebound})
        assert await asyncio.wait_for(ws.recv(), 10) == "fresh"

        # a request whose worker (named by its heartbeat) goes quiet: 502, not a 504 later
        pending = asyncio.create_task(client.get(f"http://127.0.0.1:{port}/api/slow"))
        request = await receive(layer)
        while request["type"] != "http.request":  # worker-b went quiet too: its re-binds
            request = await receive(layer)
        held = [[request["reply_channel"], request["id"], 0]]
        await layer.send(
            connect["control"], {"type": "http_ws.heartbeat", "host": "worker-c", "held": held}
        )
        assert (await receive(layer, "worker-c"))["gone"] == []
        assert (await pending).status_code == 502
        await ws.close()
