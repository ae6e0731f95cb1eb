"""Pure translation between ASGI (what uvicorn gives the bridge) and layer messages.

House rules:

* uvicorn parses HTTP and WebSocket; nothing here reads a socket. Functions take the ASGI
  ``scope`` and events as plain dicts and return plain dicts, so they are property-tested.
* Layer messages keep the ASGI spec's keys and types where there is one: ``headers`` is a list
  of ``[name, value]`` byte pairs (names lower-case, as uvicorn gives them), ``query_string`` is
  bytes, ``path`` is str, ``client`` is ``[host, port]`` or None. Where the layer differs from
  ASGI (one ``http.response`` message carrying status, headers and the first body chunk, to save
  a layer hop) gateways/http_ws/README.md says so.
* A reply from a consumer is validated here: a bad one raises :class:`InvalidReply` with a
  one-line reason and is never half-applied.
* Webhook signatures are HMAC-SHA256 compared in constant time (``hmac.compare_digest``).
* The worker side of the bridge (:mod:`.consumers`, which hosts unchanged Channels applications)
  maps the same messages back: :func:`asgi_scope` rebuilds the ASGI scope a server would have
  given the application; :func:`websocket_answer`, :func:`response_head` and
  :func:`body_parts` turn what the application sends into layer messages. What cannot be
  carried raises :class:`InvalidReply`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "ABORT",
    "ACCEPT",
    "ACK",
    "ALIVE",
    "CLOSE",
    "HEARTBEAT",
    "LOST",
    "RELEASE",
    "SEND",
    "InvalidEvent",
    "InvalidReply",
    "asgi_scope",
    "body_parts",
    "disconnect_keys",
    "header",
    "http_request_keys",
    "http_response_body",
    "http_response_start",
    "match_path",
    "origin_allowed",
    "receive_keys",
    "refusal_status",
    "response_head",
    "signature_valid",
    "websocket_answer",
    "websocket_connect_keys",
    "websocket_reply",
]

ACCEPT, SEND, CLOSE = "websocket.accept", "websocket.send", "websocket.close"
# the bridge's own messages between a worker's host (consumers.py) and the gateway (README.md,
# "Hosted applications")
#: host → reply channel: the worker stopped holding this socket; re-bind it
RELEASE = "http_ws.release"
#: host → reply channel: the application handled the socket's events up to ``acked``
ACK = "http_ws.ack"
#: host → reply channel: the application failed in the middle of a response
ABORT = "http_ws.abort"
#: host → the gateway's control channel: what the host holds, and how far each got
HEARTBEAT = "http_ws.heartbeat"
#: control channel → host: heartbeat answered; ``gone``: what is not the host's any more
ALIVE = "http_ws.alive"
#: the gateway's watchdog → reply channel: the host went silent
LOST = "http_ws.lost"
#: what a close code may be on the wire (RFC 6455 7.4; 1005, 1006 and 1015 are never sent)
_SENDABLE_CLOSE = range(3000, 5000)
_SENDABLE_STANDARD = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}

Headers = list[list[bytes]]


class InvalidReply(ValueError):
    """A consumer's reply cannot be carried out; the message is one line."""


class InvalidEvent(ValueError):
    """A bridge event lacks what an ASGI scope needs; the message is one line."""


# -- routing and policy ---------------------------------------------------------------------


def match_path(patterns: Sequence[str], path: str) -> int | None:
    """Index of the pattern ``path`` matches: exact, or a prefix when the pattern ends in ``*``.

    The longest matching pattern wins, so ``/api/hooks/*`` beats ``/api/*``, and an exact
    pattern beats a prefix of the same length.
    """
    best: int | None = None
    best_len = -1
    for index, pattern in enumerate(patterns):
        if pattern.endswith("*"):
            hit, length = path.startswith(pattern[:-1]), len(pattern) - 1
        else:
            hit, length = path == pattern, len(pattern) + 1
        if hit and length > best_len:
            best, best_len = index, length
    return best


def header(headers: Iterable[Sequence[bytes]], name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower-case), else None."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _origin_parts(origin: str) -> tuple[str, str] | None:
    scheme, sep, rest = origin.partition("://")
    if not sep or not rest or "/" in rest:
        return None
    return scheme.lower(), rest.lower()


def origin_allowed(headers: Iterable[Sequence[bytes]], allowed: Sequence[str]) -> bool:
    """Whether a WebSocket handshake's ``Origin`` may connect.

    No ``Origin`` header: a non-browser client, allowed (browsers always send one). ``allowed``
    empty: only the same origin (the ``Origin``'s host equals the ``Host`` header). ``"*"``
    allows any origin; otherwise entries are full origins (``https://example.com:8443``) or
    ``*.example.com`` for any subdomain over any scheme.
    """
    pairs = [(bytes(k).lower(), bytes(v)) for k, v in headers]
    raw = header(pairs, b"origin")
    if raw is None:
        return True
    origin = raw.decode("latin-1").strip()
    parts = _origin_parts(origin)
    if parts is None:  # "null" (sandboxed frames, file://) and garbage
        return "*" in allowed
    _scheme, host = parts
    if not allowed:
        own = header(pairs, b"host")
        return own is not None and own.decode("latin-1").strip().lower() == host
    for entry in allowed:
        entry = entry.lower().rstrip("/")
        if entry == "*" or entry == origin.lower():
            return True
        if entry.startswith("*.") and host.split(":")[0].endswith(entry[1:]):
            return True
    return False


def signature_valid(
    scheme: str, secret: bytes, headers: Iterable[Sequence[bytes]], body: bytes, name: bytes
) -> bool:
    """Check a webhook's HMAC-SHA256 signature in constant time.

    ``scheme`` ``github``: header ``X-Hub-Signature-256: sha256=<hex>``. ``hmac-sha256``: the
    header ``name`` holds the hex digest, with or without a ``sha256=`` prefix.
    """
    value = header(headers, name)
    if value is None:
        return False
    value = value.strip()
    if scheme == "github" and not value.startswith(b"sha256="):
        return False
    value = value.removeprefix(b"sha256=")
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest().encode()
    return hmac.compare_digest(expected, value.lower())


# -- ASGI → layer -------------------------------------------------------------------------------


def _headers(raw: Iterable[Sequence[bytes]]) -> Headers:
    return [[bytes(k), bytes(v)] for k, v in raw]


def _address(value: Any) -> list[Any] | None:
    """``client`` / ``server`` as ``[host, port]`` (port None for a Unix socket), or None."""
    if not value:
        return None
    port = value[1] if len(value) > 1 else None
    return [str(value[0]), None if port is None else int(port)]


def _client(scope: Mapping[str, Any]) -> list[Any] | None:
    return _address(scope.get("client"))


def _common(scope: Mapping[str, Any]) -> dict[str, Any]:
    raw_path = scope.get("raw_path")
    return {
        "scheme": str(scope.get("scheme", "")),
        "path": str(scope["path"]),
        "raw_path": None if raw_path is None else bytes(raw_path),
        "root_path": str(scope.get("root_path", "")),
        "query_string": bytes(scope.get("query_string", b"")),
        "headers": _headers(scope.get("headers", [])),
        "client": _client(scope),
        "server": _address(scope.get("server")),
        "http_version": str(scope.get("http_version", "1.1")),
    }


def websocket_connect_keys(scope: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of ``websocket.connect`` for a handshake's ASGI scope: everything a server puts
    in an ASGI ``websocket`` scope, so a worker can rebuild it (:func:`asgi_scope`)."""
    return {**_common(scope), "subprotocols": [str(p) for p in scope.get("subprotocols", [])]}


def receive_keys(event: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of ``websocket.receive`` for an ASGI ``websocket.receive`` event.

    Exactly one of ``text`` and ``bytes`` is set; the other is None.
    """
    text = event.get("text")
    if text is not None:
        return {"text": str(text), "bytes": None}
    return {"text": None, "bytes": bytes(event.get("bytes") or b"")}


def disconnect_keys(code: int | None, reason: str = "") -> dict[str, Any]:
    """The keys of ``websocket.disconnect``."""
    return {"code": 1005 if code is None else int(code), "reason": reason}


def http_request_keys(scope: Mapping[str, Any], body: bytes) -> dict[str, Any]:
    """The keys of ``http.request`` / ``http.webhook``: the request with its whole body."""
    return {**_common(scope), "method": str(scope.get("method", "GET")), "body": body}


# -- layer → ASGI application (the worker side: gateways/http_ws/host.py) -----------------

#: event type → the ASGI scope type it opens
_SCOPE_TYPES = {"websocket.connect": "websocket", "http.request": "http", "http.webhook": "http"}


def _text_key(message: Mapping[str, Any], key: str, default: str | None = None) -> str:
    value = message.get(key, default)
    if not isinstance(value, str):
        raise InvalidEvent(f"{key} must be a string")
    return value


def _bytes_key(message: Mapping[str, Any], key: str) -> bytes:
    value = message.get(key, b"")
    if not isinstance(value, bytes):
        raise InvalidEvent(f"{key} must be bytes")
    return value


def _scope_address(value: Any, key: str) -> tuple[str, int | None] | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or len(value) != 2 or not isinstance(value[0], str):
        raise InvalidEvent(f"{key} must be [host, port] or None")
    port = value[1]
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)):
        raise InvalidEvent(f"{key} port must be an integer")
    return value[0], port


def asgi_scope(message: Mapping[str, Any]) -> dict[str, Any]:
    """The ASGI scope a server would give the application for a bridge event.

    ``websocket.connect`` gives a ``websocket`` scope, ``http.request`` and ``http.webhook`` an
    ``http`` one, with every key of the ASGI 3 connection scope (``headers`` as a list of byte
    tuples, ``client`` / ``server`` as tuples). The application's own routing (``URLRouter``)
    and middleware (cookies, sessions, ``AuthMiddlewareStack``) work from it as under any
    server. Raises :class:`InvalidEvent` for anything else.
    """
    kind = _SCOPE_TYPES.get(str(message.get("type")))
    if kind is None:
        raise InvalidEvent(f"{str(message.get('type'))[:60]!r} does not open a connection")
    path = _text_key(message, "path")
    raw_path = message.get("raw_path")
    if raw_path is not None and not isinstance(raw_path, bytes):
        raise InvalidEvent("raw_path must be bytes or None")
    headers = message.get("headers", [])
    if not isinstance(headers, list | tuple) or not all(
        isinstance(pair, list | tuple)
        and len(pair) == 2
        and isinstance(pair[0], bytes)
        and isinstance(pair[1], bytes)
        for pair in headers
    ):
        raise InvalidEvent("headers must be a list of [name, value] byte pairs")
    scope: dict[str, Any] = {
        "type": kind,
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": _text_key(message, "http_version", "1.1"),
        "scheme": _text_key(message, "scheme", "ws" if kind == "websocket" else "http"),
        "path": path,
        "raw_path": raw_path,
        "query_string": _bytes_key(message, "query_string"),
        "root_path": _text_key(message, "root_path", ""),
        "headers": [(bytes(k), bytes(v)) for k, v in headers],
        "client": _scope_address(message.get("client"), "client"),
        "server": _scope_address(message.get("server"), "server"),
    }
    if kind == "websocket":
        subprotocols = message.get("subprotocols", [])
        if not isinstance(subprotocols, list | tuple) or not all(
            isinstance(p, str) for p in subprotocols
        ):
            raise InvalidEvent("subprotocols must be a list of strings")
        scope["subprotocols"] = list(subprotocols)
    else:
        scope["method"] = _text_key(message, "method").upper()
    return scope


def websocket_answer(event: Mapping[str, Any]) -> dict[str, Any]:
    """The layer message for an ASGI event a hosted application sent on a WebSocket.

    ``websocket.accept`` / ``.send`` / ``.close`` map one to one (headers as ``[name, value]``
    byte pairs); anything else, or a malformed one, raises :class:`InvalidReply`, which the
    application sees as the error a server would raise.
    """
    kind = event.get("type")
    if kind == ACCEPT:
        subprotocol = event.get("subprotocol")
        if subprotocol is not None and not isinstance(subprotocol, str):
            raise InvalidReply("subprotocol must be a string")
        headers = [[k, v] for k, v in _reply_headers(event.get("headers"))]
        return {"type": ACCEPT, "subprotocol": subprotocol, "headers": headers}
    if kind == SEND:
        text, data = event.get("text"), event.get("bytes")
        if (text is None) == (data is None):
            raise InvalidReply("websocket.send needs exactly one of text and bytes")
        if text is not None and not isinstance(text, str):
            raise InvalidReply("text must be a string")
        if data is not None and not isinstance(data, bytes | bytearray):
            raise InvalidReply("bytes must be bytes")
        if text is not None:
            return {"type": SEND, "text": text}
        assert data is not None
        return {"type": SEND, "bytes": bytes(data)}
    if kind == CLOSE:
        reason = event.get("reason") or ""
        if not isinstance(reason, str) or len(reason.encode()) > 123:
            raise InvalidReply("reason must be a string of at most 123 bytes")
        return {"type": CLOSE, "code": _close_code(event.get("code")), "reason": reason}
    raise InvalidReply(f"unexpected ASGI message {str(kind)[:60]!r} on a WebSocket")


def response_head(start: Mapping[str, Any]) -> tuple[int, list[list[bytes]]]:
    """``status`` and ``headers`` of an application's ``http.response.start``.

    Raises :class:`InvalidReply` for a status outside 100-599 or malformed headers.
    """
    status = start.get("status")
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        raise InvalidReply("status must be an integer from 100 to 599")
    return status, [[k, v] for k, v in _reply_headers(start.get("headers"))]


def body_parts(body: Any, limit: int) -> list[bytes]:
    """An ``http.response.body`` chunk cut into parts of at most ``limit`` bytes (one layer
    message each; an empty body is one empty part)."""
    if isinstance(body, bytearray | memoryview):
        body = bytes(body)
    if not isinstance(body, bytes):
        raise InvalidReply("body must be bytes")
    if len(body) <= limit:
        return [body]
    return [body[i : i + limit] for i in range(0, len(body), limit)]


# -- layer → ASGI -------------------------------------------------------------------------------


def _reply_headers(value: Any) -> list[tuple[bytes, bytes]]:
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise InvalidReply("headers must be a list of [name, value] pairs")
    out = []
    for pair in value:
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise InvalidReply("headers must be a list of [name, value] pairs")
        name, val = (_header_bytes(part) for part in pair)
        if not name or any(c in name for c in b"\r\n:\0 ") or any(c in val for c in b"\r\n\0"):
            raise InvalidReply(f"invalid header {name[:40]!r}")
        out.append((name.lower(), val))
    return out


def _header_bytes(part: Any) -> bytes:
    if isinstance(part, bytes):
        return part
    if isinstance(part, str):
        try:
            return part.encode("latin-1")
        except UnicodeEncodeError:
            raise InvalidReply("header text must be latin-1; send bytes instead") from None
    raise InvalidReply("header names and values must be str or bytes")


def _close_code(value: Any) -> int:
    if value is None:
        return 1000
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidReply("code must be an integer")
    if value not in _SENDABLE_STANDARD and value not in _SENDABLE_CLOSE:
        raise InvalidReply(f"code {value} cannot be sent in a close frame")
    return value


def refusal_status(code: int) -> int:
    """The HTTP status a handshake gets when the consumer closes before accepting: 500 for
    1011 (the application failed), 503 for 1013 (try again later), else 403 (refused)."""
    return {1011: 500, 1013: 503}.get(code, 403)


def websocket_reply(message: Mapping[str, Any], accepted: bool) -> list[dict[str, Any]]:
    """The ASGI events that carry out a consumer's reply on a WebSocket reply channel.

    Before the connection is accepted, a ``websocket.send`` accepts it first (Channels 1 did the
    same with ``accept: True``), and a ``websocket.close`` refuses the handshake (HTTP 403).
    """
    kind = message.get("type")
    if kind == ACCEPT:
        if accepted:
            return []  # a second accept is harmless; uvicorn would raise on it
        subprotocol = message.get("subprotocol")
        if subprotocol is not None and not isinstance(subprotocol, str):
            raise InvalidReply("subprotocol must be a string")
        return [
            {
                "type": ACCEPT,
                "subprotocol": subprotocol,
                "headers": _reply_headers(message.get("headers")),
            }
        ]
    if kind == SEND:
        text, data = message.get("text"), message.get("bytes")
        if (text is None) == (data is None):
            raise InvalidReply("websocket.send needs exactly one of text and bytes")
        if text is not None and not isinstance(text, str):
            raise InvalidReply("text must be a string")
        if data is not None and not isinstance(data, bytes):
            raise InvalidReply("bytes must be bytes")
        out: list[dict[str, Any]] = (
            [] if accepted else [{"type": ACCEPT, "subprotocol": None, "headers": []}]
        )
        return [*out, {"type": SEND, "text": text, "bytes": data}]
    if kind == CLOSE:
        reason = message.get("reason") or ""
        if not isinstance(reason, str) or len(reason.encode()) > 123:
            raise InvalidReply("reason must be a string of at most 123 bytes")
        return [{"type": CLOSE, "code": _close_code(message.get("code")), "reason": reason}]
    raise InvalidReply(f"unknown reply type {str(kind)[:60]!r} on a WebSocket reply channel")


def _body(message: Mapping[str, Any]) -> tuple[bytes, bool]:
    body = message.get("body", b"")
    if isinstance(body, str):
        body = body.encode("utf-8")
    if not isinstance(body, bytes):
        raise InvalidReply("body must be bytes or str")
    return body, bool(message.get("more_body", False))


def http_response_start(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ASGI ``http.response.start`` and first ``http.response.body`` for ``http.response``."""
    if message.get("type") != "http.response":
        raise InvalidReply(f"expected http.response, got {str(message.get('type'))[:60]!r}")
    status = message.get("status")
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        raise InvalidReply("status must be an integer from 100 to 599")
    body, more = _body(message)
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": _reply_headers(message.get("headers")),
    }
    return [start, {"type": "http.response.body", "body": body, "more_body": more}]


def http_response_body(message: Mapping[str, Any]) -> dict[str, Any]:
    """The ASGI ``http.response.body`` for a streamed ``http.response.body`` chunk."""
    if message.get("type") != "http.response.body":
        raise InvalidReply(f"expected http.response.body, got {str(message.get('type'))[:60]!r}")
    body, more = _body(message)
    return {"type": "http.response.body", "body": body, "more_body": more}
