"""The message envelope (DESIGN §4): pure functions, property-tested."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.envelope import (
    Command,
    CommandError,
    check_payload,
    new_event,
    parse_command,
    result_message,
)

payloads = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def test_new_event_has_envelope_first() -> None:
    event = new_event("email.receive", gateway="mail", reply_channel="mail.send", subject="hi")
    assert list(event)[:5] == ["type", "gateway", "id", "time", "reply_channel"]
    assert event["subject"] == "hi"
    assert len(event["id"]) == 32
    assert new_event("x.y", gateway="g", reply_channel="r", id="<m@x>")["id"] == "<m@x>"


@given(payloads)
def test_check_payload_accepts_what_msgpack_round_trips(value: Any) -> None:
    check_payload(value)
    assert msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False) == value


@pytest.mark.parametrize(
    ("value", "path"),
    [({"when": object()}, "message.when"), ([1, {2: "x"}], "message[1]"), ({"a": [set()]}, "a[0]")],
)
def test_check_payload_names_the_bad_key(value: Any, path: str) -> None:
    with pytest.raises(TypeError, match=path.replace("[", r"\[")):
        check_payload(value)


@given(
    action=st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True),
    id_=st.none() | st.text(min_size=1, max_size=10) | st.integers(),
    body=st.dictionaries(st.sampled_from(["to", "text", "qos"]), payloads, max_size=3),
)
def test_parse_command_round_trip(action: str, id_: Any, body: dict[str, Any]) -> None:
    message = {"type": f"mqtt.{action}", **body}
    if id_ is not None:
        message["id"] = id_
    command = parse_command(message, "mqtt")
    assert command == Command(
        type=f"mqtt.{action}", id=None if id_ is None else str(id_), body=body
    )
    assert command.action == action


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ("not a dict", "must be a dict"),
        ({}, "no 'type'"),
        ({"type": ""}, "no 'type'"),
        ({"type": "email.send"}, "unknown command type 'email.send' for the mqtt gateway"),
        ({"type": "mqtt"}, "unknown command type"),
        ({"type": "mqtt.bad-name"}, "unknown command type"),
        ({"type": "mqtt.publish", "id": [1]}, "'id' must be"),
        ({"type": "mqtt.publish", "result_channel": 5}, "'result_channel' must be"),
        ({"type": "mqtt.publish", "result_channel": ""}, "'result_channel' must be"),
    ],
)
def test_parse_command_rejects(message: Any, error: str) -> None:
    with pytest.raises(CommandError, match=error):
        parse_command(message, "mqtt")


def test_result_message() -> None:
    assert result_message("email", "7", ok=False, error="boom") == {
        "type": "email.result",
        "id": "7",
        "ok": False,
        "error": "boom",
    }
    assert result_message("mqtt", None, ok=True, mid=3)["mid"] == 3
