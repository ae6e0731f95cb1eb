"""The ``mqtt:`` section: defaults, every error with its key path, secrets from files."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import ConfigError, load_config
from gateways.mqtt.config import MqttGatewayConfig
from tests.support.example import EXAMPLES


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> MqttGatewayConfig:
    path = tmp_path / "mqtt.yaml"
    path.write_text(text)
    return load_config(path, MqttGatewayConfig, env=env or {})


def errors(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return info.value.errors


def test_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, "gateway: mqtt\nname: sensors\nmqtt: {}\n")
    mqtt = config.mqtt
    assert (mqtt.host, mqtt.broker_port, mqtt.protocol, mqtt.transport) == (
        "localhost",
        1883,
        "5",
        "tcp",
    )
    # safe by default: a persistent session (the client id defaults to NAME-HOSTNAME)
    assert not mqtt.clean_start and mqtt.session_expiry_seconds == 86_400
    assert mqtt.persistent_session and mqtt.client_id is None and mqtt.watch_broker_drops
    assert mqtt.subscriptions == [] and mqtt.payload == "bytes" and mqtt.tls is None
    assert config.consumer_channels() == ["sensors"]
    # the broker's window is the hold's size: a burst waits in the hold, not in the broker's
    # client queue (which a default mosquitto caps at 1,000 and then drops)
    assert mqtt.receive_maximum == mqtt.max_pending == 20_000


@pytest.mark.parametrize(
    ("section", "window"),
    [("{max_pending: 500}", 500), ("{max_pending: 100000}", 65_535), ("{receive_maximum: 7}", 7)],
)
def test_the_window_follows_the_hold_unless_given(
    tmp_path: Path, section: str, window: int
) -> None:
    config = load(tmp_path, f"gateway: mqtt\nname: sensors\nmqtt: {section}\n")
    assert config.mqtt.receive_maximum == window


def test_full_example(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret-password\n")
    (tmp_path / "keypw").write_text("key-password\n")
    config = load(
        tmp_path,
        f"""
gateway: mqtt
name: plant
routes: {{mqtt.message: plant-events}}
mqtt:
  host: broker.example.com
  protocol: 3.1.1
  client_id: plant-1
  clean_start: false
  username: ${{MQTT_USER}}
  password_file: {tmp_path / "pw"}
  tls:
    ca_file: /etc/ssl/ca.pem
    cert_file: /etc/ssl/me.pem
    key_file: /etc/ssl/me.key
    key_password_file: {tmp_path / "keypw"}
  transport: websockets
  websocket: {{path: /ws, headers: {{X-Tenant: plant}}}}
  will: {{topic: plant/status, payload: offline}}
  birth: {{topic: plant/status, payload: online, qos: 0}}
  subscriptions:
    - {{topic: "plant/+/temp", qos: 2, channel: temperatures, payload: json}}
    - topic: "$share/workers/jobs/#"
    - {{topic: "plant/#"}}
""",
        env={"MQTT_USER": "alice"},
    )
    mqtt = config.mqtt
    assert mqtt.protocol == "3.1.1" and not mqtt.mqtt5
    assert mqtt.broker_port == 8883 and mqtt.broker == "broker.example.com:8883"
    assert mqtt.username == "alice"
    assert mqtt.password is not None and mqtt.password.get_secret_value() == "s3cret-password"
    assert mqtt.tls is not None and mqtt.tls.verify  # verification is on unless turned off
    assert mqtt.tls.key_password is not None
    assert mqtt.will is not None and mqtt.will.on_stop and mqtt.will.retain
    assert mqtt.websocket.headers == {"X-Tenant": "plant"}
    assert [s.qos for s in mqtt.subscriptions] == [2, 1, 1]
    # consumers of every subscription's own channel run with `gateways run --app`
    assert config.consumer_channels() == ["plant", "plant-events", "temperatures"]
    assert config.subscription_channel(mqtt.subscriptions[1]) == "plant-events"
    assert "s3cret" not in repr(config)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(5, "5"), ("5.0", "5"), ("3.1.1", "3.1.1"), (311, "3.1.1"), ("MQTTv5", "5")],
)
def test_protocol_spellings(tmp_path: Path, value: object, expected: str) -> None:
    config = load(tmp_path, f"gateway: mqtt\nname: s\nmqtt: {{protocol: {value}}}\n")
    assert config.mqtt.protocol == expected


def test_every_error_with_its_key_path(tmp_path: Path) -> None:
    found = errors(
        tmp_path,
        """
gateway: mqtt
name: sensors
mqtt:
  port: 0
  protocol: 4.5
  keepalive: -1
  colour: blue
  subscriptions:
    - {topic: "a/#/b", qos: 3}
    - {topic: "$share//x", channel: "bad channel"}
    - {topic: "ok", retain_handling: sometimes}
  will: {topic: "status/+"}
""",
    )
    assert found == [
        "mqtt.port: Input should be greater than or equal to 1",
        "mqtt.protocol: Input should be '3.1.1' or '5'",
        "mqtt.keepalive: Input should be greater than or equal to 0",
        "mqtt.will.topic: topic 'status/+' must not contain the wildcards '+' or '#'",
        "mqtt.subscriptions[0].topic: topic filter 'a/#/b': '#' must be the whole last level",
        "mqtt.subscriptions[0].qos: must be 0, 1 or 2",
        "mqtt.subscriptions[1].topic: shared subscription '$share//x' needs a group name "
        "without '+' or '#': $share/GROUP/FILTER",
        "mqtt.subscriptions[2].retain_handling: Input should be a valid integer, unable to "
        "parse string as an integer",
        "mqtt.colour: Extra inputs are not permitted",
    ]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("{receive_maximum: 500, max_pending: 100}", "max_pending must not be below"),
        ("{protocol: 3.1.1, session_expiry: 60}", "session_expiry needs protocol 5"),
        ("{protocol: 3.1.1, id_property: msg-id}", "id_property needs protocol 5"),
        (
            "{protocol: 3.1.1, subscriptions: [{topic: a, no_local: true}]}",
            "subscriptions[0]: no_local, retain_as_published and retain_handling need protocol 5",
        ),
        ("{password: x}", "password needs username"),
        ("{reconnect: {initial: 5, maximum: 1}}", "reconnect.maximum must not be below"),
        ("{tls: {key_file: k.pem}}", "key_file needs cert_file"),
        ("{subscriptions: [{topic: $share/g/a, no_local: true}]}", "no_local cannot be set"),
        ("{subscriptions: [{topic: a, channel: 'x!y'}]}", "channel: must be letters"),
    ],
)
def test_cross_field_errors(tmp_path: Path, section: str, message: str) -> None:
    found = errors(tmp_path, f"gateway: mqtt\nname: s\nmqtt: {section}\n")
    assert len(found) == 1 and message in found[0], found


def test_secrets_stay_out_of_errors(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("hunter2-very-secret")
    found = errors(
        tmp_path,
        f"gateway: mqtt\nname: s\nmqtt: {{password_file: {secret}, port: banana}}\n",
    )
    assert "hunter2" not in "\n".join(found)
    found = errors(tmp_path, "gateway: mqtt\nname: s\nmqtt: {password_file: /no/such/file}\n")
    assert found == ["mqtt: password_file: cannot read /no/such/file: No such file or directory"]


def test_wrong_gateway_kind(tmp_path: Path) -> None:
    assert errors(tmp_path, "gateway: email\nname: s\nmqtt: {}\n") == [
        "gateway: Input should be 'mqtt'"
    ]


def test_example_integration_file() -> None:
    config = load_config(EXAMPLES / "sensors.yaml", MqttGatewayConfig, env={"MQTT_PORT": "18830"})
    assert config.name == "sensors" and config.mqtt.broker_port == 18830
    assert not config.mqtt.clean_start and config.mqtt.session_expiry_seconds == 3600
    assert [s.topic for s in config.mqtt.subscriptions] == ["sensors/+/+", "sensors-control/+"]
