"""The ``slack:`` section: defaults, secrets from env and files, every error with its key path."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, get_args

import pytest

from core.config import ConfigError, load_config
from gateways.slack.config import SlackConfig, SlackGatewayConfig


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "slack.yaml"
    path.write_text(text)
    return path


def test_defaults_and_secrets_from_env_and_files(tmp_path: Path) -> None:
    (tmp_path / "app").write_text("xapp-from-file\n")
    path = write(
        tmp_path,
        f"""
gateway: slack
name: team
slack:
  bot_token: ${{SLACK_BOT_TOKEN}}
  app_token_file: {tmp_path / "app"}
""",
    )
    config = load_config(path, SlackGatewayConfig, env={"SLACK_BOT_TOKEN": "xoxb-from-env"})
    slack = config.slack
    assert slack.bot_token.get_secret_value() == "xoxb-from-env"
    assert slack.app_token is not None and slack.app_token.get_secret_value() == "xapp-from-file"
    assert slack.transport == "socket_mode" and slack.api_url == "https://slack.com/api/"
    assert slack.response_url_prefix == "https://hooks.slack.com/"
    assert slack.ack_timeout == 2.5 and slack.ignore_self is True
    assert (slack.pacing.rate, slack.pacing.burst, slack.pacing.queue) == (1.0, 3, 100)
    assert (slack.dedup.window, slack.dedup.max_entries, slack.dedup.redis) == (
        3600.0,
        100_000,
        True,
    )
    assert (slack.retry.rate_limited, slack.retry.connection_errors) == (3, 3)
    events = slack.events_api
    assert (events.host, events.port, events.path) == ("127.0.0.1", 3000, "/slack/events")
    assert (events.max_body_size, events.max_age) == (256 * 1024, 300)
    assert "xoxb-from-env" not in repr(config) and "xapp-from-file" not in repr(config)


def test_events_api_needs_the_signing_secret_and_socket_mode_the_app_token(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        """
gateway: slack
name: team
slack: {bot_token: xoxb-1, transport: events_api, api_url: "http://127.0.0.1:9/api"}
""",
    )
    with pytest.raises(ConfigError) as error:
        load_config(path, SlackGatewayConfig)
    assert error.value.errors == [
        "slack: signing_secret: required for events_api (or signing_secret_file)"
    ]
    path = write(tmp_path, "gateway: slack\nname: team\nslack: {bot_token: xoxb-1}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, SlackGatewayConfig)
    assert error.value.errors == ["slack: app_token: required for socket_mode (or app_token_file)"]


def test_a_secret_set_twice_is_refused_without_echoing_it(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
gateway: slack
name: team
slack:
  bot_token: xoxb-very-secret
  bot_token_file: /nonexistent
  app_token: xapp-1
""",
    )
    with pytest.raises(ConfigError) as error:
        load_config(path, SlackGatewayConfig)
    assert "slack: set either bot_token or bot_token_file, not both" in str(error.value)
    assert "xoxb-very-secret" not in str(error.value)


def test_every_error_with_its_key_path(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
gateway: slack
name: team
slack:
  bot_token: xoxb-1
  app_token: xapp-1
  transport: carrier_pigeon
  api_url: slack.com
  ack_timeout: 5
  events_api: {path: "no-slash", max_body_size: 0}
  pacing: {rate: 0}
  colour: red
""",
    )
    with pytest.raises(ConfigError) as error:
        load_config(path, SlackGatewayConfig)
    lines = error.value.errors
    for key in (
        "slack.transport:",
        "slack.api_url: must be an http:// or https:// URL",
        "slack.ack_timeout:",
        "slack.events_api.path: must start with /",
        "slack.events_api.max_body_size:",
        "slack.pacing.rate:",
        "slack.colour: Extra inputs are not permitted",
    ):
        assert any(line.startswith(key) for line in lines), (key, lines)


def test_oauth_answers_and_their_errors(tmp_path: Path) -> None:
    (tmp_path / "client").write_text("client-secret-from-file\n")
    path = write(
        tmp_path,
        f"""
gateway: slack
name: team
slack:
  transport: events_api
  signing_secret: s3cret
  oauth:
    client_id: "1111.2222"
    client_secret_file: {tmp_path / "client"}
    scopes: [chat:write, commands]
  answers: {{timeout: 1.5, wait_for: [slack.command]}}
""",
    )
    slack = load_config(path, SlackGatewayConfig).slack
    assert slack.bot_token is None and slack.oauth is not None
    assert slack.oauth.client_secret.get_secret_value() == "client-secret-from-file"
    assert (slack.oauth.install_path, slack.oauth.redirect_path) == (
        "/slack/install",
        "/slack/oauth_redirect",
    )
    assert (slack.oauth.state_ttl, slack.oauth.refresh_before) == (600.0, 7200.0)
    assert (slack.answers.timeout, slack.answers.wait_for) == (1.5, ["slack.command"])
    assert "client-secret-from-file" not in repr(slack)
    assert SlackConfig.model_validate(
        {"bot_token": "xoxb-1", "app_token": "xapp-1"}
    ).answers.wait_for == ["slack.view_submission", "slack.options"]

    path = write(
        tmp_path,
        """
gateway: slack
name: team
slack:
  bot_token: xoxb-1
  transport: events_api
  signing_secret: s3cret
  events_api: {path: /slack/install}
  oauth:
    client_id: "1"
    client_secret: x
    scopes: [chat:write]
  answers: {timeout: 3, wait_for: [slack.message]}
""",
    )
    with pytest.raises(ConfigError) as error:
        load_config(path, SlackGatewayConfig)
    lines = error.value.errors
    assert any(line.startswith("slack.answers.timeout:") for line in lines), lines
    assert any(line.startswith("slack.answers.wait_for[0]:") for line in lines), lines
    bad = {"bot_token": "xoxb-1", "transport": "events_api", "signing_secret": "s"}
    oauth = {"client_id": "1", "client_secret": "x", "scopes": ["chat:write"]}
    cases = [
        ({**bad, "oauth": oauth}, "bot_token: not used with oauth"),
        (
            {**bad, "bot_token": None, "oauth": oauth, "events_api": {"path": "/slack/install"}},
            "must differ from events_api.path",
        ),
        ({"transport": "events_api", "signing_secret": "s"}, "bot_token: required"),
        ({**bad, "bot_token": None, "oauth": {**oauth, "scopes": []}}, "at least 1 item"),
        ({**bad, "bot_token": None, "oauth": {**oauth, "scopes": ["a b"]}}, "one word"),
        ({**bad, "bot_token": None,
          "oauth": {**oauth, "install_path": "/x", "redirect_path": "/x"}}, "must differ"),
        ({**bad, "bot_token": None, "oauth": {**oauth, "redirect_uri": "ftp://x"}}, "http"),
        ({**bad, "bot_token": None, "oauth": {**oauth, "client_secret": ""}}, "must not be empty"),
    ]  # fmt: skip
    for section, error_text in cases:
        with pytest.raises(ValueError, match=error_text):
            SlackConfig.model_validate(section)


def test_gateways_run_knows_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    from gateways.cli import main

    example = Path(__file__).resolve().parents[3] / "examples" / "slack.yaml"
    env = {"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_APP_TOKEN": "xapp-1"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        assert main(["run", "--check-config", str(example)]) == 0
    assert f"{example}: ok" in capsys.readouterr().out


def _keys(model: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for name, field in model.model_fields.items():
        # a section, or an optional one (`oauth: OAuthConfig | None`)
        section = next(
            (
                t
                for t in (field.annotation, *get_args(field.annotation))
                if hasattr(t, "model_fields")
            ),
            None,
        )
        if section is not None:
            out += _keys(section, f"{prefix}{name}.")
        elif field.default_factory is not None:
            out.append((f"{prefix}{name}", field.default_factory()))  # type: ignore[call-arg]
        else:
            out.append((f"{prefix}{name}", field.default))
    return out


def test_the_readme_documents_every_key_with_its_default() -> None:
    readme = (Path(__file__).resolve().parents[3] / "gateways/slack/README.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z_.]+)`(?: / `[a-z_.]+`)? \| ([^|]+) \|", readme, re.M))
    for key, default in _keys(SlackConfig):
        assert key in rows, f"{key} is not in the README's table"
        documented = rows[key].strip().strip("`")
        if isinstance(default, bool):
            assert documented == str(default).lower(), key
        elif isinstance(default, int | float | str):
            assert documented in (
                str(default),
                f"{default:g}" if not isinstance(default, str) else default,
            ), key
        elif isinstance(default, list):
            assert documented == ", ".join(f"`{v}`" for v in default).strip("`"), key
        elif default is None:
            assert documented.startswith(("required", "\N{EN DASH}")), key
        else:
            assert documented.startswith("required"), key
