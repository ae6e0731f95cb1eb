"""MqttGateway in-process against a real mosquitto: messages in and out, retained messages,
MQTT 5 properties, payload formats, commands good and bad, run-time subscriptions, reconnects,
TLS, passwords, WebSockets, MQTT 3.1.1, size limits and layer backpressure.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from channels.layers import InMemoryChannelLayer

from core.layers import resolve_layer
from core.retry import StartupError
from core.testing import MosquittoServer, RedisServer, make_certs, metric, receive, until
from tests.conftest import MQTT_USER, missing
from tests.gateways.mqtt.conftest import (
    MqttTestClient,
    command,
    gateway_config,
    publish_properties,
    running,
)

MakeClient = Callable[..., MqttTestClient]


@pytest.fixture
async def redis_layer(redis_server: RedisServer) -> AsyncIterator[Callable[[], Any]]:
    """Factory of channels_redis layers on the test Redis (pools closed afterwards)."""
    made: list[Any] = []

    def make() -> Any:
        made.append(resolve_layer(redis_server.url))
        return made[-1]

    yield make
    for layer in made:
        await layer.close_pools()


async def test_messages_in_and_out(
    mosquitto_server: MosquittoServer, mqtt_client: MakeClient
) -> None:
    layer = InMemoryChannelLayer()
    config = gateway_config(mosquitto_server, subscriptions=[{"topic": "sensors/#", "qos": 2}])
    async with running(config, layer) as gateway:
        connect = await receive(layer, "sensors", "mqtt.connect")
        assert connect["broker"] == f"127.0.0.1:{mosquitto_server.port}"
        assert connect["client_id"] == gateway.client_id and connect["session_present"] is False
        client = mqtt_client(mosquitto_server.port)
        for qos in (0, 1, 2):
            client.publish("sensors/boiler/temp", f"21.{qos}", qos=qos)
            message = await receive(layer, "sensors", "mqtt.message")
            event_id, received = message.pop("id"), message.pop("time")
            assert isinstance(event_id, str) and len(event_id) == 32
            assert isinstance(received, float)
            assert message == {
                "type": "mqtt.message",
                "gateway": "sensors",
                "reply_channel": "sensors.send",
                "topic": "sensors/boiler/temp",
                "payload": f"21.{qos}".encode(),
                "format": "bytes",
                "payload_error": None,
                "qos": qos,
                "retain": False,
                "dup": False,
                "subscription": "sensors/#",
                "properties": {},
            }
        client.subscribe("out/#", qos=1)
        result = await command(
            layer, {"type": "mqtt.publish", "topic": "out/a", "payload": "hello", "qos": 1}
        )
        assert result["ok"] and result["error"] is None
        assert (result["type"], result["id"], result["topic"]) == ("mqtt.result", "test", "out/a")
        got = await client.anext()
        assert (got.topic, got.payload, got.qos, got.retain) == ("out/a", b"hello", 1, False)
        # no result channel: carried out all the same
        await layer.send("sensors.send", {"type": "mqtt.publish", "topic": "out/b", "qos": 0})
        assert (await client.anext()).topic == "out/b"


async def test_retained_messages(
    mosquitto_server: MosquittoServer, mqtt_client: MakeClient
) -> None:
    client = mqtt_client(mosquitto_server.port)
    client.publish("status/boiler", b"on", qos=1, retain=True)
    layer = InMemoryChannelLayer()
    config = gateway_config(mosquitto_server, subscriptions=[{"topic": "status/#"}])
    async with running(config, layer):
        message = await receive(layer, "sensors", "mqtt.message")
        assert (message["topic"], message["payload"], message["retain"]) == (
            "status/boiler",
            b"on",
            True,
        )
        result = await command(
            layer,
            {
                "type": "mqtt.publish",
                "topic": "status/pump",
                "payload": b"off",
                "retain": True,
                "qos": 1,
            },
        )
        assert result["ok"], result
        late = mqtt_client(mosquitto_server.port)
        late.subscribe("status/pump")
        got = await late.anext()
        assert (got.payload, got.retain) == (b"off", True)


async def test_mqtt5_properties(mosquitto_server: MosquittoServer, mqtt_client: MakeClient) -> None:
    layer = InMemoryChannelLayer()
    config = gateway_config(
        mosquitto_server,
        subscriptions=[{"topic": "req/#", "payload": "auto"}],
        id_property="msg-id",
    )
    client = mqtt_client(mosquitto_server.port)
    async with running(config, layer):
        props = publish_properties(
            UserProperty=[("trace", "1"), ("trace", "2"), ("msg-id", "order-77")],
            ResponseTopic="replies/7",
            CorrelationData=b"\x00\x01req",
            ContentType="application/json; charset=utf-8",
            MessageExpiryInterval=120,
            PayloadFormatIndicator=1,
        )
        client.publish("req/order", b'{"item": "tea", "n": 2}', properties=props)
        message = await receive(layer, "sensors", "mqtt.message")
        properties = message["properties"]
        assert 0 < properties.pop("message_expiry") <= 120
        assert properties == {
            "payload_format_indicator": 1,
            "content_type": "application/json; charset=utf-8",
            "response_topic": "replies/7",
            "correlation_data": b"\x00\x01req",
            "user_properties": [["trace", "1"], ["trace", "2"], ["msg-id", "order-77"]],
        }
        assert (message["payload"], message["format"]) == ({"item": "tea", "n": 2}, "json")
        assert message["id"] == "order-77"  # mqtt.id_property

        # the request/response pattern: answer on the response topic with the correlation data
        client.subscribe("replies/#")
        result = await command(
            layer,
            {
                "type": "mqtt.publish",
                "topic": properties["response_topic"],
                "payload": {"ok": True},
                "qos": 1,
                "properties": {
                    "correlation_data": properties["correlation_data"],
                    "user_properties": {"served-by": "sensors"},
                    "message_expiry": 60,
                },
            },
        )
        assert result["ok"], result
        reply = await client.anext()
        assert reply.payload == b'{"ok":true}'
        assert reply.properties.CorrelationData == b"\x00\x01req"
        assert reply.properties.UserProperty == [("served-by", "sensors")]
        assert reply.properties.ContentType == "application/json"  # JSON payloads say so
        assert 0 < reply.properties.MessageExpiryInterval <= 60


async def test_binary_and_malformed_payloads(
    mosquitto_server: MosquittoServer, mqtt_client: MakeClient
) -> None:
    layer = InMemoryChannelLayer()
    config = gateway_config(
        mosquitto_server,
        subscriptions=[
            {"topic": "bin/#"},
            {"topic": "txt/#", "payload": "text"},
            {"topic": "json/#", "payload": "json"},
        ],
    )
    client = mqtt_client(mosquitto_server.port)
    everything = bytes(range(256)) * 4
    cases = [
        ("bin/a", everything, everything, "bytes", None),
        ("bin/empty", b"", b"", "bytes", None),
        ("txt/a", "Grüße ✓".encode(), "Grüße ✓", "text", None),
        ("txt/bad", b"ok\xff\xfe", b"ok\xff\xfe", "bytes", "payload is not valid UTF-8 (byte 2)"),
        ("json/a", b'{"t": [1, 2.5, null]}', {"t": [1, 2.5, None]}, "json", None),
        ("json/bad", b"{broken", b"{broken", "bytes", "payload is not valid JSON"),
        ("json/huge", b"1" * 30, b"1" * 30, "bytes", "does not fit in 64 bits"),
        ("json/binary", b"\x00\x9f\x92\x96", b"\x00\x9f\x92\x96", "bytes", "not valid UTF-8"),
    ]
    async with running(config, layer):
        for topic, payload, value, format_, error in cases:
            client.publish(topic, payload)
            message = await receive(layer, "sensors", "mqtt.message")
            assert message["topic"] == topic
            assert (message["payload"], message["format"]) == (value, format_)
            if error is None:
                assert message["payload_error"] is None
            else:
                assert error in message["payload_error"]


async def test_invalid_and_unknown_commands(
    mosquitto_server: MosquittoServer, mqtt_client: MakeClient
) -> None:
    layer = InMemoryChannelLayer()
    config = gateway_config(mosquitto_server, subscriptions=[{"topic": "static/#"}])
    cases: list[tuple[dict[str, Any], str]] = [
        ({"type": "mqtt.publish"}, "topic is required"),
        ({"type": "mqtt.publish", "topic": "a/#"}, "must not contain the wildcards"),
        ({"type": "mqtt.publish", "topic": "a", "qos": 5}, "qos must be 0, 1 or 2"),
        ({"type": "mqtt.publish", "topic": "a", "payload": {1, 2}}, "cannot encode as JSON"),
        ({"type": "mqtt.publish", "topic": "a", "properties": {"colour": 1}}, "colour"),
        ({"type": "mqtt.publish", "topic": "a", "qos": 1, "retained": True}, "retained"),
        ({"type": "mqtt.subscribe", "topic": "a/#/b"}, "'#' must be the whole last level"),
        ({"type": "mqtt.subscribe", "topic": "a", "channel": "x!y"}, "channel must be"),
        ({"type": "mqtt.subscribe", "topic": "static/#"}, "is a static subscription"),
        ({"type": "mqtt.unsubscribe"}, "topic is required"),
        ({"type": "mqtt.unsubscribe", "topic": "static/#"}, "is a static subscription"),
        ({"type": "mqtt.frobnicate"}, "unknown command 'mqtt.frobnicate'"),
        ({"type": "email.send"}, "unknown command 'email.send'"),
        ({"type": "mqtt.publish", "id": {"no": 1}, "topic": "a"}, "'id' must be a string"),
    ]
    async with running(config, layer) as gateway:
        for message, fragment in cases:
            result = await command(layer, message)
            assert result["ok"] is False, message
            assert fragment in result["error"], (message, result)
        # without a result channel, or not even a command: logged, and the loop goes on
        for junk in ({"type": "mqtt.publish"}, {"no": "type"}, {"type": 5}, {"type": "mqtt."}):
            await layer.send("sensors.send", junk)
        client = mqtt_client(mosquitto_server.port)
        client.subscribe("after/#")
        result = await command(layer, {"type": "mqtt.publish", "topic": "after/x", "qos": 1})
        assert result["ok"]
        assert (await client.anext()).topic == "after/x"
        assert metric(
            "gateway_commands_total", gateway="sensors", type="mqtt.publish", outcome="failed"
        )
        assert gateway.ready_reasons() == []


async def test_runtime_subscriptions(
    mosquitto_server: MosquittoServer, mqtt_client: MakeClient
) -> None:
    layer = InMemoryChannelLayer()
    config = gateway_config(mosquitto_server, subscriptions=[{"topic": "static/#"}])
    client = mqtt_client(mosquitto_server.port)
    async with running(config, layer) as gateway:
        result = await command(
            layer,
            {"type": "mqtt.subscribe", "topic": "rt/+", "channel": "rt-one", "payload": "text"},
        )
        assert result["ok"], result
        assert (result["topic"], result["channel"], result["granted_qos"]) == ("rt/+", "rt-one", 1)
        client.publish("rt/a", b"first")
        message = await receive(layer, "rt-one")
        assert (message["payload"], message["subscription"]) == ("first", "rt/+")

        # a second consumer subscribes the same filter to its own channel: both get each match
        assert (
            await command(
                layer, {"type": "mqtt.subscribe", "topic": "rt/+", "channel": "rt-two", "qos": 0}
            )
        )["ok"]
        client.publish("rt/b", b"both")
        one, two = await receive(layer, "rt-one"), await receive(layer, "rt-two")
        assert one["id"] == two["id"] and (one["payload"], two["payload"]) == ("both", b"both")

        removed = await command(
            layer, {"type": "mqtt.unsubscribe", "topic": "rt/+", "channel": "rt-two"}
        )
        assert removed["ok"] and removed["removed"] == 1
        removed = await command(layer, {"type": "mqtt.unsubscribe", "topic": "rt/+"})
        assert removed["ok"] and removed["removed"] == 1
        assert "rt/+" not in gateway.table
        again = await command(layer, {"type": "mqtt.unsubscribe", "topic": "rt/+"})
        assert again["ok"] and again["removed"] == 0

        # the broker delivers in order on one connection: once the later message on a static
        # topic is in, the unsubscribed one would already be too
        client.publish("rt/c", b"gone")
        client.publish("static/x", b"still here")
        assert (await receive(layer, "sensors", "mqtt.message"))["topic"] == "static/x"
        for channel in ("rt-one", "rt-two"):
            with pytest.raises(TimeoutError):
                await receive(layer, channel, timeout=0.2)
        assert gateway.ready_reasons() == []


@pytest.fixture
def dynsec_plugin() -> Path:
    """mosquitto's dynamic security plugin (Debian's mosquitto package ships it)."""
    plugin = Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")
    if not plugin.exists():
        missing(f"mosquitto's dynamic security plugin is not installed ({plugin})")
    return plugin


async def test_refused_subscriptions(
    start_service: Any, tmp_path: Path, dynsec_plugin: Path
) -> None:
    # mosquitto's acl_file grants every SUBSCRIBE (it filters at delivery); its dynamic
    # security plugin refuses them, as a locked-down broker would
    plugin = dynsec_plugin
    deny = [
        {"acltype": "subscribeLiteral", "topic": topic, "priority": 1, "allow": False}
        for topic in ("denied/#", "secret/#")
    ]
    dynsec = tmp_path / "dynsec.json"
    dynsec.write_text(
        json.dumps(
            {
                "defaultACLAccess": {
                    "publishClientSend": True,
                    "publishClientReceive": True,
                    "subscribe": True,
                    "unsubscribe": True,
                },
                "clients": [],
                "groups": [{"groupname": "anonymous", "roles": [{"rolename": "locked"}]}],
                "roles": [{"rolename": "locked", "acls": deny}],
                "anonymousGroup": "anonymous",
            }
        )
    )
    broker = start_service(
        MosquittoServer(extra_config=[f"plugin {plugin}", f"plugin_opt_config_file {dynsec}"])
    )
    layer = InMemoryChannelLayer()
    config = gateway_config(broker, subscriptions=[{"topic": "allowed/#"}, {"topic": "denied/#"}])
    async with running(config, layer, ready=False) as gateway:
        reasons = await until(
            lambda: [r for r in gateway.ready_reasons() if "refused" in r], what="the refusal"
        )
        assert reasons == ["sensors: subscription 'denied/#' refused: Not authorized"]
        result = await command(layer, {"type": "mqtt.subscribe", "topic": "secret/#"})
        assert not result["ok"]
        assert result["error"] == "the broker refused the subscription 'secret/#': Not authorized"
        assert "secret/#" not in gateway.table
        ok = await command(layer, {"type": "mqtt.subscribe", "topic": "allowed/more"})
        assert ok["ok"]


async def test_reconnect_restores_every_subscription(
    mosquitto_server: MosquittoServer, mqtt_client: MakeClient
) -> None:
    layer = InMemoryChannelLayer()
    config = gateway_config(mosquitto_server, subscriptions=[{"topic": "static/#"}])
    async with running(config, layer) as gateway:
        await receive(layer, "sensors", "mqtt.connect")
        result = await command(layer, {"type": "mqtt.subscribe", "topic": "rt/#", "channel": "rt"})
        assert result["ok"]
        # a broker without persistence forgets every session: the gateway must resubscribe
        await asyncio.to_thread(mosquitto_server.restart)
        lost = await receive(layer, "sensors", "mqtt.disconnect")
        assert lost["reason"] and lost["broker"] == f"127.0.0.1:{mosquitto_server.port}"
        back = await receive(layer, "sensors", "mqtt.connect")
        assert back["session_present"] is False
        await until(lambda: not gateway.ready_reasons(), what="readiness after the restart")
        client = mqtt_client(mosquitto_server.port)
        client.publish("static/a", b"1")
        client.publish("rt/b", b"2")
        assert (await receive(layer, "sensors", "mqtt.message"))["topic"] == "static/a"
        assert (await receive(layer, "rt"))["topic"] == "rt/b"


async def test_tls(
    mosquitto_tls_server: MosquittoServer,
    mqtt_client: MakeClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = mosquitto_tls_server
    layer = InMemoryChannelLayer()
    tls = {"ca_file": str(broker.certs.ca_crt)}
    config = gateway_config(
        broker.tls_port, host="localhost", tls=tls, subscriptions=[{"topic": "secure/#"}]
    )
    async with running(config, layer):
        client = mqtt_client(broker.tls_port, certs=broker.certs)
        client.publish("secure/a", b"over TLS")
        assert (await receive(layer, "sensors", "mqtt.message"))["payload"] == b"over TLS"
        client.subscribe("secure/out")
        assert (await command(layer, {"type": "mqtt.publish", "topic": "secure/out"}))["ok"]
        assert (await client.anext()).topic == "secure/out"

    stranger = make_certs(tmp_path / "stranger")
    untrusted = {**config, "mqtt": {**config["mqtt"], "tls": {"ca_file": str(stranger.ca_crt)}}}
    with pytest.raises(StartupError, match="certificate is not trusted"):
        async with running(untrusted, layer):
            pass
    # verification can be turned off, loudly
    insecure = {**untrusted, "mqtt": {**untrusted["mqtt"], "tls": {"verify": False}}}
    async with running(insecure, layer):
        pass
    assert "TLS certificate verification is OFF" in caplog.text


async def test_password(mosquitto_password_server: MosquittoServer, tmp_path: Path) -> None:
    user, password = MQTT_USER
    secret = tmp_path / "mqtt-password"
    secret.write_text(password + "\n")
    layer = InMemoryChannelLayer()
    config = gateway_config(mosquitto_password_server, username=user, password_file=str(secret))
    async with running(config, layer):
        assert (await command(layer, {"type": "mqtt.publish", "topic": "a"}))["ok"]
    wrong = {**config, "mqtt": {**config["mqtt"], "password_file": None, "password": "nope"}}
    with pytest.raises(StartupError, match=r"refused the connection: (Bad user name|Not auth)"):
        async with running(wrong, layer):
            pass
    anonymous = {**config, "mqtt": {**config["mqtt"], "username": None, "password_file": None}}
    with pytest.raises(StartupError, match="refused the connection"):
        async with running(anonymous, layer):
            pass


async def test_websockets(
    mosquitto_websockets_server: MosquittoServer, mqtt_client: MakeClient
) -> None:
    broker = mosquitto_websockets_server
    layer = InMemoryChannelLayer()
    config = gateway_config(
        broker.ws_port, transport="websockets", subscriptions=[{"topic": "ws/#"}]
    )
    async with running(config, layer):
        mqtt_client(broker.port).publish("ws/a", b"through a WebSocket")
        message = await receive(layer, "sensors", "mqtt.message")
        assert message["payload"] == b"through a WebSocket"


async def test_mqtt311(mosquitto_server: MosquittoServer, mqtt_client: MakeClient) -> None:
    layer = InMemoryChannelLayer()
    config = gateway_config(
        mosquitto_server, protocol="3.1.1", subscriptions=[{"topic": "old/#", "qos": 1}]
    )
    async with running(config, layer):
        client = mqtt_client(mosquitto_server.port, protocol=4)
        client.publish("old/a", b"3.1.1")
        message = await receive(layer, "sensors", "mqtt.message")
        assert (message["payload"], message["properties"]) == (b"3.1.1", {})
        result = await command(
            layer,
            {
                "type": "mqtt.publish",
                "topic": "old/b",
                "properties": {"content_type": "text/plain"},
            },
        )
        assert not result["ok"] and "need MQTT 5" in result["error"]
        client.subscribe("old/c")
        assert (await command(layer, {"type": "mqtt.publish", "topic": "old/c", "qos": 1}))["ok"]
        assert (await client.anext()).topic == "old/c"


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_messages_over_max_payload_never_reach_the_layer(
    mosquitto_server: MosquittoServer, mqtt_client: MakeClient, protocol: str
) -> None:
    layer = InMemoryChannelLayer()
    name = f"limit{protocol.replace('.', '')}"
    config = gateway_config(
        mosquitto_server,
        name=name,
        protocol=protocol,
        max_payload=100,
        subscriptions=[{"topic": "big/#"}],
    )
    async with running(config, layer):
        client = mqtt_client(mosquitto_server.port)
        client.publish("big/a", b"x" * 500)
        client.publish("big/b", b"small")
        # MQTT 5: the broker never sends it (Maximum Packet Size); 3.1.1: dropped and counted
        assert (await receive(layer, name, "mqtt.message"))["topic"] == "big/b"
    if protocol == "3.1.1":
        assert metric("gateway_dropped_total", gateway=name, reason="too_large") == 1


async def test_full_layer_withholds_acks_and_loses_nothing(
    mosquitto_server: MosquittoServer, mqtt_client: MakeClient
) -> None:
    layer = InMemoryChannelLayer(capacity=5)
    config = gateway_config(
        mosquitto_server,
        name="pressure",
        receive_maximum=10,
        subscriptions=[{"topic": "p/#", "qos": 1}],
    )
    async with running(config, layer):
        client = mqtt_client(mosquitto_server.port)
        for n in range(40):
            client.publish(f"p/{n}", str(n), qos=1)
        await until(lambda: metric("gateway_backpressure_waits_total", gateway="pressure") > 0)
        payloads = []
        while len(payloads) < 40:
            message = await receive(layer, "pressure")
            if message["type"] == "mqtt.message":
                payloads.append(int(message["payload"]))
        assert payloads == list(range(40))  # every message, in order


async def test_runtime_subscriptions_in_redis(
    redis_layer: Callable[[], Any], mosquitto_server: MosquittoServer, mqtt_client: MakeClient
) -> None:
    config = gateway_config(mosquitto_server, name="persist")
    first, second = redis_layer(), redis_layer()
    async with running(config, first) as one, running(config, second) as two:
        result = await command(
            first,
            {"type": "mqtt.subscribe", "topic": "rt/#", "channel": "persist-rt"},
            "persist.send",
        )
        assert result["ok"], result
        # whichever replica took the command, the other one subscribes too
        await until(lambda: "rt/#" in one.table and "rt/#" in two.table, what="both replicas")
        await until(lambda: not one.ready_reasons() and not two.ready_reasons())
    # a new process finds it in Redis, subscribes before it calls itself ready, and delivers
    layer = redis_layer()
    async with running(config, layer) as three:
        assert [r.channel for r in three.table.routes("rt/#")] == ["persist-rt"]
        mqtt_client(mosquitto_server.port).publish("rt/after-restart", b"kept")
        message = await receive(layer, "persist-rt")
        assert (message["topic"], message["subscription"]) == ("rt/after-restart", "rt/#")
        removed = await command(
            layer, {"type": "mqtt.unsubscribe", "topic": "rt/#"}, "persist.send"
        )
        assert removed["removed"] == 1
    async with running(config, redis_layer()) as four:
        assert "rt/#" not in four.table
