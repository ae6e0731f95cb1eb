"""A consumer worker that loses nothing when Redis restarts, a handler fails or the process stops.

channels' ``Worker`` (what ``manage.py runworker`` runs) has four ways to lose messages, all
seen in tests/gateways/email/test_faults.py:

* its listener moves messages from the layer into an unbounded in-memory queue per channel as
  fast as the layer gives them, so a slow consumer holds hundreds of them in memory;
* a layer error (Redis restarted) escapes the listener and ends the process, and with it every
  message in those queues;
* a consumer that raises (its own layer call failed during a Redis outage, its database is not
  migrated yet) takes the message it was handling with it, and nothing names the message;
* SIGTERM ends the process at once, with the same result.

:class:`ConsumerWorker` is the same worker with those holes closed:

* at most one message waits per channel (the next ``receive()`` happens only once the consumer
  took the previous one); receiving goes through :class:`core.receiving.ChannelReader`, which
  retries layer errors and skips (logs, counts) entries that cannot be decoded;
* **at-least-once for transient failures**: when a consumer raises one of
  :attr:`RetryPolicy.transient` (the layer's errors, Django's ``OperationalError`` /
  ``InterfaceError``), the message it was handling goes to a *fresh* consumer instance again,
  after a capped, jittered backoff, up to :attr:`RetryPolicy.max_attempts` deliveries. A
  message that fails for good (attempts used up, or a non-transient error) is sent to the
  dead-letter channel ``CHANNEL.dead`` (or, with ``dead_letter="log"``, only logged); either
  way an ERROR line names its channel, ``type`` and ``id``. A consumer may therefore see a
  message twice: de-duplicate on ``id``;
* :meth:`ConsumerWorker.drain` (SIGTERM/SIGINT) stops receiving and lets the consumers finish
  what they hold; a message still waiting for a retry is put back on its channel.

A message without ``type`` is logged and skipped instead of stopping its channel. A
``scheduler.fire`` whose schedule waits for its runs (``report_done: "worker"``) is reported
to the scheduler with ``scheduler.done`` once its handler returned (:func:`completion_report`).

``gateways run --app`` uses it, and so does ``manage.py runworker`` when ``"gateways"`` is listed
before ``"channels"`` in ``INSTALLED_APPS`` (Django picks the first app's command). Settings
(Django ``GATEWAYS_WORKER``, or ``runworker --max-attempts/--dead-letter``)::

    GATEWAYS_WORKER = {
        "MAX_ATTEMPTS": 5,            # deliveries of one message, the first included
        "RETRY_MAX_DELAY": 30,        # seconds; backoff doubles from 0.5 s up to this
        "DEAD_LETTER": "channel",     # or "log"
        "TRANSIENT_ERRORS": ["myapp.errors.TryLater"],  # added to the defaults
        "CONCURRENCY": {"sensors": 8},  # consumer instances per channel (default 1)
        "ORDERING_KEY": {"sensors": "topic"},  # equal values stay in order (same instance)
        "HEALTH": {"port": 9102},  # /healthz /readyz /metrics: core/worker_health.py
    }

With a concurrency above 1, a channel's messages go to that many consumer instances at once
(each its own scope, like one channel per instance); with an ordering key, messages whose key
has the same value always go to the same instance, so they are handled in the order they came.
Messages without the key go to whichever instance is free.

With a layer that has ``receive_with_ack`` (``core.streams``, ``redis://``), a message is
acknowledged once its consumer asked for the next one (its handler returned), once it was
dead-lettered, or once it was put back on its channel when draining; a worker that dies leaves
its messages to the layer's redelivery. While a message waits here before its handler (behind
a busy consumer, or for a retry) the worker tells the layer (``hold``), which keeps it claimed
so the wait never turns into a redelivery to another worker; as a consumer takes it the worker
says so (``release``; for a redelivered message ``begin``, which counts the hand-out in Redis
before the handler runs and dead-letters it past ``max_deliveries``). On SIGTERM the layer is
closed after the drain: its queued acknowledgements are written.

channels' ``AsyncConsumer`` hops to the sync thread before every handler to close old database
connections; :mod:`core.dbclose` (installed by the worker) skips the hop when no connection is
open to close.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal, cast

from asgiref.compatibility import guarantee_single_callable
from channels.worker import Worker

from core.dbclose import install as install_connection_closing
from core.layers import close_layer, import_object
from core.metrics import GatewayMetrics
from core.receiving import ChannelReader
from core.retry import LAYER_ERRORS, Backoff, describe_error, send_command
from core.types import AcknowledgingLayer
from core.worker_health import HealthSettings, WorkerHealth

__all__ = ["DEAD_LETTER_TYPE", "ConsumerWorker", "RetryPolicy", "default_transient_errors"]

log = logging.getLogger("gateway.worker")

#: ``type`` of the messages on a dead-letter channel; the failed message is under ``message``
DEAD_LETTER_TYPE = "gateways.dead_letter"


def concurrency_from_settings() -> tuple[dict[str, int], dict[str, str]]:
    """``CONCURRENCY`` and ``ORDERING_KEY`` of Django's ``GATEWAYS_WORKER`` (empty without)."""
    options: Mapping[str, Any] = {}
    with contextlib.suppress(ImportError):
        from django.conf import settings

        if settings.configured:
            options = dict(getattr(settings, "GATEWAYS_WORKER", {}) or {})
    try:
        concurrency = {str(c): int(n) for c, n in dict(options.get("CONCURRENCY") or {}).items()}
        ordering = {str(c): str(k) for c, k in dict(options.get("ORDERING_KEY") or {}).items()}
    except (TypeError, ValueError) as exc:
        raise ValueError(
            "GATEWAYS_WORKER: CONCURRENCY must map channels to integers and ORDERING_KEY "
            f"channels to message keys ({exc})"
        ) from None
    return concurrency, ordering


def default_transient_errors() -> tuple[type[BaseException], ...]:
    """The layer's errors, plus Django's database errors that go away (unreachable, unmigrated)."""
    errors: list[type[BaseException]] = list(LAYER_ERRORS)
    with contextlib.suppress(ImportError):
        from django.db import InterfaceError, OperationalError

        errors += [OperationalError, InterfaceError]
    return tuple(errors)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """What :class:`ConsumerWorker` does with a message whose consumer raised."""

    #: deliveries of one message in all, the first included; 1 means no retry
    max_attempts: int = 5
    #: the first retry waits about this long; each further one twice as long
    initial_delay: float = 0.5
    #: cap of the backoff between two deliveries of one message
    max_delay: float = 30.0
    #: ``"channel"``: send what failed for good to ``CHANNEL.dead``; ``"log"``: only log it
    dead_letter: Literal["channel", "log"] = "channel"
    #: exceptions after which the same message is delivered again
    transient: tuple[type[BaseException], ...] = dataclasses.field(
        default_factory=default_transient_errors
    )

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.dead_letter not in ("channel", "log"):
            raise ValueError("dead_letter must be 'channel' or 'log'")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before delivery number ``attempt + 1``."""
        return Backoff(self.initial_delay, self.max_delay).delay(attempt - 1)

    @classmethod
    def from_settings(
        cls, options: Mapping[str, Any] | None = None, **overrides: Any
    ) -> RetryPolicy:
        """The policy from ``options`` (default: Django's ``GATEWAYS_WORKER`` setting, when
        Django is configured), then ``overrides`` that are not ``None``.

        Raises ``ValueError`` with a one-line reason for a bad setting.
        """
        values: dict[str, Any] = {}
        if options is None:
            options = {}
            with contextlib.suppress(ImportError):
                from django.conf import settings

                if settings.configured:
                    options = dict(getattr(settings, "GATEWAYS_WORKER", {}) or {})
        known = {"MAX_ATTEMPTS", "RETRY_MAX_DELAY", "DEAD_LETTER", "TRANSIENT_ERRORS"}
        known |= {"CONCURRENCY", "ORDERING_KEY"}  # read by concurrency_from_settings()
        known |= {"HEALTH"}  # read by core.worker_health.HealthSettings.from_settings()
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"GATEWAYS_WORKER: unknown key(s) {unknown}; known: {sorted(known)}")
        if "MAX_ATTEMPTS" in options:
            values["max_attempts"] = int(options["MAX_ATTEMPTS"])
        if "RETRY_MAX_DELAY" in options:
            values["max_delay"] = float(options["RETRY_MAX_DELAY"])
        if "DEAD_LETTER" in options:
            values["dead_letter"] = options["DEAD_LETTER"]
        extra: list[type[BaseException]] = []
        for path in options.get("TRANSIENT_ERRORS", []):
            module, _, attr = str(path).rpartition(".")
            error = import_object(f"{module}:{attr}")
            if not (isinstance(error, type) and issubclass(error, BaseException)):
                raise ValueError(f"GATEWAYS_WORKER: TRANSIENT_ERRORS: {path} is not an exception")
            extra.append(error)
        if extra:
            values["transient"] = default_transient_errors() + tuple(extra)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclasses.dataclass
class _Delivery:
    """One message on its way to a consumer: how often it was tried, when it may go again."""

    message: dict[str, Any]
    attempt: int = 1
    not_before: float = 0.0
    #: the layer's acknowledgement token (layers with ``receive_with_ack``), else ``None``
    token: Any = None


class _Inbox:
    """One consumer instance's ``receive``: one message at a time, and what it holds."""

    def __init__(
        self,
        done: Callable[[_Delivery], None],
        take: Callable[[_Delivery], bool | Awaitable[bool]],
    ) -> None:
        #: called with each delivery the consumer finished (asked for the next one after it)
        self.done = done
        #: called with each delivery as the consumer takes it; ``False``: skip it
        self.take = take
        self.queue: asyncio.Queue[_Delivery] = asyncio.Queue(maxsize=1)
        self.idle = asyncio.Event()
        #: the delivery the consumer took last and has not finished (it has not asked again)
        self.current: _Delivery | None = None
        self.future: asyncio.Future[Any] | None = None

    async def get(self) -> dict[str, Any]:
        if self.current is not None:  # asking for the next message means the last one is done
            self.done(self.current)
        self.current = None
        self.idle.set()
        while True:
            delivery = await self.queue.get()
            taken = self.take(delivery)
            if taken if isinstance(taken, bool) else await taken:
                break
        self.idle.clear()
        self.current = delivery
        # a shallow copy: what the consumer changes in it does not travel to a retry
        return dict(delivery.message)

    @property
    def drained(self) -> bool:
        return self.queue.empty() and self.idle.is_set()

    @property
    def holds_unfinished(self) -> bool:
        """The instance ended (raised or was cancelled) while it held :attr:`current`."""
        future = self.future
        if self.current is None or future is None or not future.done():
            return False
        return future.cancelled() or future.exception() is not None


def _describe(message: dict[str, Any]) -> str:
    return f"{message.get('type')!s:.100} (id={message.get('id')!s:.200})"


class ConsumerWorker(Worker):  # type: ignore[misc]
    """channels' ``Worker`` with bounded prefetch, layer retries, redelivery and a drain."""

    def __init__(
        self,
        *args: Any,
        shutdown_grace: float = 30.0,
        retry: RetryPolicy | None = None,
        concurrency: Mapping[str, int] | None = None,
        ordering_key: Mapping[str, str] | None = None,
        health: HealthSettings | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.shutdown_grace = shutdown_grace
        self.retry = retry if retry is not None else RetryPolicy.from_settings()
        if concurrency is None and ordering_key is None:
            concurrency, ordering_key = concurrency_from_settings()
        #: consumer instances per channel (1 unless given): messages of one channel in parallel
        self.concurrency = {c: int(n) for c, n in (concurrency or {}).items()}
        if any(n < 1 for n in self.concurrency.values()):
            raise ValueError("concurrency must be at least 1")
        #: per channel, the message key whose equal values stay in order (one instance each)
        self.ordering_key = dict(ordering_key or {})
        self._slot_channel: dict[str, str] = {}
        self.metrics = GatewayMetrics("worker")
        #: the layer, when it acknowledges deliveries (core.streams): see the module docstring
        layer = self.channel_layer
        self._acking: AcknowledgingLayer | None = (
            layer if isinstance(layer, AcknowledgingLayer) else None
        )
        install_connection_closing()
        self._inboxes: dict[str, _Inbox] = {}
        self._listeners: list[asyncio.Task[None]] = []
        #: metrics, readiness and the health server (core/worker_health.py); hooks marked "health"
        self.health = WorkerHealth(self, health or HealthSettings.from_settings())

    # -- consumer instances -------------------------------------------------------------------

    def _instance(self, channel: str) -> _Inbox:
        """The channel's live consumer instance, started if there is none."""
        inbox = self._inboxes.get(channel)
        if inbox is not None and inbox.future is not None and not inbox.future.done():
            return inbox
        inbox = self._inboxes[channel] = _Inbox(self._handled, self._take)
        scope = {"type": "channel", "channel": self._channel_of(channel)}
        # asgiref's annotations of this function changed between releases: called through Any
        instance = cast(Any, guarantee_single_callable)(self.application)
        inbox.future = asyncio.ensure_future(
            instance(
                scope=scope,
                receive=self.health.receiver(channel, inbox),  # health: inbox.get, observed
                send=lambda message: self.application_send(scope, message),
            )
        )
        self.application_instances[channel] = {
            "input_queue": inbox.queue,
            "future": inbox.future,
            "scope": scope,
            "last_used": asyncio.get_running_loop().time(),
        }
        return inbox

    def _dead_instance(self, channel: str) -> _Inbox | None:
        inbox = self._inboxes.get(channel)
        if inbox is not None and inbox.future is not None and inbox.future.done():
            return inbox
        return None

    async def application_exception(self, exception: Exception, details: Any) -> None:
        """channels logs a traceback here; :meth:`_salvage` logs the failure with the message."""

    # -- receiving ----------------------------------------------------------------------------

    async def handle(self) -> None:
        self._listeners = [asyncio.create_task(self.listener(c)) for c in self.channels]
        await asyncio.gather(*self._listeners)

    def _channel_of(self, slot: str) -> str:
        """The channel a consumer slot serves (a slot is the channel, or ``CHANNEL#lane``)."""
        return self._slot_channel.get(slot, slot)

    async def _receive_unacked(self, channel: str) -> tuple[Any, None]:
        return await self.channel_layer.receive(channel), None

    def _acknowledge(self, delivery: _Delivery) -> None:
        """Tell the layer ``delivery`` is done with (handled, dead-lettered or put back).

        Only layers with ``receive_with_ack`` (core.streams) get told; a failed acknowledgement
        means the message is delivered again after the layer's ``redelivery_timeout``.
        """
        if delivery.token is None:
            return
        token, delivery.token = delivery.token, None
        assert self._acking is not None  # only an acknowledging layer hands out tokens
        future = asyncio.ensure_future(self._acking.ack(token))
        future.add_done_callback(_log_failed_ack)

    def _handled(self, delivery: _Delivery) -> None:
        """The consumer finished ``delivery`` (its handler returned): acknowledge it, and tell
        the scheduler when it was a run it waits for (see :func:`completion_report`)."""
        self._acknowledge(delivery)
        report = completion_report(delivery.message)
        if report is not None:
            task = asyncio.ensure_future(send_command(self.channel_layer, *report, timeout=30))
            _REPORTS.add(task)
            task.add_done_callback(_report_sent)

    def _hold(self, delivery: _Delivery) -> _Delivery:
        """``delivery`` waits in this process before a handler runs it (behind a busy consumer,
        or for a retry): on core.streams its entry is kept claimed meanwhile, so the wait does
        not count towards ``redelivery_timeout`` and no other worker takes it."""
        if delivery.token is not None and self._acking is not None:
            self._acking.hold(delivery.token)
        return delivery

    def _take(self, delivery: _Delivery) -> bool | Awaitable[bool]:
        """A consumer takes ``delivery`` now: its handler's time counts from here. ``False``
        (skip it) when another worker claimed it meanwhile (that one delivers it), or when the
        layer dead-lettered a redelivered message that reached ``max_deliveries``."""
        token = delivery.token
        if token is None or self._acking is None:
            return True
        if not self._acking.release(token):
            log.warning(
                "not handing %s to its consumer: another worker claimed it while it waited "
                "here (this process stalled for longer than the layer's redelivery_timeout)",
                _describe(delivery.message),
            )
            return False
        if delivery.attempt == 1 and token.redelivered:
            return self._begin(delivery)
        return True

    async def _begin(self, delivery: _Delivery) -> bool:
        """A redelivered message's handler starts: counted by the layer before it runs."""
        assert self._acking is not None and delivery.token is not None
        try:
            counted = await self._acking.begin(delivery.token, delivery.message)
        except Exception as exc:
            log.warning(
                "could not count the hand-out of redelivered %s (%s); handing it over uncounted",
                _describe(delivery.message),
                describe_error(exc),
            )
            return True
        if counted is None:  # dead-lettered and acknowledged by the layer
            delivery.token = None
            return False
        return True

    def _count(self, kind: str) -> None:
        if kind == "undecodable":
            self.metrics.dropped("undecodable")
        else:
            self.metrics.retry(kind)

    async def listener(self, channel: str) -> None:
        if self.concurrency.get(channel, 1) > 1:
            await self._lanes(channel, self.concurrency[channel], self.ordering_key.get(channel))
            return
        reader = self._reader(channel)
        receiving: asyncio.Task[Any] | None = None
        try:
            while True:
                if self._dead_instance(channel) is not None:
                    # the consumer died while we were receiving: retry what it held first
                    await self._deliver(channel, await self._salvage(channel))
                    continue
                if receiving is None:
                    taken = reader.receive_nowait()  # fetched already: no task, no wait
                    if taken is not None:
                        await self._received(channel, *taken)
                        continue
                    receiving = asyncio.create_task(reader.receive())
                waits: list[asyncio.Future[Any]] = [receiving]
                inbox = self._inboxes.get(channel)
                if inbox is not None and inbox.future is not None:
                    waits.append(inbox.future)
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if not receiving.done():
                    continue
                (message, token), receiving = receiving.result(), None
                await self._received(channel, message, token)
        finally:
            if receiving is not None:
                receiving.cancel()  # loses nothing: see ChannelReader.receive
                await asyncio.gather(receiving, return_exceptions=True)

    async def _received(self, channel: str, message: Any, token: Any) -> None:
        if not isinstance(message, dict) or not message.get("type"):
            self.metrics.dropped("no_type")
            log.warning("skipped a message without 'type' on %r", channel)
            self._acknowledge(_Delivery({}, token=token))
            return
        await self._deliver(channel, [self._hold(_Delivery(message, token=token))])

    def _reader(self, channel: str) -> ChannelReader:
        acking = self._acking
        return ChannelReader(
            self.channel_layer,
            channel,
            log=log,
            label="worker",
            count=self._count,
            receive=acking.receive_with_ack if acking is not None else self._receive_unacked,
            receive_nowait=acking.receive_with_ack_nowait if acking is not None else None,
        )

    async def _lanes(self, channel: str, lanes: int, key: str | None) -> None:
        """Receive ``channel`` for ``lanes`` consumer instances at once.

        A message whose ``key`` has a value goes to the lane that value hashes to, so messages
        with equal values are handled one after the other, in order; one without goes to a free
        lane. Each lane holds at most one message besides the one its consumer handles.
        """
        reader = self._reader(channel)
        queues: list[asyncio.Queue[_Delivery]] = []
        feeders: list[asyncio.Task[None]] = []
        for lane in range(lanes):
            slot = f"{channel}#{lane}"
            self._slot_channel[slot] = channel
            queues.append(asyncio.Queue(maxsize=1))
            feeders.append(asyncio.create_task(self._feed(slot, queues[-1])))
        turn = 0
        try:
            while True:
                message, token = await reader.receive()
                if not isinstance(message, dict) or not message.get("type"):
                    self.metrics.dropped("no_type")
                    log.warning("skipped a message without 'type' on %r", channel)
                    self._acknowledge(_Delivery({}, token=token))
                    continue
                value = message.get(key) if key else None
                if value is not None:
                    lane = zlib.crc32(str(value).encode()) % lanes
                else:
                    free = [i for i, q in enumerate(queues) if q.empty()]
                    lane = free[turn % len(free)] if free else turn % lanes
                    turn += 1
                await queues[lane].put(self._hold(_Delivery(message, token=token)))
        finally:
            for task in feeders:
                task.cancel()
            await asyncio.gather(*feeders, return_exceptions=True)
            waiting = [q.get_nowait() for q in queues if not q.empty()]
            if waiting:
                await asyncio.shield(self._put_back(channel, waiting))

    async def _feed(self, slot: str, queue: asyncio.Queue[_Delivery]) -> None:
        """One lane: hand what the lane's queue gets to the slot's consumer, in order."""
        while True:
            if self._dead_instance(slot) is not None:
                await self._deliver(slot, await self._salvage(slot))
                continue
            getting = asyncio.ensure_future(queue.get())
            waits: list[asyncio.Future[Any]] = [getting]
            inbox = self._inboxes.get(slot)
            if inbox is not None and inbox.future is not None:
                waits.append(inbox.future)
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not getting.done():
                    getting.cancel()
                    await asyncio.gather(getting, return_exceptions=True)
            if getting.done() and not getting.cancelled():
                await self._deliver(slot, [getting.result()])

    async def _deliver(self, channel: str, deliveries: list[_Delivery]) -> None:
        """Hand ``deliveries`` to the channel's consumer, one at a time, in order.

        Returns once the consumer took the last one. A consumer that dies meanwhile is replaced,
        and what it held goes to the replacement (see :meth:`_salvage`). Cancelled (drain), the
        deliveries it still holds are put back on the channel.
        """
        pending = deque(deliveries)
        put: asyncio.Future[None] | None = None
        try:
            while pending:
                if self._dead_instance(channel) is not None:
                    pending.extendleft(reversed(await self._salvage(channel)))
                    continue
                wait = pending[0].not_before - asyncio.get_running_loop().time()
                if wait > 0:
                    await asyncio.sleep(wait)
                inbox = self._instance(channel)
                assert inbox.future is not None
                if not inbox.queue.full():  # room now: no task, no wait (the common case)
                    inbox.queue.put_nowait(pending.popleft())
                    continue
                put = asyncio.ensure_future(inbox.queue.put(pending[0]))
                await asyncio.wait([put, inbox.future], return_when=asyncio.FIRST_COMPLETED)
                if not put.done():
                    put.cancel()
                    await asyncio.gather(put, return_exceptions=True)
                if put.done() and not put.cancelled():
                    pending.popleft()
                put = None
                if inbox.future.done():
                    pending.extendleft(reversed(await self._salvage(channel)))
        except asyncio.CancelledError:
            if put is not None and not put.done():
                put.cancel()
            elif put is not None and not put.cancelled() and pending:
                pending.popleft()  # it reached the consumer
            if pending:
                await asyncio.shield(self._put_back(self._channel_of(channel), list(pending)))
            raise

    async def _salvage(self, channel: str) -> list[_Delivery]:
        """What a dead consumer instance held, to hand to its replacement.

        The message it was handling comes back first when it failed with a transient error and
        has attempts left (after a backoff); otherwise it is dead-lettered. Messages it had not
        taken yet follow, unchanged.
        """
        inbox = self._inboxes.pop(channel)
        assert inbox.future is not None and inbox.future.done()
        self.health.ended(channel)  # health: what it held, it did not finish
        details = self.application_instances.get(channel)
        if details is not None and details["future"] is inbox.future:
            del self.application_instances[channel]
        error = None if inbox.future.cancelled() else inbox.future.exception()
        rescued: list[_Delivery] = []
        while not inbox.queue.empty():
            rescued.append(inbox.queue.get_nowait())
        failed, inbox.current = inbox.current, None
        salvaged: list[_Delivery] = []
        if failed is not None and error is not None:
            salvaged += await self._failed(self._channel_of(channel), failed, error)
        elif error is not None:
            log.warning("consumer on %r failed while idle: %s", channel, describe_error(error))
        if rescued:
            log.warning(
                "consumer on %r exited; handing %d waiting message(s) to a new instance",
                channel,
                len(rescued),
            )
        return salvaged + rescued

    async def _failed(
        self, channel: str, delivery: _Delivery, error: BaseException
    ) -> list[_Delivery]:
        """Log a failed handler; return the delivery to retry, or dead-letter it."""
        policy = self.retry
        what = _describe(delivery.message)
        self.metrics.error("handler")
        transient = isinstance(error, policy.transient)
        if transient and delivery.attempt < policy.max_attempts:
            delay = policy.delay(delivery.attempt)
            self.metrics.retry("handler")
            self.health.retried(channel)
            log.warning(
                "consumer on %r failed on %s, attempt %d of %d: %s; delivering it again in %.1f s",
                channel,
                what,
                delivery.attempt,
                policy.max_attempts,
                describe_error(error),
                delay,
            )
            when = asyncio.get_running_loop().time() + delay
            retry = _Delivery(delivery.message, delivery.attempt + 1, when, delivery.token)
            return [self._hold(retry)]
        reason = (
            f"{delivery.attempt} attempt(s) failed"
            if transient
            else "not a transient error, not retried"
        )
        log.error(
            "consumer on %r failed on %s: %s (%s)",
            channel,
            what,
            describe_error(error),
            reason,
            exc_info=error if not transient else None,
        )
        if await self._dead_letter(channel, delivery, error):
            self._acknowledge(delivery)
        return []

    async def _dead_letter(self, channel: str, delivery: _Delivery, error: BaseException) -> bool:
        """Dead-letter ``delivery``; ``False`` if it could not be sent (the layer redelivers it
        later when it acknowledges deliveries)."""
        self.metrics.dropped("dead_letter")
        self.health.dead_lettered(channel)
        what = _describe(delivery.message)
        if self.retry.dead_letter == "log":
            log.error("gave up on %s from %r (dead_letter: log)", what, channel)
            return True
        target = f"{channel}.dead"
        letter = {
            "type": DEAD_LETTER_TYPE,
            "channel": channel,
            "error": describe_error(error),
            "attempts": delivery.attempt,
            "message": delivery.message,
        }
        try:
            await send_command(self.channel_layer, target, letter, timeout=30)
        except Exception as exc:
            log.error(
                "gave up on %s from %r, and could not send it to %r either: %s",
                what,
                channel,
                target,
                describe_error(exc),
            )
            return False
        log.error("gave up on %s from %r: sent to %r", what, channel, target)
        return True

    async def _put_back(self, channel: str, deliveries: list[_Delivery]) -> None:
        """Return undelivered messages to their channel (stopping): the next worker gets them."""
        for delivery in deliveries:
            try:
                await send_command(self.channel_layer, channel, delivery.message, timeout=10)
            except Exception as exc:
                log.error(
                    "stopping: could not put %s back on %r: %s",
                    _describe(delivery.message),
                    channel,
                    describe_error(exc),
                )
            else:
                self._acknowledge(delivery)
                log.info("stopping: put %s back on %r", _describe(delivery.message), channel)

    # -- stopping -----------------------------------------------------------------------------

    async def drain(self) -> None:
        """Stop receiving; give consumers ``shutdown_grace`` s to finish what they hold."""
        for task in self._listeners:
            task.cancel()
        await asyncio.gather(*self._listeners, return_exceptions=True)
        try:
            await asyncio.wait_for(self._consumers_idle(), self.shutdown_grace)
        except TimeoutError:
            log.warning("consumers still busy after %.0f s; stopping them", self.shutdown_grace)
        for channel, inbox in list(self._inboxes.items()):
            # what a consumer still holds (busy past the grace, or failed while draining)
            # goes back on its channel for the next worker: at-least-once, never silent
            if inbox.future is not None and not inbox.future.done():
                inbox.future.cancel()
                await asyncio.gather(inbox.future, return_exceptions=True)
            left = [inbox.current] if inbox.holds_unfinished and inbox.current else []
            while not inbox.queue.empty():
                left.append(inbox.queue.get_nowait())
            inbox.current = None
            if left:
                await self._put_back(self._channel_of(channel), left)

    async def _consumers_idle(self) -> None:
        for inbox in list(self._inboxes.values()):
            future = inbox.future
            if future is None:
                continue
            while not future.done():
                idle = asyncio.create_task(inbox.idle.wait())
                await asyncio.wait([idle, future], return_when=asyncio.FIRST_COMPLETED)
                idle.cancel()
                if inbox.drained:
                    break
                await asyncio.sleep(0)  # the consumer is about to take the waiting message

    async def serve(self) -> None:
        """Run until SIGTERM/SIGINT, then drain. What ``manage.py runworker`` calls."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        running = asyncio.create_task(self.arun())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([running, stopping], return_when=asyncio.FIRST_COMPLETED)
        if running.done():
            stopping.cancel()
            running.result()
            return
        log.info("signal received: draining consumers")
        await self.drain()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        for inbox in self._inboxes.values():
            if inbox.future is not None:
                inbox.future.cancel()
        await asyncio.gather(
            *(i.future for i in self._inboxes.values() if i.future is not None),
            return_exceptions=True,
        )
        await close_layer(self.channel_layer, log)

    def run(self) -> None:
        asyncio.run(self.health.around(self.serve))  # health: the server and readiness around it


#: scheduler.done reports on their way (a reference, so a pending task is not collected)
_REPORTS: set[asyncio.Future[None]] = set()


def completion_report(message: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """``(channel, scheduler.done)`` for a handled message whose schedule waits for its run to
    finish (a ``scheduler.fire`` with ``report_done: "worker"``), else ``None``.

    The scheduler's overlap policies (gateways/scheduler/README.md) are fed by these reports.
    """
    if message.get("type") != "scheduler.fire" or message.get("report_done") != "worker":
        return None
    run, channel = message.get("run_id"), message.get("reply_channel")
    if not isinstance(run, str) or not isinstance(channel, str):
        return None
    return channel, {"type": "scheduler.done", "run_id": run, "schedule": message.get("schedule")}


def _report_sent(future: asyncio.Future[None]) -> None:
    _REPORTS.discard(future)
    error = None if future.cancelled() else future.exception()
    if error is not None:
        log.warning(
            "could not report a scheduler run as done (%s); it ends at its run_timeout",
            describe_error(error),
        )


def _log_failed_ack(future: asyncio.Future[Any]) -> None:
    error = None if future.cancelled() else future.exception()
    if error is not None:
        log.warning(
            "acknowledgement failed (%s); the layer delivers the message again later",
            describe_error(error),
        )
