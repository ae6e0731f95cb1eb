"""An async pacer: a token bucket per key, for IRC flood control and Slack per-channel pacing.

``burst`` sends may go at once; after that one each ``1 / rate`` seconds, per key (an IRC
target, a Slack channel; one key for a whole connection). ``await pacer.wait(key)`` returns when
this caller may send; it only ever awaits, so the event loop keeps running (the ``irc``
library's own limiter calls ``time.sleep``: never use it).

House rules:

* **Order**: callers of one key go in the order they called (each reserves its slot on entry:
  the GCRA form of a token bucket, so no task wakes up just to find the token gone).
* **Bounded**: at most ``queue`` callers wait per key. One more raises :class:`PacerFull` (a
  :class:`core.envelope.CommandError`, so a command handler that awaits the pacer answers
  ``ok: false`` with the reason), logged and counted in ``gateway_errors_total{kind="pacer_full"}``.
* **Never faster**: a waiter that is cancelled keeps its slot used, so cancellations can slow the
  pace but never break the server's limit.
* **Bounded memory**: keys whose bucket is full again and nobody waits on are forgotten.
* **Time is injected** (:class:`core.clock.Clock`), so tests drive it by hand.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final

from core.clock import LOOP_CLOCK, Clock
from core.envelope import CommandError
from core.metrics import GatewayMetrics

__all__ = ["Pacer", "PacerFull"]

#: forget idle keys after this many calls (an amortised sweep, not a timer)
_SWEEP_EVERY: Final = 1000

log = logging.getLogger("gateway.pacer")


class PacerFull(CommandError):
    """``queue`` callers already wait for this key; the text names the key."""


@dataclass
class _Bucket:
    #: when the next slot is free if the bucket were empty (GCRA's "theoretical arrival time")
    free_at: float
    waiting: int = 0


class Pacer:
    """A token bucket of ``burst`` tokens refilled at ``rate`` per second, per key."""

    def __init__(
        self,
        rate: float,
        burst: int = 1,
        *,
        queue: int = 100,
        clock: Clock = LOOP_CLOCK,
        metrics: GatewayMetrics | None = None,
        name: str = "pacer",
    ) -> None:
        if rate <= 0 or burst < 1 or queue < 0:
            raise ValueError("rate must be > 0, burst >= 1 and queue >= 0")
        self.rate = rate
        self.burst = burst
        self.queue = queue
        self.clock = clock
        self.metrics = metrics
        self.name = name
        self._interval = 1.0 / rate
        self._tolerance = (burst - 1) * self._interval
        self._buckets: dict[str, _Bucket] = {}
        self._calls = 0

    def __len__(self) -> int:
        """Keys currently remembered (for tests and metrics)."""
        return len(self._buckets)

    def waiting(self, key: str) -> int:
        """Callers waiting for ``key`` now."""
        bucket = self._buckets.get(key)
        return bucket.waiting if bucket is not None else 0

    def delay(self, key: str) -> float:
        """How long a caller arriving now would wait for ``key``."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return 0.0
        return max(0.0, bucket.free_at - self._tolerance - self.clock.monotonic())

    async def wait(self, key: str = "") -> None:
        """Return when the caller may send to ``key``; raise :class:`PacerFull` if too many wait."""
        now = self.clock.monotonic()
        self._calls += 1
        if self._calls % _SWEEP_EVERY == 0:
            self._sweep(now)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(free_at=now)
        start = max(bucket.free_at, now)
        delay = start - self._tolerance - now
        if delay > 0 and bucket.waiting >= self.queue:
            if self.metrics is not None:
                self.metrics.error("pacer_full")
            log.warning(
                "%s: refused a send to %r: %d already wait for it", self.name, key, bucket.waiting
            )
            raise PacerFull(f"too many messages waiting for {key!r} ({bucket.waiting}); try later")
        bucket.free_at = start + self._interval  # reserved now: callers keep their order
        if delay <= 0:
            return
        bucket.waiting += 1
        try:
            await self.clock.sleep(delay)
        finally:
            bucket.waiting -= 1

    def _sweep(self, now: float) -> None:
        idle = [k for k, b in self._buckets.items() if b.waiting == 0 and b.free_at <= now]
        for key in idle:
            del self._buckets[key]
