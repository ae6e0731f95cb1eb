"""gateways/http_ws/host.py in one process: HttpWsGateway (uvicorn on a free port) and
ConsumerWorkers hosting an unchanged Channels application on the in-memory layer, with real
``websockets`` and ``httpx`` clients. The same code runs in ``manage.py runworker``
(test_unchanged_apps.py and test_rebind.py run it there, on Redis)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets
from channels.generic.http import AsyncHttpConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import DEFAULT_CHANNEL_LAYER, InMemoryChannelLayer, channel_layers
from channels.routing import ChannelNameRouter, ProtocolTypeRouter, URLRouter
from django.urls import path, re_path
from websockets.exceptions import ConnectionClosed, InvalidStatus

from core.testing import free_port, run_gateway, until
from core.worker import ConsumerWorker
from gateways.http_ws.config import HttpWsGatewayConfig
from gateways.http_ws.gateway import HttpWsGateway
from gateways.http_ws.host import BridgeHost, host_unrouted, routed_channels

#: what the test application saw: close codes of ended sockets, webhooks
seen: dict[str, list[Any]] = {}


class Room(AsyncWebsocketConsumer):  # type: ignore[misc]
    async def connect(self) -> None:
        self.room = self.scope["url_route"]["kwargs"]["room"]
        if self.room == "boom":
            raise RuntimeError("boom in connect")
        await self.channel_layer.group_add(self.room, self.channel_name)
        offered = self.scope["subprotocols"]
        await self.accept(subprotocol=offered[0] if offered else None)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if bytes_data is not None:
            await self.send(bytes_data=bytes_data)
        elif text_data == "scope":
            scope = self.scope
            await self.send(
                text_data=json.dumps(
                    {
                        "type": scope["type"],
                        "path": scope["path"],
                        "raw_path": scope["raw_path"].decode(),
                        "query_string": scope["query_string"].decode(),
                        "x-test": dict(scope["headers"]).get(b"x-test", b"").decode(),
                        "client": list(scope["client"]),
                        "server": list(scope["server"]),
                        "scheme": scope["scheme"],
                        "subprotocols": scope["subprotocols"],
                        "url_route": scope["url_route"]["kwargs"],
                        "own_channel": "!" in self.channel_name,
                    }
                )
            )
        elif text_data == "fail":
            raise RuntimeError("boom in receive")
        elif text_data == "self":
            await self.channel_layer.send(self.channel_name, {"type": "note", "text": "to me"})
        else:
            await self.channel_layer.group_send(self.room, {"type": "note", "text": text_data})

    async def note(self, event: dict[str, Any]) -> None:
        await self.send(text_data=event["text"])

    async def disconnect(self, code: int) -> None:
        seen.setdefault("closed", []).append(code)
        if hasattr(self, "room"):
            await self.channel_layer.group_discard(self.room, self.channel_name)


class Page(AsyncHttpConsumer):  # type: ignore[misc]
    async def handle(self, body: bytes) -> None:
        name = self.scope["path"].rsplit("/", 1)[-1]
        if name == "fail":
            raise RuntimeError("boom in handle")
        if name == "stream":
            await self.send_headers(headers=[(b"content-type", b"text/plain")])
            await self.send_body(b"one ", more_body=True)
            await self.send_body(b"two")
        elif name == "big":
            await self.send_response(200, b"x" * (2 * 1024 * 1024 + 3))
        else:
            seen.setdefault("requests", []).append(
                {"method": self.scope["method"], "path": self.scope["path"], "body": body}
            )
            echo = {"method": self.scope["method"], "query": self.scope["query_string"].decode()}
            await self.send_response(201, json.dumps(echo).encode(), headers=[(b"x-a", b"b")])


async def returns_nothing(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await receive()


application = ProtocolTypeRouter(
    {
        "websocket": URLRouter([path("ws/<room>/", Room.as_asgi())]),
        "http": URLRouter(
            [path("app/returns", returns_nothing), re_path(r"^app/|^hook", Page.as_asgi())]
        ),
    }
)

SECRET = "hook-secret"


def config(port: int, **section: Any) -> HttpWsGatewayConfig:
    return HttpWsGatewayConfig.model_validate(
        {
            "gateway": "http_ws",
            "name": "web",
            "http_ws": {
                "port": port,
                "websocket": [{"path": "/ws/*", "channel": "app"}],
                "http": [{"path": "/app/*", "channel": "app"}],
                "webhooks": [{"path": "/hook", "channel": "app", "secret": SECRET}],
                # far longer than any wait below: an answer that comes came from the worker
                "connect_timeout": 60,
                "response_timeout": 60,
                **section,
            },
        }
    )


@pytest.fixture
def layer(monkeypatch: pytest.MonkeyPatch) -> InMemoryChannelLayer:
    """The in-memory layer, as the consumers' default layer (what ``gateways run`` does)."""
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "tests.core.django_settings")
    layer = InMemoryChannelLayer()
    monkeypatch.setitem(channel_layers.backends, DEFAULT_CHANNEL_LAYER, layer)
    seen.clear()
    return layer


class Worker:
    """A ConsumerWorker hosting ``application`` on the channel ``app``, in this process."""

    def __init__(self, layer: Any, app: Any = None) -> None:
        app = host_unrouted(application) if app is None else app
        self.worker = ConsumerWorker(app, ["app"], layer, shutdown_grace=5)
        self.task = asyncio.create_task(self.worker.arun())

    async def stop(self) -> None:
        """What SIGTERM does: drain (the host releases its sockets), then stop."""
        await self.worker.drain()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture
async def worker(layer: InMemoryChannelLayer) -> AsyncIterator[Worker]:
    started = Worker(layer)
    yield started
    await started.stop()


async def test_routing_is_read_from_the_application() -> None:
    assert routed_channels(application) == frozenset()
    mixed = ProtocolTypeRouter(
        {"websocket": application, "channel": ChannelNameRouter({"mail": application})}
    )
    assert routed_channels(mixed) == {"mail"}
    assert routed_channels(returns_nothing) is None
    assert host_unrouted(returns_nothing) is returns_nothing  # cannot tell: left alone
    only_channels = ProtocolTypeRouter({"channel": ChannelNameRouter({"mail": application})})
    assert host_unrouted(only_channels) is only_channels  # nothing to host
    with pytest.raises(ValueError, match="channel scopes"):
        await BridgeHost(application)({"type": "websocket"}, None, None)


async def test_scope_routing_groups_and_own_channel(
    layer: InMemoryChannelLayer, worker: Worker
) -> None:
    port = free_port()
    url = f"ws://127.0.0.1:{port}/ws/lobby/?a=1"
    async with (
        run_gateway(HttpWsGateway(config(port), layer)),
        websockets.connect(
            url, subprotocols=["v1.chat"], additional_headers={"X-Test": "yes"}
        ) as first,
        websockets.connect(f"ws://127.0.0.1:{port}/ws/lobby/") as second,
        websockets.connect(f"ws://127.0.0.1:{port}/ws/other/") as elsewhere,
    ):
        assert first.subprotocol == "v1.chat"
        await first.send("scope")
        scope = json.loads(await asyncio.wait_for(first.recv(), 10))
        assert scope == {
            "type": "websocket",
            "path": "/ws/lobby/",
            "raw_path": "/ws/lobby/",
            "query_string": "a=1",
            "x-test": "yes",
            "client": ["127.0.0.1", first.local_address[1]],
            "server": ["127.0.0.1", port],
            "scheme": "ws",
            "subprotocols": ["v1.chat"],
            "url_route": {"room": "lobby"},
            "own_channel": True,
        }
        await first.send("hello room")  # group_send to the room: both members, not the other
        assert await asyncio.wait_for(first.recv(), 10) == "hello room"
        assert await asyncio.wait_for(second.recv(), 10) == "hello room"
        await second.send("self")  # channel_layer.send(self.channel_name, …)
        assert await asyncio.wait_for(second.recv(), 10) == "to me"
        await elsewhere.send(b"\x00bytes")
        assert await asyncio.wait_for(elsewhere.recv(), 10) == b"\x00bytes"
        for n in range(100):  # one socket's events reach its instance in order
            await first.send(f"m{n}")
        got = [await asyncio.wait_for(first.recv(), 10) for _ in range(100)]
        assert got == [f"m{n}" for n in range(100)]
    # each instance heard its socket's disconnect (its group_discard ran)
    await until(lambda: len(seen.get("closed", [])) == 3, 10, "three disconnects")


async def test_a_failing_application_answers_at_once(
    layer: InMemoryChannelLayer, worker: Worker
) -> None:
    port = free_port()
    async with run_gateway(HttpWsGateway(config(port), layer)):
        # the consumer raised in connect: 500 now, not 504 after connect_timeout (60 s)
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(f"ws://127.0.0.1:{port}/ws/boom/", open_timeout=10)
        assert refused.value.response.status_code == 500
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws/lobby/") as ws:
            await ws.send("fail")  # raised after accept: closed with 1011
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            assert (await client.get("/app/fail")).status_code == 500
            assert (await client.get("/app/returns")).status_code == 500


async def test_http_requests_and_webhooks(layer: InMemoryChannelLayer, worker: Worker) -> None:
    port = free_port()
    async with (
        run_gateway(HttpWsGateway(config(port), layer)),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client,
    ):
        response = await client.post("/app/echo?q=1", content=b"the body")
        assert response.status_code == 201 and response.headers["x-a"] == "b"
        assert response.json() == {"method": "POST", "query": "q=1"}
        assert seen["requests"] == [{"method": "POST", "path": "/app/echo", "body": b"the body"}]
        async with client.stream("GET", "/app/stream") as streamed:
            assert streamed.headers.get("transfer-encoding") == "chunked"
            assert b"".join([c async for c in streamed.aiter_bytes()]) == b"one two"
        big = await client.get("/app/big")  # more than one layer message: sent in parts
        assert big.status_code == 200 and big.content == b"x" * (2 * 1024 * 1024 + 3)

        body = b'{"event": "push"}'
        signature = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        hooked = await client.post(
            "/hook", content=body, headers={"X-Hub-Signature-256": signature}
        )
        assert hooked.status_code == 202
        await until(lambda: len(seen["requests"]) == 2, 10, "the webhook")
        assert seen["requests"][1] == {"method": "POST", "path": "/hook", "body": body}
        assert (await client.get("/hook")).status_code == 405


async def test_a_stopping_worker_hands_its_sockets_to_another(
    layer: InMemoryChannelLayer,
) -> None:
    """SIGTERM (``drain``) on the worker holding the sockets: each is re-bound to the next
    worker, whose instance runs connect again; the clients notice nothing."""
    port = free_port()
    first = Worker(layer)
    async with run_gateway(HttpWsGateway(config(port, rebind_timeout=5), layer)):
        url = f"ws://127.0.0.1:{port}/ws/lobby/"
        sockets = [await websockets.connect(url) for _ in range(5)]
        await sockets[0].send("before")
        assert [await asyncio.wait_for(ws.recv(), 10) for ws in sockets] == ["before"] * 5
        await sockets[1].send("in flight")  # sent while the worker stops: not lost
        await first.stop()
        assert sorted(seen["closed"]) == [1012] * 5  # the old instances ended: 1012
        # the next worker starts after the first stopped (the in-memory layer forgets a
        # channel's waiters when one of two cancels its receive; Redis layers do not)
        second = Worker(layer)
        try:
            got = [await asyncio.wait_for(ws.recv(), 10) for ws in sockets]
            assert got == ["in flight"] * 5
            for n, ws in enumerate(sockets):  # every socket still talks, to everyone
                await ws.send(f"after {n}")
                for other in sockets:
                    assert await asyncio.wait_for(other.recv(), 10) == f"after {n}"
        finally:
            await second.stop()
        # no worker left: after rebind_timeout the sockets are closed (1012), never left hanging
        for ws in sockets:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 20)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012


async def test_an_explicit_bridge_host_route(layer: InMemoryChannelLayer) -> None:
    """``ChannelNameRouter({"app": BridgeHost(application)})``: another application than the
    project's, on a channel of its choice; no automatic hosting needed."""
    routed = ProtocolTypeRouter({"channel": ChannelNameRouter({"app": BridgeHost(application)})})
    worker = Worker(layer, routed)
    port = free_port()
    try:
        async with (
            run_gateway(HttpWsGateway(config(port), layer)),
            websockets.connect(f"ws://127.0.0.1:{port}/ws/lobby/") as ws,
        ):
            await ws.send("self")
            assert await asyncio.wait_for(ws.recv(), 10) == "to me"
    finally:
        await worker.stop()
