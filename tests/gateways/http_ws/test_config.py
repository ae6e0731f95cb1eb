"""The http_ws: section: the example loads, mistakes are reported with their key path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from core.config import ConfigError, load_config
from gateways.http_ws.cli import main
from gateways.http_ws.config import HttpWsGatewayConfig

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def write(tmp_path: Path, section: dict) -> Path:
    path = tmp_path / "web.yaml"
    path.write_text(
        yaml.safe_dump({"gateway": "http_ws", "name": "web", "layer": "memory://", **section})
    )
    return path


def test_the_example_loads_and_lists_every_route_channel(capsys: pytest.CaptureFixture) -> None:
    config = load_config(EXAMPLES / "web.yaml", HttpWsGatewayConfig, env={})
    assert config.consumer_channels() == ["echo", "live", "rooms", "web"]
    assert main(["--config", str(EXAMPLES / "web.yaml"), "--check-config"]) == 0
    assert "ok" in capsys.readouterr().out


def test_every_mistake_is_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {
            "http_ws": {
                "websocket": [{"path": "live"}],
                "http": [{"path": "/a*b"}],
                "webhooks": [{"path": "/hook"}],
                "max_message_size": 2_000_000,
                "colour": "blue",
            }
        },
    )
    with pytest.raises(ConfigError) as error:
        load_config(path, HttpWsGatewayConfig)
    text = str(error.value)
    assert "http_ws.websocket[0].path: must start with /" in text
    assert "http_ws.http[0].path: must start with /" in text
    assert "http_ws.webhooks[0]: secret or secret_file is required" in text
    assert "http_ws.max_message_size" in text
    assert "http_ws.colour" in text


def test_nothing_to_serve(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nothing to serve"):
        load_config(write(tmp_path, {"http_ws": {}}), HttpWsGatewayConfig)


def test_webhook_secret_from_a_file_never_echoed(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("very-secret-value\n")
    config = load_config(
        write(tmp_path, {"http_ws": {"webhooks": [{"path": "/h", "secret_file": str(secret)}]}}),
        HttpWsGatewayConfig,
    )
    hook = config.http_ws.webhooks[0]
    assert hook.secret is not None and hook.secret.get_secret_value() == "very-secret-value"
    assert "very-secret-value" not in repr(config)
