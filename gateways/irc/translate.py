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
* **IRCv3 tags**: ``msgid`` becomes the event ``id``, ``server-time`` its ``time``; every tag is
  passed on in ``tags`` (valueless tags as ``""``).
* **Nicks compare under RFC 1459 case mapping** (``[]\\~`` are the lower case of ``{}|^``).
"""

from __future__ import annotations

import base64
import codecs
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

from irc.client import NickMask, is_channel
from irc.strings import lower as irc_lower

__all__ = [
    "KINDS",
    "MAX_LINE",
    "InvalidCommand",
    "Outbound",
    "Send",
    "Translated",
    "cap_request",
    "check_channel",
    "check_encoding",
    "check_nick",
    "check_target",
    "check_text",
    "inbound",
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


def same_nick(a: str | None, b: str | None) -> bool:
    """Whether two nicks are the same under RFC 1459 case mapping."""
    return a is not None and b is not None and irc_lower(a) == irc_lower(b)


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


def inbound(
    type_: str,
    source: str | None,
    target: str | None,
    arguments: Sequence[str],
    tags: Iterable[Mapping[str, Any]] | None,
    own_nick: str,
) -> Translated | None:
    """The layer event for one of the library's events, or None for events we do not forward.

    ``type_`` etc. are :class:`irc.client.Event`'s fields; ``own_nick`` is our current nick
    (for ``self`` and ``private``).
    """
    tag_map = parse_tags(tags)
    msgid = tag_map.get("msgid") or None
    when = parse_server_time(tag_map.get("time"))
    who = _who(source)
    own = same_nick(who["nick"], own_nick)
    args = list(arguments)
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
        return Translated("receive", keys, msgid, when)
    if type_ == "join":
        keys = {**who, "channel": target, "self": own}
        return Translated("joined", keys, msgid, when)
    if type_ == "part":
        keys = {**who, "channel": target, "reason": first or None, "self": own}
        return Translated("parted", keys, msgid, when)
    if type_ == "quit":
        keys = {**who, "reason": first or None, "self": own}
        return Translated("quit", keys, msgid, when)
    if type_ == "kick":
        kicked = first or None
        keys = {
            "nick": kicked,
            "by": who["nick"],
            "channel": target,
            "reason": args[1] if len(args) > 1 else None,
            "self": same_nick(kicked, own_nick),
        }
        return Translated("kicked", keys, msgid, when)
    if type_ == "nick":
        # the library renamed us before this event: our old nick is the source, the new the target
        keys = {**who, "new": target, "self": own or same_nick(target, own_nick)}
        return Translated("nick", keys, msgid, when)
    if type_ == "topic":
        keys = {**who, "channel": target, "topic": first, "plain": strip_formatting(first)}
        return Translated("topic", keys, msgid, when)
    if type_ == "currenttopic" and len(args) >= 2:  # RPL_TOPIC (332) when we join
        topic = args[1]
        keys = {"nick": None, "user": None, "host": None, "channel": args[0], "topic": topic}
        keys["plain"] = strip_formatting(topic)
        return Translated("topic", keys, msgid, when)
    if type_ == "invite":
        keys = {
            **who,
            "channel": first or None,
            "target": target,
            "self": same_nick(target, own_nick),
        }
        return Translated("invite", keys, msgid, when)
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
