"""Stall tracking: is the gateway holding inbound events back because the layer refuses them?

Every gateway hands events to the layer through :meth:`core.service.Gateway.publish`, which
reports each refusal (``ChannelFull``, an unreachable layer) and each accepted event here. A
short refusal is ordinary backpressure; a *stall* is refusals that last:

* it **starts** when a refused event has waited :data:`STALL_AFTER` seconds (one WARNING line);
* it **ends** once the layer accepted an event and refused none in the :data:`STALL_CLEAR`
  seconds after it, or once nothing is held any more and nothing was refused for that long (an SMTP
  client that got 451 and went away); one WARNING line with the duration and the counts.

Between the two lines ``/readyz`` answers 503 with :meth:`StallTracker.reason` (``holding 812
message(s): layer full on channel 'sensors'``) and the metrics say so: ``gateway_stalled``
(gauge), ``gateway_stalls_total``, ``gateway_stalled_seconds_total`` and
``gateway_held_messages`` (gauge, at every scrape). Nothing is logged per message.

The time source is injectable (``clock``) so the state machine is tested without sleeping;
:meth:`StallTracker.tick` runs from the gateway's readiness watcher (every 0.5 s) and is what
notices the end of a stall when no event is moving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

from channels.exceptions import ChannelFull

from core.metrics import GatewayMetrics

__all__ = ["STALL_AFTER", "STALL_CLEAR", "StallTracker"]

#: seconds a refused event must wait before the gateway calls it a stall
STALL_AFTER: Final = 1.0
#: seconds without a refusal (after an accepted event, or with nothing held) that end a stall
STALL_CLEAR: Final = 1.0


class StallTracker:
    """The stall state of one gateway; see the module docstring."""

    def __init__(
        self,
        name: str,
        log: logging.Logger,
        metrics: GatewayMetrics,
        *,
        held: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        after: float = STALL_AFTER,
        clear: float = STALL_CLEAR,
    ) -> None:
        self.name = name
        self.log = log
        self.metrics = metrics
        self.clock = clock
        self.after = after
        self.clear = clear
        #: publish() calls currently waiting after a refusal
        self.waiting = 0
        #: when the current stall started (None: not stalled)
        self.stalled_since: float | None = None
        self._held = held
        self._episode: float | None = None  # first refusal while not stalled
        self._last_refusal = -1.0
        self._last_accept = -1.0
        self._recovering: float | None = None  # the first acceptance since the last refusal
        self._accounted = 0.0  # stalled seconds already added to the counter
        self._refusals = 0
        self._accepted = 0
        self._peak = 0
        self._channel = ""
        self._why = ""
        #: what the transport does meanwhile, in the stall WARNING (a gateway says its own way)
        self.pushback = "the transport is pushed back until the layer takes events again"
        metrics.held.set_function(self.held)

    def held(self) -> int:
        """Messages the gateway holds back now: the gateway's own count, else the waiters."""
        return self._held() if self._held is not None else self.waiting

    @property
    def stalled(self) -> bool:
        return self.stalled_since is not None

    def reason(self, *, detail: bool = True) -> str | None:
        """Why /readyz is red, or None when not stalled; ``detail=False``: without the counts."""
        if self.stalled_since is None:
            return None
        if not detail:
            return f"stalled: {self._why} on channel {self._channel!r}"
        seconds = self.clock() - self.stalled_since
        return (
            f"stalled for {seconds:.0f} s, holding {self.held()} message(s): "
            f"{self._why} on channel {self._channel!r}"
        )

    # -- reports from publish() ---------------------------------------------------------------

    def wait_started(self) -> None:
        """A publish() call got its first refusal and waits."""
        self.waiting += 1

    def wait_ended(self) -> None:
        """That call returned (accepted, gave up, or cancelled)."""
        self.waiting = max(0, self.waiting - 1)

    def refused(self, channel: str, error: BaseException) -> None:
        now = self.clock()
        self._last_refusal = now
        self._recovering = None
        self._channel = channel
        if isinstance(error, ChannelFull):
            self._why = "layer full"
        else:
            self._why = f"layer unreachable ({type(error).__name__})"
        if self.stalled_since is not None:
            self._refusals += 1
            return
        if self._episode is None:
            self._episode = now
            self._refusals = 0
        self._refusals += 1
        self._maybe_start(now)

    def accepted(self) -> None:
        now = self.clock()
        self._last_accept = now
        if self._recovering is None:
            self._recovering = now
        if self.stalled_since is not None:
            self._accepted += 1
        elif self.waiting == 0:
            self._episode = None  # ordinary backpressure, over before it was a stall

    # -- time ---------------------------------------------------------------------------------

    def tick(self) -> None:
        """Start, account for and end stalls as time passes (called every half second)."""
        now = self.clock()
        if self.stalled_since is None:
            if self._episode is not None and self.waiting == 0 and self.held() == 0:
                self._episode = None
            self._maybe_start(now)
            return
        self._peak = max(self._peak, self.held())
        self._account(now)
        recovered = self._recovering is not None and now - self._recovering >= self.clear
        idle = self.waiting == 0 and self.held() == 0 and now - self._last_refusal >= self.clear
        if recovered or idle:
            self._end(now)

    def _maybe_start(self, now: float) -> None:
        if self._episode is None or self.waiting == 0 or now - self._episode < self.after:
            return
        self.stalled_since = self._episode
        self._accounted = self._episode
        self._accepted = 0
        self._peak = self.held()
        self.metrics.stalled.set(1)
        self.metrics.stalls.inc()
        self._account(now)
        self.log.warning(
            "%s: stalled: %s on channel %r for %.1f s; holding %d message(s) back, %s",
            self.name,
            self._why,
            self._channel,
            now - self._episode,
            self._peak,
            self.pushback,
        )

    def _account(self, now: float) -> None:
        if now > self._accounted:
            self.metrics.stalled_seconds.inc(now - self._accounted)
            self._accounted = now

    def _end(self, now: float) -> None:
        assert self.stalled_since is not None
        end = self._recovering if self._recovering is not None else self._last_refusal
        duration = max(0.0, end - self.stalled_since)
        self.log.warning(
            "%s: stall over after %.1f s: %d refusal(s) on channel %r, at most %d message(s) "
            "held, %s",
            self.name,
            duration,
            self._refusals,
            self._channel,
            self._peak,
            "the layer takes events again" if self._accepted else "nothing held any more",
        )
        self.stalled_since = None
        self._episode = None
        self.metrics.stalled.set(0)
