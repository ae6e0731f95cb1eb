"""The scheduler: section as loaded from YAML: defaults, time values, errors with key paths."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from core.config import ConfigError, load_config
from gateways.scheduler.config import SchedulerGatewayConfig


def load(tmp_path: Path, body: str) -> SchedulerGatewayConfig:
    path = tmp_path / "timers.yaml"
    path.write_text("gateway: scheduler\nname: timers\n" + body)
    return load_config(path, SchedulerGatewayConfig)


def test_defaults_and_section_defaults_reach_each_schedule(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
scheduler:
  misfire: skip
  misfire_grace: 2m
  tick: 2
  schedules:
    a: {every: 90s}
    b: {cron: "0 7 * * *", misfire: all, misfire_cap: 5, channel: other}
""",
    )
    settings = config.scheduler
    assert settings.lease_seconds == 3.0 and settings.max_in_flight == 100
    a, b = settings.specs(config.inbound_channel)
    assert (a.kind, a.every, a.misfire, a.misfire_grace, a.channel) == (
        "every",
        90.0,
        "skip",
        120.0,
        "timers",
    )
    assert (b.kind, b.misfire, b.misfire_cap, b.channel, b.timezone) == (
        "cron",
        "all",
        5,
        "other",
        "UTC",
    )


def test_unquoted_yaml_date_times_are_read_in_the_schedule_zone(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
scheduler:
  schedules:
    party: {at: 2099-12-31T23:00:00, timezone: Europe/Berlin}
    window: {every: 1h, start: 2099-01-01T00:00:00+05:00, end: "2099-02-01"}
""",
    )
    party, window = config.scheduler.specs("timers")
    berlin = ZoneInfo("Europe/Berlin")
    assert party.at == datetime(2099, 12, 31, 23, tzinfo=berlin).timestamp()
    assert window.start == datetime.fromisoformat("2099-01-01T00:00:00+05:00").timestamp()
    assert window.end == datetime.fromisoformat("2099-02-01T00:00:00+00:00").timestamp()


def test_every_error_is_reported_with_its_key_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(
            tmp_path,
            """
scheduler:
  misfire: sometimes
  schedules:
    a: {every: 1m, colour: red}
    b: {every: 1m, message: {schedule: x}}
    c: {every: 1m, message: {type: 3}}
    "bad id": {every: 1m}
    d: {cron: "0 7 * * *", start: "2030-01-02", end: "2030-01-01"}
""",
        )
    errors = "\n".join(info.value.errors)
    assert "scheduler.misfire: " in errors
    assert "scheduler.schedules.a.colour: " in errors
    assert (
        "scheduler.schedules.b.message: keys ['schedule'] are set by the scheduler.fire" in errors
    )
    assert "scheduler.schedules.c.message: type must be a string like email.send" in errors
    assert "scheduler.schedules.bad id.[key]: " in errors
    assert "scheduler.schedules.d: end must be after start" in errors


def test_a_past_at_loads_and_jitter_overlap_errors_name_their_key(tmp_path: Path) -> None:
    # a fired one-shot stays in the file: a restart must load it (the gateway skips it)
    config = load(tmp_path, "scheduler:\n  schedules:\n    once: {at: 2001-01-01T00:00:00Z}\n")
    (spec,) = config.scheduler.specs("timers")
    assert spec.at == datetime.fromisoformat("2001-01-01T00:00:00+00:00").timestamp()
    with pytest.raises(ConfigError) as info:
        load(
            tmp_path,
            """
scheduler:
  overlap: skip
  schedules:
    a: {every: 1m, jitter: 90s}
    b: {cron: "*/5 * * * *", jitter: 6m}
    c: {every: 1m, overlap: skip, message: {type: mqtt.publish, topic: t}}
    d: {every: 1m, overlap: often}
    typed: {every: 1m, message: {type: mqtt.publish, topic: t}}
""",
        )
    errors = "\n".join(info.value.errors)
    assert "scheduler.schedules.a.jitter: 90 s is longer than the interval" in errors
    assert "scheduler.schedules.b.jitter: 360 s is longer than the shortest" in errors
    assert "scheduler.schedules.c.overlap: skip needs runs" in errors
    assert "scheduler.schedules.d.overlap: " in errors
    assert "typed" not in errors  # the section's default overlap does not reach typed messages
