"""core.stall: when refusals become a stall, and when the stall is over (time injected)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from channels.exceptions import ChannelFull
from channels.layers import InMemoryChannelLayer

from core.metrics import GatewayMetrics
from core.service import EventBuffer
from core.stall import StallTracker
from core.testing import metric, until
from tests.core.test_service import EchoConfig, EchoGateway


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(name: str, held: list[int] | None = None) -> tuple[StallTracker, Clock]:
    clock = Clock()
    counts = held if held is not None else None
    tracker = StallTracker(
        name,
        logging.getLogger("gateway.test"),
        GatewayMetrics(name),
        held=(lambda: counts[0]) if counts is not None else None,
        clock=clock,
    )
    return tracker, clock


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_short_backpressure_is_not_a_stall(caplog: pytest.LogCaptureFixture) -> None:
    tracker, clock = make("brief")
    tracker.wait_started()
    tracker.refused("ch", ChannelFull())
    clock.now += 0.5
    tracker.wait_ended()
    tracker.accepted()
    clock.now += 5
    tracker.tick()
    assert not tracker.stalled and tracker.reason() is None
    assert metric("gateway_stalls_total", gateway="brief") == 0
    assert warnings(caplog) == []


def test_one_warning_at_start_and_one_at_end(caplog: pytest.LogCaptureFixture) -> None:
    held = [0]
    tracker, clock = make("long", held)
    tracker.wait_started()
    for _ in range(20):  # refusals that last: many retries, one stall
        held[0] += 10
        tracker.refused("sensors", ChannelFull())
        clock.now += 0.5
        tracker.tick()
    assert tracker.stalled
    assert tracker.reason() == (
        "stalled for 10 s, holding 200 message(s): layer full on channel 'sensors'"
    )
    assert tracker.reason(detail=False) == "stalled: layer full on channel 'sensors'"
    assert metric("gateway_stalled", gateway="long") == 1
    assert metric("gateway_held_messages", gateway="long") == 200
    tracker.wait_ended()
    tracker.accepted()
    held[0] = 150
    clock.now += 0.5
    tracker.accepted()  # the backlog drains: acceptances keep coming, no refusal
    tracker.tick()
    assert tracker.stalled  # not STALL_CLEAR since the first acceptance yet
    clock.now += 0.6
    tracker.accepted()
    tracker.tick()
    assert not tracker.stalled
    lines = warnings(caplog)
    assert len(lines) == 2, lines
    assert lines[0].startswith("long: stalled: layer full on channel 'sensors'")
    assert lines[1].startswith("long: stall over after 10.0 s: 20 refusal(s)")
    assert "at most 200 message(s) held" in lines[1]
    assert metric("gateway_stalls_total", gateway="long") == 1
    assert metric("gateway_stalled", gateway="long") == 0
    assert 10 <= metric("gateway_stalled_seconds_total", gateway="long") <= 12


def test_a_refusal_while_recovering_keeps_the_stall() -> None:
    tracker, clock = make("flaps")
    tracker.wait_started()
    tracker.refused("ch", OSError("down"))
    clock.now += 2
    tracker.refused("ch", OSError("down"))
    assert tracker.stalled and "layer unreachable (OSError)" in (tracker.reason() or "")
    tracker.accepted()
    clock.now += 0.5
    tracker.refused("ch", ChannelFull())
    clock.now += 0.8
    tracker.tick()
    assert tracker.stalled
    assert metric("gateway_stalls_total", gateway="flaps") == 1


def test_stall_ends_when_nothing_is_held_any_more() -> None:
    # an SMTP client answered 451 goes away: the gateway holds nothing, nothing is refused
    tracker, clock = make("gave-up")
    tracker.wait_started()
    tracker.refused("mail", ChannelFull())
    clock.now += 1.5
    tracker.tick()
    assert tracker.stalled
    tracker.wait_ended()  # publish() gave up: 451
    clock.now += 1.1
    tracker.tick()
    assert not tracker.stalled


async def test_every_gateway_reports_its_stall_through_publish(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # any gateway, no code of its own: the layer refuses, publish() waits, /readyz says why
    gateway = EchoGateway(EchoConfig(name="any"), InMemoryChannelLayer(capacity=1))
    assert await gateway.publish(gateway.event("first"))
    waiting = asyncio.create_task(gateway.publish(gateway.event("second")))

    def ticked(stalled: bool) -> bool:
        gateway.stall.tick()  # what the readiness watcher does twice a second
        return gateway.stall.stalled is stalled

    await until(lambda: ticked(True), what="the stall")
    (reason,) = [r for r in gateway.ready_reasons() if "stalled" in r]
    assert reason.startswith("any: stalled for ")
    assert reason.endswith("s, holding 1 message(s): layer full on channel 'any'")
    assert metric("gateway_held_messages", gateway="any") == 1
    assert (await gateway.layer.receive("any"))["type"] == "echo.first"
    assert await asyncio.wait_for(waiting, 10)
    await until(lambda: ticked(False), what="the end of the stall")
    assert not any("stalled" in reason for reason in gateway.ready_reasons())
    assert len(warnings(caplog)) == 2


async def test_events_queued_in_an_event_buffer_count_as_held() -> None:
    # IRC, Slack and MQTT's QoS 0 queue in an EventBuffer: what waits there is held back too
    gateway = EchoGateway(EchoConfig(name="buffered"), InMemoryChannelLayer(capacity=1))
    buffer = EventBuffer(gateway, capacity=10)
    for n in range(3):
        assert buffer.put(gateway.event(f"queued-{n}"))
    assert gateway.held_messages() == 3
    assert metric("gateway_held_messages", gateway="buffered") == 3
