"""MQTT ⇄ layer translation: pure functions over plain data and paho's data types.

No I/O and no asyncio here: ``connection.py`` talks to the broker, ``gateway.py`` to the layer.

House rules (MQTT 5.0 §4.7 and §4.8; MQTT 3.1.1 §4.7 says the same for everything used here):

* A topic name or filter is UTF-8, 1 to 65,535 bytes, without U+0000 (§1.5.4). Topic names
  carry no wildcards. In a filter ``#`` is only ever the whole last level and ``+`` a whole
  level (§4.7.1). ``$share/{group}/{filter}`` is a shared subscription (§4.8.2): the group is
  non-empty and has no ``/``, ``+`` or ``#``; messages are matched against the part after it.
* A filter that starts with a wildcard does not match a topic that starts with ``$`` (§4.7.2).
  Such topics belong to the broker (``$SYS/…``): ``mqtt.publish`` refuses them.
* Every event is msgpack-safe (DESIGN §3). A payload decoded as JSON is checked before it goes
  out; one that cannot be sent as it is (an integer beyond 64 bits, a lone surrogate, very deep
  nesting) is delivered as bytes with ``payload_error`` saying why. Nothing is dropped for its
  content.
* The ``id`` of a QoS 1/2 message is stable across redeliveries. A broker that resends an
  unacknowledged PUBLISH in a resumed session MUST reuse its packet identifier (MQTT 5.0
  §4.4, 3.1.1 §4.4), and the session belongs to one client id; so the id is a digest of the
  client id, the packet identifier, the topic, the payload and the properties a redelivery
  keeps (not Message Expiry, which the broker counts down). Two deliveries only share an id if
  all of these are equal: the same bytes published again to the same topic and delivered with
  the same packet identifier, which the broker can only reuse after the first was acknowledged
  (at least 65,535 messages later when it allocates them in turn, as mosquitto does). QoS 0
  messages are never redelivered and get a random id, so identical readings stay distinct.
  A publisher that wants exact de-duplication sends its own id in a user property and names
  it in ``mqtt.id_property``.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, cast

from paho.mqtt.client import MQTTMessage
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from core.types import is_channel_name

__all__ = [
    "MAX_SUBSCRIPTION_ID",
    "PAYLOAD_FORMATS",
    "RETAIN_HANDLING",
    "BrokerSubscription",
    "Delivery",
    "Inbound",
    "InvalidCommand",
    "InvalidTopic",
    "Publish",
    "Route",
    "SubscriptionTable",
    "Unsubscribe",
    "decode_payload",
    "encode_payload",
    "inbound_message",
    "message_id",
    "new_properties",
    "parse_publish",
    "parse_subscribe",
    "parse_unsubscribe",
    "properties_to_dict",
    "publish_properties",
    "split_shared",
    "subscription_identifiers",
    "topic_matches",
    "topic_of",
    "validate_channel",
    "validate_filter",
    "validate_topic",
]

#: how a payload is handed to consumers; ``auto`` follows the MQTT 5 content type / format flag
PAYLOAD_FORMATS: Final = ("bytes", "text", "json", "auto")
#: MQTT 5 Retain Handling subscription option, by name (§3.8.3.1)
RETAIN_HANDLING: Final = {"send": 0, "if_new": 1, "never": 2}
#: the largest Subscription Identifier (a Variable Byte Integer, §3.8.2.1.2)
MAX_SUBSCRIPTION_ID: Final = 268_435_455
MAX_TOPIC_BYTES: Final = 65_535
MAX_PAYLOAD_BYTES: Final = 268_435_455
_MAX_UINT32: Final = 2**32 - 1
#: msgpack cannot pack integers outside [-2**63, 2**64 - 1]
_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**64 - 1
#: msgpack refuses more than 511 nesting levels; keep well clear of it and of Python's stack
_MAX_DEPTH: Final = 100

#: event key → paho ``Properties`` attribute, for the properties a consumer may see and set
_PROPERTIES: Final = {
    "payload_format_indicator": "PayloadFormatIndicator",
    "message_expiry": "MessageExpiryInterval",
    "content_type": "ContentType",
    "response_topic": "ResponseTopic",
    "correlation_data": "CorrelationData",
    "user_properties": "UserProperty",
}
#: properties a redelivery carries unchanged, in the order they enter a message id
_STABLE_PROPERTIES: Final = (
    "payload_format_indicator",
    "content_type",
    "response_topic",
    "correlation_data",
    "user_properties",
)


def new_properties(packet_type: int) -> Properties:
    """Empty MQTT 5 properties for ``packet_type`` (``PacketTypes.PUBLISH`` …).

    paho's ``Properties.__init__`` has no annotations (2.1, 2.2); called through ``Any`` here
    once, so the rest of the code is typed whichever paho release annotates it.
    """
    properties: Properties = cast(Any, Properties)(packet_type)
    return properties


def _shown(text: str, limit: int = 80) -> str:
    """``text`` quoted for an error message, cut: a topic may be 65,535 bytes, and the message
    reaches the log and the caller (issue 14, item 1)."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}… ({len(text)} characters)"


class InvalidTopic(ValueError):
    """A topic name or filter breaks the MQTT rules; the text says which."""


class InvalidCommand(ValueError):
    """A command body is malformed; the text goes back to the caller."""


# -- topics ---------------------------------------------------------------------------------


def _mqtt_string(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidTopic(f"{what} must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise InvalidTopic(f"{what} must not contain U+0000")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidTopic(f"{what} is not valid UTF-8 (lone surrogate)") from None
    if size > MAX_TOPIC_BYTES:
        raise InvalidTopic(f"{what} is longer than {MAX_TOPIC_BYTES} bytes")
    return value


def validate_topic(value: object) -> str:
    """Return ``value`` if it is a valid topic name to publish to; raise :class:`InvalidTopic`."""
    topic = _mqtt_string(value, "topic")
    if not topic:
        raise InvalidTopic("topic must not be empty")
    if "+" in topic or "#" in topic:
        raise InvalidTopic(f"topic {_shown(topic)} must not contain the wildcards '+' or '#'")
    return topic


def split_shared(filter_: str) -> tuple[str | None, str]:
    """``("group", "a/b")`` for ``$share/group/a/b``; ``(None, filter_)`` for a plain filter."""
    if filter_.startswith("$share/"):
        parts = filter_.split("/", 2)
        return parts[1], parts[2] if len(parts) == 3 else ""
    return None, filter_


def validate_filter(value: object) -> str:
    """Return ``value`` if it is a valid topic filter; raise :class:`InvalidTopic`."""
    filter_ = _mqtt_string(value, "topic filter")
    if not filter_:
        raise InvalidTopic("topic filter must not be empty")
    group, rest = split_shared(filter_)
    if filter_.startswith("$share/"):
        if not group or any(c in group for c in "+#"):
            raise InvalidTopic(
                f"shared subscription {_shown(filter_)} needs a group name without '+' or '#': "
                "$share/GROUP/FILTER"
            )
        if not rest:
            raise InvalidTopic(
                f"shared subscription {_shown(filter_)} has no filter after the group"
            )
    levels = rest.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise InvalidTopic(f"topic filter {_shown(filter_)}: '#' must be the whole last level")
        if "+" in level and level != "+":
            raise InvalidTopic(f"topic filter {_shown(filter_)}: '+' must be a whole level")
    return filter_


def topic_matches(filter_: str, topic: str) -> bool:
    """Whether the topic name ``topic`` matches ``filter_`` (shared or not)."""
    _, pattern = split_shared(filter_)
    if topic.startswith("$") and pattern[:1] in ("+", "#"):
        return False
    wanted = pattern.split("/")
    levels = topic.split("/")
    for i, part in enumerate(wanted):
        if part == "#":
            return True  # also matches the parent level: "a/#" matches "a"
        if i >= len(levels) or (part != "+" and part != levels[i]):
            return False
    return len(wanted) == len(levels)


def validate_channel(value: object) -> str:
    """Return ``value`` if it is a named channel a worker can listen on; raise ``ValueError``."""
    if not is_channel_name(value):
        raise InvalidCommand(
            "channel must be a channel name (letters, digits, '-', '_', '.'; under 100 "
            "characters); process-specific '!' channels die with their process and cannot "
            "hold a subscription"
        )
    return value


# -- payloads -------------------------------------------------------------------------------


def _wants_json(content_type: object) -> bool:
    if not isinstance(content_type, str):
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media in ("application/json", "text/json") or media.endswith("+json")


def _unsendable(value: Any, depth: int = 0) -> str | None:
    """Why ``value`` (decoded JSON) cannot be packed by msgpack, or ``None``."""
    if depth > _MAX_DEPTH:
        return f"nested deeper than {_MAX_DEPTH} levels"
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "a string holds a lone surrogate (\\ud800-\\udfff)"
        return None
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return None
    if isinstance(value, int):
        return None if _INT_MIN <= value <= _INT_MAX else "an integer does not fit in 64 bits"
    if isinstance(value, list):
        for item in value:
            problem = _unsendable(item, depth + 1)
            if problem:
                return problem
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            problem = _unsendable(key, depth + 1) or _unsendable(item, depth + 1)
            if problem:
                return problem
        return None
    return f"unexpected {type(value).__name__}"  # pragma: no cover - json.loads makes no others


def decode_payload(
    payload: bytes, format_: str, properties: Mapping[str, Any] | None = None
) -> tuple[Any, str, str | None]:
    """Decode ``payload`` as ``format_``: ``(value, format actually used, error or None)``.

    On a decoding error the value is the raw bytes, the format ``"bytes"`` and the error says
    what was wrong, so the message still reaches its consumer.
    """
    props = properties or {}
    if format_ == "auto":
        if _wants_json(props.get("content_type")):
            format_ = "json"
        elif props.get("payload_format_indicator") == 1:
            format_ = "text"
        else:
            format_ = "bytes"
    if format_ == "bytes":
        return payload, "bytes", None
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return payload, "bytes", f"payload is not valid UTF-8 (byte {exc.start})"
    if format_ == "text":
        return text, "text", None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return (
            payload,
            "bytes",
            (f"payload is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"),
        )
    except RecursionError:
        return payload, "bytes", f"payload JSON is nested deeper than {_MAX_DEPTH} levels"
    problem = _unsendable(value)
    if problem:
        return payload, "bytes", f"payload JSON cannot be passed on: {problem}"
    return value, "json", None


def encode_payload(value: Any) -> bytes:
    """The bytes to publish for a command's ``payload``.

    ``bytes`` go as they are, ``str`` as UTF-8, ``None`` as an empty payload, and any other
    value (number, bool, list, dict) as compact JSON.
    """
    if value is None:
        return b""
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
    elif isinstance(value, str):
        try:
            data = value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidCommand("payload: string is not valid UTF-8 (lone surrogate)") from None
    else:
        try:
            text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
            data = text.encode("utf-8")
        except (TypeError, ValueError, UnicodeEncodeError, RecursionError) as exc:
            raise InvalidCommand(f"payload: cannot encode as JSON: {exc}") from None
    if len(data) > MAX_PAYLOAD_BYTES:
        raise InvalidCommand(f"payload: larger than MQTT's {MAX_PAYLOAD_BYTES} bytes")
    return data


# -- MQTT 5 properties ----------------------------------------------------------------------


def properties_to_dict(properties: Properties | None) -> dict[str, Any]:
    """The consumer-visible properties of a PUBLISH as plain, msgpack-safe data.

    User properties are a list of ``[name, value]`` pairs: MQTT keeps their order and allows a
    name more than once.
    """
    out: dict[str, Any] = {}
    if properties is None:
        return out
    for key, attr in _PROPERTIES.items():
        if not hasattr(properties, attr):
            continue
        value = getattr(properties, attr)
        if key == "user_properties":
            value = [[str(name), str(item)] for name, item in value]
        elif key == "correlation_data":
            value = bytes(value)
        out[key] = value
    return out


def subscription_identifiers(properties: Properties | None) -> list[int]:
    """The Subscription Identifiers a broker attached to a PUBLISH (MQTT 5), else ``[]``."""
    if properties is None or not hasattr(properties, "SubscriptionIdentifier"):
        return []
    return [int(i) for i in properties.SubscriptionIdentifier]


def _property_string(value: object, key: str) -> str:
    try:
        return _mqtt_string(value, f"properties.{key}")
    except InvalidTopic as exc:
        raise InvalidCommand(str(exc)) from None


def _user_properties(value: object) -> list[tuple[str, str]]:
    if isinstance(value, Mapping):
        items: Iterable[Any] = value.items()
    elif isinstance(value, list | tuple):
        items = value
    else:
        raise InvalidCommand("properties.user_properties must be a list of [name, value] pairs")
    pairs = []
    for item in items:
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise InvalidCommand("properties.user_properties must be a list of [name, value] pairs")
        name = _property_string(item[0], "user_properties name")
        text = _property_string(item[1], "user_properties value")
        pairs.append((name, text))
    return pairs


def _uint(value: object, key: str, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise InvalidCommand(f"properties.{key} must be an integer from 0 to {maximum}")
    return value


def publish_properties(spec: object) -> Properties | None:
    """paho ``Properties`` for a PUBLISH from a command's ``properties`` dict; ``None`` if empty."""
    if spec is None:
        return None
    if not isinstance(spec, Mapping):
        raise InvalidCommand("properties must be a dict")
    unknown = sorted(str(k) for k in spec if k not in _PROPERTIES)
    if unknown:
        raise InvalidCommand(
            f"properties: unknown key(s) {', '.join(unknown)} (known: {', '.join(_PROPERTIES)})"
        )
    props = new_properties(PacketTypes.PUBLISH)
    empty = True
    for key, value in spec.items():
        if value is None:
            continue
        if key == "payload_format_indicator":
            props.PayloadFormatIndicator = _uint(value, key, 1)
        elif key == "message_expiry":
            props.MessageExpiryInterval = _uint(value, key, _MAX_UINT32)
        elif key == "content_type":
            props.ContentType = _property_string(value, key)
        elif key == "response_topic":
            try:
                props.ResponseTopic = validate_topic(value)
            except InvalidTopic as exc:
                raise InvalidCommand(f"properties.response_topic: {exc}") from None
        elif key == "correlation_data":
            if isinstance(value, str):
                value = _property_string(value, key).encode("utf-8")
            if not isinstance(value, bytes | bytearray) or len(value) > MAX_TOPIC_BYTES:
                raise InvalidCommand(
                    f"properties.correlation_data must be bytes or str, at most "
                    f"{MAX_TOPIC_BYTES} bytes"
                )
            props.CorrelationData = bytes(value)
        else:  # user_properties
            pairs = _user_properties(value)
            if not pairs:
                continue
            props.UserProperty = pairs
        empty = False
    return None if empty else props


# -- message ids ----------------------------------------------------------------------------


def message_id(
    *,
    client_id: str,
    topic: str,
    payload: bytes,
    qos: int,
    mid: int,
    properties: Mapping[str, Any],
    id_property: str | None = None,
) -> str | None:
    """The stable id of a received message, or ``None`` for "no stable id, use a random one".

    See the module docstring for what makes it stable and when two messages can share it.
    """
    if id_property:
        for name, value in properties.get("user_properties", ()):
            if name == id_property and value:
                return str(value)
    if qos == 0:
        return None
    digest = hashlib.blake2b(digest_size=16, person=b"mqtt-message-id")
    stable = {
        key: value.hex() if isinstance(value, bytes) else value
        for key in _STABLE_PROPERTIES
        if (value := properties.get(key)) is not None
    }
    parts = (
        client_id.encode("utf-8"),
        mid.to_bytes(2, "big"),
        topic.encode("utf-8", "surrogateescape"),
        payload,
        json.dumps(stable, ensure_ascii=False).encode("utf-8") if stable else b"",
    )
    for part in parts:  # length-prefixed: no two different inputs hash the same bytes
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


# -- subscriptions and routing --------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """One subscriber of a topic filter: matches go to ``channel`` decoded as ``payload``.

    Several routes may share a filter (one broker subscription); a message is delivered once to
    each distinct channel among the routes that match it.
    """

    filter: str
    channel: str
    qos: int = 1
    payload: str = "bytes"
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0
    static: bool = False

    def to_record(self) -> dict[str, Any]:
        """The JSON-safe fields that describe a run-time route, for the subscription store."""
        return {
            "qos": self.qos,
            "payload": self.payload,
            "no_local": self.no_local,
            "retain_as_published": self.retain_as_published,
            "retain_handling": self.retain_handling,
        }

    @classmethod
    def from_record(cls, filter_: str, channel: str, record: Mapping[str, Any]) -> Route:
        """The inverse of :meth:`to_record`; raises ``ValueError`` on a corrupt record."""
        qos = record.get("qos", 1)
        payload = record.get("payload", "bytes")
        handling = record.get("retain_handling", 0)
        if qos not in (0, 1, 2) or payload not in PAYLOAD_FORMATS or handling not in (0, 1, 2):
            raise ValueError(f"corrupt subscription record for {_shown(filter_)}")
        return cls(
            filter=validate_filter(filter_),
            channel=validate_channel(channel),
            qos=int(qos),
            payload=str(payload),
            no_local=bool(record.get("no_local", False)),
            retain_as_published=bool(record.get("retain_as_published", False)),
            retain_handling=int(handling),
        )


@dataclass(frozen=True)
class BrokerSubscription:
    """What the broker is asked for one filter: the most any of its routes needs."""

    filter: str
    qos: int
    no_local: bool
    retain_as_published: bool
    retain_handling: int
    identifier: int


class SubscriptionTable:
    """Routes by filter, in the order they were added, with a Subscription Identifier each.

    Identifiers are derived from the filter (CRC-32, probing on a clash), so they usually stay
    the same across restarts and messages queued under an old session still route by them.
    Routing always checks that the topic matches; an unknown identifier falls back to matching
    the topic against every filter.
    """

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        self._routes: dict[str, list[Route]] = {}
        self._ids: dict[str, int] = {}
        self._filters_by_id: dict[int, str] = {}
        for route in routes:
            self.add(route)

    def __len__(self) -> int:
        return sum(len(r) for r in self._routes.values())

    def __contains__(self, filter_: object) -> bool:
        return filter_ in self._routes

    def filters(self) -> list[str]:
        return list(self._routes)

    def routes(self, filter_: str | None = None) -> list[Route]:
        if filter_ is not None:
            return list(self._routes.get(filter_, ()))
        return [route for routes in self._routes.values() for route in routes]

    def find(self, filter_: str, channel: str) -> Route | None:
        return next((r for r in self._routes.get(filter_, ()) if r.channel == channel), None)

    def subscription(self, filter_: str) -> BrokerSubscription | None:
        routes = self._routes.get(filter_)
        if not routes:
            return None
        return BrokerSubscription(
            filter=filter_,
            qos=max(r.qos for r in routes),
            no_local=all(r.no_local for r in routes),
            retain_as_published=any(r.retain_as_published for r in routes),
            retain_handling=min(r.retain_handling for r in routes),
            identifier=self._ids[filter_],
        )

    def subscriptions(self) -> list[BrokerSubscription]:
        return [s for f in self._routes if (s := self.subscription(f)) is not None]

    def add(self, route: Route) -> bool:
        """Add or replace the route for ``(filter, channel)``; whether the broker must be told."""
        before = self.subscription(route.filter)
        routes = self._routes.setdefault(route.filter, [])
        for i, existing in enumerate(routes):
            if existing.channel == route.channel:
                routes[i] = route
                break
        else:
            routes.append(route)
        if route.filter not in self._ids:
            ident = zlib.crc32(route.filter.encode("utf-8")) % MAX_SUBSCRIPTION_ID + 1
            while ident in self._filters_by_id:
                ident = ident % MAX_SUBSCRIPTION_ID + 1
            self._ids[route.filter] = ident
            self._filters_by_id[ident] = route.filter
        return before != self.subscription(route.filter)

    def remove(self, filter_: str, channel: str | None = None) -> list[Route]:
        """Remove the run-time routes of ``filter_`` (to ``channel``, or all); return them.

        Static routes stay. When no route is left the filter and its identifier are freed.
        """
        routes = self._routes.get(filter_, [])
        removed = [r for r in routes if not r.static and channel in (None, r.channel)]
        if not removed:
            return []
        kept = [r for r in routes if r not in removed]
        if kept:
            self._routes[filter_] = kept
        else:
            del self._routes[filter_]
            del self._filters_by_id[self._ids.pop(filter_)]
        return removed

    def match(self, topic: str, identifiers: Sequence[int] = ()) -> list[Route]:
        """The routes a message on ``topic`` goes to, in table order."""
        wanted: list[str] = []
        for ident in identifiers:
            filter_ = self._filters_by_id.get(ident)
            if filter_ is not None and filter_ not in wanted and topic_matches(filter_, topic):
                wanted.append(filter_)
        if not wanted:
            wanted = [f for f in self._routes if topic_matches(f, topic)]
        chosen = set(wanted)
        return [r for f, routes in self._routes.items() if f in chosen for r in routes]


# -- inbound --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """One ``mqtt.message`` for one channel: the event's own keys (the envelope comes later)."""

    channel: str
    keys: dict[str, Any]


@dataclass(frozen=True)
class Inbound:
    """What to do with one received PUBLISH."""

    id: str | None
    qos: int
    mid: int
    topic: str
    size: int
    deliveries: list[Delivery] = field(default_factory=list)
    #: over ``max_payload``: nothing is delivered, the message is acknowledged and counted
    too_large: bool = False


def topic_of(message: MQTTMessage) -> str:
    """The message's topic as text; an undecodable byte becomes U+FFFD instead of raising."""
    try:
        return message.topic
    except UnicodeDecodeError:
        # brokers validate topics, but never let one bad byte stop the stream
        raw: bytes = message._topic  # paho keeps the undecodable bytes only here
        return raw.decode("utf-8", "replace")


def inbound_message(
    message: MQTTMessage,
    table: SubscriptionTable,
    *,
    client_id: str,
    default_channel: str,
    default_format: str = "bytes",
    id_property: str | None = None,
    max_payload: int = MAX_PAYLOAD_BYTES,
) -> Inbound:
    """Translate one received PUBLISH into the ``mqtt.message`` events it becomes.

    Each distinct channel among the matching routes gets one event (the first matching route
    to that channel names the ``subscription`` and the payload format). A message no route
    matches (queued in a persistent session before its subscription was removed) goes to
    ``default_channel`` with ``subscription: None``.
    """
    topic = topic_of(message)
    payload = bytes(message.payload)
    properties = properties_to_dict(message.properties)
    qos = int(message.qos)
    mid = int(message.mid)
    ident = message_id(
        client_id=client_id,
        topic=topic,
        payload=payload,
        qos=qos,
        mid=mid,
        properties=properties,
        id_property=id_property,
    )
    size = len(payload) + len(topic.encode("utf-8", "replace"))
    if size > max_payload:
        return Inbound(id=ident, qos=qos, mid=mid, topic=topic, size=size, too_large=True)
    targets: dict[str, tuple[str | None, str]] = {}
    for route in table.match(topic, subscription_identifiers(message.properties)):
        targets.setdefault(route.channel, (route.filter, route.payload))
    if not targets:
        targets[default_channel] = (None, default_format)
    decoded: dict[str, tuple[Any, str, str | None]] = {}
    deliveries = []
    for channel, (filter_, format_) in targets.items():
        if format_ not in decoded:
            decoded[format_] = decode_payload(payload, format_, properties)
        value, used, error = decoded[format_]
        deliveries.append(
            Delivery(
                channel,
                {
                    "topic": topic,
                    "payload": value,
                    "format": used,
                    "payload_error": error,
                    "qos": qos,
                    "retain": bool(message.retain),
                    "dup": bool(message.dup),
                    "subscription": filter_,
                    "properties": properties,
                },
            )
        )
    return Inbound(id=ident, qos=qos, mid=mid, topic=topic, size=size, deliveries=deliveries)


# -- commands -------------------------------------------------------------------------------


def _check_keys(body: Mapping[str, Any], allowed: Sequence[str], command: str) -> None:
    unknown = sorted(str(k) for k in body if k not in allowed)
    if unknown:
        raise InvalidCommand(
            f"{command}: unknown key(s) {', '.join(unknown)} (known: {', '.join(allowed)})"
        )


def _qos(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in (0, 1, 2):
        raise InvalidCommand("qos must be 0, 1 or 2")
    return value


def _flag(body: Mapping[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise InvalidCommand(f"{key} must be true or false")
    return value


def _topic_arg(body: Mapping[str, Any], validate: Any) -> str:
    if "topic" not in body:
        raise InvalidCommand("topic is required")
    try:
        result: str = validate(body["topic"])
    except InvalidTopic as exc:
        raise InvalidCommand(str(exc)) from None
    return result


@dataclass(frozen=True)
class Publish:
    """A validated ``mqtt.publish``."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties | None = None


_PUBLISH_KEYS: Final = ("topic", "payload", "qos", "retain", "properties")


def parse_publish(body: Mapping[str, Any], *, mqtt5: bool) -> Publish:
    """Validate the keys of an ``mqtt.publish`` command; raise :class:`InvalidCommand`."""
    _check_keys(body, _PUBLISH_KEYS, "mqtt.publish")
    topic = _topic_arg(body, validate_topic)
    if topic.startswith("$"):
        # $SYS/… and the like belong to the broker: mosquitto drops the whole connection on a
        # QoS 1 publish there, and every in-flight message with it (issue 14, item 11)
        raise InvalidCommand(
            f"topic {_shown(topic)} starts with '$': such topics belong to the broker "
            "(MQTT 4.7.2), publishing there is refused"
        )
    properties = publish_properties(body.get("properties"))
    if properties is not None and not mqtt5:
        raise InvalidCommand("properties need MQTT 5 (mqtt.protocol: 5 in the YAML)")
    value = body.get("payload")
    payload = encode_payload(value)
    if mqtt5 and not isinstance(value, str | bytes | bytearray | memoryview | None):
        # sent as JSON: say so, so `payload: auto` subscribers decode it
        if properties is None:
            properties = new_properties(PacketTypes.PUBLISH)
        if not hasattr(properties, "ContentType"):
            properties.ContentType = "application/json"
    return Publish(
        topic=topic,
        payload=payload,
        qos=_qos(body.get("qos", 0)),
        retain=_flag(body, "retain"),
        properties=properties,
    )


_SUBSCRIBE_KEYS: Final = (
    "topic",
    "qos",
    "channel",
    "payload",
    "no_local",
    "retain_as_published",
    "retain_handling",
)


def _retain_handling(value: object) -> int:
    if isinstance(value, str) and value in RETAIN_HANDLING:
        return RETAIN_HANDLING[value]
    if not isinstance(value, bool) and isinstance(value, int) and value in (0, 1, 2):
        return value
    raise InvalidCommand("retain_handling must be 'send', 'if_new' or 'never' (or 0, 1, 2)")


def parse_subscribe(
    body: Mapping[str, Any], *, default_channel: str, default_format: str, mqtt5: bool
) -> Route:
    """Validate an ``mqtt.subscribe`` command into the run-time :class:`Route` it asks for."""
    _check_keys(body, _SUBSCRIBE_KEYS, "mqtt.subscribe")
    filter_ = _topic_arg(body, validate_filter)
    channel = body.get("channel")
    channel = default_channel if channel is None else validate_channel(channel)
    payload = body.get("payload")
    if payload is None:
        payload = default_format
    elif payload not in PAYLOAD_FORMATS:
        raise InvalidCommand(f"payload must be one of {', '.join(PAYLOAD_FORMATS)}")
    route = Route(
        filter=filter_,
        channel=channel,
        qos=_qos(body.get("qos", 1)),
        payload=str(payload),
        no_local=_flag(body, "no_local"),
        retain_as_published=_flag(body, "retain_as_published"),
        retain_handling=_retain_handling(body.get("retain_handling", 0)),
    )
    if not mqtt5 and (route.no_local or route.retain_as_published or route.retain_handling):
        raise InvalidCommand(
            "no_local, retain_as_published and retain_handling need MQTT 5 "
            "(mqtt.protocol: 5 in the YAML)"
        )
    if route.no_local and filter_.startswith("$share/"):
        raise InvalidCommand("no_local cannot be set on a shared subscription (MQTT 5 §3.8.3.1)")
    return route


@dataclass(frozen=True)
class Unsubscribe:
    """A validated ``mqtt.unsubscribe``: one route (``channel`` given) or all run-time ones."""

    filter: str
    channel: str | None = None


def parse_unsubscribe(body: Mapping[str, Any]) -> Unsubscribe:
    """Validate the keys of an ``mqtt.unsubscribe`` command; raise :class:`InvalidCommand`."""
    _check_keys(body, ("topic", "channel"), "mqtt.unsubscribe")
    filter_ = _topic_arg(body, validate_filter)
    channel = body.get("channel")
    return Unsubscribe(filter_, None if channel is None else validate_channel(channel))
