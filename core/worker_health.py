"""Health of a :class:`core.worker.ConsumerWorker`: /healthz, /readyz, /metrics for runworker.

A stuck or disconnected ``manage.py runworker`` was invisible to an orchestrator (issue 29;
channels' tracker has the same report: runworker "silently stopped processing"). With
``runworker --health-port N`` or the ``GATEWAYS_WORKER["HEALTH"]`` setting the worker serves,
on the gateways' own server (:class:`core.health.HealthServer`):

* ``/healthz``: 200 while the worker's event loop answers (the server runs on that loop);
* ``/readyz``: 200 ``ready`` once every channel's listener runs, the layer answers a PING
  (probed every :data:`PROBE_INTERVAL` s), no consumer has been busy with one message for more
  than ``stuck_after`` seconds, the layer reports no problem of its own
  (``layer.health_problems()``, where the layer has it) and nothing suggests the gateways use
  another layer (:mod:`core.layer_check`); else 503 with one line per reason;
* ``/metrics``: the process's Prometheus registry, with the worker's series below.

Series (``channel`` is one of the channels the worker was started with):

* ``gateway_worker_messages_total{channel, outcome}``: ``handled`` (the handler returned),
  ``failed`` (it raised), then for a failed one ``retried`` (delivered again) or
  ``dead_lettered`` (given up: sent to ``CHANNEL.dead``, or only logged);
* ``gateway_worker_handler_seconds{channel}``: how long each handler ran, failed ones too;
* ``gateway_worker_redeliveries_total{channel}``: messages the layer delivered again because
  an earlier consumer did not acknowledge them (``__delivery__`` above 1);
* ``gateway_worker_in_flight{channel}``: messages consumers hold now (taken, not finished).

:class:`WorkerHealth` is what the worker calls (a few hooks in core/worker.py); the rest of the
worker does not know it exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge, Histogram

from core.health import HealthServer
from core.layer_check import ChannelsRedisCheck
from core.layers import probe_layer
from core.metrics import REGISTRY
from core.retry import StartupError, cancel_and_wait, describe_error

if TYPE_CHECKING:
    from core.worker import ConsumerWorker, _Inbox

__all__ = ["PROBE_INTERVAL", "HealthSettings", "WorkerHealth"]

log = logging.getLogger("gateway.worker")

#: seconds between two PINGs of the layer (and two looks at readiness for the log lines)
PROBE_INTERVAL = 1.0
#: the key of a redelivered message (core.streams.DELIVERY_KEY; not imported: any layer)
_DELIVERY_KEY = "__delivery__"

_MESSAGES = Counter(
    "gateway_worker_messages",
    "Messages a ConsumerWorker's handlers took, by outcome (handled, failed, retried, "
    "dead_lettered)",
    ["channel", "outcome"],
    registry=REGISTRY,
)
_HANDLER_SECONDS = Histogram(
    "gateway_worker_handler_seconds",
    "Time one handler of a ConsumerWorker took for one message (failed ones too)",
    ["channel"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0),
    registry=REGISTRY,
)
_REDELIVERIES = Counter(
    "gateway_worker_redeliveries",
    "Messages the layer delivered again (an earlier consumer did not acknowledge them)",
    ["channel"],
    registry=REGISTRY,
)
_IN_FLIGHT = Gauge(
    "gateway_worker_in_flight",
    "Messages a ConsumerWorker's consumers hold now (taken, not finished)",
    ["channel"],
    registry=REGISTRY,
)


@dataclasses.dataclass(frozen=True)
class HealthSettings:
    """Where the worker serves /healthz, /readyz and /metrics, and when it counts as stuck.

    Django: ``GATEWAYS_WORKER = {"HEALTH": {"host": "127.0.0.1", "port": 9102,
    "stuck_after": 300}}``; ``runworker --health-port N --health-host H`` override the first two.
    """

    #: address the server listens on
    host: str = "127.0.0.1"
    #: its port (0: a free one, logged); ``None``: no server
    port: int | None = None
    #: seconds one handler may run on one message before /readyz calls the worker stuck
    stuck_after: float = 300.0

    def __post_init__(self) -> None:
        if self.port is not None and not 0 <= self.port <= 65535:
            raise ValueError(f"GATEWAYS_WORKER: HEALTH: port {self.port} is not a TCP port")
        if not self.host:
            raise ValueError("GATEWAYS_WORKER: HEALTH: host must not be empty")
        if not self.stuck_after > 0:
            raise ValueError("GATEWAYS_WORKER: HEALTH: stuck_after must be positive")

    @classmethod
    def from_settings(
        cls,
        options: Mapping[str, Any] | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
    ) -> HealthSettings:
        """``options`` (default: ``GATEWAYS_WORKER["HEALTH"]`` of Django's settings, when
        configured), then ``host`` / ``port`` where given. ``ValueError``: a bad setting."""
        if options is None:
            options = {}
            with contextlib.suppress(ImportError):
                from django.conf import settings

                if settings.configured:
                    worker = dict(getattr(settings, "GATEWAYS_WORKER", {}) or {})
                    options = worker.get("HEALTH") or {}
        if not isinstance(options, Mapping):
            raise ValueError("GATEWAYS_WORKER: HEALTH must be a dict (host, port, stuck_after)")
        known = {"host", "port", "stuck_after"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"GATEWAYS_WORKER: HEALTH: unknown key(s) {unknown}; known: {sorted(known)}"
            )
        values: dict[str, Any] = {}
        try:
            if "host" in options:
                values["host"] = str(options["host"])
            if options.get("port") is not None:
                values["port"] = int(options["port"])
            if "stuck_after" in options:
                values["stuck_after"] = float(options["stuck_after"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"GATEWAYS_WORKER: HEALTH: {exc}") from None
        if host is not None:
            values["host"] = host
        if port is not None:
            values["port"] = port
        return cls(**values)


@dataclasses.dataclass
class _Busy:
    """A message one consumer instance (a slot) is handling."""

    channel: str
    since: float
    what: str


class WorkerHealth:
    """Metrics, readiness and the health server of one :class:`ConsumerWorker`."""

    def __init__(self, worker: ConsumerWorker, settings: HealthSettings | None = None) -> None:
        self.worker = worker
        self.settings = settings if settings is not None else HealthSettings()
        #: the health server while :meth:`around` runs one (its ``port`` is the bound one)
        self.server: HealthServer | None = None
        self.layer_check = ChannelsRedisCheck("worker", worker.channel_layer, log)
        self._busy: dict[str, _Busy] = {}
        self._layer_problem: str | None = None
        self._probed = False

    # -- hooks called by ConsumerWorker --------------------------------------------------------

    def receiver(self, slot: str, inbox: _Inbox) -> Callable[[], Awaitable[dict[str, Any]]]:
        """The ``receive`` a consumer instance of ``slot`` gets: ``inbox.get``, observed.

        A consumer asks for its next message once its handler returned: that ends the one it
        held (``handled``); the message it gets next is in flight until then.
        """

        async def receive() -> dict[str, Any]:
            self._finished(slot, "handled")
            message = await inbox.get()
            channel = self.worker._channel_of(slot)
            self._busy[slot] = _Busy(channel, _now(), _describe(message))
            _IN_FLIGHT.labels(channel).inc()
            delivery = inbox.current
            redelivered = int(message.get(_DELIVERY_KEY, 1) or 1) > 1
            if redelivered and (delivery is None or delivery.attempt == 1):
                _REDELIVERIES.labels(channel).inc()  # not again for the worker's own retries
            return message

        return receive

    def ended(self, slot: str) -> None:
        """The consumer instance of ``slot`` ended (raised, or was cancelled) while it held a
        message: that handler ``failed``."""
        self._finished(slot, "failed")

    def retried(self, channel: str) -> None:
        _MESSAGES.labels(channel, "retried").inc()

    def dead_lettered(self, channel: str) -> None:
        _MESSAGES.labels(channel, "dead_lettered").inc()

    def _finished(self, slot: str, outcome: str) -> None:
        busy = self._busy.pop(slot, None)
        if busy is None:
            return
        _MESSAGES.labels(busy.channel, outcome).inc()
        _HANDLER_SECONDS.labels(busy.channel).observe(max(0.0, _now() - busy.since))
        _IN_FLIGHT.labels(busy.channel).dec()

    # -- readiness -----------------------------------------------------------------------------

    def ready_reasons(self) -> list[str]:
        """Everything that keeps /readyz from answering 200 (empty: ready)."""
        reasons: list[str] = []
        listeners = self.worker._listeners
        if not listeners or not self._probed:
            reasons.append("worker: starting")
        for channel, task in zip(self.worker.channels, listeners, strict=False):
            if task.done():
                error = None if task.cancelled() else task.exception()
                why = describe_error(error) if error is not None else "stopped"
                reasons.append(f"worker: listener for {channel!r} ended: {why}")
        if self._layer_problem is not None:
            reasons.append(f"worker: layer unreachable: {self._layer_problem}")
        now = _now()
        for busy in self._busy.values():
            if now - busy.since > self.settings.stuck_after:
                reasons.append(
                    f"worker: consumer on {busy.channel!r} has been handling {busy.what} for "
                    f"{now - busy.since:.0f} s (stuck_after: {self.settings.stuck_after:g} s)"
                )
        reasons += [f"worker: layer: {problem}" for problem in self._layer_problems()]
        reasons += [f"worker: {reason}" for reason in self.layer_check.reasons()]
        return reasons

    def _layer_problems(self) -> list[str]:
        """What the layer itself reports (``health_problems()``, e.g. core.streams'), if any."""
        problems = getattr(self.worker.channel_layer, "health_problems", None)
        if problems is None:
            return []
        try:
            return [str(problem) for problem in problems()]
        except Exception as exc:
            return [f"health_problems() failed: {describe_error(exc)}"]

    async def _monitor(self) -> None:
        """Probe the layer, run the layer check and log readiness changes, every second."""
        last: list[str] | None = None
        while True:
            self._layer_problem = await probe_layer(self.worker.channel_layer)
            self._probed = True
            if self._layer_problem is None:
                await self.layer_check.poll(self.worker.channels)
            reasons = self.ready_reasons()
            if reasons != last:
                if reasons:
                    log.info("worker not ready yet: %s", "; ".join(reasons))
                else:
                    log.info("worker ready: consuming %s", ", ".join(self.worker.channels))
                last = reasons
            await asyncio.sleep(PROBE_INTERVAL)

    # -- running -------------------------------------------------------------------------------

    async def around(self, main: Callable[[], Awaitable[None]]) -> None:
        """Run ``main()`` (the worker) with the readiness monitor and, when a port is set, the
        health server. ``StartupError`` when the server cannot listen (port taken)."""
        if self.settings.port is not None:
            server = HealthServer(self.settings.host, self.settings.port, [self.ready_reasons])
            try:
                await server.start()
            except OSError as exc:
                raise StartupError(
                    f"could not start the health server on {self.settings.host}:"
                    f"{self.settings.port}: {describe_error(exc)}"
                ) from None
            self.server = server
        monitor = asyncio.create_task(self._monitor())
        try:
            await main()
        finally:
            await cancel_and_wait(monitor)
            if self.server is not None:
                await self.server.stop()


def _now() -> float:
    return asyncio.get_running_loop().time()


def _describe(message: Mapping[str, Any]) -> str:
    return f"{message.get('type')!s:.100} (id={message.get('id')!s:.200})"
