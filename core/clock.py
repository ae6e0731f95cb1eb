"""Time as an injectable dependency: what paces, schedules and times out asks a :class:`Clock`.

Production code uses :data:`LOOP_CLOCK` (the event loop's monotonic time and ``asyncio.sleep``;
``time.time()`` for wall-clock epoch seconds). Tests pass :class:`core.testing.ManualClock`,
which only moves when the test says so, so a pacer or a scheduler is tested without waiting and
without asserting on timings.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

__all__ = ["LOOP_CLOCK", "Clock", "LoopClock"]


class Clock(Protocol):
    """Monotonic time to measure with, wall time to name instants with, and a way to wait."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for intervals and deadlines)."""

    def wall(self) -> float:
        """Epoch seconds (for ``time`` keys and schedules); may jump."""

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` without blocking the event loop."""


class LoopClock:
    """The real clock: the running loop's time, ``time.time()`` and ``asyncio.sleep``."""

    def monotonic(self) -> float:
        return asyncio.get_running_loop().time()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


#: the clock everything uses unless a test injects another
LOOP_CLOCK: Clock = LoopClock()
