"""YAML loading (DESIGN §6): env expansion, secret files, every error at once with its key path."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydantic import Field, SecretStr

from core.config import (
    ConfigError,
    GatewayConfig,
    Section,
    load_config,
    peek_gateway,
)
from core.logs import redact, setup_logging


class Sub(Section):
    topic: str
    qos: int = Field(0, ge=0, le=2)


class Demo(Section):
    host: str = "localhost"
    port: int = 1
    password: SecretStr | None = None
    subscriptions: list[Sub] = []
    secret_files = ("password",)  # password_file: PATH is read into password


class DemoConfig(GatewayConfig):
    demo: Demo


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gw.yaml"
    path.write_text(text)
    return path


def test_env_expansion_and_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "gateway: demo\nname: ${NAME}\ndemo:\n  host: ${HOST:-fallback}\n  port: ${PORT}\n"
        "  password: 'pa$$word'\n",
    )
    config = load_config(path, DemoConfig, env={"NAME": "sensors", "PORT": "1883"})
    assert config.name == "sensors"
    assert config.demo.host == "fallback"
    assert config.demo.port == 1883
    assert config.demo.password is not None
    assert config.demo.password.get_secret_value() == "pa$word"
    assert config.inbound_channel == "sensors"
    assert config.command_channel == "sensors.send"
    assert config.route("demo.x") == "sensors"


def test_expanded_values_are_not_parsed_as_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "gateway: demo\nname: n\ndemo:\n  host: ${EVIL}\n")
    config = load_config(path, DemoConfig, env={"EVIL": "x\nport: 99"})
    assert config.demo.host == "x\nport: 99"
    assert config.demo.port == 1


def test_every_error_at_once_with_key_paths(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "gateway: demo\nname: 'bad name!'\nbogus: 1\nhealth: {port: 99999}\n"
        "demo:\n  port: lots\n  password: ${SECRET_PW}\n  subscriptions:\n"
        "    - {topic: a, qos: 3}\n    - {qos: 1}\n  extra: ${MISSING}\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, DemoConfig, env={"SECRET_PW": "hunter2-secret"})
    text = str(info.value)
    for expected in (
        "demo.extra: environment variable MISSING is not set",
        "name: must be letters",
        "bogus: Extra inputs are not permitted",
        "health.port: Input should be less than or equal to 65535",
        "demo.port: Input should be a valid integer",
        "demo.subscriptions[0].qos: Input should be less than or equal to 2",
        "demo.subscriptions[1].topic: Field required",
    ):
        assert expected in text, text
    assert "hunter2-secret" not in text
    assert all(line.startswith(f"{path}: ") for line in text.splitlines())


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("gateway: demo\nname: [unclosed\n", "line 3, column 1: invalid YAML"),
        ("- a\n- b\n", "must be a mapping"),
        ("", "must be a mapping"),
        ("gateway: demo\nname: n\n\tdemo: {}\n", "invalid YAML"),
    ],
)
def test_broken_yaml(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(write(tmp_path, text), DemoConfig)


def test_missing_and_non_utf8_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read file"):
        load_config(tmp_path / "absent.yaml", DemoConfig)
    bad = tmp_path / "latin.yaml"
    bad.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad, DemoConfig)


def test_secret_file_and_redaction(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-a-file-123\n")
    path = write(tmp_path, f"gateway: demo\nname: n\ndemo:\n  password_file: {secret}\n")
    config = load_config(path, DemoConfig)
    assert config.demo.password is not None
    assert config.demo.password.get_secret_value() == "from-a-file-123"
    assert "from-a-file-123" not in repr(config)
    # once loaded, the value is redacted from any log line, whoever writes it
    assert redact("connecting with from-a-file-123") == "connecting with ***"
    assert redact("redis://:pw4567@host:6379/0") == "redis://:***@host:6379/0"


def test_secret_file_errors(tmp_path: Path) -> None:
    path = write(tmp_path, f"gateway: demo\nname: n\ndemo:\n  password_file: {tmp_path}/nope\n")
    with pytest.raises(ConfigError, match=r"demo: password_file: cannot read .*/nope"):
        load_config(path, DemoConfig)
    path = write(tmp_path, "gateway: demo\nname: n\ndemo:\n  password: a\n  password_file: b\n")
    with pytest.raises(ConfigError, match="either password or password_file"):
        load_config(path, DemoConfig)


def test_overrides_and_peek(tmp_path: Path) -> None:
    path = write(tmp_path, "gateway: demo\nname: n\nlayer: memory://\ndemo: {}\n")
    assert peek_gateway(path) == "demo"
    assert load_config(path, DemoConfig, overrides={"layer": "redis://x/0"}).layer == "redis://x/0"
    assert load_config(path, DemoConfig, overrides={"layer": None}).layer == "memory://"
    with pytest.raises(ConfigError, match="gateway: required"):
        peek_gateway(write(tmp_path, "name: n\n"))


def test_routes_and_channels(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "gateway: demo\nname: n\nchannel: inbox\ncommand_channel: outbox\n"
        "routes: {demo.connect: ops}\ndemo: {}\n",
    )
    config = load_config(path, DemoConfig)
    assert config.route("demo.connect") == "ops"
    assert config.route("demo.message") == "inbox"
    assert config.command_channel == "outbox"
    assert config.consumer_channels() == ["inbox", "ops"]
    with pytest.raises(ConfigError, match="routes: must be letters"):
        load_config(
            write(tmp_path, "gateway: demo\nname: n\nroutes: {a: 'b c'}\ndemo: {}\n"), DemoConfig
        )


def test_log_lines_are_redacted(capfd: pytest.CaptureFixture[str]) -> None:
    from core.logs import register_secret

    register_secret("sup3r-secret-value")
    setup_logging("INFO")
    logging.getLogger("gateway.test").warning("token sup3r-secret-value leaked?")
    assert "***" in capfd.readouterr().err
    setup_logging("INFO")
    logging.getLogger("gateway.test").warning("again sup3r-secret-value")
    err = capfd.readouterr().err
    assert "sup3r-secret-value" not in err
    assert err.count("again") == 1  # setup_logging twice does not double the handler
