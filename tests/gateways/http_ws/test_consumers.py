"""gateways/http_ws/consumers.py: HttpWsConsumer in the spirit of Channels' WebsocketConsumer."""

from __future__ import annotations

from typing import Any

import pytest
from channels.layers import InMemoryChannelLayer

from core.consumers import InvalidCommand
from gateways.http_ws.consumers import (
    HttpWsConsumer,
    HttpWsReplies,
    http_response,
    websocket_accept,
    websocket_close,
    websocket_send,
)
from tests.gateways.conftest import Handle, nothing_sent, sent


def event(type_: str, socket: str = "specific.x!web.1", **keys: Any) -> dict[str, Any]:
    return {"type": type_, "gateway": "web", "id": "1", "reply_channel": socket, **keys}


class Chat(HttpWsConsumer):
    groups = ["chat"]

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if text_data == "bye":
            await self.send("see you", close=True)
        else:
            await self.broadcast("chat", text_data)


async def test_connect_joins_the_groups_and_accepts(handle: Handle) -> None:
    layer = InMemoryChannelLayer()
    chat = await handle(Chat, event("websocket.connect", subprotocols=[]), layer=layer)
    assert await sent(chat, "specific.x!web.1") == websocket_accept()
    await handle(Chat, event("websocket.receive", text="hello", bytes=None), layer=layer)
    assert await sent(chat, "specific.x!web.1") == websocket_send("hello")  # via the group
    await handle(Chat, event("websocket.disconnect", code=1001, reason=""), layer=layer)
    await layer.group_send("chat", websocket_send("after"))
    assert await nothing_sent(chat, "specific.x!web.1")


async def test_send_with_close(handle: Handle) -> None:
    chat = await handle(Chat, event("websocket.receive", text="bye", bytes=None))
    assert await sent(chat, "specific.x!web.1") == websocket_send("see you")
    assert await sent(chat, "specific.x!web.1") == websocket_close()


async def test_an_unanswered_request_is_a_404(handle: Handle) -> None:
    chat = await handle(Chat, event("http.request", path="/x", method="GET", body=b""))
    answer = await sent(chat, "specific.x!web.1")
    assert answer == http_response(404, b"Not Found", headers=[[b"content-type", b"text/plain"]])


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (lambda r: r.close(1006), "code 1006 cannot be sent in a close frame"),
        (lambda r: r.send(), "websocket.send needs exactly one of text and bytes"),
        (lambda r: r.respond(700), "status must be an integer from 100 to 599"),
        (lambda r: r.respond(200, headers=[[b"x", b"a\r\nb"]]), "invalid header b'x'"),
        (lambda r: r.accept(headers=[["x", "€"]]), "header text must be latin-1"),
    ],
)
async def test_what_the_bridge_would_refuse_is_refused_here(answer: Any, error: str) -> None:
    replies = HttpWsReplies(InMemoryChannelLayer(), "specific.x!web.1")
    with pytest.raises(InvalidCommand, match=error):
        await answer(replies)
    assert await nothing_sent(replies, "specific.x!web.1")


async def test_the_bridge_has_no_results_to_wait_for() -> None:
    replies = HttpWsReplies(InMemoryChannelLayer(), "specific.x!web.1")
    with pytest.raises(InvalidCommand, match="has no result to wait for"):
        await replies.submit(websocket_send("x"), wait=True)
