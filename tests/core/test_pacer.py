"""core.pacer.Pacer driven by a ManualClock: burst, steady rate, per key, bounded, ordered."""

from __future__ import annotations

import asyncio

import pytest

from core.envelope import CommandError
from core.metrics import GatewayMetrics
from core.pacer import Pacer, PacerFull
from core.testing import ManualClock, metric


async def sends(pacer: Pacer, clock: ManualClock, key: str, count: int) -> list[float]:
    """Start ``count`` senders on ``key``; return the clock time each one was let through."""
    times: list[float] = []

    async def send() -> None:
        await pacer.wait(key)
        times.append(clock.monotonic())

    tasks = [asyncio.create_task(send()) for _ in range(count)]
    await asyncio.sleep(0)
    while not all(t.done() for t in tasks):
        await clock.sleeping(1)
        await clock.advance(0.25)
    await asyncio.gather(*tasks)
    return times


async def test_burst_then_steady_rate() -> None:
    clock = ManualClock()
    pacer = Pacer(rate=2, burst=3, clock=clock)
    assert await sends(pacer, clock, "#a", 7) == [0, 0, 0, 0.5, 1.0, 1.5, 2.0]


async def test_keys_are_paced_independently() -> None:
    clock = ManualClock()
    pacer = Pacer(rate=1, burst=1, clock=clock)
    await pacer.wait("#a")
    assert pacer.delay("#a") == 1.0
    await asyncio.wait_for(pacer.wait("#b"), 1)  # not held up by #a: the clock never moved
    assert clock.monotonic() == 0


async def test_callers_go_in_order_and_the_loop_keeps_running() -> None:
    clock = ManualClock()
    pacer = Pacer(rate=1, burst=1, clock=clock)
    order: list[int] = []

    async def send(n: int) -> None:
        await pacer.wait("#a")
        order.append(n)

    tasks = [asyncio.create_task(send(n)) for n in range(5)]
    await clock.sleeping(4)
    assert order == [0]
    assert await asyncio.wait_for(asyncio.sleep(0, "the loop is free"), 1) == "the loop is free"
    for _ in range(4):
        await clock.advance(1)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]


async def test_a_full_queue_is_an_error_and_counted() -> None:
    clock = ManualClock()
    pacer = Pacer(rate=1, burst=1, queue=2, clock=clock, metrics=GatewayMetrics("paced"))
    await pacer.wait("#a")  # the token
    waiters = [asyncio.create_task(pacer.wait("#a")) for _ in range(2)]
    await clock.sleeping(2)
    with pytest.raises(PacerFull, match=r"too many messages waiting for '#a' \(2\)"):
        await pacer.wait("#a")
    assert issubclass(PacerFull, CommandError)  # a command handler answers ok: false
    assert metric("gateway_errors_total", gateway="paced", kind="pacer_full") == 1
    assert pacer.waiting("#a") == 2
    await clock.advance(2)
    await asyncio.gather(*waiters)
    await asyncio.wait_for(pacer.wait("#b"), 1)  # other keys were never affected


async def test_a_cancelled_waiter_never_speeds_up_the_rest() -> None:
    clock = ManualClock()
    pacer = Pacer(rate=1, burst=1, clock=clock)
    await pacer.wait("#a")
    first = asyncio.create_task(pacer.wait("#a"))
    await clock.sleeping(1)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    assert pacer.waiting("#a") == 0
    assert pacer.delay("#a") == 2.0  # the cancelled slot stays used


async def test_idle_keys_are_forgotten() -> None:
    clock = ManualClock()
    pacer = Pacer(rate=10, burst=1, clock=clock)
    for n in range(999):
        await pacer.wait(f"#{n}")
    assert len(pacer) == 999
    await clock.advance(1)
    await pacer.wait("#last")  # the 1000th call sweeps
    assert len(pacer) == 1


@pytest.mark.parametrize(
    "options", [{"rate": 0}, {"rate": 1, "burst": 0}, {"rate": 1, "queue": -1}]
)
def test_bad_settings(options: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="rate must be"):
        Pacer(**options)  # type: ignore[arg-type]
