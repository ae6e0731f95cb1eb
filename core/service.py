"""The gateway service base: lifecycle, command loop, layer hand-off with backpressure.

A gateway subclass fills in four hooks and registers one handler per command::

    class MqttGateway(Gateway[MqttGatewayConfig]):
        protocol = "mqtt"
        config_model = MqttGatewayConfig

        def __init__(self, config: MqttGatewayConfig, layer: ChannelLayer) -> None:
            super().__init__(config, layer)
            self.settings = config.mqtt            # its section: `settings` in every gateway

        async def open(self) -> None: ...      # connect; raise to fail start-up
        async def drain(self) -> None: ...     # stop taking inbound work, finish in-flight work
        async def close(self) -> None: ...     # close the transport
        def readiness(self) -> list[str]: ...  # reasons it is not ready ([] = ready)

        @handles("mqtt.publish")
        async def handle_publish(self, command: Command) -> dict[str, Any] | None: ...

Commands are an explicit registry (:func:`handles` → :attr:`Gateway.commands`, bound once per
gateway in :attr:`Gateway.handlers`), never a method looked up from message text: anything
unregistered is answered ``unknown command '<type>'`` and counted under one ``type="unknown"``
label. A handler raises :class:`core.envelope.CommandError` for ``ok: false`` with its text.

Lifecycle (uvicorn's shape): :meth:`Gateway.run` calls ``open()``, serves the command and
reply channels until :meth:`Gateway.stop` is called (SIGTERM/SIGINT in the binaries), then
stops taking commands, lets ``drain()`` and in-flight commands finish within
``shutdown_grace`` seconds, cancels what is left and calls ``close()``. A gateway with a standby
role (IRC active/standby, :mod:`core.lease`) stops and resumes reading its command channel with
:meth:`Gateway.take_commands`, so commands wait in the layer for the replica that can carry them
out.

Layer hand-off: :meth:`Gateway.publish` sends an inbound event and retries with backoff while the
layer is full or unreachable, up to a deadline the caller picks; it returns ``False`` when the
deadline passed so the caller can push back in its transport's own way (SMTP 451, withheld MQTT ack,
HTTP 503); :meth:`Gateway.publish_many` does the same for a run of events in order, one round trip
for all of them on a layer with ``send_many`` (``core.streams``). Refusals that last are a *stall*
(:mod:`core.stall`): /readyz answers 503 with the reason, metrics count it, and one WARNING line
marks its start and one its end. What no layer can ever take (over 1 MB as msgpack, not msgpack-
safe) is refused at once with :class:`EventRefused`, logged and counted, never retried. Transports
with no pushback put events in an :class:`EventBuffer`, which skips (logs, counts) a bad event and
never stops.

Client-side transports build on :mod:`core.client` (reconnects), pace sends with
:mod:`core.pacer` and keep their own Redis keys through :mod:`core.redis`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, ClassVar, Generic, TypeVar

from channels.exceptions import ChannelFull

from core.config import GatewayConfig
from core.envelope import (
    MAX_MESSAGE_BYTES,
    Command,
    CommandError,
    encoded_size,
    new_event,
    parse_command,
    result_message,
)
from core.layer_check import StreamsReadCheck
from core.metrics import GatewayMetrics
from core.receiving import ChannelReader
from core.retry import (
    LAYER_ERRORS,
    Backoff,
    StartupError,
    cancel_and_wait,
    describe_error,
    send_command,
)
from core.stall import StallTracker
from core.types import BatchSendingLayer, ChannelLayer

__all__ = [
    "HANDOFF_BATCH",
    "EventBuffer",
    "EventRefused",
    "Gateway",
    "handles",
    "listen",
]

#: the config model of a Gateway subclass (``MqttGateway(Gateway[MqttGatewayConfig])``)
ConfigT = TypeVar("ConfigT", bound=GatewayConfig)
#: a command handler: ``async def handle_x(self, command) -> dict | None``
Handler = TypeVar("Handler", bound=Callable[..., Awaitable[dict[str, Any] | None]])
#: a handler bound to its gateway: the command in, the result's extra keys (or ``None``) out
BoundHandler = Callable[[Command], Awaitable[dict[str, Any] | None]]

#: the metric label of every command type no handler is registered for (bounded cardinality)
UNKNOWN_COMMAND = "unknown"
_COMMAND_MARK = "__gateway_command__"

#: results waiting for room on their channel before new ones are dropped (and counted)
MAX_PENDING_RESULTS = 1000
#: how long one result may wait for room on its channel
RESULT_TIMEOUT = 30.0
#: events one hand-off (:meth:`Gateway.publish_many`) carries at most
HANDOFF_BATCH = 500
#: seconds between two looks at readiness (for the "ready" / "not ready yet" log lines)
READINESS_INTERVAL = 0.5
#: seconds a layer send that is under way when a publish() timeout passes may still take: cut
#: short, it may have added the message anyway, and the transport's retry added it again (a
#: Slack redelivery published twice when Redis came back in an event's last milliseconds)
MIN_SEND_ATTEMPT = 0.25


class EventRefused(ValueError):
    """No layer can ever take this event (over 1 MB, or not msgpack-safe): never retried.

    ``reason`` is ``too_large`` or ``unserialisable``, the ``gateway_dropped_total`` label it
    was counted under. :meth:`Gateway.publish` has logged it already.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


async def listen(start: Callable[[], Awaitable[object]], host: str, port: int) -> None:
    """``await start()`` of a server gateway's listener; an ``OSError`` (the port is taken, the
    address is not this host's) becomes :class:`StartupError` naming ``host:port`` (exit 3)."""
    try:
        await start()
    except OSError as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


def handles(type_: str) -> Callable[[Handler], Handler]:
    """Register the decorated method as the handler of the command ``type_``.

    ::

        @handles("mqtt.publish")
        async def handle_publish(self, command: Command) -> dict[str, Any]: ...

    Only registered methods are commands (:attr:`Gateway.commands`): a method is never found
    from the text of a message, so a helper named like a handler cannot be reached by a
    command, nor a transport library's hook (issue 8: ``email.DATA`` reached aiosmtpd's
    ``handle_DATA`` when it lived on the gateway; such hooks now live in the gateway's
    ``connection.py``, e.g. ``SmtpHandler`` in gateways/email/connection.py).
    """

    def register(method: Handler) -> Handler:
        setattr(method, _COMMAND_MARK, type_)
        return method

    return register


class Gateway(Generic[ConfigT]):
    """Base of every ``<Proto>Gateway``; see the module docstring for the hooks."""

    protocol: ClassVar[str]
    config_model: ClassVar[type[GatewayConfig]]
    #: how many commands may run at once; 1 keeps them in arrival order
    command_concurrency: ClassVar[int] = 1
    #: command type → name of its handler method; built from :func:`handles`, inherited
    commands: ClassVar[Mapping[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        table = dict(cls.commands)  # the base class's commands, then this class's
        protocol = getattr(cls, "protocol", None)
        for name, value in vars(cls).items():
            type_ = getattr(value, _COMMAND_MARK, None)
            if type_ is None:
                continue
            if protocol is not None and not type_.startswith(f"{protocol}."):
                raise TypeError(
                    f"{cls.__name__}.{name}: {type_!r} is not a command of the {protocol} gateway"
                )
            table[type_] = name
        cls.commands = table

    def __init__(self, config: ConfigT, layer: ChannelLayer) -> None:
        self.config = config
        self.layer = layer
        #: the layer's ``send_many`` (one round trip for a run of events), if it has one
        self._batch_layer = layer if isinstance(layer, BatchSendingLayer) else None
        #: command type → this gateway's handler, bound once from the :attr:`commands` table
        self.handlers: Mapping[str, BoundHandler] = {
            type_: getattr(self, method) for type_, method in self.commands.items()
        }
        self.name = config.name
        self.log = logging.getLogger(f"gateway.{self.protocol}")
        self.metrics = GatewayMetrics(config.name)
        #: this process's own channel, for commands that must leave through its connection
        self.reply_channel: str | None = None
        self.started = asyncio.Event()
        self._stop = asyncio.Event()
        self._layer_ok = True  # False from a layer error until a probe or a send gets through
        self._refusals = 0  # layer refusals in the current backpressure episode
        #: whether inbound events are being held back (/readyz, metrics, the two log lines)
        self.stall = StallTracker(config.name, self.log, self.metrics, held=self.held_messages)
        self._buffers: list[EventBuffer] = []  # each EventBuffer made for this gateway
        self._commands: set[asyncio.Task[None]] = set()
        self._results: set[asyncio.Task[None]] = set()
        self._command_slots = asyncio.Semaphore(self.command_concurrency)
        self._dead_loop: str | None = None
        #: is anything reading what this gateway sends on its layer? (core/layer_check.py)
        self.layer_check = StreamsReadCheck(config.name, layer, self.log)
        self._sized: set[str] = set()  # inbound channels given config.inbound_capacity
        # take_commands(): set while the command channel is read (a standby clears it)
        self._serving = asyncio.Event()
        self._serving.set()
        self._not_serving = asyncio.Event()

    # -- hooks --------------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect the transport. Raise :class:`StartupError` (or ``OSError``) to fail start-up."""

    async def drain(self) -> None:
        """Stop taking inbound work and finish what is in flight. Bounded by the grace period."""

    async def close(self) -> None:
        """Close the transport. Called once, after drain, even if drain timed out."""

    def readiness(self) -> list[str]:
        """Reasons the transport is not ready; empty when connected, authenticated, subscribed."""
        return []

    def held_messages(self) -> int:
        """Inbound messages held back for the layer (``gateway_held_messages``, /readyz).

        The default counts :meth:`publish` calls waiting after a refusal plus the events
        queued in this gateway's :class:`EventBuffer` objects; a gateway with a queue of its own
        (MQTT's hold) overrides it.
        """
        return self.stall.waiting + sum(len(buffer) for buffer in self._buffers)

    def status(self) -> list[str]:
        """Lines /readyz adds to its body, ready or not (the scheduler: leader or standby)."""
        return []

    # -- lifecycle ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the gateway to drain and exit. Idempotent; safe from a signal handler."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def take_commands(self, on: bool) -> None:
        """Start (``True``, the default state) or stop reading the command channel.

        For a gateway with a standby role (IRC active/standby): a standby calls
        ``take_commands(False)`` in ``open()`` so commands wait in the layer for the replica that
        can carry them out, and ``take_commands(True)`` once it is active. Stopping cancels the
        receive, which loses nothing (:meth:`core.receiving.ChannelReader.receive`); commands
        already taken keep running. The reply channel is always read. Idempotent.
        """
        if on:
            self._not_serving.clear()
            self._serving.set()
        else:
            self._serving.clear()
            self._not_serving.set()

    @property
    def taking_commands(self) -> bool:
        return self._serving.is_set()

    def ready_reasons(self, *, detail: bool = True) -> list[str]:
        """Everything that keeps /readyz from answering 200 (``detail``: with live counts)."""
        reasons = [f"{self.name}: {r}" for r in self.readiness()]
        if not self.started.is_set():
            reasons.append(f"{self.name}: starting")
        if not self._layer_ok:
            reasons.append(f"{self.name}: layer unreachable")
        stall = self.stall.reason(detail=detail)
        if stall is not None:
            reasons.append(f"{self.name}: {stall}")
        if self._dead_loop is not None:
            reasons.append(f"{self.name}: command loop died: {self._dead_loop}")
        reasons += [f"{self.name}: {reason}" for reason in self.layer_check.reasons()]
        layer_problems = getattr(self.layer, "health_problems", None)
        if layer_problems is not None:  # core.streams: data found lost in Redis
            reasons += [f"{self.name}: {problem}" for problem in layer_problems()]
        return reasons

    async def run(self) -> None:
        """Open the transport, serve commands until :meth:`stop`, then drain and close."""
        # channels' default prefix, like every consumer: channels_redis reads all "!" channels
        # of a layer instance from one list named by the part before "!", so a second prefix
        # in the same process is a list nobody polls (tests/core/test_service.py, "sharing")
        self.reply_channel = await self.layer.new_channel()
        try:
            await self.open()
        except StartupError:
            raise
        except OSError as exc:
            raise StartupError(describe_error(exc)) from exc
        loops = [
            asyncio.create_task(self._gated_command_loop(self.config.command_channel)),
            asyncio.create_task(self._command_loop(self.reply_channel)),
        ]
        self._layer_ok = await self._probe_layer()
        self.started.set()
        # "started" = serving commands; "ready" (below) only once /readyz would answer 200
        self.log.info(
            "%s started: events → %s, commands ← %s",
            self.name,
            self.config.inbound_channel,
            self.config.command_channel,
        )
        watcher = asyncio.create_task(self._watch_readiness())
        stopping = asyncio.create_task(self._stop.wait())
        try:
            done, _ = await asyncio.wait([*loops, stopping], return_when=asyncio.FIRST_COMPLETED)
            for task in loops:
                if task in done:
                    # ChannelReader retries and skips everything it can: this is a bug. Say so
                    # in /readyz and end run() with the error, so the process exits non-zero
                    # and a supervisor restarts it, instead of serving without commands.
                    error = task.exception() or RuntimeError("command loop returned")
                    self._dead_loop = describe_error(error)
                    self.log.error(
                        "%s: command loop died (%s); stopping", self.name, self._dead_loop
                    )
                    raise error
        finally:
            stopping.cancel()
            watcher.cancel()
            await cancel_and_wait(*loops)
            await self._shutdown()

    async def _probe_layer(self) -> bool:
        from core.layers import probe_layer

        problem = await probe_layer(self.layer)
        if problem is not None:
            self.log.warning("%s: layer unreachable: %s", self.name, problem)
        return problem is None

    async def _watch_readiness(self) -> None:
        """Log what keeps the gateway from being ready, and "ready" once /readyz would say so.

        Readiness is computed from the transport's own state and the layer's, so it is
        sampled; while the layer is marked down it is probed, so readiness recovers without
        waiting for traffic.
        """
        last: list[str] | None = None
        while True:
            if not self._layer_ok:
                self._layer_ok = await self._probe_layer_quietly()
            self.stall.tick()
            if self._layer_ok:  # every few seconds; returns at once in between
                await self.layer_check.poll()
            reasons = self.ready_reasons(detail=False)
            if reasons != last:
                if reasons:
                    self.log.info("%s not ready yet: %s", self.name, "; ".join(reasons))
                else:
                    self.log.info(
                        "%s ready: events → %s, commands ← %s",
                        self.name,
                        self.config.inbound_channel,
                        self.config.command_channel,
                    )
                last = reasons
            await asyncio.sleep(READINESS_INTERVAL)

    async def _probe_layer_quietly(self) -> bool:
        from core.layers import probe_layer

        return await probe_layer(self.layer) is None

    async def _shutdown(self) -> None:
        grace = self.config.shutdown_grace

        async def finish() -> None:
            await self.drain()
            if self._commands:
                await asyncio.wait(set(self._commands))
            if self._results:
                await asyncio.wait(set(self._results))

        try:
            await asyncio.wait_for(finish(), grace)
        except TimeoutError:
            self.log.warning(
                "%s: in-flight work not done after %.1f s; cancelling %d command(s) "
                "and %d result(s)",
                self.name,
                grace,
                len(self._commands),
                len(self._results),
            )
        await cancel_and_wait(*self._commands, *self._results)
        await self.close()
        self.log.info("%s stopped", self.name)

    # -- inbound: gateway → layer -------------------------------------------------------------

    def event(self, type_: str, /, *, id: str | None = None, **keys: Any) -> dict[str, Any]:
        """An inbound event with this integration's envelope.

        ``self`` and ``type_`` are positional-only, so an event may have a key named ``self``
        (DESIGN §5: ``irc.joined`` … ``self: bool``).

        ``reply_channel`` defaults to the command channel; pass ``reply_channel=self.reply_channel``
        when the answer must leave through this process's connection.
        """
        reply = keys.pop("reply_channel", None) or self.config.command_channel
        return new_event(
            f"{self.protocol}.{type_}", gateway=self.name, reply_channel=reply, id=id, **keys
        )

    async def publish(
        self, message: dict[str, Any], *, timeout: float | None = None, channel: str | None = None
    ) -> bool:
        """Hand ``message`` to the layer on its route, retrying while the layer is full or down.

        The route is ``channel`` when given (a per-event target, e.g. an MQTT subscription's
        own channel), else ``config.route(message["type"])``. Returns ``True`` once the layer
        accepted it, ``False`` when ``timeout`` seconds passed first (``None``: keep trying until
        :meth:`stop`, then give up); a send under way when ``timeout`` passes gets up to
        :data:`MIN_SEND_ATTEMPT` s more, since one cut short may have added the message. The
        first refusal of an episode and the recovery are logged at INFO, once per episode for
        the whole gateway; refusals that last make a stall (:attr:`stall`), with one WARNING
        when it starts and one when it ends.

        Raises :class:`EventRefused` (logged and counted here) when no layer could ever take
        ``message``: over 1 MB as msgpack, or not msgpack-safe. Such an event is never retried.
        """
        channel = self._inbound(channel or self.config.route(message["type"]))
        self._check_sendable(message, channel)
        return await self._publish_checked([(channel, message)], timeout) == 1

    async def publish_many(
        self, items: Sequence[tuple[str | None, dict[str, Any]]], *, timeout: float | None = None
    ) -> int:
        """:meth:`publish` for several ``(channel or None, message)`` pairs, in order.

        Returns how many pairs, from the front, are done: accepted by the layer, or refused for
        good and skipped: :class:`EventRefused`'s cases, and an event the layer fails to send
        with an error that is not an outage (``gateway_dropped{reason="unsendable"}``); both
        logged and counted here. That is
        ``len(items)`` unless ``timeout`` passed or the gateway stopped first; the rest was not
        sent and can be published again later without overtaking anything.

        A layer with ``send_many`` (``core.streams``: an ordered prefix in one round trip) takes
        every pair in one call while it has room, so a gateway with a backlog (a broker's queued
        messages, a burst) pays one Redis round trip for many events instead of one each. Other
        layers get one ``send`` per pair, as :meth:`publish` does.
        """
        checked: list[tuple[int, str, dict[str, Any]]] = []
        for position, (channel, message) in enumerate(items):
            channel = self._inbound(channel or self.config.route(message["type"]))
            try:
                self._check_sendable(message, channel)
            except EventRefused:
                continue
            checked.append((position, channel, message))
        pairs = [(c, m) for _, c, m in checked]
        taken = await self._publish_checked(pairs, timeout, skip_unsendable=True)
        return len(items) if taken == len(checked) else checked[taken][0]

    def _inbound(self, channel: str) -> str:
        """``channel``, given ``config.inbound_capacity`` on a layer that takes one (core.streams)
        the first time this gateway sends an event there."""
        if channel not in self._sized:
            self._sized.add(channel)
            capacity = self.config.inbound_capacity
            set_capacity = getattr(self.layer, "set_channel_capacity", None)
            if capacity is not None and set_capacity is not None and "!" not in channel:
                set_capacity(channel, capacity)
        return channel

    async def _publish_checked(
        self,
        pending: list[tuple[str, dict[str, Any]]],
        timeout: float | None,
        *,
        skip_unsendable: bool = False,
    ) -> int:
        """Send ``pending`` in order, retrying refusals; how many are done (all, unless
        ``timeout`` passed or the gateway stops). An error that is not an outage is raised, or
        with ``skip_unsendable`` logged, counted and the event skipped."""
        loop = asyncio.get_running_loop()
        batch = self._batch_layer
        send_many = batch.send_many if batch is not None else None
        deadline = None if timeout is None else loop.time() + timeout
        backoff = Backoff(0.05, 2.0)
        failures = 0
        taken = 0
        try:
            while taken < len(pending):
                started = loop.time()
                # the attempt made at the deadline still gets a round trip's time (and more:
                # one cut short may have added the message anyway, see MIN_SEND_ATTEMPT)
                attempt_limit = (
                    10.0 if deadline is None else max(MIN_SEND_ATTEMPT, deadline - started)
                )
                channel, message = pending[taken]
                try:
                    wanted = len(pending) - taken if send_many is not None else 1
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for runs the send as a
                    # task of its own, about 10 us more per event (issue 28, the chat bench)
                    async with asyncio.timeout(min(10.0, attempt_limit)):
                        if send_many is not None and wanted > 1:
                            added = await send_many(pending[taken:])
                        else:
                            await self.layer.send(channel, message)
                            added = 1
                    self.metrics.layer_latency.observe(loop.time() - started)
                    self._accepted(pending[taken : taken + added])
                    taken += added
                    if added:
                        backoff.reset()  # it moves: the next refusal waits the shortest time
                    if added < wanted:  # send_many stopped at a full channel
                        raise ChannelFull(pending[taken][0])
                except asyncio.CancelledError:
                    raise
                except LAYER_ERRORS as exc:
                    channel, message = pending[taken]
                    # an attempt cut short by the deadline (the last one gets 50 ms) says
                    # nothing about the layer being down
                    cut = isinstance(exc, TimeoutError) and loop.time() - started < 1.0
                    if not isinstance(exc, ChannelFull) and not cut:
                        self._layer_ok = False
                    failures += 1
                    self.metrics.retry("layer_send")
                    if failures == 1:
                        self.metrics.backpressure_waits.inc()
                        self.stall.wait_started()
                    self.stall.refused(channel, exc)
                    if self._refusals == 0:
                        # INFO: a stall (refusals that last) gets its one WARNING from core.stall
                        self.log.info(
                            "%s: layer refuses %s for %r (%s); retrying with backoff, "
                            "the transport is pushed back meanwhile",
                            self.name,
                            message["type"],
                            channel,
                            describe_error(exc),
                        )
                    self._refusals += 1
                    delay = backoff.next()
                    now = loop.time()
                    if deadline is not None:
                        # the last attempt is made at the deadline, not one backoff step before
                        # it (publish_timeout: 2 s gave up after 1.1-1.8 s, issue 28)
                        delay = min(delay, deadline - now)
                    if (deadline is not None and delay <= 0) or self.stopping:
                        self.metrics.pushback.inc()
                        return taken
                    await asyncio.sleep(delay)
                except Exception as exc:
                    if not skip_unsendable:
                        raise
                    if send_many is not None:
                        send_many = None  # find the one that cannot be sent: one at a time
                        continue
                    self._unsendable(*pending[taken], exc)
                    taken += 1
        finally:
            if failures:
                self.stall.wait_ended()
        return taken

    def _unsendable(self, channel: str, message: dict[str, Any], exc: Exception) -> None:
        self.metrics.dropped("unsendable")
        self.log.error(
            "%s: dropped %s %s: the layer cannot send it to %r (%s)",
            self.name,
            message.get("type"),
            message.get("id"),
            channel,
            describe_error(exc),
        )

    def _accepted(self, sent: list[tuple[str, dict[str, Any]]]) -> None:
        if not sent:
            return
        for channel, message in sent:
            self.metrics.event(message["type"])
            self.stall.accepted()
            self.layer_check.sent(channel)
        self._layer_ok = True
        if self._refusals:
            self.log.info(
                "%s: layer accepts events again after %d refusals", self.name, self._refusals
            )
            self._refusals = 0

    def _check_sendable(self, message: dict[str, Any], channel: str) -> None:
        # checked for every layer, so a memory:// test run refuses what Redis would
        try:
            size = encoded_size(message)
        except TypeError as exc:
            reason, problem = "unserialisable", f"not msgpack-safe: {exc}"
        else:
            if size <= MAX_MESSAGE_BYTES:
                return
            reason = "too_large"
            problem = f"{size} bytes as a message (limit {MAX_MESSAGE_BYTES})"
        self.metrics.dropped(reason)
        self.log.error(
            "%s: refused %s %s for %r: %s; dropped, not retried",
            self.name,
            message.get("type"),
            message.get("id"),
            channel,
            problem,
        )
        raise EventRefused(reason, problem)

    # -- commands: layer → gateway ------------------------------------------------------------

    async def _gated_command_loop(self, channel: str) -> None:
        """:meth:`_command_loop` while :meth:`take_commands` is on; cancelled while off."""
        while True:
            await self._serving.wait()
            loop = asyncio.create_task(self._command_loop(channel))
            off = asyncio.create_task(self._not_serving.wait())
            try:
                await asyncio.wait([loop, off], return_when=asyncio.FIRST_COMPLETED)
            finally:
                off.cancel()
                if not loop.done():
                    await cancel_and_wait(loop)
            if loop.done() and not loop.cancelled():
                loop.result()  # the loop ended by itself: raise why (run() reports it)
                raise RuntimeError("command loop returned")

    def channel_reader(self, channel: str) -> ChannelReader:
        """A reader of one of this gateway's own channels, reporting to its readiness and
        receive metrics (the command loop's, and a subclass's control channels)."""
        return ChannelReader(
            self.layer,
            channel,
            log=self.log,
            label=self.name,
            on_layer=self._set_layer_ok,
            count=self._count_receive,
        )

    async def _command_loop(self, channel: str) -> None:
        reader = self.channel_reader(channel)
        while True:
            # Wait for a free command slot *before* receiving, so a command is not taken off
            # the channel while every slot is busy (it would sit in this task and be lost if
            # stop() cancels it). The reply channel's loop shares the slots, so a slot can
            # still be gone by the time a command arrives: then, if stop() cancels the wait,
            # the command goes back on its channel. Cancelling receive() loses nothing.
            await self._command_slots.acquire()
            self._command_slots.release()
            message = await reader.receive()
            try:
                await self._command_slots.acquire()
            except asyncio.CancelledError:
                await asyncio.shield(self._put_back(channel, message))
                raise
            task = asyncio.create_task(self._run_command(message))
            self._commands.add(task)
            task.add_done_callback(self._command_done)

    async def _put_back(self, channel: str, message: Any) -> None:
        try:
            await send_command(self.layer, channel, message, timeout=5)
        except Exception as exc:
            self.metrics.dropped("command_at_stop")
            self.log.error(
                "%s: stopping: could not put a %s command back on %r: %s",
                self.name,
                _get(message, "type"),
                channel,
                describe_error(exc),
            )
        else:
            self.log.info("%s: stopping: put a received command back on %r", self.name, channel)

    def _set_layer_ok(self, ok: bool) -> None:
        self._layer_ok = ok

    def _count_receive(self, kind: str) -> None:
        if kind == "undecodable":
            self.metrics.dropped("undecodable_command")
        else:
            self.metrics.retry(kind)

    def _command_done(self, task: asyncio.Task[None]) -> None:
        self._commands.discard(task)
        self._command_slots.release()

    async def dispatch(self, message: Any) -> dict[str, Any] | None:
        """Validate and carry out one command; return its result message (``None`` if unasked).

        Only types in :attr:`commands` are carried out; anything else is answered
        ``unknown command '<type>'`` and counted under the one label ``type="unknown"``.
        Never raises: a bad command is logged at WARNING and answered ``ok: false``.
        """
        type_ = _get(message, "type")
        handler = self.handlers.get(type_) if isinstance(type_, str) else None
        if handler is None and isinstance(type_, str) and type_:
            self.metrics.command(UNKNOWN_COMMAND, "invalid")
            error = f"unknown command {type_[:200]!r}"
            self.log.warning("%s: %s", self.name, error)
            return _error_result(self.protocol, message, error)
        try:
            command = parse_command(message, self.protocol)
        except CommandError as exc:
            self.metrics.command(str(type_) if handler else UNKNOWN_COMMAND, "invalid")
            self.log.warning("%s: invalid command: %s", self.name, exc)
            return _error_result(self.protocol, message, str(exc))
        assert handler is not None  # parse_command refuses a message without a type
        try:
            extra = await handler(command) or {}
        except CommandError as exc:
            self.metrics.command(command.type, "failed")
            self.log.warning("%s: %s (id=%s) failed: %s", self.name, command.type, command.id, exc)
            return self._result(command, ok=False, error=str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.metrics.command(command.type, "failed")
            self.metrics.error("command")
            self.log.exception("%s: %s (id=%s) crashed", self.name, command.type, command.id)
            return self._result(command, ok=False, error=f"internal error: {describe_error(exc)}")
        self.metrics.command(command.type, "ok")
        return self._result(command, ok=True, **extra)

    def _result(self, command: Command, **keys: Any) -> dict[str, Any] | None:
        if command.result_channel is None:
            return None
        return result_message(self.protocol, command.id, **keys)

    async def _run_command(self, message: Any) -> None:
        result = await self.dispatch(message)
        if result is None:
            return
        # Sent from its own task so a caller whose channel is full cannot hold a command slot:
        # a consumer waiting for room on the command channel while the gateway waits for room
        # on the consumer's channel would otherwise stall both.
        if len(self._results) >= MAX_PENDING_RESULTS:
            self.metrics.dropped("result_backlog")
            self.log.warning(
                "%s: dropped the result of %s: %d results already wait for their channels",
                self.name,
                result["id"],
                len(self._results),
            )
            return
        task = asyncio.create_task(self._send_result(message["result_channel"], result))
        self._results.add(task)
        task.add_done_callback(self._results.discard)

    async def _send_result(self, target: str, result: dict[str, Any]) -> None:
        try:
            await send_command(self.layer, target, result, timeout=RESULT_TIMEOUT)
        except Exception as exc:
            self.metrics.dropped("result_undeliverable")
            self.log.warning(
                "%s: could not send the result of %s to %r: %s",
                self.name,
                result["id"],
                target,
                describe_error(exc),
            )


def _get(message: Any, key: str) -> Any:
    return message.get(key) if isinstance(message, dict) else None


def _error_result(protocol: str, message: Any, error: str) -> dict[str, Any] | None:
    channel = _get(message, "result_channel")
    if not isinstance(channel, str) or not channel:
        return None
    id_ = _get(message, "id")
    return result_message(protocol, None if id_ is None else str(id_), ok=False, error=error)


class EventBuffer:
    """A bounded FIFO between a transport with no pushback (IRC, Slack, MQTT QoS 0) and the layer.

    :meth:`put` never blocks; one task hands events to :meth:`Gateway.publish` in order, retrying
    while the layer is down. When ``capacity`` events are waiting, new ones are dropped, counted
    in ``gateway_dropped{reason="buffer_full"}`` and reported in one WARNING a second with the
    number dropped.

    One bad event never stops the buffer: an event :meth:`Gateway.publish` refuses (too large,
    not msgpack-safe) or that the layer rejects with an error other than an outage is logged,
    counted (``too_large``, ``unserialisable``, ``unsendable``) and skipped.

    A transport that *can* stop reading (a TCP stream, IRC) checks :attr:`full` before it turns
    input into an event and, when it is, pauses its reading until :meth:`wait_room` returns:
    its peer is pushed back by TCP and nothing is dropped. :attr:`full` keeps
    :data:`RESERVED` places free for the events no reader can hold back (a client's
    ``<proto>.connect`` / ``.disconnect``).
    """

    #: places a pausing reader leaves free (see above)
    RESERVED = 2

    def __init__(self, gateway: Gateway[Any], capacity: int) -> None:
        self.gateway = gateway
        self.capacity = capacity
        gateway._buffers.append(self)  # its length counts in gateway.held_messages()
        self._queue: deque[tuple[dict[str, Any], str | None]] = deque()
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._room = asyncio.Event()
        self._room.set()
        self._unreported = 0
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def full(self) -> bool:
        """``True`` while a reader that can pause should (at most :data:`RESERVED` places left;
        all of them when the capacity is that small)."""
        return len(self._queue) >= max(1, self.capacity - self.RESERVED)

    async def wait_room(self) -> None:
        """Return once :meth:`put` would keep an event (for a reader that paused meanwhile)."""
        while self.full:
            self._room.clear()
            await self._room.wait()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    def put(self, message: dict[str, Any], *, channel: str | None = None) -> bool:
        """Queue ``message`` (for ``channel``, default its route); ``False`` (counted) when full."""
        if len(self._queue) >= self.capacity:
            self.gateway.metrics.dropped("buffer_full")
            if self._unreported == 0:
                asyncio.get_running_loop().call_later(1.0, self._report_drops)
            self._unreported += 1
            return False
        self._queue.append((message, channel))
        self._idle.clear()
        self._ready.set()
        return True

    def _report_drops(self) -> None:
        count, self._unreported = self._unreported, 0
        self.gateway.log.warning(
            "%s: dropped %d event(s): buffer full (%d waiting for the layer)",
            self.gateway.name,
            count,
            self.capacity,
        )

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            while self._queue:
                # everything waiting goes in one hand-off (one round trip on core.streams)
                batch = [(c, m) for m, c in itertools.islice(self._queue, HANDOFF_BATCH)]
                done = await self.gateway.publish_many(batch)
                for _ in range(done):
                    self._queue.popleft()
                if done:
                    self._room.set()
                if done < len(batch):
                    return  # stopping: flush() accounts for what is left
            self._ready.clear()
            self._idle.set()

    async def flush(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for the buffer to empty; stop; return how many were dropped."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        left = len(self._queue)
        if left:
            self.gateway.metrics.dropped("shutdown", left)
            self.gateway.log.warning(
                "%s: dropped %d buffered event(s) at shutdown", self.gateway.name, left
            )
            self._queue.clear()
        self._room.set()
        return left
