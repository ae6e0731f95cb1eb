"""A manual clock for tests: time moves only when the test says so."""

from __future__ import annotations

import asyncio
import heapq

from core.testing.base import WAIT


class ManualClock:
    """A :class:`core.clock.Clock` for tests: time stands still until :meth:`advance`.

    ``sleep()`` parks the caller until the clock is advanced past its deadline;
    :meth:`advance` wakes sleepers in deadline order and lets each run to its next ``await``.
    :meth:`sleeping` waits until ``count`` callers sleep, to synchronise with the code under
    test without a real delay.
    """

    def __init__(self, monotonic: float = 0.0, wall: float = 1_700_000_000.0) -> None:

        self._now = monotonic
        self._wall_offset = wall - monotonic
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = 0
        self._changed = asyncio.Event()

    def monotonic(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    @property
    def sleepers(self) -> int:
        """Callers parked in :meth:`sleep` now."""
        return sum(1 for _, _, future in self._sleepers if not future.done())

    async def sleep(self, seconds: float) -> None:
        import heapq

        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._seq += 1
        heapq.heappush(self._sleepers, (self._now + seconds, self._seq, future))
        self._changed.set()
        await future

    async def sleeping(self, count: int, timeout: float = WAIT) -> None:
        """Return once at least ``count`` callers sleep on this clock."""

        async def wait() -> None:
            while self.sleepers < count:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, waking every sleeper whose deadline passed."""

        target = self._now + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            when, _, future = heapq.heappop(self._sleepers)
            self._now = max(self._now, when)
            if not future.done():
                future.set_result(None)
                await _settle()
        self._now = target
        await _settle()


async def _settle(rounds: int = 10) -> None:
    """Let tasks that were just woken run up to their next real wait."""

    for _ in range(rounds):
        await asyncio.sleep(0)
