"""core.consumers: commands checked before they leave, results awaited on a channel of their own.

The gateway answering here is a real one (the scheduler, which needs no outside server) running
in this process, on the in-memory layer and on the streams layer over a real Redis.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from channels.layers import InMemoryChannelLayer

from core.consumers import (
    CommandFailed,
    Commands,
    InvalidCommand,
    ResultTimeout,
    command,
    validate,
)
from core.layers import resolve_layer
from core.testing import RedisServer, run_gateway
from gateways.scheduler.config import SchedulerGatewayConfig
from gateways.scheduler.consumers import SchedulerCommands
from gateways.scheduler.gateway import SchedulerGateway

pytestmark = pytest.mark.timeout(60)


def _keys_only(body: Mapping[str, Any]) -> None:
    unknown = set(body) - {"text"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}")


class ToyCommands(Commands):
    protocol = "toy"
    validators = {"toy.say": _keys_only}


async def first(layer: Any, channel: str) -> dict[str, Any]:
    message: dict[str, Any] = await asyncio.wait_for(layer.receive(channel), 10)
    return message


def test_command_leaves_out_unset_keys() -> None:
    assert command("toy.say", text="hi", extra=None) == {"type": "toy.say", "text": "hi"}
    assert command("toy.say", id=7, result_channel="r") == {
        "type": "toy.say",
        "id": 7,
        "result_channel": "r",
    }


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ({"type": "other.say"}, "unknown command type 'other.say' for the toy gateway"),
        ({"type": "toy.say", "id": {"no": 1}}, "'id' must be a string or an integer"),
        ({"type": "toy.say", "result_channel": ""}, "'result_channel' must be a non-empty"),
        ({"type": "toy.shout"}, "unknown command 'toy.shout' (this gateway takes toy.say)"),
        ({"type": "toy.say", "txt": "hi"}, "toy.say: unknown keys ['txt']"),
        ({"type": "toy.say", "text": datetime.date(2026, 1, 1)}, "toy.say.text: date is not"),
    ],
)
def test_validate_refuses_what_the_gateway_would(message: dict[str, Any], error: str) -> None:
    with pytest.raises(InvalidCommand) as refused:
        validate(message, "toy", ToyCommands.validators)
    assert error in str(refused.value)


def test_the_gateways_reason_is_chained() -> None:
    with pytest.raises(InvalidCommand) as refused:
        ToyCommands.check({"type": "toy.say", "txt": "hi"})
    assert isinstance(refused.value.__cause__, ValueError)


async def test_nothing_is_sent_when_a_command_is_refused() -> None:
    layer = InMemoryChannelLayer()
    toy = ToyCommands(layer, "toy.send")
    with pytest.raises(InvalidCommand):
        await toy.submit({"type": "toy.say", "txt": "typo"})
    with pytest.raises(InvalidCommand, match="leave result_channel out"):
        await toy.submit({"type": "toy.say", "result_channel": "mine"}, wait=True)
    await toy.submit({"type": "toy.say", "text": "the first one sent"})
    assert await first(layer, "toy.send") == {"type": "toy.say", "text": "the first one sent"}


@pytest.fixture
async def scheduler(tmp_path: Path) -> AsyncIterator[tuple[SchedulerGateway, Any]]:
    layer = InMemoryChannelLayer(capacity=100)
    config = {
        "gateway": "scheduler",
        "name": "timers",
        "shutdown_grace": 5,
        "scheduler": {
            "tick": 0.3,
            "state_file": str(tmp_path / "state.sqlite3"),
            "schedules": {"nightly": {"cron": "0 3 * * *"}},
        },
    }
    gateway = SchedulerGateway(SchedulerGatewayConfig.model_validate(config), layer)
    async with run_gateway(gateway):
        yield gateway, layer


async def test_wait_returns_the_gateways_result(
    scheduler: tuple[SchedulerGateway, Any],
) -> None:
    _, layer = scheduler
    timers = SchedulerCommands(layer, "timers.send")
    result = await timers.add("reminder", in_=3600, wait=True)
    assert result is not None
    assert (result["type"], result["ok"], result["created"]) == ("scheduler.result", True, True)
    assert isinstance(result["next_fire"], float)
    again = await timers.add("reminder", in_=3600, id="mine", wait=True)
    assert again is not None
    assert (again["id"], again["created"]) == ("mine", False)  # the caller's id is kept


async def test_ok_false_raises_with_the_gateways_error(
    scheduler: tuple[SchedulerGateway, Any],
) -> None:
    _, layer = scheduler
    timers = SchedulerCommands(layer, "timers.send")
    with pytest.raises(CommandFailed) as failed:
        await timers.remove("nightly", id=42, wait=True)
    assert failed.value.error == "schedule: 'nightly' is a YAML schedule; edit the file"
    assert failed.value.id == "42"
    assert failed.value.result["ok"] is False
    assert "scheduler.remove (id=42) failed: schedule: 'nightly'" in str(failed.value)


async def test_no_result_in_time_raises_result_timeout() -> None:
    layer = InMemoryChannelLayer()
    nobody = SchedulerCommands(layer, "nobody-reads-this.send")
    with pytest.raises(ResultTimeout, match=r"no scheduler\.result for scheduler\.remove"):
        await nobody.remove("x", wait=True, timeout=0.5)
    # the command went out; only its answer did not come
    sent = await first(layer, "nobody-reads-this.send")
    assert sent["type"] == "scheduler.remove" and sent["result_channel"].startswith("specific")


async def test_wait_over_the_streams_layer(redis_server: RedisServer, tmp_path: Path) -> None:
    """The result comes back on a process-local channel of the consumer's own layer instance."""
    config = {
        "gateway": "scheduler",
        "name": "streams-timers",
        "shutdown_grace": 5,
        "scheduler": {"tick": 0.3},
    }
    gateway_layer, consumer_layer = resolve_layer(redis_server.url), resolve_layer(redis_server.url)
    gateway = SchedulerGateway(SchedulerGatewayConfig.model_validate(config), gateway_layer)
    try:
        async with run_gateway(gateway):
            timers = SchedulerCommands(consumer_layer, "streams-timers.send")
            results = await asyncio.gather(
                *(timers.add(f"one-{i}", in_="1h", wait=True) for i in range(5))
            )
            assert [r["schedule"] for r in results if r] == [f"one-{i}" for i in range(5)]
            listed = await timers.list("one-", wait=True)
            assert listed is not None and len(listed["schedules"]) == 5
            assert consumer_layer.receive_buffer == {}  # nothing left behind for dead channels
    finally:
        for layer in (gateway_layer, consumer_layer):
            await layer.close_pools()
