"""gateways.mqtt.translate: pure, so property-tested (hypothesis) without any network."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.client import MQTTMessage, topic_matches_sub
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateways.mqtt.translate import (
    MAX_SUBSCRIPTION_ID,
    InvalidCommand,
    InvalidTopic,
    Route,
    SubscriptionTable,
    decode_payload,
    encode_payload,
    inbound_message,
    message_id,
    parse_publish,
    parse_subscribe,
    parse_unsubscribe,
    properties_to_dict,
    publish_properties,
    split_shared,
    subscription_identifiers,
    topic_matches,
    validate_channel,
    validate_filter,
    validate_topic,
)

# -- strategies -----------------------------------------------------------------------------

level = st.sampled_from(["a", "b", "c", "", "sensor", "ü"])
topics = st.lists(level, min_size=1, max_size=5).map("/".join).filter(bool)
filter_levels = st.lists(st.one_of(level, st.just("+")), min_size=1, max_size=5)
filters = st.builds(
    lambda levels, hash_: "/".join(levels + (["#"] if hash_ else [])),
    filter_levels,
    st.booleans(),
).filter(bool) | st.just("#")
texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=20,
)
user_properties = st.lists(st.tuples(texts, texts).map(list), max_size=4)
property_dicts = st.fixed_dictionaries(
    {},
    optional={
        "payload_format_indicator": st.sampled_from([0, 1]),
        "message_expiry": st.integers(0, 2**32 - 1),
        "content_type": texts,
        "response_topic": topics,
        "correlation_data": st.binary(max_size=64),
        "user_properties": user_properties.filter(bool),
    },
)


def msgpack_safe(value: Any) -> None:
    msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False)


def make_message(
    topic: str,
    payload: bytes,
    *,
    qos: int = 1,
    mid: int = 7,
    properties: Properties | None = None,
    retain: bool = False,
    dup: bool = False,
) -> MQTTMessage:
    message = MQTTMessage(mid, topic.encode("utf-8"))
    message.payload = payload
    message.qos = qos
    message.retain = retain
    message.dup = dup
    message.properties = properties
    return message


def wire_properties(spec: dict[str, Any]) -> Properties:
    """``spec`` through paho's own wire format, as a received PUBLISH would carry it."""
    props = publish_properties(spec) or Properties(PacketTypes.PUBLISH)
    received = Properties(PacketTypes.PUBLISH)
    received.unpack(props.pack())
    return received


# -- topics ---------------------------------------------------------------------------------


@given(filters, topics)
def test_topic_matching_agrees_with_paho(filter_: str, topic: str) -> None:
    assert topic_matches(filter_, topic) == topic_matches_sub(filter_, topic)


@given(filters, topics, st.text("abc", min_size=1, max_size=3))
def test_shared_filters_match_like_their_inner_filter(filter_: str, topic: str, group: str) -> None:
    assert topic_matches(f"$share/{group}/{filter_}", topic) == topic_matches(filter_, topic)
    assert split_shared(f"$share/{group}/{filter_}") == (group, filter_)


@given(filters)
def test_generated_filters_are_valid(filter_: str) -> None:
    assert validate_filter(filter_) == filter_


def test_dollar_topics_need_an_explicit_first_level() -> None:
    assert not topic_matches("#", "$SYS/broker/uptime")
    assert not topic_matches("+/broker/uptime", "$SYS/broker/uptime")
    assert topic_matches("$SYS/#", "$SYS/broker/uptime")
    assert topic_matches("a/#", "a")  # '#' includes the parent level (MQTT 5 §4.7.1.2)
    assert not topic_matches("a/+", "a")
    assert topic_matches("+/+", "/")


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("", "must not be empty"),
        ("a/#/b", "'#' must be the whole last level"),
        ("a/b#", "'#' must be the whole last level"),
        ("a/b+/c", "'+' must be a whole level"),
        ("$share/g", "no filter after the group"),
        ("$share//a", "needs a group name"),
        ("$share/g+/a", "needs a group name"),
        ("a\x00b", "U+0000"),
        ("x" * 65536, "longer than 65535 bytes"),
        ("\ud800", "lone surrogate"),
        (42, "must be a string"),
    ],
)
def test_invalid_filters(value: Any, fragment: str) -> None:
    with pytest.raises(InvalidTopic, match=fragment.replace("+", r"\+")):
        validate_filter(value)


@pytest.mark.parametrize("value", ["", "a/+", "a/#", "#", "a\x00"])
def test_invalid_topic_names(value: str) -> None:
    with pytest.raises(InvalidTopic):
        validate_topic(value)


@given(topics)
def test_topic_names_without_wildcards_are_valid(topic: str) -> None:
    assert validate_topic(topic) == topic


def test_channel_names() -> None:
    assert validate_channel("sensors.alerts-1") == "sensors.alerts-1"
    for bad in ("", "a b", "specific.abc!def", "x" * 100, None):
        with pytest.raises(InvalidCommand, match="channel must be"):
            validate_channel(bad)


# -- payloads -------------------------------------------------------------------------------


@given(st.binary(), st.sampled_from(["bytes", "text", "json", "auto"]), property_dicts)
def test_any_payload_decodes_to_something_sendable(
    payload: bytes, format_: str, props: dict[str, Any]
) -> None:
    value, used, error = decode_payload(payload, format_, props)
    msgpack_safe(value)
    if error is not None:
        assert (value, used) == (payload, "bytes")
    if used == "bytes":
        assert value == payload


@given(texts)
def test_text_round_trip(text: str) -> None:
    assert decode_payload(encode_payload(text), "text") == (text, "text", None)


@given(json_values.filter(lambda v: not isinstance(v, str | type(None))))
def test_json_round_trip(value: Any) -> None:
    decoded, used, error = decode_payload(encode_payload(value), "json")
    assert (used, error) == ("json", None)
    assert decoded == value


@given(st.binary())
def test_bytes_round_trip(payload: bytes) -> None:
    assert decode_payload(encode_payload(payload), "bytes") == (payload, "bytes", None)


@pytest.mark.parametrize(
    ("payload", "format_", "fragment"),
    [
        (b"\xff\xfe", "text", "not valid UTF-8 (byte 0)"),
        (b"ok\xc3", "json", "not valid UTF-8 (byte 2)"),
        (b"{broken", "json", "not valid JSON"),
        (b"18446744073709551616", "json", "does not fit in 64 bits"),
        (b'"\\ud800"', "json", "lone surrogate"),
        (b"[" * 102 + b"]" * 102, "json", "nested deeper than 100"),
        (b"[" * 100_000 + b"]" * 100_000, "json", "nested deeper than 100"),
    ],
)
def test_malformed_payloads_come_as_bytes_with_the_reason(
    payload: bytes, format_: str, fragment: str
) -> None:
    value, used, error = decode_payload(payload, format_)
    assert (value, used) == (payload, "bytes")
    assert error is not None and fragment in error


def test_nesting_limit_is_exact() -> None:
    assert decode_payload(b"[" * 101 + b"]" * 101, "json")[1] == "json"


def test_auto_format_follows_the_mqtt5_hints() -> None:
    assert decode_payload(b"[1]", "auto", {"content_type": "application/json"})[1] == "json"
    assert decode_payload(b"[1]", "auto", {"content_type": "application/vnd.x+json; v=1"})[0] == [1]
    assert decode_payload(b"hi", "auto", {"payload_format_indicator": 1}) == ("hi", "text", None)
    assert decode_payload(b"hi", "auto", {"content_type": "text/plain"})[1] == "bytes"
    assert decode_payload(b"hi", "auto", {}) == (b"hi", "bytes", None)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, b""),
        (b"\x00\xff", b"\x00\xff"),
        ("é", "é".encode()),
        (True, b"true"),
        ({"a": [1, 2.5]}, b'{"a":[1,2.5]}'),
        (7, b"7"),
    ],
)
def test_encode_payload(value: Any, expected: bytes) -> None:
    assert encode_payload(value) == expected


@pytest.mark.parametrize("value", [math.nan, {1, 2}, "\ud800", [math.inf]])
def test_unencodable_payloads(value: Any) -> None:
    with pytest.raises(InvalidCommand, match="payload"):
        encode_payload(value)


# -- properties -----------------------------------------------------------------------------


@given(property_dicts)
def test_properties_round_trip_through_the_wire_format(spec: dict[str, Any]) -> None:
    assert properties_to_dict(wire_properties(spec)) == spec


def test_user_properties_may_be_a_dict_and_keep_duplicates_as_pairs() -> None:
    props = publish_properties({"user_properties": {"a": "1", "b": "2"}})
    assert properties_to_dict(props)["user_properties"] == [["a", "1"], ["b", "2"]]
    props = publish_properties({"user_properties": [["a", "1"], ["a", "2"]]})
    assert properties_to_dict(props)["user_properties"] == [["a", "1"], ["a", "2"]]
    assert publish_properties({}) is None
    assert publish_properties({"user_properties": []}) is None
    assert properties_to_dict(None) == {}


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("x", "properties must be a dict"),
        ({"colour": "red"}, "unknown key(s) colour"),
        ({"message_expiry": -1}, "message_expiry must be an integer"),
        ({"payload_format_indicator": 2}, "payload_format_indicator must be an integer"),
        ({"payload_format_indicator": True}, "payload_format_indicator must be an integer"),
        ({"response_topic": "a/+"}, "response_topic"),
        ({"correlation_data": 5}, "correlation_data must be bytes or str"),
        ({"user_properties": "a=b"}, "list of [name, value] pairs"),
        ({"user_properties": [["a"]]}, "list of [name, value] pairs"),
        ({"user_properties": [["a", 1]]}, "must be a string"),
        ({"content_type": "a\x00"}, "U+0000"),
    ],
)
def test_invalid_properties(spec: Any, fragment: str) -> None:
    with pytest.raises(InvalidCommand) as info:
        publish_properties(spec)
    assert fragment in str(info.value)


def test_correlation_data_may_be_text() -> None:
    props = publish_properties({"correlation_data": "req-1"})
    assert properties_to_dict(props) == {"correlation_data": b"req-1"}


def test_subscription_identifiers() -> None:
    props = Properties(PacketTypes.PUBLISH)
    props.SubscriptionIdentifier = 5
    props.SubscriptionIdentifier = 9
    assert subscription_identifiers(props) == [5, 9]
    assert subscription_identifiers(None) == []
    assert subscription_identifiers(Properties(PacketTypes.PUBLISH)) == []


# -- message ids ----------------------------------------------------------------------------

id_args = st.fixed_dictionaries(
    {
        "client_id": st.text(max_size=8),
        "topic": topics,
        "payload": st.binary(max_size=32),
        "qos": st.sampled_from([1, 2]),
        "mid": st.integers(1, 65535),
        "properties": property_dicts,
    }
)


@given(id_args, st.integers(0, 2**32 - 1))
def test_message_id_survives_what_a_redelivery_changes(args: dict[str, Any], expiry: int) -> None:
    first = message_id(**args)
    assert first is not None and len(first) == 32
    # the broker counts Message Expiry down on a redelivery; the rest stays
    again = {**args, "properties": {**args["properties"], "message_expiry": expiry}}
    assert message_id(**again) == first


@given(id_args, st.sampled_from(["client_id", "topic", "payload", "mid", "correlation_data"]))
def test_message_id_changes_with_what_identifies_the_message(
    args: dict[str, Any], key: str
) -> None:
    other = dict(args)
    if key == "client_id":
        other[key] = args[key] + "x"
    elif key == "topic":
        other[key] = args[key] + "/x"
    elif key == "payload":
        other[key] = args[key] + b"x"
    elif key == "mid":
        other[key] = args[key] % 65535 + 1
    else:
        data = args["properties"].get("correlation_data", b"")
        other["properties"] = {**args["properties"], "correlation_data": data + b"x"}
    assert message_id(**other) != message_id(**args)


def test_message_id_for_qos0_and_from_a_user_property() -> None:
    base = {"client_id": "c", "topic": "t", "payload": b"p", "mid": 0, "properties": {}}
    assert message_id(qos=0, **base) is None
    props = {"user_properties": [["trace", "x"], ["msg-id", "abc-1"]]}
    assert message_id(qos=0, **{**base, "properties": props}, id_property="msg-id") == "abc-1"
    assert message_id(qos=1, **{**base, "properties": props}, id_property="other") is not None


# -- subscription table and routing ---------------------------------------------------------

routes = st.builds(
    Route,
    filter=filters,
    channel=st.sampled_from(["a", "b", "c"]),
    qos=st.sampled_from([0, 1, 2]),
    payload=st.sampled_from(["bytes", "json"]),
    no_local=st.booleans(),
    retain_as_published=st.booleans(),
    retain_handling=st.sampled_from([0, 1, 2]),
)


@given(st.lists(routes, max_size=12), st.lists(st.tuples(filters, st.none() | st.just("a"))))
def test_table_invariants(added: list[Route], removals: list[tuple[str, str | None]]) -> None:
    table = SubscriptionTable()
    for route in added:
        table.add(route)
    for filter_, channel in removals:
        table.remove(filter_, channel)
    subs = table.subscriptions()
    assert [s.filter for s in subs] == table.filters()
    assert len({s.identifier for s in subs}) == len(subs)
    for sub in subs:
        mine = table.routes(sub.filter)
        assert mine and 1 <= sub.identifier <= MAX_SUBSCRIPTION_ID
        assert sub.qos == max(r.qos for r in mine)
        assert len({r.channel for r in mine}) == len(mine)


@given(st.lists(routes, min_size=1, max_size=8), topics)
def test_routing_by_topic_matches_every_matching_filter(added: list[Route], topic: str) -> None:
    table = SubscriptionTable(added)
    matched = table.match(topic)
    expected = [r for f in table.filters() if topic_matches(f, topic) for r in table.routes(f)]
    assert matched == expected
    # an identifier the table does not know falls back to matching the topic
    assert table.match(topic, [MAX_SUBSCRIPTION_ID + 1]) == expected


def test_routing_by_subscription_identifier() -> None:
    table = SubscriptionTable([Route("a/#", "wide"), Route("a/b", "narrow")])
    narrow = table.subscription("a/b")
    assert narrow is not None
    assert [r.channel for r in table.match("a/b")] == ["wide", "narrow"]
    assert [r.channel for r in table.match("a/b", [narrow.identifier])] == ["narrow"]
    # an identifier whose filter does not match the topic is ignored
    assert [r.channel for r in table.match("a/c", [narrow.identifier])] == ["wide"]


def test_static_routes_stay_and_add_reports_broker_changes() -> None:
    table = SubscriptionTable([Route("s/#", "in", qos=1, static=True)])
    assert not table.add(Route("s/#", "other", qos=0))  # broker subscription unchanged
    assert table.add(Route("s/#", "other", qos=2))  # now QoS 2 at the broker
    assert table.remove("s/#") == [Route("s/#", "other", qos=2)]
    assert table.remove("s/#") == []
    assert [r.channel for r in table.routes("s/#")] == ["in"]
    assert "s/#" in table and len(table) == 1


def test_identifiers_are_stable_across_tables() -> None:
    one = SubscriptionTable([Route("x/#", "a"), Route("y/#", "a")])
    two = SubscriptionTable([Route("y/#", "a"), Route("x/#", "a")])
    assert one.subscription("x/#") == two.subscription("x/#")


@given(routes)
def test_route_records_round_trip(route: Route) -> None:
    assert Route.from_record(route.filter, route.channel, route.to_record()) == route


def test_corrupt_route_records() -> None:
    with pytest.raises(ValueError, match="corrupt"):
        Route.from_record("a", "b", {"qos": 5})


@given(
    topics,
    st.binary(max_size=64),
    st.sampled_from([0, 1, 2]),
    property_dicts,
    st.lists(routes, max_size=5),
    st.sampled_from(["bytes", "text", "json", "auto"]),
)
def test_inbound_events_are_sendable_and_go_to_distinct_channels(
    topic: str,
    payload: bytes,
    qos: int,
    spec: dict[str, Any],
    added: list[Route],
    default_format: str,
) -> None:
    table = SubscriptionTable(added)
    message = make_message(topic, payload, qos=qos, properties=wire_properties(spec))
    inbound = inbound_message(
        message, table, client_id="gw", default_channel="in", default_format=default_format
    )
    channels = [d.channel for d in inbound.deliveries]
    assert len(channels) == len(set(channels)) >= 1
    matching = {r.channel for r in table.match(topic)}
    assert set(channels) == (matching or {"in"})
    for delivery in inbound.deliveries:
        msgpack_safe(delivery.keys)
        assert delivery.keys["topic"] == topic
        assert delivery.keys["properties"] == spec
        assert (delivery.keys["qos"], delivery.keys["retain"]) == (qos, False)
    assert (inbound.id is None) == (qos == 0)


def test_inbound_message_keys_and_formats() -> None:
    table = SubscriptionTable([Route("s/+", "raw"), Route("s/#", "parsed", payload="json")])
    inbound = inbound_message(
        make_message("s/a", b'{"t": 21.5}', qos=1, retain=True, dup=True),
        table,
        client_id="gw",
        default_channel="in",
    )
    by_channel = {d.channel: d.keys for d in inbound.deliveries}
    assert by_channel["raw"]["payload"] == b'{"t": 21.5}'
    assert by_channel["parsed"] == {
        "topic": "s/a",
        "payload": {"t": 21.5},
        "format": "json",
        "payload_error": None,
        "qos": 1,
        "retain": True,
        "dup": True,
        "subscription": "s/#",
        "properties": {},
    }
    nowhere = inbound_message(
        make_message("x", b"", qos=0), table, client_id="gw", default_channel="in"
    )
    assert [(d.channel, d.keys["subscription"]) for d in nowhere.deliveries] == [("in", None)]


def test_inbound_too_large_and_undecodable_topics() -> None:
    table = SubscriptionTable([Route("#", "in")])
    big = inbound_message(
        make_message("t", b"x" * 100), table, client_id="c", default_channel="in", max_payload=50
    )
    assert big.too_large and big.deliveries == [] and big.size == 101
    message = make_message("t", b"x")
    message.topic = b"bad\xff"
    inbound = inbound_message(message, table, client_id="c", default_channel="in")
    assert inbound.topic == "bad\ufffd"


# -- commands -------------------------------------------------------------------------------


def test_parse_publish() -> None:
    action = parse_publish({"topic": "a/b", "payload": {"v": 1}, "qos": 1}, mqtt5=True)
    assert (action.topic, action.payload, action.qos, action.retain) == (
        "a/b",
        b'{"v":1}',
        1,
        False,
    )
    assert action.properties is not None
    assert properties_to_dict(action.properties) == {"content_type": "application/json"}
    action = parse_publish(
        {"topic": "a", "payload": [1], "properties": {"content_type": "x/y"}}, mqtt5=True
    )
    assert properties_to_dict(action.properties) == {"content_type": "x/y"}
    assert parse_publish({"topic": "a", "payload": "x"}, mqtt5=True).properties is None
    assert parse_publish({"topic": "a", "payload": [1]}, mqtt5=False).properties is None


@pytest.mark.parametrize(
    ("body", "mqtt5", "fragment"),
    [
        ({}, True, "topic is required"),
        ({"topic": "a/#"}, True, "must not contain the wildcards"),
        ({"topic": "a", "qos": 3}, True, "qos must be 0, 1 or 2"),
        ({"topic": "a", "qos": "1"}, True, "qos must be 0, 1 or 2"),
        ({"topic": "a", "qos": True}, True, "qos must be 0, 1 or 2"),
        ({"topic": "a", "retain": "yes"}, True, "retain must be true or false"),
        ({"topic": "a", "retained": True}, True, "unknown key(s) retained"),
        ({"topic": "a", "properties": {"content_type": "x"}}, False, "need MQTT 5"),
        ({"topic": "a", "payload": object()}, True, "cannot encode as JSON"),
    ],
)
def test_invalid_publish(body: dict[str, Any], mqtt5: bool, fragment: str) -> None:
    with pytest.raises(InvalidCommand) as info:
        parse_publish(body, mqtt5=mqtt5)
    assert fragment in str(info.value)


def test_parse_subscribe() -> None:
    route = parse_subscribe(
        {"topic": "a/+", "channel": "alerts", "qos": 2, "retain_handling": "never"},
        default_channel="in",
        default_format="text",
        mqtt5=True,
    )
    assert route == Route("a/+", "alerts", qos=2, payload="text", retain_handling=2)
    route = parse_subscribe(
        {"topic": "#"}, default_channel="in", default_format="bytes", mqtt5=False
    )
    assert route == Route("#", "in", qos=1)


@pytest.mark.parametrize(
    ("body", "mqtt5", "fragment"),
    [
        ({"topic": "a/#/b"}, True, "'#' must be the whole last level"),
        ({"topic": "a", "channel": "x!y"}, True, "channel must be"),
        ({"topic": "a", "payload": "xml"}, True, "payload must be one of"),
        ({"topic": "a", "retain_handling": 5}, True, "retain_handling must be"),
        ({"topic": "a", "no_local": True}, False, "need MQTT 5"),
        ({"topic": "$share/g/a", "no_local": True}, True, "shared subscription"),
        ({"topic": "a", "filter": "b"}, True, "unknown key(s) filter"),
    ],
)
def test_invalid_subscribe(body: dict[str, Any], mqtt5: bool, fragment: str) -> None:
    with pytest.raises(InvalidCommand) as info:
        parse_subscribe(body, default_channel="in", default_format="bytes", mqtt5=mqtt5)
    assert fragment in str(info.value)


def test_parse_unsubscribe() -> None:
    assert parse_unsubscribe({"topic": "a/#"}).channel is None
    assert parse_unsubscribe({"topic": "a/#", "channel": "x"}).channel == "x"
    with pytest.raises(InvalidCommand, match="topic is required"):
        parse_unsubscribe({"channel": "x"})
    with pytest.raises(InvalidCommand, match=r"unknown key\(s\) qos"):
        parse_unsubscribe({"topic": "a", "qos": 1})


def test_edges(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateways.mqtt import translate

    assert "lone surrogate" in (decode_payload(b'{"\\ud800": 1}', "json")[2] or "")
    assert publish_properties({"content_type": None}) is None
    table = SubscriptionTable([Route("a", "x"), Route("a", "y")])
    assert table.routes() == [Route("a", "x"), Route("a", "y")]
    assert table.find("a", "y") == Route("a", "y") and table.find("a", "z") is None

    class SameCrc:
        @staticmethod
        def crc32(data: bytes) -> int:
            return 41

    monkeypatch.setattr(translate, "zlib", SameCrc)
    clash = SubscriptionTable([Route("p", "x"), Route("q", "x")])
    assert [s.identifier for s in clash.subscriptions()] == [42, 43]
    monkeypatch.setattr(translate, "MAX_PAYLOAD_BYTES", 4)
    with pytest.raises(InvalidCommand, match="larger than"):
        encode_payload(b"12345")
