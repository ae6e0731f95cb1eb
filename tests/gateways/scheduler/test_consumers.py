"""gateways/scheduler/consumers.py: datetime and timedelta arguments, SchedulerConsumer.later."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from core.consumers import InvalidCommand
from gateways.irc.consumers import irc_send
from gateways.scheduler.consumers import SchedulerConsumer, scheduler_add
from tests.gateways.conftest import Handle, sent


def test_python_times_become_what_the_command_takes() -> None:
    later = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    added = scheduler_add(
        "x", at=later, jitter=timedelta(seconds=90), misfire_grace=timedelta(minutes=5)
    )
    assert (added["at"], added["jitter"], added["misfire_grace"]) == (later.timestamp(), 90, 300)
    naive = scheduler_add("y", every="1h", start=datetime(2030, 1, 1), timezone="Europe/Berlin")
    assert naive["start"] == "2030-01-01T00:00:00"  # read in the schedule's zone, as in YAML


def test_another_gateways_command_as_the_message() -> None:
    added = scheduler_add(
        "standup", cron="0 9 * * mon-fri", channel="ops-irc.send", message=irc_send("#ops", "!")
    )
    assert added["message"] == {
        "type": "irc.send",
        "target": "#ops",
        "text": "!",
        "kind": "message",
    }


def test_a_past_at_is_left_to_the_gateway_but_a_bad_one_is_not() -> None:
    assert scheduler_add("old", at=0)["at"] == 0  # the gateway's misfire_grace decides
    with pytest.raises(InvalidCommand, match="at: 'tomorrow' is not an ISO 8601 date-time"):
        scheduler_add("bad", at="tomorrow")


class Reminder(SchedulerConsumer):
    async def scheduler_fire(self, message: dict[str, Any]) -> None:
        await self.later("10m", {"note": "again"}, schedule=f"again.{message['id']}")


async def test_later_schedules_a_one_shot_back_to_this_channel(handle: Handle) -> None:
    fire = {"type": "scheduler.fire", "id": "tick@1.000", "reply_channel": "timers.send"}
    reminder = await handle(Reminder, fire, channel="reminders")
    assert await sent(reminder, "timers.send") == scheduler_add(
        "again.tick@1.000", in_="10m", channel="reminders", message={"note": "again"}
    )
