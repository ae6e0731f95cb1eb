"""Every gateway's consumer helpers (gateways/<proto>/consumers.py) refuse what the gateway refuses,
with the gateway's words, before anything is sent; and they know every command it takes.

The gateways here are the real classes, built on the in-memory layer and never started: an
invalid command is answered by ``Gateway.dispatch`` before any I/O.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from channels.layers import InMemoryChannelLayer

from core.consumers import Commands, InvalidCommand
from core.service import Gateway
from gateways import GATEWAYS
from tests.gateways.conftest import nothing_sent

LAYER = InMemoryChannelLayer()

CONFIGS: dict[str, dict[str, Any]] = {
    "irc": {"irc": {"server": "irc.invalid", "nick": "bot"}},
    "mqtt": {"mqtt": {"host": "broker.invalid", "client_id": "helpers"}},  # no id lock to hold
    "email": {
        "email": {
            "accept": ["example.com"],
            "relay": {"host": "relay.invalid", "tls": "none", "from_address": "s@example.com"},
        }
    },
    "slack": {"slack": {"bot_token": "xoxb-1", "app_token": "xapp-1"}},
    "scheduler": {"scheduler": {"schedules": {"nightly": {"cron": "0 3 * * *"}}}},
}
COMMANDS = {
    "irc": "IrcCommands",
    "mqtt": "MqttCommands",
    "email": "EmailCommands",
    "slack": "SlackCommands",
    "scheduler": "SchedulerCommands",
}


def gateway_class(proto: str) -> type[Gateway[Any]]:
    module, _, name = GATEWAYS[proto].partition(":")
    cls: type[Gateway[Any]] = getattr(importlib.import_module(module), name)
    return cls


def commands_class(proto: str) -> type[Commands]:
    cls: type[Commands] = getattr(
        importlib.import_module(f"gateways.{proto}.consumers"), COMMANDS[proto]
    )
    return cls


def gateway(proto: str, tmp_path: Any) -> Gateway[Any]:
    cls = gateway_class(proto)
    config = {"gateway": proto, "name": f"test-{proto}", **CONFIGS[proto]}
    if proto == "scheduler":
        config["scheduler"]["state_file"] = str(tmp_path / "state.sqlite3")
    return cls(cls.config_model.model_validate(config), LAYER)


@pytest.mark.parametrize("proto", sorted(COMMANDS))
def test_the_helpers_know_every_command_the_gateway_takes(proto: str) -> None:
    """A command added to a gateway (``@handles``) needs its line in ``consumers.VALIDATORS``."""
    helpers = commands_class(proto)
    assert helpers.protocol == gateway_class(proto).protocol
    assert set(helpers.validators) == set(gateway_class(proto).commands)


def test_every_gateway_has_its_helpers() -> None:
    assert set(COMMANDS) | {"http_ws"} == set(GATEWAYS)


HOOK = "https://hooks.slack.com/commands/1"
MODAL = {"type": "modal", "title": {"type": "plain_text", "text": "Ticket"}, "blocks": []}
HOME = {"type": "home", "blocks": []}

#: commands every gateway refuses before doing anything (one per check the helpers reuse)
REFUSED: list[tuple[str, dict[str, Any]]] = [
    ("irc", {"type": "irc.send", "target": "#ops", "text": "two\nlines"}),
    ("irc", {"type": "irc.send", "target": "#ops", "text": "hi", "knd": "action"}),
    ("irc", {"type": "irc.send", "target": "#ops", "text": "hi", "kind": "shout"}),
    ("irc", {"type": "irc.send", "target": "a,b", "text": "hi"}),
    ("irc", {"type": "irc.join", "channel": "ops"}),
    ("irc", {"type": "irc.topic", "channel": "#ops"}),
    ("irc", {"type": "irc.nick", "nick": "9lives"}),
    ("irc", {"type": "irc.send", "id": 1.5, "target": "#ops", "text": "hi"}),
    ("mqtt", {"type": "mqtt.publish", "topic": "alerts/#"}),
    ("mqtt", {"type": "mqtt.publish", "topic": "$SYS/x"}),
    ("mqtt", {"type": "mqtt.publish", "topic": "a", "qos": 3}),
    ("mqtt", {"type": "mqtt.publish", "topic": "a", "retained": True}),
    ("mqtt", {"type": "mqtt.publish", "topic": "a", "properties": {"content": "x"}}),
    ("mqtt", {"type": "mqtt.subscribe", "topic": "a/#/b"}),
    ("mqtt", {"type": "mqtt.subscribe", "topic": "a/+", "channel": "specific.x!y"}),
    ("mqtt", {"type": "mqtt.subscribe", "topic": "a/+", "payload": "yaml"}),
    ("mqtt", {"type": "mqtt.unsubscribe"}),
    ("email", {"type": "email.send", "subject": "no recipient"}),
    ("email", {"type": "email.send", "to": "not an address"}),
    ("email", {"type": "email.send", "to": "a@example.com", "subject": "x\r\nBcc: evil@x"}),
    ("email", {"type": "email.send", "to": "a@example.com", "headers": {"From": "x@y.z"}}),
    ("email", {"type": "email.send", "to": "a@example.com", "attachment": []}),
    ("email", {"type": "email.send", "to": "a@example.com", "in_reply_to": "<a@b> <c@d>"}),
    ("slack", {"type": "slack.send", "channel": "C1"}),
    ("slack", {"type": "slack.send", "channel": "C1", "text": "x" * 40_001}),
    ("slack", {"type": "slack.send", "channel": "C1", "text": "hi", "thread_ts": "yesterday"}),
    ("slack", {"type": "slack.update", "channel": "C1", "ts": "1.2"}),
    ("slack", {"type": "slack.react", "channel": "C1", "ts": "1.2", "name": "a:b"}),
    ("slack", {"type": "slack.respond", "response_url": HOOK, "text": "x", "response_type": "dm"}),
    ("slack", {"type": "slack.respond", "response_url": HOOK}),
    ("slack", {"type": "slack.send", "channel": "C1", "text": "hi", "team": "T 1"}),
    ("slack", {"type": "slack.views_open", "view": MODAL}),
    ("slack", {"type": "slack.views_open", "trigger_id": "1.2.a", "view": {**MODAL, "title": 1}}),
    ("slack", {"type": "slack.views_push", "trigger_id": "1.2.a", "view": HOME}),
    ("slack", {"type": "slack.views_update", "view_id": "V1", "external_id": "e", "view": MODAL}),
    ("slack", {"type": "slack.views_publish", "user_id": "U1", "view": MODAL}),
    ("slack", {"type": "slack.function_complete", "function_execution_id": "Fx1"}),
    ("slack", {"type": "slack.function_fail", "function_execution_id": "Fx1", "error": ""}),
    ("slack", {"type": "slack.ack", "options": "all of them"}),
    ("slack", {"type": "slack.ack", "response_action": "close"}),
    ("scheduler", {"type": "scheduler.add", "schedule": "a", "cron": "99 * * * *"}),
    ("scheduler", {"type": "scheduler.add", "schedule": "a", "in": "10m", "every": "1h"}),
    ("scheduler", {"type": "scheduler.add", "schedule": "a", "in": "10m", "timezone": "Mars/X"}),
    ("scheduler", {"type": "scheduler.add", "schedule": "a b", "in": "10m"}),
    ("scheduler", {"type": "scheduler.add", "schedule": "a", "in": "10m", "misfire": "x"}),
    ("scheduler", {"type": "scheduler.add", "schedule": "a", "in": "10 minutes"}),
    ("scheduler", {"type": "scheduler.add", "schedule": "a", "in": "10m", "every_": 1}),
    ("scheduler", {"type": "scheduler.remove"}),
    ("scheduler", {"type": "scheduler.list", "prefix": 3}),
    ("scheduler", {"type": "scheduler.remove", "schedule": "a", "shedule": "b"}),
    ("scheduler", {"type": "scheduler.pause"}),
    ("scheduler", {"type": "scheduler.pause", "schedule": "nightly", "all": True}),
    ("scheduler", {"type": "scheduler.resume", "all": "yes"}),
    ("scheduler", {"type": "scheduler.pause", "all": True, "note": 5}),
    ("scheduler", {"type": "scheduler.trigger", "schedule": "nightly", "request_id": "a b"}),
    ("scheduler", {"type": "scheduler.trigger", "schedule": "nightly", "overlap": "never"}),
    ("scheduler", {"type": "scheduler.trigger"}),
    ("scheduler", {"type": "scheduler.backfill", "schedule": "nightly", "from": "2026-01-01"}),
    ("scheduler", {"type": "scheduler.backfill", "schedule": "nightly", "from": "x", "to": 0}),
    ("scheduler", {"type": "scheduler.done"}),
    ("scheduler", {"type": "scheduler.done", "run_id": "r", "extra": 1}),
]


@pytest.mark.parametrize(("proto", "message"), REFUSED, ids=lambda v: str(v)[:60])
async def test_refused_in_the_consumer_with_the_gateways_words(
    proto: str, message: dict[str, Any], tmp_path: Any
) -> None:
    answer = await gateway(proto, tmp_path).dispatch({**message, "result_channel": "r"})
    assert answer is not None and answer["ok"] is False
    with pytest.raises(InvalidCommand) as refused:
        commands_class(proto).check(message)
    assert answer["error"] in str(refused.value)


#: commands the gateways take; the helpers must not refuse them
TAKEN: list[tuple[str, dict[str, Any]]] = [
    ("irc", {"type": "irc.send", "target": "#ops", "text": "hi", "kind": "action", "id": 3}),
    ("irc", {"type": "irc.join", "channel": "#ops", "key": "s3cret"}),
    ("irc", {"type": "irc.raw", "line": "VERSION"}),  # the gateway may still disallow it
    ("mqtt", {"type": "mqtt.publish", "topic": "a/b", "payload": {"t": 1}, "qos": 1}),
    ("mqtt", {"type": "mqtt.publish", "topic": "a", "properties": {"content_type": "x/y"}}),
    ("mqtt", {"type": "mqtt.subscribe", "topic": "$share/g/a/+", "retain_handling": "never"}),
    ("mqtt", {"type": "mqtt.resync"}),
    ("email", {"type": "email.send", "to": "Bob <b@example.com>", "text": "hi"}),
    ("email", {"type": "email.send", "bcc": ["b@example.com"], "from": "me@example.com"}),
    ("slack", {"type": "slack.send", "channel": "C1", "blocks": [{"type": "divider"}]}),
    ("slack", {"type": "slack.respond", "response_url": "https://elsewhere/", "text": "x"}),
    ("slack", {"type": "slack.send", "channel": "C1", "text": "hi", "team": "T1"}),
    ("slack", {"type": "slack.views_open", "trigger_id": "1.2.a", "view": MODAL}),
    ("slack", {"type": "slack.views_publish", "user_id": "U1", "view": HOME, "hash": "1.2"}),
    ("slack", {"type": "slack.views_update", "external_id": "home-1", "view": HOME}),
    ("slack", {"type": "slack.function_complete", "function_execution_id": "F", "outputs": {}}),
    ("slack", {"type": "slack.ack", "response_action": "errors", "errors": {"b": "bad"}}),
    ("slack", {"type": "slack.ack"}),
    ("scheduler", {"type": "scheduler.add", "schedule": "a", "at": 0, "misfire_grace": 1e12}),
    ("scheduler", {"type": "scheduler.add", "schedule": "a", "cron": "*/10 * * * * *"}),
    ("scheduler", {"type": "scheduler.pause", "all": True, "note": "deploy"}),
    ("scheduler", {"type": "scheduler.resume", "schedule": "nightly"}),
    ("scheduler", {"type": "scheduler.trigger", "schedule": "nightly", "request_id": "r-1"}),
    ("scheduler", {"type": "scheduler.backfill", "schedule": "n", "from": 0, "to": "2026-01-01"}),
    ("scheduler", {"type": "scheduler.done", "run_id": "r", "schedule": "nightly"}),
]


@pytest.mark.parametrize(("proto", "message"), TAKEN, ids=lambda v: str(v)[:60])
def test_taken_commands_pass(proto: str, message: dict[str, Any]) -> None:
    assert commands_class(proto).check(message) == message


Call = Callable[[Any], Awaitable[Any]]

#: a typo in an argument's name, and a value the gateway refuses, for one method per gateway
MISTAKES: list[tuple[str, Call, Call]] = [
    (
        "irc",
        lambda c: c.send("#ops", "hi", knd="action"),
        lambda c: c.send("#ops", "line one\r\nQUIT"),
    ),
    (
        "mqtt",
        lambda c: c.publish("alerts/x", b"hot", qso=1),
        lambda c: c.publish("alerts/+", b"hot", qos=1),
    ),
    (
        "email",
        lambda c: c.send("a@example.com", subjet="hi"),
        lambda c: c.send("a@example.com", subject="hi", headers={"Subject": "twice"}),
    ),
    (
        "slack",
        lambda c: c.send("C0GENERAL", "hi", thread="1.2"),
        lambda c: c.react("C0GENERAL", "1700000000.000100", "not:one"),
    ),
    (
        "scheduler",
        lambda c: c.add("digest", cron="0 18 * * *", timezon="Europe/Berlin"),
        lambda c: c.add("digest", cron="0 18 * * *", timezone="Europe/Bern"),
    ),
]


@pytest.mark.parametrize(("proto", "typo", "invalid"), MISTAKES, ids=[m[0] for m in MISTAKES])
async def test_a_mistake_fails_before_anything_reaches_the_layer(
    proto: str, typo: Call, invalid: Call
) -> None:
    layer = InMemoryChannelLayer()
    helpers = commands_class(proto)(layer, "integration.send")
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        await typo(helpers)
    with pytest.raises(InvalidCommand):
        await invalid(helpers)
    assert await nothing_sent(helpers, "integration.send")
