"""gateways/http_ws/translate.py: pure, so every branch is tested here without a socket."""

from __future__ import annotations

import hashlib
import hmac

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateways.http_ws.translate import (
    ACCEPT,
    CLOSE,
    SEND,
    InvalidEvent,
    InvalidReply,
    asgi_scope,
    body_parts,
    disconnect_keys,
    header,
    http_request_keys,
    http_response_body,
    http_response_start,
    match_path,
    origin_allowed,
    receive_keys,
    refusal_status,
    response_head,
    signature_valid,
    websocket_answer,
    websocket_connect_keys,
    websocket_reply,
)

header_bytes = st.binary(min_size=1, max_size=20).filter(lambda b: b":" not in b)
scopes = st.fixed_dictionaries(
    {
        "type": st.just("websocket"),
        "scheme": st.sampled_from(["ws", "wss", "http", "https"]),
        "path": st.text(max_size=50).map(lambda p: "/" + p),
        "query_string": st.binary(max_size=50),
        "headers": st.lists(st.tuples(header_bytes, st.binary(max_size=40)), max_size=5),
        "client": st.one_of(st.none(), st.tuples(st.just("127.0.0.1"), st.integers(1, 65535))),
        "server": st.one_of(st.none(), st.tuples(st.just("10.0.0.1"), st.integers(1, 65535))),
        "raw_path": st.one_of(st.none(), st.binary(max_size=50)),
        "root_path": st.sampled_from(["", "/prefix"]),
        "http_version": st.sampled_from(["1.0", "1.1"]),
        "subprotocols": st.lists(st.text(min_size=1, max_size=10), max_size=3),
        "method": st.sampled_from(["GET", "POST"]),
    }
)


@given(scopes, st.binary(max_size=200))
def test_events_are_msgpack_safe_and_keep_the_asgi_keys(scope: dict, body: bytes) -> None:
    connect = websocket_connect_keys(scope)
    request = http_request_keys(scope, body)
    for keys in (connect, request):
        assert msgpack.unpackb(msgpack.packb(keys), raw=False) == keys
        assert keys["path"] == scope["path"]
        assert keys["query_string"] == scope["query_string"]
        assert keys["headers"] == [[k, v] for k, v in scope["headers"]]
        assert keys["client"] == (list(scope["client"]) if scope["client"] else None)
    assert connect["subprotocols"] == scope["subprotocols"]
    assert request["body"] == body and request["method"] == scope["method"]


@given(st.one_of(st.text(), st.binary()))
def test_receive_keys_set_exactly_one_of_text_and_bytes(data: str | bytes) -> None:
    event = {"type": "websocket.receive", "text" if isinstance(data, str) else "bytes": data}
    keys = receive_keys(event)
    assert (keys["text"], keys["bytes"]) == (
        (data, None) if isinstance(data, str) else (None, data)
    )


def test_disconnect_keys() -> None:
    assert disconnect_keys(None) == {"code": 1005, "reason": ""}
    assert disconnect_keys(1001, "bye") == {"code": 1001, "reason": "bye"}


@pytest.mark.parametrize(
    ("patterns", "path", "index"),
    [
        (["/live", "/api/*"], "/live", 0),
        (["/live", "/api/*"], "/live/x", None),
        (["/live", "/api/*"], "/api/echo", 1),
        (["/api/*", "/api/hooks/*"], "/api/hooks/github", 1),
        (["/", "/api/*"], "/anything", None),
        (["/*", "/"], "/", 1),
        ([], "/", None),
    ],
)
def test_match_path(patterns: list[str], path: str, index: int | None) -> None:
    assert match_path(patterns, path) == index


@given(st.lists(st.text(max_size=8).map(lambda p: "/" + p), max_size=5), st.text(max_size=10))
def test_match_path_picks_a_pattern_that_matches(patterns: list[str], rest: str) -> None:
    path = "/" + rest
    index = match_path(patterns, path)
    if index is not None:
        pattern = patterns[index]
        assert path == pattern or (pattern.endswith("*") and path.startswith(pattern[:-1]))
    else:
        assert path not in patterns


H = [(b"host", b"example.com:8000")]


@pytest.mark.parametrize(
    ("origin", "allowed", "ok"),
    [
        (None, [], True),  # not a browser
        (b"http://example.com:8000", [], True),  # same origin
        (b"http://EXAMPLE.com:8000", [], True),
        (b"http://evil.example", [], False),
        (b"null", [], False),
        (b"null", ["*"], True),
        (b"garbage", ["https://a.example"], False),
        (b"https://a.example", ["https://a.example"], True),
        (b"https://a.example/", ["https://a.example/"], False),  # an origin has no path
        (b"https://b.example", ["https://a.example"], False),
        (b"https://x.a.example", ["*.a.example"], True),
        (b"https://xa.example", ["*.a.example"], False),
        (b"https://evil.example", ["*"], True),
    ],
)
def test_origin_allowed(origin: bytes | None, allowed: list[str], ok: bool) -> None:
    headers = H + ([(b"origin", origin)] if origin is not None else [])
    assert origin_allowed(headers, allowed) is ok


def test_origin_without_host_header_is_refused_by_default() -> None:
    assert not origin_allowed([(b"origin", b"http://a.example")], [])


def sig(body: bytes, secret: bytes = b"s3cret") -> bytes:
    return hmac.new(secret, body, hashlib.sha256).hexdigest().encode()


def test_signatures() -> None:
    body = b'{"a": 1}'
    gh = b"x-hub-signature-256"
    assert signature_valid("github", b"s3cret", [(gh, b"sha256=" + sig(body))], body, gh)
    assert signature_valid("github", b"s3cret", [(gh, b"sha256=" + sig(body).upper())], body, gh)
    assert not signature_valid("github", b"s3cret", [(gh, sig(body))], body, gh)  # no prefix
    assert not signature_valid("github", b"s3cret", [(gh, b"sha256=" + sig(body, b"x"))], body, gh)
    assert not signature_valid("github", b"s3cret", [(gh, b"sha256=" + sig(body))], body + b" ", gh)
    assert not signature_valid("github", b"s3cret", [], body, gh)
    x = b"x-signature"
    assert signature_valid("hmac-sha256", b"s3cret", [(x, sig(body))], body, x)
    assert signature_valid("hmac-sha256", b"s3cret", [(x, b" sha256=" + sig(body))], body, x)
    assert not signature_valid("hmac-sha256", b"s3cret", [(x, b"")], body, x)


def test_header() -> None:
    assert header([(b"A", b"1"), (b"a", b"2")], b"a") == b"1"
    assert header([], b"a") is None


def test_websocket_accept() -> None:
    events = websocket_reply(
        {"type": ACCEPT, "subprotocol": "chat", "headers": [["X-A", "1"], [b"x-b", b"2"]]}, False
    )
    assert events == [
        {"type": ACCEPT, "subprotocol": "chat", "headers": [(b"x-a", b"1"), (b"x-b", b"2")]}
    ]
    assert websocket_reply({"type": ACCEPT}, True) == []


def test_websocket_send_before_accept_accepts_first() -> None:
    events = websocket_reply({"type": SEND, "text": "hi"}, False)
    assert [e["type"] for e in events] == [ACCEPT, SEND]
    assert websocket_reply({"type": SEND, "bytes": b"\x00"}, True) == [
        {"type": SEND, "text": None, "bytes": b"\x00"}
    ]


def test_websocket_close() -> None:
    assert websocket_reply({"type": CLOSE}, True) == [{"type": CLOSE, "code": 1000, "reason": ""}]
    assert websocket_reply({"type": CLOSE, "code": 4001, "reason": "x"}, True)[0]["code"] == 4001


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"type": ACCEPT, "subprotocol": 1}, "subprotocol"),
        ({"type": ACCEPT, "headers": "x"}, "headers"),
        ({"type": ACCEPT, "headers": [["a"]]}, "headers"),
        ({"type": ACCEPT, "headers": [["a b", "1"]]}, "invalid header"),
        ({"type": ACCEPT, "headers": [["a", "1\r\nx: y"]]}, "invalid header"),
        ({"type": ACCEPT, "headers": [["a", "☃"]]}, "latin-1"),
        ({"type": ACCEPT, "headers": [["a", 1]]}, "str or bytes"),
        ({"type": SEND}, "exactly one"),
        ({"type": SEND, "text": "a", "bytes": b"a"}, "exactly one"),
        ({"type": SEND, "text": 1}, "text must"),
        ({"type": SEND, "bytes": "a"}, "bytes must"),
        ({"type": CLOSE, "code": 1006}, "cannot be sent"),
        ({"type": CLOSE, "code": True}, "integer"),
        ({"type": CLOSE, "reason": "x" * 124}, "123 bytes"),
        ({"type": "websocket.nonsense"}, "unknown reply type"),
        ({}, "unknown reply type"),
    ],
)
def test_invalid_websocket_replies(message: dict, error: str) -> None:
    with pytest.raises(InvalidReply, match=error):
        websocket_reply(message, accepted=False)


def test_http_response() -> None:
    start, body = http_response_start(
        {"type": "http.response", "status": 201, "headers": [["a", "b"]], "body": "é"}
    )
    assert start == {"type": "http.response.start", "status": 201, "headers": [(b"a", b"b")]}
    assert body == {"type": "http.response.body", "body": "é".encode(), "more_body": False}
    _, first = http_response_start({"type": "http.response", "status": 200, "more_body": True})
    assert first == {"type": "http.response.body", "body": b"", "more_body": True}
    assert http_response_body({"type": "http.response.body", "body": b"x"}) == {
        "type": "http.response.body",
        "body": b"x",
        "more_body": False,
    }


@pytest.mark.parametrize(
    "message",
    [
        {"type": "http.response.start", "status": 200},
        {"type": "http.response", "status": 99},
        {"type": "http.response", "status": "200"},
        {"type": "http.response", "status": True},
        {"type": "http.response", "status": 200, "body": 5},
    ],
)
def test_invalid_http_responses(message: dict) -> None:
    with pytest.raises(InvalidReply):
        http_response_start(message)
    with pytest.raises(InvalidReply, match=r"expected http\.response\.body"):
        http_response_body({"type": "http.response"})


@given(scopes, st.binary(max_size=200))
def test_a_worker_rebuilds_the_scope_the_server_gave(scope: dict, body: bytes) -> None:
    """websocket.connect / http.request → msgpack → asgi_scope(): the ASGI scope again, so a
    hosted application routes, reads cookies and headers as under any server."""
    for kind, keys in (
        ("websocket", websocket_connect_keys(scope)),
        ("http", http_request_keys(scope, body)),
    ):
        message = {"type": "websocket.connect" if kind == "websocket" else "http.request"}
        message.update(msgpack.unpackb(msgpack.packb(keys), raw=False))
        rebuilt = asgi_scope(message)
        assert rebuilt["type"] == kind and rebuilt["asgi"]["version"] == "3.0"
        for key in ("path", "raw_path", "query_string", "root_path", "http_version"):
            assert rebuilt[key] == scope[key]
        assert rebuilt["scheme"] == scope["scheme"]
        assert rebuilt["headers"] == [tuple(pair) for pair in scope["headers"]]
        for key in ("client", "server"):
            assert rebuilt[key] == (tuple(scope[key]) if scope[key] else None)
        if kind == "websocket":
            assert rebuilt["subprotocols"] == scope["subprotocols"] and "method" not in rebuilt
        else:
            assert rebuilt["method"] == scope["method"] and "subprotocols" not in rebuilt


def test_scope_defaults_and_a_webhook_is_an_http_scope() -> None:
    minimal = asgi_scope({"type": "http.webhook", "path": "/hook", "method": "post"})
    assert minimal == {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "scheme": "http",
        "path": "/hook",
        "raw_path": None,
        "query_string": b"",
        "root_path": "",
        "headers": [],
        "client": None,
        "server": None,
        "method": "POST",
    }
    socket = asgi_scope({"type": "websocket.connect", "path": "/ws", "server": ["/run/s", None]})
    assert socket["scheme"] == "ws" and socket["server"] == ("/run/s", None)


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"type": "websocket.receive", "path": "/"}, "does not open a connection"),
        ({"type": "http.request"}, "path must be a string"),
        ({"type": "http.request", "path": "/", "method": 1}, "method must be a string"),
        ({"type": "http.request", "path": "/", "raw_path": "/"}, "raw_path must be bytes"),
        ({"type": "http.request", "path": "/", "query_string": "a"}, "query_string must be"),
        ({"type": "websocket.connect", "path": "/", "headers": [["a", "b"]]}, "headers must"),
        ({"type": "websocket.connect", "path": "/", "headers": "x"}, "headers must"),
        ({"type": "websocket.connect", "path": "/", "client": "x"}, "client must be"),
        ({"type": "websocket.connect", "path": "/", "client": ["h", "1"]}, "port must be"),
        ({"type": "websocket.connect", "path": "/", "client": ["h", True]}, "port must be"),
        ({"type": "websocket.connect", "path": "/", "subprotocols": [1]}, "subprotocols"),
        ({"type": "websocket.connect", "path": "/", "subprotocols": "x"}, "subprotocols"),
    ],
)
def test_events_that_cannot_become_a_scope(message: dict, error: str) -> None:
    with pytest.raises(InvalidEvent, match=error):
        asgi_scope(message)


def test_what_a_hosted_application_sends_on_a_socket() -> None:
    accept = websocket_answer({"type": ACCEPT, "subprotocol": "v1", "headers": [(b"X-A", "b")]})
    assert accept == {"type": ACCEPT, "subprotocol": "v1", "headers": [[b"x-a", b"b"]]}
    assert websocket_answer({"type": ACCEPT}) == {
        "type": ACCEPT,
        "subprotocol": None,
        "headers": [],
    }
    # ASGI lets the unused one of text and bytes be present as None
    assert websocket_answer({"type": SEND, "text": "hi", "bytes": None}) == {
        "type": SEND,
        "text": "hi",
    }
    assert websocket_answer({"type": SEND, "bytes": bytearray(b"\x00")}) == {
        "type": SEND,
        "bytes": b"\x00",
    }
    assert websocket_answer({"type": CLOSE}) == {"type": CLOSE, "code": 1000, "reason": ""}
    assert websocket_answer({"type": CLOSE, "code": 4001, "reason": "bye"})["code"] == 4001


@pytest.mark.parametrize(
    ("event", "error"),
    [
        ({"type": ACCEPT, "subprotocol": 1}, "subprotocol"),
        ({"type": SEND}, "exactly one"),
        ({"type": SEND, "text": "a", "bytes": b"b"}, "exactly one"),
        ({"type": SEND, "text": b"a"}, "text must be"),
        ({"type": SEND, "bytes": "a"}, "bytes must be"),
        ({"type": CLOSE, "reason": "x" * 124}, "reason"),
        ({"type": CLOSE, "code": 1005}, "cannot be sent"),
        ({"type": "websocket.http.response.start"}, "unexpected ASGI message"),
    ],
)
def test_what_a_hosted_application_may_not_send(event: dict, error: str) -> None:
    with pytest.raises(InvalidReply, match=error):
        websocket_answer(event)


def test_response_head_and_body_parts() -> None:
    head = response_head({"status": 201, "headers": [("Content-Type", b"text/plain")]})
    assert head == (201, [[b"content-type", b"text/plain"]])
    for bad in ({"status": 99}, {"status": True}, {"status": "200"}, {"status": 200, "headers": 1}):
        with pytest.raises(InvalidReply):
            response_head(bad)
    assert body_parts(b"", 4) == [b""]
    assert body_parts(b"abcd", 4) == [b"abcd"]
    assert body_parts(memoryview(b"abcdefghij"), 4) == [b"abcd", b"efgh", b"ij"]
    with pytest.raises(InvalidReply, match="body must be bytes"):
        body_parts("text", 4)


def test_refusal_status() -> None:
    assert [refusal_status(c) for c in (1011, 1013, 1000, 4000)] == [500, 503, 403, 403]
