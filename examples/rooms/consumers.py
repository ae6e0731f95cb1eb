"""Channels consumers as the Channels documentation writes them, nothing gateway-specific.

They run behind gateway-http-ws (``manage.py runworker rooms``: ``web.yaml`` routes ``/ws/*``,
``/chat/*`` and ``/accounts/*`` to the channel ``rooms``, which no ``ChannelNameRouter`` entry
claims, so the worker hosts ``example.asgi.application`` there) exactly as they run under
``daphne example.asgi:application``; tests/gateways/http_ws/test_unchanged_apps.py runs both.

- :class:`ChatConsumer`: the tutorial's chat room (``/ws/chat/<room_name>/``), unchanged.
- :class:`WhoAmIConsumer`: a ``JsonWebsocketConsumer`` (sync, in a thread) behind
  ``AuthMiddlewareStack``: who the Django session says you are; ``{"later": x}`` comes back
  through ``self.channel_layer.send(self.channel_name, …)``.
- :class:`PostMessageConsumer`: an ``AsyncHttpConsumer`` behind ``AuthMiddlewareStack``:
  ``POST /chat/<room_name>/messages/`` (JSON ``{"message": …}``) says something in a room as the
  signed-in user, through the room's group.
"""

import json

from asgiref.sync import async_to_sync
from channels.generic.http import AsyncHttpConsumer
from channels.generic.websocket import AsyncWebsocketConsumer, JsonWebsocketConsumer


class ChatConsumer(AsyncWebsocketConsumer):
    async def connect(self):
        self.room_name = self.scope["url_route"]["kwargs"]["room_name"]
        self.room_group_name = f"chat_{self.room_name}"

        # Join room group
        await self.channel_layer.group_add(self.room_group_name, self.channel_name)

        await self.accept()

    async def disconnect(self, close_code):
        # Leave room group
        await self.channel_layer.group_discard(self.room_group_name, self.channel_name)

    # Receive message from WebSocket
    async def receive(self, text_data):
        text_data_json = json.loads(text_data)
        message = text_data_json["message"]

        # Send message to room group
        await self.channel_layer.group_send(
            self.room_group_name, {"type": "chat.message", "message": message}
        )

    # Receive message from room group
    async def chat_message(self, event):
        message = event["message"]

        # Send message to WebSocket
        await self.send(text_data=json.dumps({"message": message}))


class WhoAmIConsumer(JsonWebsocketConsumer):
    def connect(self):
        self.accept()
        self.send_json({"user": self.username(), "path": self.scope["path"]})

    def username(self):
        user = self.scope["user"]
        return user.get_username() if user.is_authenticated else None

    def receive_json(self, content, **kwargs):
        if "later" in content:
            # a message to this instance's own channel comes back through the layer
            async_to_sync(self.channel_layer.send)(
                self.channel_name, {"type": "say.later", "text": content["later"]}
            )
        else:
            self.send_json({"echo": content, "user": self.username()})

    def say_later(self, event):
        self.send_json({"later": event["text"]})


class PostMessageConsumer(AsyncHttpConsumer):
    async def handle(self, body):
        if self.scope["method"] != "POST":
            await self.send_response(405, b"POST a message\n", headers=[(b"Allow", b"POST")])
            return
        headers = dict(self.scope["headers"])
        if headers.get(b"content-type", b"").split(b";")[0] != b"application/json":
            # a form on another site cannot send JSON without asking first (CORS): no CSRF
            await self.send_response(415, b"send application/json\n")
            return
        user = self.scope["user"]
        name = user.get_username() if user.is_authenticated else "someone"
        message = f"{name}: {json.loads(body)['message']}"
        room_name = self.scope["url_route"]["kwargs"]["room_name"]
        await self.channel_layer.group_send(
            f"chat_{room_name}", {"type": "chat.message", "message": message}
        )
        await self.send_headers(status=202, headers=[(b"Content-Type", b"application/json")])
        # the response in two parts, as a streamed one would go
        await self.send_body(b'{"sent": ', more_body=True)
        await self.send_body(json.dumps(message).encode() + b"}")
