"""Django-side helpers for the HTTP/WebSocket bridge's own message spec: answers checked before
they leave, and a consumer in the spirit of Channels' ``WebsocketConsumer``.

    from gateways.http_ws.consumers import HttpWsConsumer

    class ChatConsumer(HttpWsConsumer):
        groups = ["chat"]                       # every socket joins them (and leaves on close)

        async def receive(self, text_data=None, bytes_data=None):
            await self.broadcast("chat", text_data)   # to every socket in the group

        async def request(self, message):       # an http.request on a bridged path
            await self.respond(200, b"hello", headers=[[b"content-type", b"text/plain"]])

One consumer instance serves every socket routed to its channel (``runworker`` runs one per
channel): :meth:`HttpWsConsumer.send` and the other answers go to the socket (or request) whose
event is being handled, :attr:`HttpWsConsumer.socket` names it. Keep per-socket state in a dict
keyed by it.

Builders (``websocket_accept``, ``websocket_send``, ``websocket_close``, ``http_response``,
``http_response_body``) return the answer dict and raise :class:`core.consumers.InvalidCommand`
for anything the bridge would refuse (a close code that cannot be sent, both text and bytes, a
header with a line break …), using the bridge's own checks (``translate.websocket_reply``,
``http_response_start``). The bridge answers no results: there is nothing to ``wait`` for. The
keys are those of ``gateways/http_ws/README.md``; the guide is ``docs/consumers.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from core.consumers import Commands, GatewayConsumer, Message, Validator, command
from gateways.http_ws.translate import (
    ACCEPT,
    CLOSE,
    SEND,
    http_response_start,
    websocket_reply,
)
from gateways.http_ws.translate import (
    http_response_body as check_response_body,
)

__all__ = [
    "VALIDATORS",
    "HttpWsConsumer",
    "HttpWsReplies",
    "http_response",
    "http_response_body",
    "websocket_accept",
    "websocket_close",
    "websocket_send",
]

Headers = Sequence[Sequence[bytes | str]]

#: every answer the bridge takes on a reply channel, with the bridge's own check of its keys
VALIDATORS: dict[str, Validator] = {
    ACCEPT: lambda body: websocket_reply({**body, "type": ACCEPT}, accepted=False),
    SEND: lambda body: websocket_reply({**body, "type": SEND}, accepted=True),
    CLOSE: lambda body: websocket_reply({**body, "type": CLOSE}, accepted=True),
    "http.response": lambda body: http_response_start({**body, "type": "http.response"}),
    "http.response.body": lambda body: check_response_body({**body, "type": "http.response.body"}),
}


def _headers(headers: Headers | None) -> list[list[bytes | str]] | None:
    return None if headers is None else [list(pair) for pair in headers]


def _checked(type_: str, **keys: Any) -> Message:
    return HttpWsReplies.check(command(type_, **keys))


def websocket_accept(subprotocol: str | None = None, *, headers: Headers | None = None) -> Message:
    """``websocket.accept``: accept the handshake (with one of the offered subprotocols)."""
    return _checked(ACCEPT, subprotocol=subprotocol, headers=_headers(headers))


def websocket_send(text: str | None = None, *, data: bytes | None = None) -> Message:
    """``websocket.send``: a text frame, or a binary one (``data``, the ``bytes`` key)."""
    return _checked(SEND, text=text, bytes=data)


def websocket_close(code: int | None = None, reason: str | None = None) -> Message:
    """``websocket.close`` (default code 1000); before an accept it refuses the handshake."""
    return _checked(CLOSE, code=code, reason=reason)


def http_response(
    status: int = 200,
    body: bytes | str = b"",
    *,
    headers: Headers | None = None,
    more_body: bool = False,
) -> Message:
    """``http.response``: status, headers and the body (or its first part, ``more_body``)."""
    return _checked(
        "http.response",
        status=status,
        body=body,
        headers=_headers(headers),
        more_body=more_body or None,
    )


def http_response_body(body: bytes | str, *, more_body: bool = False) -> Message:
    """``http.response.body``: the next part of a streamed response."""
    return _checked("http.response.body", body=body, more_body=more_body or None)


class HttpWsReplies(Commands):
    """Answer one socket or request on its ``reply_channel``; every answer checked first
    (:class:`~core.consumers.InvalidCommand`, nothing sent)."""

    protocol = None
    validators = VALIDATORS
    results = False

    async def accept(
        self, subprotocol: str | None = None, *, headers: Headers | None = None
    ) -> None:
        """See :func:`websocket_accept`."""
        await self.submit(websocket_accept(subprotocol, headers=headers))

    async def send(self, text: str | None = None, *, data: bytes | None = None) -> None:
        """See :func:`websocket_send`."""
        await self.submit(websocket_send(text, data=data))

    async def close(self, code: int | None = None, reason: str | None = None) -> None:
        """See :func:`websocket_close`."""
        await self.submit(websocket_close(code, reason))

    async def respond(
        self,
        status: int = 200,
        body: bytes | str = b"",
        *,
        headers: Headers | None = None,
        more_body: bool = False,
    ) -> None:
        """See :func:`http_response`."""
        await self.submit(http_response(status, body, headers=headers, more_body=more_body))

    async def respond_body(self, body: bytes | str, *, more_body: bool = False) -> None:
        """See :func:`http_response_body`."""
        await self.submit(http_response_body(body, more_body=more_body))


class HttpWsConsumer(GatewayConsumer):
    """Channels' ``WebsocketConsumer`` for the bridge's message spec, plus HTTP requests.

    Override what you need: :meth:`connect` (default: accept), :meth:`receive`,
    :meth:`disconnect`, :meth:`request` (an ``http.request``; default 404) and :meth:`webhook`
    (a verified ``http.webhook``; the sender already got 202). The handlers
    (``websocket_connect`` …) call them; overriding a handler itself works too, as in any
    consumer. Sockets join every group in :attr:`groups` before :meth:`connect` and leave them
    on disconnect.
    """

    commands_class = HttpWsReplies
    #: groups every socket of this consumer is in while it is open
    groups: ClassVar[Sequence[str]] = ()

    @property
    def socket(self) -> str:
        """The reply channel of the socket or request being handled: its identity."""
        return self.reply_channel()

    @property
    def replies(self) -> HttpWsReplies:
        """:class:`HttpWsReplies` to the socket or request being handled."""
        return HttpWsReplies(self.channel_layer, self.reply_channel())

    # -- events ----------------------------------------------------------------------------

    async def websocket_connect(self, message: Message) -> None:
        for group in self.groups:
            await self.channel_layer.group_add(group, message["reply_channel"])
        await self.connect()

    async def websocket_receive(self, message: Message) -> None:
        await self.receive(text_data=message.get("text"), bytes_data=message.get("bytes"))

    async def websocket_disconnect(self, message: Message) -> None:
        for group in self.groups:
            await self.channel_layer.group_discard(group, message["reply_channel"])
        await self.disconnect(message.get("code", 1005))

    async def http_request(self, message: Message) -> None:
        await self.request(message)

    async def http_webhook(self, message: Message) -> None:
        await self.webhook(message)

    # -- what a subclass overrides ---------------------------------------------------------

    async def connect(self) -> None:
        """A socket asks to connect: accept it (override to check first; :meth:`close`
        refuses)."""
        await self.accept()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """A frame arrived on the current socket."""

    async def disconnect(self, code: int) -> None:
        """The current socket closed (``code`` 1005: none given, 1006: the connection dropped)."""

    async def request(self, message: Message) -> None:
        """An ``http.request``: answer with :meth:`respond` (default: 404)."""
        await self.respond(404, b"Not Found", headers=[[b"content-type", b"text/plain"]])

    async def webhook(self, message: Message) -> None:
        """A verified ``http.webhook`` (nothing to answer: the sender got 202)."""

    # -- answers -----------------------------------------------------------------------------

    async def accept(self, subprotocol: str | None = None, headers: Headers | None = None) -> None:
        """Accept the current socket."""
        await self.replies.accept(subprotocol, headers=headers)

    async def send(  # channels' own send(message) is the ASGI one, unused by channel consumers
        self, text_data: str | None = None, bytes_data: bytes | None = None, close: bool = False
    ) -> None:
        """A frame to the current socket (``close=True`` closes it afterwards)."""
        await self.replies.send(text_data, data=bytes_data)
        if close:
            await self.close()

    async def close(self, code: int | None = None, reason: str | None = None) -> None:
        """Close the current socket (before an accept: refuse the handshake with 403)."""
        await self.replies.close(code, reason)

    async def respond(
        self,
        status: int = 200,
        body: bytes | str = b"",
        *,
        headers: Headers | None = None,
        more_body: bool = False,
    ) -> None:
        """Answer the current ``http.request``."""
        await self.replies.respond(status, body, headers=headers, more_body=more_body)

    async def respond_body(self, body: bytes | str, *, more_body: bool = False) -> None:
        """The next part of a streamed answer (after ``respond(…, more_body=True)``)."""
        await self.replies.respond_body(body, more_body=more_body)

    async def broadcast(
        self, group: str, text_data: str | None = None, bytes_data: bytes | None = None
    ) -> None:
        """A frame to every socket in ``group`` (``channel_layer.group_send``)."""
        await self.channel_layer.group_send(group, websocket_send(text_data, data=bytes_data))
