"""The live page: one WebSocket group showing every gateway's events, and a way to answer them.

The http_ws integration (``examples/web.yaml``) routes ``/`` (the page, as ``http.request``),
``/live`` (its WebSocket) and ``/hooks/github`` (a signed webhook) to the channel ``live``, which
``manage.py runworker live`` serves with :class:`LiveConsumer`.

What a tab sends (JSON text frames):

- ``{"say": "text", "name": "ann"}``: a chat line every tab sees;
- ``{"answer": "mail", "to": "bob@example.org", "subject": "…", "text": "…",
  "in_reply_to": "<id>"}``:
  an ``email.send`` through the email integration's command channel.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from channels.consumer import AsyncConsumer

from gateways.email.consumers import EmailCommands
from gateways.http_ws.consumers import HttpWsReplies
from live.events import GROUP, show

log = logging.getLogger("live")

PAGE = (Path(__file__).parent / "page.html").read_bytes()
MAIL_COMMANDS = "support-mail.send"
SUPPORT_ADDRESS = "support@example.com"


class LiveConsumer(AsyncConsumer):
    """Serves the page, joins its sockets to the group, relays what people type."""

    async def http_request(self, message: dict[str, Any]) -> None:
        await HttpWsReplies(self.channel_layer, message["reply_channel"]).respond(
            200,
            PAGE,
            headers=[
                [b"content-type", b"text/html; charset=utf-8"],
                [b"cache-control", b"no-store"],
            ],
        )

    async def http_webhook(self, message: dict[str, Any]) -> None:
        event = dict(message["headers"]).get(b"x-github-event", b"webhook").decode()
        await show(self.channel_layer, "webhook", f"{event} on {message['path']}")

    async def websocket_connect(self, message: dict[str, Any]) -> None:
        reply = message["reply_channel"]
        await self.channel_layer.group_add(GROUP, reply)
        await HttpWsReplies(self.channel_layer, reply).accept()

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        await self.channel_layer.group_discard(GROUP, message["reply_channel"])

    async def websocket_receive(self, message: dict[str, Any]) -> None:
        try:
            request = json.loads(message["text"] or "")
        except ValueError:
            return
        if not isinstance(request, dict):
            return
        if isinstance(request.get("say"), str):
            name = str(request.get("name") or "someone")[:40]
            await show(self.channel_layer, "web", request["say"][:2000], name=name)
        elif request.get("answer") == "mail" and isinstance(request.get("to"), str):
            email = EmailCommands(self.channel_layer, MAIL_COMMANDS, timeout=10)
            try:
                await email.send(
                    [request["to"]],
                    from_=SUPPORT_ADDRESS,
                    subject=str(request.get("subject") or "Re:"),
                    text=str(request.get("text") or ""),
                    in_reply_to=request.get("in_reply_to") or None,
                    result_channel=self.scope["channel"],
                )
            except Exception as exc:
                await show(self.channel_layer, "web", f"answer not sent: {exc!r}")
                return
            await show(self.channel_layer, "web", f"answer to {request['to']} queued")

    async def email_result(self, message: dict[str, Any]) -> None:
        outcome = "sent" if message["ok"] else f"failed: {message['error']}"
        await show(self.channel_layer, "mail", f"answer {outcome}")
