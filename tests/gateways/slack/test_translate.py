"""The pure translation: Slack's documented payloads in, layer messages and Web API calls out."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.envelope import check_payload
from gateways.slack.translate import (
    TYPED_EVENTS,
    ApiCall,
    Control,
    Envelope,
    Installation,
    InvalidCommand,
    InvalidPayload,
    Respond,
    Unknown,
    ack,
    authorize_url,
    channel_type_of,
    check_timestamp,
    from_event_callback,
    from_interactive,
    from_slash_command,
    installation_from_oauth,
    installation_key,
    own_ids,
    parse_ack,
    parse_delete,
    parse_envelope,
    parse_function_complete,
    parse_function_fail,
    parse_http_body,
    parse_react,
    parse_respond,
    parse_route,
    parse_send,
    parse_update,
    parse_views_open,
    parse_views_publish,
    parse_views_push,
    parse_views_update,
    refreshed,
    route_of,
)

#: no deadline: the machine is shared, a slow example is not a failure
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@PROPERTY
@given(st.text() | st.binary())
def test_any_frame_parses_to_something(frame: str | bytes) -> None:
    assert isinstance(parse_envelope(frame), Envelope | Control | Unknown)


def test_envelopes_as_slack_documents_them() -> None:
    hello = '{"type": "hello", "num_connections": 1, "connection_info": {"app_id": "A1"}}'
    assert parse_envelope(hello) == Control("hello")
    assert parse_envelope('{"type": "disconnect", "reason": "warning"}') == Control(
        "disconnect", "warning"
    )
    envelope = {
        "envelope_id": "57d6a792-4d35-4d0b-b6aa-3361493e1caf",
        "type": "events_api",
        "accepts_response_payload": False,
        "retry_attempt": 1,
        "retry_reason": "timeout",
        "payload": {"type": "event_callback", "event": {"type": "message"}},
    }
    assert parse_envelope(json.dumps(envelope)) == Envelope(
        "events_api", envelope["envelope_id"], envelope["payload"], 1
    )
    assert parse_envelope("[]") == Unknown("not a JSON object")
    assert parse_envelope('{"type": "gossip"}') == Unknown("unknown envelope type 'gossip'")
    assert isinstance(parse_envelope('{"type": "interactive", "payload": {}}'), Unknown)
    assert isinstance(parse_envelope('{"type": "interactive", "envelope_id": "e"}'), Unknown)
    assert json.loads(ack("e1")) == {"envelope_id": "e1"}


@PROPERTY
@given(st.dictionaries(st.text(), json_values), json_values)
def test_any_event_callback_is_a_msgpack_safe_message_or_invalid(
    body: dict[str, Any], event: Any
) -> None:
    body["event"] = event
    try:
        inbound = from_event_callback(body, ("U1", "B1"))
    except InvalidPayload:
        assert not isinstance(event, dict)
        return
    check_payload(inbound.keys)
    assert inbound.event in {"message", "mention", "joined", "left", "reaction", "event"} | set(
        TYPED_EVENTS
    )
    assert "bot_access_token" not in str(inbound.keys)


def callback(event: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "event_callback",
        "team_id": "T1",
        "event_id": "Ev1",
        "event_time": 5,
        "event": event,
    }


def test_messages_edits_deletes_and_self() -> None:
    plain = from_event_callback(
        callback(
            {
                "type": "message",
                "channel": "C1",
                "user": "U2",
                "text": "hi",
                "ts": "1.2",
                "files": [{"id": "F1", "name": "x", "secret": "no", "size": 1}, "junk"],
            }
        ),
        ("U1", "B1"),
    )
    assert plain.id == "Ev1" and plain.event == "message"
    assert plain.keys["files"] == [{"id": "F1", "name": "x", "size": 1}]
    assert plain.keys["self"] is False and plain.keys["team"] == "T1"
    assert plain.keys["event_time"] == 5
    mine = from_event_callback(
        callback({"type": "message", "subtype": "bot_message", "bot_id": "B1", "text": "x"}),
        ("U1", "B1"),
    )
    assert mine.keys["self"] is True and mine.keys["subtype"] == "bot_message"
    changed = from_event_callback(
        callback(
            {
                "type": "message",
                "subtype": "message_changed",
                "channel": "C1",
                "message": {"user": "U2", "text": "new", "ts": "1.2"},
                "previous_message": {"user": "U2", "text": "old", "ts": "1.2"},
            }
        )
    )
    assert (changed.keys["text"], changed.keys["previous_text"]) == ("new", "old")
    deleted = from_event_callback(
        callback(
            {
                "type": "message",
                "subtype": "message_deleted",
                "channel": "C1",
                "deleted_ts": "1.2",
                "previous_message": {"user": "U2", "text": "old"},
            }
        )
    )
    assert (deleted.keys["text"], deleted.keys["ts"], deleted.keys["user"]) == ("", "1.2", "U2")
    broken = from_event_callback(
        callback({"type": "message", "subtype": "message_changed", "message": "x"})
    )
    assert broken.keys["text"] == "" and broken.keys["previous_text"] is None


def test_other_events_keep_their_raw_payload() -> None:
    raw = {"type": "team_join", "user": {"id": "U9"}}
    inbound = from_event_callback({"event": raw, "event_time": True})
    assert inbound.event == "event" and inbound.id is None
    assert inbound.keys == {
        "team": None,
        "enterprise": None,
        "event_time": None,
        "event_type": "team_join",
        "event": raw,
    }
    with pytest.raises(InvalidPayload):
        from_event_callback({"type": "event_callback"})


def test_slash_commands_and_interactivity() -> None:
    command = from_slash_command(
        {
            "command": "/ticket",
            "text": "42",
            "user_id": "U2",
            "channel_id": "C1",
            "response_url": "https://hooks.slack.com/commands/1",
            "trigger_id": "1.2.3",
        }
    )
    assert command.event == "command" and command.id == "1.2.3"
    assert command.keys["user"] == "U2" and command.keys["channel"] == "C1"
    with pytest.raises(InvalidPayload):
        from_slash_command({"text": "no command"})
    view = from_interactive(
        {
            "type": "view_submission",
            "user": {"id": "U2"},
            "trigger_id": "t",
            "view": {"callback_id": "form"},
            "response_urls": [{"response_url": "https://hooks.slack.com/app/1"}],
        }
    )
    assert view.keys["callback_id"] == "form" and view.keys["channel"] is None
    assert view.keys["response_url"] == "https://hooks.slack.com/app/1"
    assert view.keys["actions"] == []


def test_http_bodies() -> None:
    assert parse_http_body(
        b'{"type": "url_verification", "challenge": "c"}', "application/json"
    ) == ("url_verification", {"type": "url_verification", "challenge": "c"})
    form = "application/x-www-form-urlencoded"
    assert parse_http_body(b"command=%2Fticket&text=", form) == (
        "slash_commands",
        {"command": "/ticket", "text": ""},
    )
    assert parse_http_body(b"payload=%7B%22type%22%3A%22shortcut%22%7D", form) == (
        "interactive",
        {"type": "shortcut"},
    )
    for body, kind in [
        (b"\xff", "application/json"),
        (b"[1]", "application/json"),
        (b"{", "application/json"),
        (b"payload=%5B%5D", form),
        (b"payload=%7B", form),
        (b"other=1", form),
    ]:
        with pytest.raises(InvalidPayload):
            parse_http_body(body, kind)


def test_timestamps() -> None:
    assert check_timestamp("1000", 1000.0, 300) is None
    assert check_timestamp("700", 1000.0, 300) is None
    assert check_timestamp("699", 1000.0, 300) == (
        "X-Slack-Request-Timestamp is 301 s off (limit 300 s)"
    )
    assert check_timestamp("1301", 1000.0, 300) is not None
    assert check_timestamp(None, 1000.0, 300) == "missing X-Slack-Request-Timestamp"
    assert check_timestamp("soon", 1000.0, 300) == "malformed X-Slack-Request-Timestamp"


def test_commands_become_web_api_calls() -> None:
    assert parse_send({"channel": "C1", "text": "hi", "thread_ts": "1.2"}) == ApiCall(
        "chat.postMessage", {"channel": "C1", "text": "hi", "thread_ts": "1.2"}, "C1"
    )
    assert parse_update({"channel": "C1", "ts": "1.2", "blocks": [{"type": "divider"}]}) == (
        ApiCall(
            "chat.update", {"channel": "C1", "ts": "1.2", "blocks": [{"type": "divider"}]}, "C1"
        )
    )
    assert parse_delete({"channel": "C1", "ts": "1.2"}) == ApiCall(
        "chat.delete", {"channel": "C1", "ts": "1.2"}, "C1"
    )
    assert parse_react({"channel": "C1", "ts": "1.2", "name": ":+1:", "remove": True}) == (
        ApiCall("reactions.remove", {"channel": "C1", "timestamp": "1.2", "name": "+1"}, "C1")
    )
    assert parse_respond(
        {"response_url": "https://hooks.slack.com/x", "delete_original": True},
        "https://hooks.slack.com/",
    ) == Respond("https://hooks.slack.com/x", {"delete_original": True})


@pytest.mark.parametrize(
    ("parse", "body", "error"),
    [
        (parse_send, {"channel": "C1"}, "'text' or 'blocks' is required"),
        (parse_send, {"channel": "C 1", "text": "x"}, "without spaces"),
        (parse_send, {"channel": "C1", "text": 5}, "'text' must be a string"),
        (parse_send, {"channel": "C1", "text": "x" * 40_001}, "Slack's limit: 40000"),
        (parse_send, {"channel": "C1", "blocks": "x"}, "'blocks' must be a list"),
        (parse_send, {"channel": "C1", "blocks": [{}] * 51}, "Slack's limit: 50"),
        (parse_send, {"channel": "C1", "text": "x", "reply_broadcast": "yes"}, "true or false"),
        (parse_send, {"channel": "C1", "text": "x", "thread_ts": 1.2}, "Slack timestamp"),
        (parse_delete, {"channel": "C1"}, "'ts' must be a Slack timestamp"),
        (parse_react, {"channel": "C1", "ts": "1.2", "name": "::"}, "emoji name"),
        (parse_react, {"channel": "C1", "ts": "1.2", "name": "a:b"}, "emoji name"),
    ],
)
def test_bad_commands_name_the_key(parse: Any, body: dict[str, Any], error: str) -> None:
    with pytest.raises(InvalidCommand, match=error):
        parse(body)


def test_bad_responds() -> None:
    prefix = "https://hooks.slack.com/"
    with pytest.raises(InvalidCommand, match="response_url"):
        parse_respond({"response_url": "http://169.254.169.254/", "text": "x"}, prefix)
    with pytest.raises(InvalidCommand, match="response_type"):
        parse_respond({"response_url": prefix + "1", "text": "x", "response_type": "loud"}, prefix)
    assert parse_respond(
        {
            "response_url": prefix + "1",
            "text": "x",
            "replace_original": True,
            "response_type": "ephemeral",
            "thread_ts": "1.2",
        },
        prefix,
    ).body == {
        "text": "x",
        "replace_original": True,
        "response_type": "ephemeral",
        "thread_ts": "1.2",
    }


@PROPERTY
@given(
    st.text(min_size=1, max_size=50).filter(
        lambda s: s.strip() and not any(c.isspace() for c in s)
    ),
    st.text(max_size=200),
)
def test_send_keeps_what_it_was_given(channel: str, text: str) -> None:
    try:
        call = parse_send({"channel": channel, "text": text})
    except InvalidCommand:
        assert not text
        return
    assert call.args == {"channel": channel, "text": text} and call.channel == channel


def test_mentions_members_and_reactions() -> None:
    mention = from_event_callback(
        callback(
            {
                "type": "app_mention",
                "user": "U2",
                "text": "<@U1> hi",
                "ts": "1.2",
                "channel": "C1",
                "thread_ts": "1.1",
            }
        )
    )
    assert mention.event == "mention"
    assert (mention.keys["text"], mention.keys["thread_ts"], mention.keys["files"]) == (
        "<@U1> hi",
        "1.1",
        [],
    )
    joined = from_event_callback(
        callback(
            {
                "type": "member_joined_channel",
                "user": "U2",
                "channel": "C1",
                "channel_type": "C",
                "inviter": "U3",
            }
        )
    )
    assert joined.event == "joined" and joined.keys["inviter"] == "U3"
    # "C" is the id's letter, not a type (private channels have it too): the gateway fills it
    assert joined.keys["channel_type"] is None
    left = from_event_callback(callback({"type": "member_left_channel", "user": "U2"}))
    assert left.event == "left" and left.keys["channel"] is None
    added = from_event_callback(
        callback(
            {
                "type": "reaction_added",
                "user": "U2",
                "reaction": "tada",
                "item_user": "U1",
                "item": {"type": "message", "channel": "C1", "ts": "1.2"},
            }
        )
    )
    assert added.event == "reaction"
    assert {k: added.keys[k] for k in ("action", "reaction", "item_type", "channel", "ts")} == {
        "action": "added",
        "reaction": "tada",
        "item_type": "message",
        "channel": "C1",
        "ts": "1.2",
    }
    removed = from_event_callback(callback({"type": "reaction_removed", "item": "junk"}))
    assert removed.keys["action"] == "removed" and removed.keys["channel"] is None


def test_interactive_fallbacks() -> None:
    shortcut = from_interactive(
        {
            "type": "message_action",
            "callback_id": "cb",
            "response_url": "https://h/1",
            "response_urls": [{"response_url": "https://h/2"}],
            "view": {"callback_id": "v"},
        }
    )
    assert (shortcut.keys["callback_id"], shortcut.keys["response_url"]) == ("cb", "https://h/1")
    bare = from_interactive({"type": "view_closed", "response_urls": ["junk"], "view": "junk"})
    assert bare.id is None and bare.keys["response_url"] is None
    assert bare.keys["callback_id"] is None
    with pytest.raises(InvalidCommand, match="non-empty string"):
        parse_send({"channel": "  ", "text": "x"})
    assert (
        parse_send({"channel": "C1", "text": "x", "reply_broadcast": False}).args["reply_broadcast"]
        is False
    )


def test_channel_type_of_a_conversation_object() -> None:
    flags = {"is_channel": False, "is_group": False, "is_im": False, "is_mpim": False}
    cases = [
        ({**flags, "is_channel": True, "is_private": False}, "channel"),
        ({**flags, "is_channel": True, "is_private": True}, "group"),  # private since 2021
        ({**flags, "is_group": True, "is_private": True}, "group"),  # private before (G…)
        ({**flags, "is_mpim": True, "is_group": True, "is_private": True}, "mpim"),
        ({**flags, "is_im": True, "is_private": True}, "im"),
        (flags, None),
        ("C1", None),
        (None, None),
    ]
    for conversation, expected in cases:
        assert channel_type_of(conversation) == expected, conversation


# -- issue 26: typed events, answers, views, workflow functions, OAuth -------------------------

MODAL = {
    "type": "modal",
    "title": {"type": "plain_text", "text": "Look up"},
    "submit": {"type": "plain_text", "text": "Go"},
    "blocks": [{"type": "input", "block_id": "ticket", "element": {}, "label": {}}],
}


def test_envelopes_say_whether_they_take_an_answer() -> None:
    frame = {
        "envelope_id": "e1",
        "type": "interactive",
        "accepts_response_payload": True,
        "payload": {"type": "view_submission"},
    }
    assert parse_envelope(json.dumps(frame)).accepts_response_payload is True  # type: ignore[union-attr]
    frame.update(accepts_response_payload="yes", retry_attempt=True)
    parsed = parse_envelope(json.dumps(frame))
    assert isinstance(parsed, Envelope)
    assert parsed.accepts_response_payload is False and parsed.retry_attempt == 0
    assert json.loads(ack("e1", {"options": []})) == {
        "envelope_id": "e1",
        "payload": {"options": []},
    }


def test_interactivity_is_typed_by_its_documented_type() -> None:
    view = {
        "id": "V1",
        "callback_id": "form",
        "private_metadata": "42",
        "hash": "1.2",
        "state": {"values": {"ticket": {"number": {"value": "42"}}}},
    }
    common = {"user": {"id": "U1", "username": "alice"}, "team": {"id": "T1"}, "trigger_id": "t"}
    submission = from_interactive({"type": "view_submission", "view": view, **common})
    assert submission.event == "view_submission"
    assert submission.keys["values"] == {"ticket": {"number": {"value": "42"}}}
    assert (submission.keys["view_id"], submission.keys["hash"]) == ("V1", "1.2")
    assert submission.keys["private_metadata"] == "42" and submission.keys["user_name"] == "alice"
    assert (submission.keys["team"], submission.keys["enterprise"]) == ("T1", None)
    options = from_interactive(
        {"type": "block_suggestion", "action_id": "a", "block_id": "b", "value": "pr", **common}
    )
    assert options.event == "options" and options.keys["value"] == "pr"
    closed = from_interactive({"type": "view_closed", "view": view, "is_cleared": True})
    assert closed.event == "view_closed" and closed.keys["is_cleared"] is True
    actions = from_interactive(
        {
            "type": "block_actions",
            "container": {"message_ts": "1.2"},
            "state": {"values": {"b": {}}},
            "actions": [{"action_id": "go"}],
        }
    )
    assert actions.event == "block_actions" and actions.keys["values"] == {"b": {}}
    assert actions.keys["message_ts"] == "1.2" and actions.keys["view_id"] is None
    in_view = from_interactive({"type": "block_actions", "view": view})
    assert in_view.keys["view_id"] == "V1" and in_view.keys["values"]["ticket"]
    message = from_interactive({"type": "message_action", "message": {"ts": "3.4"}})
    assert message.event == "message_action" and message.keys["message_ts"] == "3.4"
    assert from_interactive({"type": "shortcut", "callback_id": "s"}).event == "shortcut"
    legacy = from_interactive({"type": "dialog_submission", "user": {"team_id": "T9"}})
    assert legacy.event == "action" and legacy.keys["team"] == "T9"
    grid = from_interactive({"type": "shortcut", "enterprise": {"id": "E1"}, "team": None})
    assert (grid.keys["enterprise"], grid.keys["team"]) == ("E1", None)


def test_documented_events_are_typed_and_secrets_stay_out() -> None:
    home = from_event_callback(
        callback(
            {
                "type": "app_home_opened",
                "user": "U1",
                "channel": "D1",
                "tab": "home",
                "view": {"id": "V1", "type": "home"},
                "event_ts": "1.2",
            }
        )
    )
    assert home.event == "app_home_opened"
    assert (home.keys["user"], home.keys["tab"], home.keys["view_id"]) == ("U1", "home", "V1")
    thread = from_event_callback(
        callback(
            {
                "type": "assistant_thread_started",
                "assistant_thread": {
                    "user_id": "U1",
                    "context": {"channel_id": "C1", "team_id": "T1", "enterprise_id": None},
                    "channel_id": "D1",
                    "thread_ts": "1.5",
                },
                "event_ts": "1.6",
            }
        )
    )
    assert thread.event == "assistant_thread_started"
    assert (thread.keys["channel"], thread.keys["thread_ts"]) == ("D1", "1.5")
    assert thread.keys["context"]["channel_id"] == "C1"
    step = from_event_callback(
        callback(
            {
                "type": "function_executed",
                "function": {"callback_id": "sample_function", "id": "Fn1"},
                "inputs": {"user_id": "U1"},
                "function_execution_id": "Fx1",
                "workflow_execution_id": "Wx1",
                "event_ts": "1.7",
                "bot_access_token": "abcd-1325532282098",
            }
        )
    )
    assert step.event == "function_executed" and step.secret == "abcd-1325532282098"
    assert "abcd-1325532282098" not in json.dumps(step.keys) + repr(step)
    assert (step.keys["callback_id"], step.keys["inputs"]) == ("sample_function", {"user_id": "U1"})
    grid = dict(callback({"type": "team_join"}), enterprise_id=None)
    grid["authorizations"] = [
        {"enterprise_id": "E1", "team_id": "T1", "user_id": "U0", "is_bot": True}
    ]
    assert route_of("event_callback", grid) == ("E1", "T1")
    assert own_ids(grid) == ("U0", None) and own_ids({"authorizations": "x"}) == (None, None)
    assert route_of("slash_commands", {"team_id": "T2", "enterprise_id": "E2"}) == ("E2", "T2")


@pytest.mark.parametrize(
    ("event", "body", "payload"),
    [
        ("slack.view_submission", {}, None),
        (
            "slack.view_submission",
            {"errors": {"ticket": "bad"}, "response_action": "errors"},
            {"response_action": "errors", "errors": {"ticket": "bad"}},
        ),
        (
            "slack.view_submission",
            {"response_action": "update", "view": MODAL},
            {"response_action": "update", "view": MODAL},
        ),
        ("slack.view_submission", {"response_action": "clear"}, {"response_action": "clear"}),
        (
            "slack.options",
            {"options": [{"text": {"type": "plain_text", "text": "A"}, "value": "a"}]},
            {"options": [{"text": {"type": "plain_text", "text": "A"}, "value": "a"}]},
        ),
        (
            "slack.options",
            {"option_groups": [{"label": {"type": "plain_text", "text": "G"}, "options": []}]},
            {"option_groups": [{"label": {"type": "plain_text", "text": "G"}, "options": []}]},
        ),
        (
            "slack.command",
            {"text": "hi", "response_type": "in_channel"},
            {"text": "hi", "response_type": "in_channel"},
        ),
        (None, {"text": "hi"}, {"text": "hi"}),
    ],
)
def test_answers_as_slack_documents_them(
    event: str | None, body: dict[str, Any], payload: dict[str, Any] | None
) -> None:
    assert parse_ack(body, event) == payload


@pytest.mark.parametrize(
    ("event", "body", "error"),
    [
        ("slack.view_submission", {"options": []}, "a slack.view_submission is answered with"),
        ("slack.command", {"errors": {"a": "b"}}, "a slack.command is answered with"),
        (None, {"text": "x", "options": []}, "an answer is for one kind of event"),
        ("slack.view_submission", {"response_action": "errors"}, "'errors' must map block_id"),
        ("slack.view_submission", {"errors": {"a": ""}, "response_action": "errors"}, "map"),
        (None, {"response_action": "errors", "errors": {"a": "b"}, "view": MODAL}, "no 'view'"),
        (None, {"response_action": "push", "errors": {"a": "b"}}, "takes no 'errors'"),
        (None, {"response_action": "update", "view": {"type": "home", "blocks": []}}, "modal"),
        (None, {"response_action": "clear", "view": MODAL}, "takes neither"),
        (None, {"response_action": "close"}, "must be 'errors', 'update', 'push' or 'clear'"),
        (None, {"options": [], "option_groups": []}, "not both"),
        (None, {"options": "a"}, "must be a list"),
        (None, {"options": [{}] * 101}, "Slack's limit: 100"),
        (None, {"options": [1]}, "must be an option object"),
        (None, {"options": [{"text": {"type": "mrkdwn", "text": "a"}}]}, "plain_text"),
        (None, {"options": [{"text": {"type": "plain_text", "text": "a" * 76}}]}, "limit: 75"),
        (None, {"options": [{"text": {"type": "plain_text", "text": "a"}, "value": 1}]}, "value"),
        (None, {"option_groups": "x"}, "list of at most 100"),
        (None, {"option_groups": [1]}, "option group object"),
        (None, {"text": "x", "response_type": "dm"}, "'ephemeral' or 'in_channel'"),
        (None, {"blocks": []}, "'text' or 'blocks' is required"),
    ],
)
def test_answers_that_slack_would_refuse(
    event: str | None, body: dict[str, Any], error: str
) -> None:
    with pytest.raises(InvalidCommand, match=re.escape(error)):
        parse_ack(body, event)


def test_views_become_web_api_calls() -> None:
    opened = parse_views_open({"trigger_id": "1.2.a", "view": MODAL})
    assert opened == ApiCall("views.open", {"trigger_id": "1.2.a", "view": MODAL})
    pushed = parse_views_push({"interactivity_pointer": "1.2.b", "view": MODAL})
    assert pushed == ApiCall("views.push", {"interactivity_pointer": "1.2.b", "view": MODAL})
    home = {"type": "home", "blocks": [], "private_metadata": "x", "external_id": "h1"}
    assert parse_views_publish({"user_id": "U1", "view": home, "hash": "1.2"}) == ApiCall(
        "views.publish", {"user_id": "U1", "view": home, "hash": "1.2"}
    )
    assert parse_views_update({"external_id": "h1", "view": home}).args == {
        "external_id": "h1",
        "view": home,
    }
    done = parse_function_complete({"function_execution_id": "Fx1", "outputs": {"a": 1}})
    assert done == ApiCall(
        "functions.completeSuccess", {"function_execution_id": "Fx1", "outputs": {"a": 1}}
    )
    failed = parse_function_fail({"function_execution_id": "Fx1", "error": "no"})
    assert failed.method == "functions.completeError" and failed.args["error"] == "no"
    assert parse_route({"team": "T1"}) == (None, "T1") and parse_route({}) == (None, None)


@pytest.mark.parametrize(
    ("parse", "body", "error"),
    [
        (parse_views_open, {"view": MODAL}, "exactly one of 'trigger_id'"),
        (parse_views_open, {"trigger_id": "a b", "view": MODAL}, "no spaces"),
        (parse_views_open, {"trigger_id": "t", "view": "x"}, "'view' must be a view object"),
        (parse_views_open, {"trigger_id": "t", "view": {"type": "home", "blocks": []}}, "'modal'"),
        (parse_views_open, {"trigger_id": "t", "view": {**MODAL, "blocks": "x"}}, "view.blocks"),
        (parse_views_open, {"trigger_id": "t", "view": {**MODAL, "blocks": [{}] * 101}}, "100"),
        (parse_views_open, {"trigger_id": "t", "view": {**MODAL, "title": None}}, "view.title"),
        (
            parse_views_open,
            {
                "trigger_id": "t",
                "view": {**MODAL, "title": {"type": "plain_text", "text": "x" * 25}},
            },
            "limit: 24",
        ),
        (parse_views_open, {"trigger_id": "t", "view": {**MODAL, "close": "x"}}, "view.close"),
        (parse_views_open, {"trigger_id": "t", "view": {**MODAL, "submit": None}}, "submit"),
        (parse_views_open, {"trigger_id": "t", "view": {**MODAL, "callback_id": "x" * 256}}, "255"),
        (
            parse_views_open,
            {"trigger_id": "t", "view": {**MODAL, "private_metadata": "x" * 3001}},
            "private_metadata",
        ),
        (parse_views_update, {"view": MODAL, "view_id": "V1", "external_id": "e"}, "exactly one"),
        (parse_views_update, {"view": MODAL, "view_id": "V1", "hash": 3}, "'hash'"),
        (parse_views_publish, {"view": {"type": "home", "blocks": []}}, "'user_id'"),
        (parse_function_complete, {"function_execution_id": "Fx1"}, "'outputs'"),
        (parse_function_complete, {"outputs": {}}, "'function_execution_id'"),
        (parse_function_fail, {"function_execution_id": "Fx1", "error": " "}, "'error'"),
        (parse_route, {"team": "T 1"}, "'team'"),
        (parse_route, {"enterprise": 5}, "'enterprise'"),
    ],
)
def test_bad_views_and_functions_name_the_key(parse: Any, body: dict[str, Any], error: str) -> None:
    with pytest.raises(InvalidCommand, match=re.escape(error)):
        parse(body)


def test_installations_from_oauth_answers() -> None:
    answer = {
        "ok": True,
        "access_token": "xoxe.xoxb-1-abc",
        "token_type": "bot",
        "scope": "chat:write,commands",
        "bot_user_id": "U0BOT",
        "app_id": "A1",
        "team": {"name": "One", "id": "T1"},
        "enterprise": None,
        "authed_user": {"id": "U1"},
        "is_enterprise_install": False,
        "refresh_token": "xoxe-1-def",
        "expires_in": 43200,
    }
    installed = installation_from_oauth(answer, 1000.0)
    assert (installed.team_id, installed.key, installed.installer_user_id) == ("T1", "-:T1", "U1")
    assert installed.bot_token_expires_at == 44200.0 and installed.expires_in(1200.0) == 43000.0
    assert "xoxe" not in repr(installed)
    assert Installation.from_json(installed.to_json()) == installed
    later = refreshed(installed, {"access_token": "xoxe.xoxb-2", "refresh_token": "xoxe-2"}, 5.0)
    assert (later.bot_token, later.bot_refresh_token, later.bot_token_expires_at) == (
        "xoxe.xoxb-2",
        "xoxe-2",
        None,
    )
    org = installation_from_oauth(
        {**answer, "team": None, "enterprise": {"id": "E1"}, "is_enterprise_install": True}, 0.0
    )
    assert org.key == "E1:-" and installation_key("E1", "T1") == "E1:T1"
    plain = installation_from_oauth({k: v for k, v in answer.items() if k != "expires_in"}, 0)
    assert plain.expires_in(10.0) is None
    for bad in ({**answer, "token_type": "user"}, {**answer, "team": None}):
        with pytest.raises(InvalidPayload):
            installation_from_oauth(bad, 0.0)
    with pytest.raises(InvalidPayload):
        refreshed(installed, {"access_token": "x"}, 0.0)
    with pytest.raises(InvalidPayload):
        Installation.from_json("[1]")
    url = authorize_url("https://slack.com/oauth/v2/authorize", "1.2", ["a:b", "c"], "s", None)
    assert url == "https://slack.com/oauth/v2/authorize?client_id=1.2&scope=a%3Ab%2Cc&state=s"


@PROPERTY
@given(st.dictionaries(st.text(max_size=20), json_values, max_size=8), st.sampled_from(
    [None, "slack.view_submission", "slack.options", "slack.command", "slack.message"]
))  # fmt: skip
def test_any_answer_is_a_payload_or_a_clear_refusal(
    body: dict[str, Any], event: str | None
) -> None:
    try:
        payload = parse_ack(body, event)
    except InvalidCommand:
        return
    if payload is not None:
        check_payload(payload)
        json.dumps(payload)


@PROPERTY
@given(st.dictionaries(st.text(max_size=20), json_values, max_size=8), json_values)
def test_any_interaction_is_a_msgpack_safe_message(payload: dict[str, Any], kind: Any) -> None:
    payload["type"] = kind if not isinstance(kind, bool) else "view_submission"
    inbound = from_interactive(payload)
    check_payload(inbound.keys)


@PROPERTY
@given(st.dictionaries(st.text(max_size=20), json_values, max_size=8))
def test_any_view_command_is_a_call_or_a_clear_refusal(body: dict[str, Any]) -> None:
    for parse in (parse_views_open, parse_views_push, parse_views_update, parse_views_publish):
        try:
            call = parse(body)
        except InvalidCommand:
            continue
        check_payload(call.args)
