"""A consumer that exercises every corner of the http_ws bridge (tests and bench/http_ws.py).

Channel ``echo`` (``examples/web.yaml`` routes ``/echo``, ``/api/*`` to it):

- WebSocket: accepts with the first offered subprotocol; ``?reject=1`` refuses; ``?silent=1``
  never answers the connect; ``?group=NAME`` joins group NAME; text and bytes come back as
  they went; the text ``close`` closes with 4000; ``broadcast:X`` sends X to the socket's group.
- HTTP: ``/api/echo`` answers with the request as JSON; ``/api/stream`` streams three chunks;
  ``/api/silent`` never answers (504).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs

from channels.consumer import AsyncConsumer


class EchoConsumer(AsyncConsumer):
    groups_by_socket: dict[str, str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.groups_by_socket = {}

    async def reply(self, message: dict[str, Any], **keys: Any) -> None:
        await self.channel_layer.send(message["reply_channel"], keys)

    async def websocket_connect(self, message: dict[str, Any]) -> None:
        query = parse_qs(message["query_string"].decode())
        if "silent" in query:
            return
        if "reject" in query:
            await self.reply(message, type="websocket.close")
            return
        if "group" in query:
            group = query["group"][0]
            self.groups_by_socket[message["reply_channel"]] = group
            await self.channel_layer.group_add(group, message["reply_channel"])
        offered = message["subprotocols"]
        await self.reply(
            message, type="websocket.accept", subprotocol=offered[0] if offered else None
        )

    async def websocket_receive(self, message: dict[str, Any]) -> None:
        text = message["text"]
        if text == "close":
            await self.reply(message, type="websocket.close", code=4000, reason="asked to")
        elif text is not None and text.startswith("broadcast:"):
            group = self.groups_by_socket.get(message["reply_channel"])
            if group:
                await self.channel_layer.group_send(
                    group, {"type": "websocket.send", "text": text.removeprefix("broadcast:")}
                )
        elif text is not None:
            await self.reply(message, type="websocket.send", text=text)
        else:
            await self.reply(message, type="websocket.send", bytes=message["bytes"])

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        group = self.groups_by_socket.pop(message["reply_channel"], None)
        if group:
            await self.channel_layer.group_discard(group, message["reply_channel"])

    async def http_request(self, message: dict[str, Any]) -> None:
        path = message["path"]
        if path == "/api/silent":
            return
        if path == "/api/stream":
            await self.reply(
                message,
                type="http.response",
                status=200,
                headers=[[b"content-type", b"text/plain"]],
                body=b"one ",
                more_body=True,
            )
            await self.reply(message, type="http.response.body", body=b"two ", more_body=True)
            await self.reply(message, type="http.response.body", body=b"three")
            return
        echo = {
            "method": message["method"],
            "path": path,
            "query_string": message["query_string"].decode(),
            "body": message["body"].decode("utf-8", "replace"),
            "headers": {k.decode(): v.decode("latin-1") for k, v in message["headers"]},
            "client": message["client"],
        }
        await self.reply(
            message,
            type="http.response",
            status=200,
            headers=[[b"content-type", b"application/json"], [b"x-bridge", b"yes"]],
            body=json.dumps(echo).encode(),
        )
