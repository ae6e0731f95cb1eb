"""Pure IRC translation: the ``irc`` library's parsed events → layer messages, commands → lines.

No I/O and no asyncio here: ``connection.py`` feeds the library's :class:`irc.client.Event`
fields in, the gateway sends what comes out. House rules (RFC 1459/2812, IRCv3):

* **A line is one command.** Every text that goes into a line is checked for CR, LF and NUL
  first (:func:`check_text`); a command carrying one is refused whole, never sent as two lines.
* **512 bytes per line, counted as the server relays it** (RFC 2812 §2.3): the server puts
  ``:nick!user@host `` in front of what we send, so the room for text is 512 minus CR LF, the
  prefix (:func:`prefix_length`; the worst case until the server showed us our own mask) and
  ``PRIVMSG <target> :``. Longer texts are split (:func:`split_text`) at UTF-8 character
  boundaries, preferring a space in the second half of a chunk (that space is the separator);
  nothing is ever cut off.
* **Formatting is kept** in ``text`` (mIRC codes, colours) and removed in ``plain``.
* **IRCv3 tags**: ``msgid`` gives the event ``id`` (:func:`event_id`: a UUID 5 of the configured
  server and the msgid, so a server cannot make its ids collide with another network's),
  ``server-time`` its ``time``; every tag is passed on in ``tags`` (valueless tags as ``""``).
* **NUL never reaches an event**: IRC forbids it in a line and databases refuse it in text, so
  it is removed from every string a server sends (:func:`inbound`).
* **Nicks and channels compare under the server's CASEMAPPING** (ISUPPORT; :func:`fold`):
  ``ascii`` folds A-Z only, ``rfc1459`` also ``[]\\~`` to ``{}|^``, ``strict-rfc1459`` ``[]\\``
  to ``{}|``, ``rfc7613``/``rfc8265`` lower-case Unicode. A server that announces none, or one
  we do not know, is taken as ``rfc1459`` (what RFC 1459 servers did before ISUPPORT).
"""

from __future__ import annotations

import base64
import codecs
import re
import string
import unicodedata
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

from irc.client import NickMask, is_channel

__all__ = [
    "CASEMAPPINGS",
    "KINDS",
    "MAX_LINE",
    "Context",
    "InvalidCommand",
    "Outbound",
    "Send",
    "Translated",
    "cap_request",
    "casemapping",
    "check_channel",
    "check_encoding",
    "check_nick",
    "check_target",
    "check_text",
    "check_username",
    "default_username",
    "event_id",
    "fold",
    "inbound",
    "loggable",
    "nick_candidates",
    "parse_cap_ls",
    "parse_join",
    "parse_nick",
    "parse_part",
    "parse_raw",
    "parse_send",
    "parse_server_time",
    "parse_tags",
    "parse_topic",
    "prefix_length",
    "refused_for_configuration",
    "same_nick",
    "sasl_payload",
    "send_lines",
    "split_text",
    "strip_formatting",
]

#: RFC 2812 §2.3: a line is at most 512 bytes, CR LF included
MAX_LINE: Final = 512
#: irc.send kinds and the command each is sent as
KINDS: Final = {"message": "PRIVMSG", "action": "PRIVMSG", "notice": "NOTICE"}
#: what a server puts in front of a relayed line, before it showed us our own user@host:
#: ":" nick "!" user (10, with a "~") "@" host (63, a DNS label's limit) " "
_UNKNOWN_USERHOST: Final = 10 + 1 + 63
_FORBIDDEN = re.compile(r"[\r\n\0]")
_NICK = re.compile(r"^[A-Za-z\[\]\\`_^{|}][A-Za-z0-9\[\]\\`_^{|}-]{0,63}$")
_CHANNEL_PREFIXES: Final = "#&+!"
# mIRC bold, colour (with fg[,bg]), hex colour, reset, monospace, reverse, italics, strike,
# underline: the codes https://modern.ircdocs.horse/formatting.html lists
_FORMATTING = re.compile(
    r"\x03(?:\d{1,2}(?:,\d{1,2})?)?|\x04(?:[0-9A-Fa-f]{6}(?:,[0-9A-Fa-f]{6})?)?"
    r"|[\x02\x0f\x11\x16\x1d\x1e\x1f]"
)


class InvalidCommand(ValueError):
    """A command or setting that cannot become a valid IRC line; the text says why."""


# -- checks ----------------------------------------------------------------------------------


def check_text(value: Any, key: str, *, empty: bool = False) -> str:
    """``value`` as one line's worth of text: a string without CR, LF or NUL."""
    if not isinstance(value, str):
        raise InvalidCommand(f"{key!r} must be a string")
    if not empty and not value:
        raise InvalidCommand(f"{key!r} must not be empty")
    bad = _FORBIDDEN.search(value)
    if bad:
        raise InvalidCommand(
            f"{key!r} contains {bad.group()!r} (CR, LF and NUL would end the IRC line); refused"
        )
    return value


def check_nick(value: Any) -> str:
    """A nick as RFC 2812 §2.3.1 allows it (letters, digits, ``[]\\`_^{|}-``), up to 64."""
    text = check_text(value, "nick")
    if not _NICK.match(text):
        raise InvalidCommand(f"not a valid nick: {text[:80]!r}")
    return text


def check_channel(value: Any, key: str = "channel") -> str:
    """A channel name: a ``#&+!`` prefix, no space, comma or BEL, at most 200 characters."""
    text = check_text(value, key)
    if (
        text[0] not in _CHANNEL_PREFIXES
        or len(text) > 200
        or any(c in text for c in " ,\x07")
        or len(text) < 2
    ):
        raise InvalidCommand(f"not a valid channel name: {text[:80]!r}")
    return text


def check_target(value: Any) -> str:
    """A PRIVMSG/NOTICE target: a channel or a nick (a comma would address several)."""
    text = check_text(value, "target")
    if text[0] in _CHANNEL_PREFIXES:
        return check_channel(text, "target")
    if " " in text or "," in text or len(text) > 64:
        raise InvalidCommand(f"not a valid target: {text[:80]!r}")
    return text


def check_encoding(value: str) -> str:
    """A codec name Python knows (for ``fallback_encoding``)."""
    try:
        return codecs.lookup(value).name
    except LookupError:
        raise InvalidCommand(f"unknown encoding {value!r}") from None


def check_username(value: Any) -> str:
    """A USER name as RFC 2812 §2.3.1 allows it: not empty, no space, ``@``, NUL, CR or LF.

    Servers are stricter (ngircd takes only letters, digits, ``_``, ``-`` and ``.``); what one
    refuses ends the start with exit code 3 (see ``connection.py``).
    """
    text = check_text(value, "username")
    if " " in text or "@" in text:
        raise InvalidCommand(f"not a valid user name: {text[:80]!r} (no space or '@')")
    return text


_NOT_USERNAME = re.compile(r"[^A-Za-z0-9_.-]")


def default_username(nick: str) -> str:
    """The USER name for ``nick`` when none is configured: its ASCII letters, digits, ``_``,
    ``-`` and ``.`` (leading ``-``/``.`` dropped), ``gateway`` if nothing is left.

    Those are what every server we test accepts: ngircd answers ``USER acc[bot]`` with
    ``ERROR :Invalid user name`` (issue 21, item 8), InspIRCd ``USER ~acc`` with 468.
    """
    return _NOT_USERNAME.sub("", nick).lstrip("-.") or "gateway"


# -- case mapping ----------------------------------------------------------------------------

#: CASEMAPPING values (ISUPPORT) folded as announced; any other is folded as ``rfc1459``
CASEMAPPINGS: Final = ("ascii", "rfc1459", "strict-rfc1459", "rfc7613", "rfc8265")
_UPPER, _LOWER = string.ascii_uppercase, string.ascii_lowercase
_TABLES: Final = {
    "ascii": str.maketrans(_UPPER, _LOWER),
    "rfc1459": str.maketrans(_UPPER + "[]\\~", _LOWER + "{}|^"),
    "strict-rfc1459": str.maketrans(_UPPER + "[]\\", _LOWER + "{}|"),
}


def casemapping(value: object) -> str:
    """The case mapping to fold by for a server's ``CASEMAPPING`` token (None: not announced)."""
    name = str(value).lower() if isinstance(value, str) else ""
    return name if name in CASEMAPPINGS else "rfc1459"


def fold(text: str, mapping: str) -> str:
    """``text`` in the lower case of ``mapping`` (a :data:`CASEMAPPINGS` value): two nicks or
    two channel names are the same on that server when their folds are equal."""
    table = _TABLES.get(mapping)
    if table is not None:
        return text.translate(table)
    if mapping in ("rfc7613", "rfc8265"):  # PRECIS: width-mapped, lower-cased, NFC
        return unicodedata.normalize("NFC", unicodedata.normalize("NFKC", text).lower())
    return text.translate(_TABLES["rfc1459"])


def same_nick(a: str | None, b: str | None, mapping: str) -> bool:
    """Whether two nicks (or channel names) are the same under ``mapping``."""
    return a is not None and b is not None and fold(a, mapping) == fold(b, mapping)


# -- what the server says during registration and what we may log ------------------------------

# the texts servers give when they close a registration for a reason only configuration fixes:
# ngircd "Invalid user name" and "Access denied: Bad password?", InspIRCd "Your username is not
# valid", and bans (K-, G-, Z-lines)
_CONFIG_REFUSAL = re.compile(
    r"invalid user ?name|user ?name is (?:not valid|invalid)|bad password|invalid password"
    r"|password (?:incorrect|mismatch|required)|access denied|not authori[sz]ed|banned"
    r"|\b[kgz]-?lined",
    re.IGNORECASE,
)


def refused_for_configuration(text: str) -> bool:
    """Whether a server's ``ERROR`` (or refusal numeric) text during registration names a
    reason that retrying cannot fix: a user name, a password, a ban."""
    return _CONFIG_REFUSAL.search(text) is not None


_SECRET_ARGS = re.compile(r"^(?P<head>(?:PASS|OPER \S+|AUTHENTICATE) ).+$", re.IGNORECASE)
_IDENTIFY = re.compile(r"^(?P<head>PRIVMSG NickServ :IDENTIFY ).+$", re.IGNORECASE)
_JOIN_KEYS = re.compile(r"^(?P<head>JOIN \S+ ).+$", re.IGNORECASE)


def loggable(line: str) -> str:
    """``line`` as a log may show it: what follows ``PASS``, ``OPER <name>``, ``AUTHENTICATE``
    (except a mechanism name, ``+`` and ``*``), NickServ ``IDENTIFY`` and a ``JOIN``'s channel
    list (the keys) is ``***``. Redaction in the log formatter matches only the plain secret,
    and the SASL payload is its base64 (issue 21, item 15)."""
    if line.upper().startswith("AUTHENTICATE "):
        argument = line[len("AUTHENTICATE ") :]
        if argument in ("+", "*") or argument.upper() in ("PLAIN", "EXTERNAL"):
            return line
    for pattern in (_SECRET_ARGS, _IDENTIFY, _JOIN_KEYS):
        match = pattern.match(line)
        if match:
            return f"{match.group('head')}***"
    return line


# -- inbound -----------------------------------------------------------------------------------


def strip_formatting(text: str) -> str:
    """``text`` without mIRC formatting codes (bold, colours, italics, …)."""
    return _FORMATTING.sub("", text)


def parse_tags(tags: Iterable[Mapping[str, Any]] | None) -> dict[str, str]:
    """The library's ``[{"key", "value"}]`` tag list as a dict; valueless tags map to ``""``."""
    return {str(t["key"]): "" if t.get("value") is None else str(t["value"]) for t in tags or ()}


def parse_server_time(value: str | None) -> float | None:
    """IRCv3 ``server-time`` (``2011-10-19T16:40:51.620Z``) as epoch seconds; None if invalid."""
    if not value:
        return None
    try:
        stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if stamp.tzinfo is None:
        return None
    return stamp.timestamp()


def event_id(server: str, msgid: str) -> str:
    """The envelope ``id`` of an event the server tagged ``msgid``: the UUID 5 (RFC 4122, URL
    namespace) of ``irc://<server>/<msgid>``, ``server`` the YAML's ``host:port``.

    A server chooses its msgids; hashing them with the server we connect to keeps one server's
    ids from colliding with another's (a de-duplicating consumer would drop the other
    network's message), while two gateways on the same server still agree on an event's id.
    """
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"irc://{server}/{msgid}"))


@dataclass(frozen=True)
class Context:
    """What translating one event needs to know of its connection."""

    #: our nick now (``self``, ``private``)
    own_nick: str
    #: the server's CASEMAPPING (:func:`casemapping`)
    casemapping: str = "rfc1459"
    #: the configured server, ``host:port``: the scope of msgid-based ids (:func:`event_id`)
    server: str = ""


@dataclass(frozen=True)
class Translated:
    """One inbound event: its ``irc.<event>`` name, its keys, and the envelope ``id``/``time``."""

    event: str
    keys: dict[str, Any]
    id: str | None = None
    time: float | None = None


def _who(source: str | None) -> dict[str, Any]:
    mask = NickMask(source or "")
    return {"nick": mask.nick or None, "user": mask.user, "host": mask.host}


def _no_nul(value: str | None) -> str | None:
    return None if value is None else str(value).replace("\0", "")


def inbound(
    type_: str,
    source: str | None,
    target: str | None,
    arguments: Sequence[str],
    tags: Iterable[Mapping[str, Any]] | None,
    context: Context,
) -> Translated | None:
    """The layer event for one of the library's events, or None for events we do not forward.

    ``type_`` etc. are :class:`irc.client.Event`'s fields; ``context`` says who we are on which
    server. NUL is removed from every string first.
    """
    source, target = _no_nul(source), _no_nul(target)
    clean_tags = [
        {"key": _no_nul(str(t["key"])), "value": _no_nul(t.get("value"))} for t in tags or ()
    ]
    tag_map = parse_tags(clean_tags)
    msgid = tag_map.get("msgid") or None
    event_key = event_id(context.server, msgid) if msgid is not None else None
    when = parse_server_time(tag_map.get("time"))
    who = _who(source)
    own_nick, mapping = context.own_nick, context.casemapping
    own = same_nick(who["nick"], own_nick, mapping)
    args = [str(a).replace("\0", "") for a in arguments]
    first = args[0] if args else ""
    keys: dict[str, Any]
    if type_ in ("pubmsg", "privmsg", "pubnotice", "privnotice", "action"):
        kind = "notice" if "notice" in type_ else "action" if type_ == "action" else "message"
        text = first
        keys = {
            "kind": kind,
            **who,
            "target": target,
            "text": text,
            "plain": strip_formatting(text),
            "tags": tag_map,
            "private": not is_channel(target or ""),
            "self": own,
        }
        return Translated("receive", keys, event_key, when)
    if type_ == "join":
        keys = {**who, "channel": target, "self": own}
        return Translated("joined", keys, event_key, when)
    if type_ == "part":
        keys = {**who, "channel": target, "reason": first or None, "self": own}
        return Translated("parted", keys, event_key, when)
    if type_ == "quit":
        keys = {**who, "reason": first or None, "self": own}
        return Translated("quit", keys, event_key, when)
    if type_ == "kick":
        kicked = first or None
        keys = {
            "nick": kicked,
            "by": who["nick"],
            "channel": target,
            "reason": args[1] if len(args) > 1 else None,
            "self": same_nick(kicked, own_nick, mapping),
        }
        return Translated("kicked", keys, event_key, when)
    if type_ == "nick":
        # the library renamed us before this event: our old nick is the source, the new the target
        keys = {**who, "new": target, "self": own or same_nick(target, own_nick, mapping)}
        return Translated("nick", keys, event_key, when)
    if type_ == "topic":
        keys = {**who, "channel": target, "topic": first, "plain": strip_formatting(first)}
        return Translated("topic", keys, event_key, when)
    if type_ == "currenttopic" and len(args) >= 2:  # RPL_TOPIC (332) when we join
        topic = args[1]
        keys = {"nick": None, "user": None, "host": None, "channel": args[0], "topic": topic}
        keys["plain"] = strip_formatting(topic)
        return Translated("topic", keys, event_key, when)
    if type_ == "invite":
        keys = {
            **who,
            "channel": first or None,
            "target": target,
            "self": same_nick(target, own_nick, mapping),
        }
        return Translated("invite", keys, event_key, when)
    return None


# -- outbound ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outbound:
    """Lines to send for one command, in order."""

    lines: tuple[str, ...]


def prefix_length(nick: str, userhost: str | None) -> int:
    """Bytes of ``:nick!user@host `` a server puts in front of a line we send."""
    rest = len(userhost.encode()) if userhost else _UNKNOWN_USERHOST
    return 1 + len(nick.encode()) + 1 + rest + 1


def split_text(text: str, limit: int) -> list[str]:
    """``text`` in chunks of at most ``limit`` UTF-8 bytes, cut only between characters.

    A chunk ends at the last space in its second half when there is one, and that one space is
    dropped (servers and clients strip trailing spaces, so it would vanish anyway); elsewhere
    chunks are cut between characters and join back exactly.
    """
    if limit < 4:
        raise InvalidCommand(f"no room for text in a line ({limit} bytes left)")
    data = text.encode()
    chunks: list[str] = []
    start = 0
    while len(data) - start > limit:
        end = start + limit
        while end > start and (data[end] & 0xC0) == 0x80:  # inside a multi-byte character
            end -= 1
        space = data.rfind(b" ", start + limit // 2, end)
        if space != -1:
            chunks.append(data[start:space].decode())
            start = space + 1
            continue
        chunks.append(data[start:end].decode())
        start = end
    chunks.append(data[start:].decode())
    return chunks


def send_lines(kind: str, target: str, text: str, prefix: int) -> Outbound:
    """The lines of an ``irc.send`` (``kind``: message | action | notice), split to fit."""
    command = KINDS[kind]
    head = f"{command} {target} :"
    wrap = ("\x01ACTION ", "\x01") if kind == "action" else ("", "")
    room = MAX_LINE - 2 - prefix - len(head.encode()) - len("".join(wrap).encode())
    chunks = split_text(text, room)
    return Outbound(tuple(f"{head}{wrap[0]}{chunk}{wrap[1]}" for chunk in chunks))


def _body(body: Mapping[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise InvalidCommand(f"unknown keys: {', '.join(extra)}")


def _optional(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    return None if value is None else check_text(value, key, empty=True)


@dataclass(frozen=True)
class Send:
    target: str
    text: str
    kind: Literal["message", "action", "notice"]


def parse_send(body: Mapping[str, Any]) -> Send:
    """``irc.send``: ``target``, ``text``, ``kind`` (message | action | notice)."""
    _body(body, {"target", "text", "kind"})
    target = check_target(body.get("target"))
    text = check_text(body.get("text"), "text")
    kind = body.get("kind", "message")
    if kind not in KINDS:
        raise InvalidCommand(f"'kind' must be message, action or notice, not {kind!r}")
    return Send(target, text, kind)


def parse_join(body: Mapping[str, Any]) -> tuple[str, str | None]:
    """``irc.join``: ``channel``, optional ``key``."""
    _body(body, {"channel", "key"})
    channel = check_channel(body.get("channel"))
    key = _optional(body, "key")
    if key is not None and (" " in key or "," in key or not key):
        raise InvalidCommand("'key' must be one word")
    return channel, key


def parse_part(body: Mapping[str, Any]) -> tuple[str, str | None]:
    """``irc.part``: ``channel``, optional ``reason``."""
    _body(body, {"channel", "reason"})
    return check_channel(body.get("channel")), _optional(body, "reason")


def parse_topic(body: Mapping[str, Any]) -> tuple[str, str]:
    """``irc.topic``: ``channel``, ``topic`` (``""`` clears it)."""
    _body(body, {"channel", "topic"})
    return check_channel(body.get("channel")), check_text(body.get("topic"), "topic", empty=True)


def parse_nick(body: Mapping[str, Any]) -> str:
    """``irc.nick``: ``nick``."""
    _body(body, {"nick"})
    return check_nick(body.get("nick"))


def parse_raw(body: Mapping[str, Any]) -> str:
    """``irc.raw``: ``line``, one line without CR/LF, at most 510 bytes."""
    _body(body, {"line"})
    line = check_text(body.get("line"), "line")
    if len(line.encode()) > MAX_LINE - 2:
        raise InvalidCommand(f"'line' is {len(line.encode())} bytes; the limit is {MAX_LINE - 2}")
    return line


def nick_candidates(nick: str, alternates: Sequence[str], count: int) -> list[str]:
    """The first ``count`` nicks to try: ``nick``, the alternates, then ``nick1``, ``nick2``…"""
    names = [nick, *alternates]
    suffix = 1
    while len(names) < count:
        names.append(f"{nick}{suffix}")
        suffix += 1
    return names[:count]


# -- capability negotiation and SASL -------------------------------------------------------------


def parse_cap_ls(arguments: Sequence[str]) -> tuple[bool, dict[str, str]]:
    """``CAP * LS [*] :caps`` (the library's arguments after the target): (more, {cap: value})."""
    args = list(arguments)
    more = len(args) >= 3 and args[1] == "*"
    caps: dict[str, str] = {}
    for item in (args[-1] if len(args) >= 2 else "").split():
        name, _, value = item.partition("=")
        caps[name] = value
    return more, caps


def cap_request(offered: Mapping[str, str], wanted: Iterable[str], sasl: str | None) -> list[str]:
    """Capabilities to ``CAP REQ``: the wanted ones offered, plus ``sasl`` when configured.

    ``message-tags`` is asked for with ``server-time`` because the library parses tags only
    once the server sends them.
    """
    request = [cap for cap in dict.fromkeys(wanted) if cap in offered]
    if sasl is not None and "sasl" in offered:
        request.append("sasl")
    return request


def sasl_payload(mechanism: str, username: str, password: str) -> list[str]:
    """``AUTHENTICATE`` arguments: base64 in 400-byte chunks, ``+`` for empty/terminal."""
    if mechanism == "EXTERNAL":
        return ["+"]
    raw = f"{username}\0{username}\0{password}".encode()
    encoded = base64.b64encode(raw).decode()
    chunks = [encoded[i : i + 400] for i in range(0, len(encoded), 400)]
    if len(chunks[-1]) == 400:
        chunks.append("+")
    return chunks
