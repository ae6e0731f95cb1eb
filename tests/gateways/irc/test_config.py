"""The ``irc:`` section: defaults, secrets from files, every error with its key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import ConfigError, load_config
from gateways.irc.config import IrcGatewayConfig


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "irc.yaml"
    path.write_text(text)
    return path


def test_defaults_and_secret_files(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    path = write(
        tmp_path,
        f"""
gateway: irc
name: ops
irc:
  server: irc.example.org
  tls: {{}}
  nick: bot
  sasl: {{password_file: {tmp_path / "pw"}}}
  channels: ["#ops", {{name: "#keyed", key: "${{KEY}}"}}]
""",
    )
    config = load_config(path, IrcGatewayConfig, env={"KEY": "k1"})
    irc = config.irc
    assert irc.server_port == 6697 and irc.tls is not None and irc.tls.verify
    assert irc.sasl is not None and irc.sasl.password is not None
    assert irc.sasl.password.get_secret_value() == "s3cret"
    assert [c.name for c in irc.channels] == ["#ops", "#keyed"]
    assert irc.capabilities == ["server-time", "message-tags"]  # no echo-message by default
    assert irc.raw_commands is False and irc.rejoin_after_kick is True
    assert "s3cret" not in repr(config)


def test_every_error_with_its_key_path(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
gateway: irc
name: ops
irc:
  server: irc.example.org
  nick: "1bad"
  channels: ["ops"]
  sasl: {mechanism: EXTERNAL}
  fallback_encoding: klingon
  flood: {rate: 0}
  colour: red
""",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, IrcGatewayConfig, env={})
    text = str(info.value)
    for fragment in (
        "irc.nick: not a valid nick",
        "irc.channels[0].name: not a valid channel name",
        "irc.fallback_encoding: unknown encoding",
        "irc.flood.rate:",
        "irc.colour:",
    ):
        assert fragment in text, text


def test_reconnect_defaults_and_bounds(tmp_path: Path) -> None:
    base = "gateway: irc\nname: ops\nirc:\n  server: irc.example.org\n  nick: bot\n"
    irc = load_config(write(tmp_path, base), IrcGatewayConfig, env={}).irc
    assert (irc.reconnect.initial, irc.reconnect.maximum) == (1.0, 60.0)
    path = write(tmp_path, base + "  reconnect: {initial: 5, maximum: 1}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, IrcGatewayConfig, env={})
    assert "irc.reconnect: maximum must not be below initial" in str(info.value)
