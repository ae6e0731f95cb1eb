"""YAML configuration (DESIGN §6): one file per integration, validated all at once.

Loading goes: ``yaml.safe_load`` → ``${VAR}`` / ``${VAR:-default}`` expanded inside string values
(never in keys, and never re-parsed as YAML, so a variable cannot inject structure; ``$$`` is a
literal ``$``) → CLI overrides → a pydantic model that rejects unknown keys. Every problem is
reported in one :class:`ConfigError`, one line per problem, each starting with its key path
(``mqtt.subscriptions[0].qos: …``). Secret values never appear in these messages: pydantic is
told not to echo inputs, and every ``SecretStr`` found is registered with the log redactor.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Self, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from core.logs import register_secret
from core.types import check_channel_name

__all__ = [
    "MAX_EVENT_PAYLOAD",
    "MAX_MESSAGE_BYTES",
    "ConfigError",
    "GatewayConfig",
    "HealthConfig",
    "PaceBurst",
    "PaceRate",
    "ReconnectConfig",
    "Section",
    "YamlType",
    "load_config",
    "peek_gateway",
    "read_secret_files",
]

ConfigT = TypeVar("ConfigT", bound="GatewayConfig")

#: the largest message (packed) a gateway puts on the layer (DESIGN §3); size limits in a
#: gateway's config derive from it. channels_redis and msgpack cope with more, but a message
#: this large stalls every consumer
MAX_MESSAGE_BYTES = 1024 * 1024
#: the largest payload (an HTTP body, a WebSocket frame) a gateway puts in one event: the
#: message limit less 64 KiB left for the envelope and the event's other keys
MAX_EVENT_PAYLOAD = MAX_MESSAGE_BYTES - 64 * 1024

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True)
class YamlType:
    """``Annotated`` metadata: what the configuration reference calls a type whose YAML form
    is not its Python one, e.g. ``Annotated[float, BeforeValidator(parse_duration),
    YamlType("duration")]`` (read from ``30s``, held as seconds). Pydantic ignores it."""

    name: str


class ConfigError(Exception):
    """The configuration is invalid. ``errors`` holds one line per problem."""

    def __init__(self, source: str, errors: Sequence[str]) -> None:
        self.source = source
        self.errors = list(errors)
        super().__init__("\n".join(f"{source}: {e}" for e in self.errors))


class Section(BaseModel):
    """Base for every YAML section: frozen, unknown keys rejected, inputs never echoed.

    ``secret_files = ("password",)`` lets the YAML give ``password_file: PATH`` instead of
    ``password:`` (:func:`read_secret_files`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)
    #: keys that may instead be read from the file named by ``<key>_file``
    secret_files: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _read_secret_files(cls, data: Any) -> Any:
        return read_secret_files(data, *cls.secret_files) if cls.secret_files else data


class HealthConfig(Section):
    """``health:`` — the optional /healthz, /readyz and /metrics server."""

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(ge=0, le=65535, description="TCP port; 0 picks a free one.")


class ReconnectConfig(Section):
    """``<proto>.reconnect`` of a client-side gateway: capped, jittered backoff between
    connection attempts (:class:`core.retry.Backoff`, driven by :mod:`core.client`).

    A gateway with other defaults subclasses it and declares the two fields again.
    """

    initial: float = Field(default=1.0, gt=0, description="First delay (s).")
    maximum: float = Field(default=60.0, gt=0, description="Largest delay (s).")

    @model_validator(mode="after")
    def _cap_not_below_start(self) -> Self:
        if self.maximum < self.initial:
            raise ValueError("maximum must not be below initial")
        return self


#: a :class:`core.pacer.Pacer`'s ``rate`` as a config field (IRC ``flood``, Slack ``pacing``):
#: sends per second after the burst. The section gives its default and description
PaceRate = Annotated[float, Field(gt=0, le=1000)]
#: a :class:`core.pacer.Pacer`'s ``burst``: sends that may leave at once. The section gives its
#: default, description and upper bound (``le``)
PaceBurst = Annotated[int, Field(ge=1)]


class GatewayConfig(Section):
    """The keys every integration file has; each gateway adds its ``<proto>:`` section."""

    gateway: str = Field(description="Which gateway this file configures (email, mqtt, …).")
    name: str = Field(
        description="Integration name: the default inbound channel (NAME) and command channel "
        "(NAME.send)."
    )
    layer: str | None = Field(
        None,
        description="Layer path: redis://…, memory://, django[:ALIAS] or module:attr "
        "(docs/layers.md); --layer overrides it, GATEWAYS_LAYER stands in when it is absent.",
    )
    channel: str | None = Field(None, description="Inbound channel; default: the name.")
    # the YAML key is `command_channel`; the resolved name is the `command_channel` property
    command_channel_setting: str | None = Field(
        None, alias="command_channel", description="Command channel; default NAME.send."
    )
    routes: dict[str, str] = Field(
        default_factory=dict,
        description="Per event type inbound channel, e.g. {mqtt.connect: ops}.",
    )
    health: HealthConfig | None = Field(
        None, description="Serve /healthz, /readyz and /metrics (Prometheus); off when absent."
    )
    shutdown_grace: float = Field(
        10.0, gt=0, description="Seconds to drain in-flight work on SIGTERM before cancelling."
    )
    inbound_capacity: int | None = Field(
        100_000,
        gt=0,
        description="Messages each channel this integration sends inbound events to may hold "
        "on the streams layer (redis://) before the gateway pushes back; a burst waits in "
        "Redis instead of at the transport. null: the layer's own capacity.",
    )

    _check_names = field_validator("name", "channel", "command_channel_setting")(check_channel_name)

    @field_validator("routes")
    @classmethod
    def _check_routes(cls, value: dict[str, str]) -> dict[str, str]:
        for target in value.values():
            check_channel_name(target)
        return value

    @property
    def inbound_channel(self) -> str:
        """Where inbound events go unless ``routes`` says otherwise."""
        return self.channel or self.name

    @property
    def command_channel(self) -> str:
        """Where consumers send commands for this integration (YAML ``command_channel``)."""
        return self.command_channel_setting or f"{self.name}.send"

    def route(self, event_type: str) -> str:
        """The channel an inbound event of ``event_type`` goes to."""
        return self.routes.get(event_type, self.inbound_channel)

    def consumer_channels(self) -> list[str]:
        """Every channel a worker must listen on to see this integration's events."""
        return sorted({self.inbound_channel, *self.routes.values()})


def read_secret_files(data: Any, *names: str) -> Any:
    """For a ``mode="before"`` validator: fill ``NAME`` from the file named by ``NAME_file``.

    Trailing newlines are stripped. Setting both is an error; so is an unreadable file (the
    message names the path, never the content).
    """
    if not isinstance(data, Mapping):
        return data
    data = dict(data)
    for name in names:
        path = data.pop(f"{name}_file", None)
        if path is None:
            continue
        if data.get(name) is not None:
            raise ValueError(f"set either {name} or {name}_file, not both")
        try:
            data[name] = Path(str(path)).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ValueError(f"{name}_file: cannot read {path}: {exc.strerror}") from None
    return data


def _key_path(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _expand(
    node: Any,
    path: tuple[int | str, ...],
    env: Mapping[str, str],
    errors: list[str],
    missing: list[tuple[int | str, ...]] | None = None,
) -> Any:
    if isinstance(node, str):

        def substitute(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            name, default = match.group(1), match.group(2)
            value = env.get(name)
            if value is None or (value == "" and default is not None):
                if default is None:
                    errors.append(f"{_key_path(path)}: environment variable {name} is not set")
                    if missing is not None:
                        missing.append(path)
                    return ""
                return default
            return value

        return _VAR.sub(substitute, node)
    if isinstance(node, dict):
        return {k: _expand(v, (*path, str(k)), env, errors, missing) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v, (*path, i), env, errors, missing) for i, v in enumerate(node)]
    return node


def _caused_by(loc: tuple[int | str, ...], missing: Sequence[tuple[int | str, ...]]) -> bool:
    """Whether a validation error at ``loc`` is (or may be) caused by a missing variable.

    An error on the key itself or inside it, or on a section that holds it (a model-level
    check of that section), follows from the empty value put there.
    """
    for path in missing:
        shorter = min(len(loc), len(path))
        if loc[:shorter] == path[:shorter]:
            return True
    return False


def _read_yaml(path: Path) -> dict[str, Any]:
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [f"cannot read file: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(source, [f"not UTF-8 text (byte {exc.start})"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(source, [f"{where}invalid YAML: {problem}"]) from None
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): must be a mapping of keys to values"])
    return data


def peek_gateway(path: str | os.PathLike[str]) -> str:
    """The ``gateway:`` key of a file, to pick the gateway class before full validation."""
    data = _read_yaml(Path(path))
    kind = data.get("gateway")
    if not isinstance(kind, str):
        raise ConfigError(str(path), ["gateway: required (email, mqtt, …)"])
    return kind


def _register_secrets(node: Any) -> None:
    if isinstance(node, SecretStr):
        register_secret(node.get_secret_value())
    elif isinstance(node, BaseModel):
        for name in type(node).model_fields:
            _register_secrets(getattr(node, name))
    elif isinstance(node, dict):
        for value in node.values():
            _register_secrets(value)
    elif isinstance(node, list | tuple):
        for value in node:
            _register_secrets(value)


def load_config(
    path: str | os.PathLike[str],
    model: type[ConfigT],
    *,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> ConfigT:
    """Load, expand and validate one integration file; raise :class:`ConfigError`.

    ``overrides`` are top-level keys set by the command line (``{"layer": "memory://"}``);
    ``None`` values are ignored so an absent flag keeps the YAML value.
    """
    source = str(path)
    data = _read_yaml(Path(path))
    errors: list[str] = []
    missing: list[tuple[int | str, ...]] = []
    data = _expand(data, (), os.environ if env is None else env, errors, missing)
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    try:
        config = model.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors(include_input=False, include_url=False):
            if _caused_by(tuple(error["loc"]), missing):
                continue  # the empty value of a missing variable: its cause is reported
            message = error["msg"].removeprefix("Value error, ")
            errors.append(f"{_key_path(error['loc'])}: {message}")
    if errors:
        raise ConfigError(source, errors)
    _register_secrets(config)
    return config
