"""The pure IRC translation: inbound events, line splitting, command validation, CAP and SASL."""

from __future__ import annotations

import base64
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateways.irc import translate as t
from gateways.irc.translate import InvalidCommand


@given(st.text(min_size=1, max_size=3000), st.integers(min_value=4, max_value=450))
def test_split_never_exceeds_the_limit_and_loses_nothing(text: str, limit: int) -> None:
    chunks = t.split_text(text, limit)
    assert all(len(c.encode()) <= limit for c in chunks)
    # every character kept; a split at a space consumed exactly that space
    joined = "".join(chunks)
    assert len(joined) + len(chunks) - 1 >= len(text) >= len(joined)
    assert joined.replace(" ", "") == text.replace(" ", "")


@given(
    st.text(
        alphabet=st.characters(blacklist_characters="\r\n\0", blacklist_categories=("Cs",)),
        min_size=1,
        max_size=2500,
    ),
    st.sampled_from(["message", "action", "notice"]),
    st.one_of(st.none(), st.just("~someone@a.very.long.host.name.example.com")),
)
def test_send_lines_fit_512_bytes_as_relayed(text: str, kind: str, userhost: str | None) -> None:
    prefix = t.prefix_length("bot", userhost)
    lines = t.send_lines(kind, "#ops", text, prefix).lines
    for line in lines:
        assert prefix + len(line.encode()) + 2 <= t.MAX_LINE
        assert "\r" not in line and "\n" not in line


def test_split_prefers_a_space_and_never_cuts_a_character() -> None:
    assert t.split_text("aaaa bbbb", 6) == ["aaaa", "bbbb"]
    assert t.split_text("ééé", 5) == ["éé", "é"]
    with pytest.raises(InvalidCommand):
        t.split_text("x", 2)


@pytest.mark.parametrize("bad", ["a\rb", "a\nb", "a\0b", "x\r\nQUIT :bye"])
def test_cr_lf_nul_refused_everywhere(bad: str) -> None:
    with pytest.raises(InvalidCommand, match="refused"):
        t.parse_send({"target": "#ops", "text": bad})
    with pytest.raises(InvalidCommand):
        t.parse_send({"target": bad, "text": "x"})
    with pytest.raises(InvalidCommand):
        t.parse_join({"channel": "#ops", "key": bad})
    with pytest.raises(InvalidCommand):
        t.parse_topic({"channel": "#ops", "topic": bad})
    with pytest.raises(InvalidCommand):
        t.parse_raw({"line": bad})
    with pytest.raises(InvalidCommand):
        t.parse_part({"channel": "#ops", "reason": bad})


def test_command_validation() -> None:
    assert t.parse_send({"target": "alice", "text": "hi"}) == t.Send("alice", "hi", "message")
    with pytest.raises(InvalidCommand, match="kind"):
        t.parse_send({"target": "#a", "text": "x", "kind": "shout"})
    with pytest.raises(InvalidCommand, match="unknown keys: extra"):
        t.parse_send({"target": "#a", "text": "x", "extra": 1})
    with pytest.raises(InvalidCommand, match="must not be empty"):
        t.parse_send({"target": "#a", "text": ""})
    with pytest.raises(InvalidCommand, match="target"):
        t.parse_send({"target": "a,b", "text": "x"})
    assert t.parse_join({"channel": "#a", "key": "k"}) == ("#a", "k")
    with pytest.raises(InvalidCommand, match="channel"):
        t.parse_join({"channel": "ops"})
    with pytest.raises(InvalidCommand):
        t.parse_join({"channel": "#a b"})
    assert t.parse_topic({"channel": "#a", "topic": ""}) == ("#a", "")
    assert t.parse_nick({"nick": "bot[2]"}) == "bot[2]"
    with pytest.raises(InvalidCommand):
        t.parse_nick({"nick": "1bot"})
    with pytest.raises(InvalidCommand, match="limit"):
        t.parse_raw({"line": "x" * 511})
    with pytest.raises(InvalidCommand):
        t.check_encoding("no-such-codec")
    assert t.check_encoding("latin-1") == "iso8859-1"


BOT = t.Context("bot", "rfc1459", "irc.example.org")


def test_inbound_messages() -> None:
    tags = [{"key": "msgid", "value": "abc"}, {"key": "time", "value": "2024-01-02T03:04:05.500Z"}]
    out = t.inbound("pubmsg", "alice!~a@host", "#ops", ["\x02hi\x02 \x0304,01red"], tags, BOT)
    assert out is not None and out.event == "receive"
    assert out.id == t.event_id("irc.example.org", "abc") and out.time == 1704164645.5
    assert out.keys["text"] == "\x02hi\x02 \x0304,01red" and out.keys["plain"] == "hi red"
    assert out.keys["tags"] == {"msgid": "abc", "time": "2024-01-02T03:04:05.500Z"}
    assert (out.keys["nick"], out.keys["user"], out.keys["host"]) == ("alice", "~a", "host")
    assert out.keys["private"] is False
    private = t.inbound("privnotice", "alice!a@h", "bot", ["psst"], None, BOT)
    assert private is not None and private.keys["kind"] == "notice" and private.keys["private"]
    assert private.id is None and private.time is None
    action = t.inbound("action", "alice!a@h", "#ops", ["waves"], None, BOT)
    assert action is not None and action.keys["kind"] == "action"
    assert t.inbound("ctcp", "alice!a@h", "#ops", ["VERSION"], None, BOT) is None


def test_inbound_membership_events() -> None:
    def one(type_: str, source: str, target: str, args: list[str]) -> dict[str, object]:
        out = t.inbound(type_, source, target, args, None, t.Context("Bot"))
        assert out is not None
        return {"event": out.event, **out.keys}

    assert one("join", "bot!b@h", "#a", [])["self"] is True  # case-insensitive
    assert one("part", "al!a@h", "#a", ["bye"])["reason"] == "bye"
    assert one("quit", "al!a@h", None, ["gone"])["event"] == "quit"  # type: ignore[arg-type]
    kick = one("kick", "op!o@h", "#a", ["bot", "spam"])
    assert (kick["nick"], kick["by"], kick["reason"], kick["self"]) == ("bot", "op", "spam", True)
    nick = one("nick", "al!a@h", "al2", [])
    assert (nick["nick"], nick["new"], nick["self"]) == ("al", "al2", False)
    assert one("nick", "old!b@h", "bot", [])["self"] is True  # renamed already by the library
    assert one("topic", "al!a@h", "#a", ["t"])["topic"] == "t"
    assert one("currenttopic", "irc.test", "bot", ["#a", "t2"])["channel"] == "#a"
    invite = one("invite", "al!a@h", "bot", ["#a"])
    assert (invite["channel"], invite["self"]) == ("#a", True)
    assert t.parse_server_time("yesterday") is None
    assert t.parse_server_time("2024-01-02T03:04:05") is None  # no zone: not trusted


def test_nicks_caps_and_sasl() -> None:
    assert t.nick_candidates("bot", ["b2"], 4) == ["bot", "b2", "bot1", "bot2"]
    assert t.same_nick("Bot[a]", "bot{a}", "rfc1459")
    assert t.parse_cap_ls(["LS", "*", "sasl=PLAIN server-time"]) == (
        True,
        {"sasl": "PLAIN", "server-time": ""},
    )
    assert t.parse_cap_ls(["LS", "echo-message"]) == (False, {"echo-message": ""})
    offered = {"sasl": "PLAIN", "server-time": "", "echo-message": ""}
    assert t.cap_request(offered, ["server-time", "message-tags"], "PLAIN") == [
        "server-time",
        "sasl",
    ]
    assert t.cap_request(offered, [], None) == []
    (payload,) = t.sasl_payload("PLAIN", "acct", "pw")
    assert base64.b64decode(payload) == b"acct\0acct\0pw"
    assert t.sasl_payload("EXTERNAL", "", "") == ["+"]
    long = t.sasl_payload("PLAIN", "a", "x" * 296)  # exactly 400 base64 characters
    assert len(long) == 2 and long[1] == "+"


@pytest.mark.parametrize(
    ("mapping", "a", "b", "same"),
    [
        ("ascii", "acc[gw]", "acc{gw}", False),  # ngircd: two people (issue 21, item 6)
        ("ascii", "ACC[GW]", "acc[gw]", True),
        ("rfc1459", "acc[gw]", "ACC{GW}", True),  # InspIRCd: one nick
        ("rfc1459", "a~b", "A^B", True),
        ("rfc1459", "a\\b", "a|b", True),
        ("strict-rfc1459", "a[b]\\", "A{B}|", True),
        ("strict-rfc1459", "a~", "a^", False),
        ("rfc8265", "ÉLAN", "élan", True),
        ("rfc7613", "\uff22\uff2f\uff34", "bot", True),  # fullwidth BOT: width-mapped
        ("rfc8265", "a[b]", "a{b}", False),
    ],
)
def test_case_mappings(mapping: str, a: str, b: str, same: bool) -> None:
    assert t.same_nick(a, b, mapping) is same
    assert (t.fold(a, mapping) == t.fold(b, mapping)) is same


def test_the_announced_case_mapping_and_its_default() -> None:
    assert t.casemapping("ascii") == "ascii" and t.casemapping("RFC1459") == "rfc1459"
    assert t.casemapping(None) == "rfc1459"  # not announced: RFC 1459's
    assert t.casemapping("klingon") == "rfc1459"
    assert t.fold("A[B]", "klingon") == "a{b}"
    assert not t.same_nick(None, "bot", "ascii")


def test_self_follows_the_servers_case_mapping() -> None:
    join = ("join", "acc{gw}!u@h", "#ops", [], None)
    on_ngircd = t.inbound(*join, t.Context("acc[gw]", "ascii"))
    on_inspircd = t.inbound(*join, t.Context("acc[gw]", "rfc1459"))
    assert on_ngircd is not None and on_ngircd.keys["self"] is False  # a look-alike
    assert on_inspircd is not None and on_inspircd.keys["self"] is True
    kick = t.inbound(
        "kick", "op!o@h", "#ops", ["ACC{GW}", "x"], None, t.Context("acc[gw]", "ascii")
    )
    assert kick is not None and kick.keys["self"] is False


def test_nul_is_removed_from_every_string() -> None:
    tags = [{"key": "msg\0id", "value": "m\0"}, {"key": "x", "value": None}]
    out = t.inbound("pubmsg", "al\0ice!~a\0@h\0st", "#o\0ps", ["a\0b"], tags, BOT)
    assert out is not None
    keys = out.keys
    assert (keys["nick"], keys["user"], keys["host"]) == ("alice", "~a", "hst")
    assert (keys["target"], keys["text"], keys["plain"]) == ("#ops", "ab", "ab")
    assert keys["tags"] == {"msgid": "m", "x": ""}
    assert out.id == t.event_id("irc.example.org", "m")
    part = t.inbound("part", "al!a@h", "#a", ["by\0e"], None, BOT)
    assert part is not None and part.keys["reason"] == "bye"


def test_event_ids_are_scoped_by_the_server() -> None:
    # a server cannot choose msgids that collide with another network's events
    one = t.event_id("irc.libera.chat", "abc")
    assert one == t.event_id("irc.libera.chat", "abc")  # stable: replicas agree
    assert one != t.event_id("irc.oftc.net", "abc")
    assert one == str(uuid.uuid5(uuid.NAMESPACE_URL, "irc://irc.libera.chat/abc"))
    assert uuid.UUID(one).version == 5


def test_default_username_and_username_checks() -> None:
    assert t.default_username("acc[bot]") == "accbot"  # ngircd: "Invalid user name" otherwise
    assert t.default_username("ticket_bot-2") == "ticket_bot-2"
    assert t.default_username("[-x]") == "x"
    assert t.default_username("[]") == "gateway"
    assert t.check_username("acc.bot") == "acc.bot"
    for bad in ("a b", "a@b", "", "a\0b", "a\nb"):
        with pytest.raises(InvalidCommand):
            t.check_username(bad)


@pytest.mark.parametrize(
    ("text", "configuration"),
    [
        ("Invalid user name", True),  # ngircd, USER acc[bot]
        ("Access denied: Bad password?", True),  # ngircd, wrong PASS
        ("Your username is not valid", True),  # InspIRCd 468
        ("Closing link: (u@h) [K-Lined: spam]", True),
        ("You are banned from this server", True),
        ("Closing link: (u@h) [Registration timeout]", False),
        ("Connection refused, too many connections from your IP address", False),
        ("Throttled: Reconnecting too fast", False),
    ],
)
def test_refusals_only_configuration_can_fix(text: str, configuration: bool) -> None:
    assert t.refused_for_configuration(text) is configuration


def test_loggable_masks_secrets_in_lines() -> None:
    payload = t.sasl_payload("PLAIN", "acct", "hunter2")[0]
    assert t.loggable(f"AUTHENTICATE {payload}") == "AUTHENTICATE ***"
    assert t.loggable("AUTHENTICATE PLAIN") == "AUTHENTICATE PLAIN"
    assert t.loggable("AUTHENTICATE +") == "AUTHENTICATE +"
    assert t.loggable("PASS pw") == "PASS ***"
    assert t.loggable("OPER admin pw") == "OPER admin ***"
    assert t.loggable("PRIVMSG NickServ :IDENTIFY acct pw") == "PRIVMSG NickServ :IDENTIFY ***"
    assert t.loggable("JOIN #staff,#ops k1,k2") == "JOIN #staff,#ops ***"
    assert t.loggable("JOIN #ops") == "JOIN #ops"
    assert t.loggable("PRIVMSG #ops :PASS me the salt") == "PRIVMSG #ops :PASS me the salt"
