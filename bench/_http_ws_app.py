"""The in-process baseline of bench/http_ws.py: the same echo, as Daphne or uvicorn serve it.

WebSocket ``/echo``: a Channels ``AsyncWebsocketConsumer`` sending every frame back. HTTP
``/api/echo``: a Channels ``AsyncHttpConsumer`` answering the same JSON as the example's
bridged ``EchoConsumer`` does. No layer is involved: this is what the layer hop is measured
against.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example.settings")
os.environ.setdefault("EXAMPLE_LAYER", "memory://")

import django

django.setup()

from channels.generic.http import AsyncHttpConsumer  # noqa: E402
from channels.generic.websocket import AsyncWebsocketConsumer  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402


class Echo(AsyncWebsocketConsumer):  # type: ignore[misc]
    async def connect(self) -> None:
        await self.accept()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        await self.send(text_data=text_data, bytes_data=bytes_data)


class EchoView(AsyncHttpConsumer):  # type: ignore[misc]
    async def handle(self, body: bytes) -> None:
        scope: dict[str, Any] = self.scope
        echo = {
            "method": scope["method"],
            "path": scope["path"],
            "query_string": scope["query_string"].decode(),
            "body": body.decode("utf-8", "replace"),
            "headers": {k.decode(): v.decode("latin-1") for k, v in scope["headers"]},
            "client": list(scope["client"]) if scope.get("client") else None,
        }
        await self.send_response(
            200,
            json.dumps(echo).encode(),
            headers=[(b"content-type", b"application/json"), (b"x-bridge", b"no")],
        )


application = ProtocolTypeRouter(
    {
        "websocket": URLRouter([path("echo", Echo.as_asgi())]),
        "http": URLRouter([path("api/echo", EchoView.as_asgi())]),
    }
)
