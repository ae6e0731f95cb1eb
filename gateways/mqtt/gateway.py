"""``MqttGateway``: broker messages → ``mqtt.message``; ``mqtt.publish`` / ``subscribe`` → broker.

Delivery follows the layer, not our hopes. A QoS 1/2 message is acknowledged to the broker only
after :meth:`Gateway.publish` returned ``True`` for every channel it goes to; while the layer is
full or down the hand-off keeps retrying, acknowledgements stop, and the broker stops sending once
``receive_maximum`` messages are unacknowledged. The socket is always read (keep-alive must never
fail because of our own pushback); what the broker sends beyond the hold (``max_pending``: 3.1.1
has no receive maximum, mosquitto overshoots it) is left with it unacknowledged and fetched again
by resuming the session once the hold is empty (README, "Stalls"). QoS 0 messages, which have
nothing to withhold, wait in a bounded :class:`EventBuffer`.

Hand-offs run in arrival order on one task, so consumers see a topic's messages in order and the
acknowledgements leave in the order the messages came (MQTT 5 §4.6).

Subscriptions: the YAML's are static; ``mqtt.subscribe`` adds run-time ones, kept in the store
(a Redis hash with a Redis layer) and told to every replica. All of them are sent again after
every reconnect, and ``/readyz`` is green only when the broker granted each one.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import tempfile
from collections import OrderedDict
from collections.abc import Awaitable, Coroutine, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any, ClassVar, Final, TypeVar

from paho.mqtt.client import MQTTMessage
from paho.mqtt.reasoncodes import ReasonCode
from prometheus_client import Counter, Gauge

from core.envelope import Command, CommandError
from core.logs import clip
from core.metrics import REGISTRY
from core.retry import LAYER_ERRORS, Backoff, StartupError, cancel_and_wait, describe_error
from core.service import HANDOFF_BATCH, EventBuffer, Gateway, handles
from core.types import ChannelLayer
from gateways.mqtt.config import MqttGatewayConfig
from gateways.mqtt.connection import (
    ConnectionLost,
    MqttConnection,
    NotConnected,
    QueueFull,
)
from gateways.mqtt.store import StoreError, open_store
from gateways.mqtt.translate import (
    BrokerSubscription,
    InvalidCommand,
    Route,
    SubscriptionTable,
    inbound_message,
    parse_publish,
    parse_subscribe,
    parse_unsubscribe,
    topic_of,
)

__all__ = ["MqttGateway", "claim_client_id"]

T = TypeVar("T")

#: seconds between renewals of this process's membership in the replicas group
REJOIN_INTERVAL = 3600.0
#: ids of recently handed-off QoS 1/2 messages kept to count redeliveries as duplicates
RECENT_IDS: Final = 20_000
#: seconds between two WARNING lines about QoS 1/2 messages dropped beyond the hold
DROP_REPORT_INTERVAL: Final = 1.0
#: mosquitto's broker-wide counters (published every sys_interval, 10 s by default)
SYS_DROPPED: Final = "$SYS/broker/publish/messages/dropped"
SYS_STORED: Final = "$SYS/broker/store/messages/count"

_DEFERRED = Counter(
    "mqtt_deferred",
    "QoS 1 messages left unacknowledged with the broker beyond the hold (redelivered when the "
    "gateway resumes its session)",
    ["gateway"],
    registry=REGISTRY,
)
_SESSION_RESUMES = Counter(
    "mqtt_session_resumes",
    "Deliberate reconnects that fetch the messages left with the broker during a stall",
    ["gateway"],
    registry=REGISTRY,
)
_BROKER_DROPPED = Gauge(
    "mqtt_broker_dropped_messages",
    "The broker's own count of messages it dropped, all clients ($SYS/broker/publish/messages/"
    "dropped on mosquitto; -1 until reported)",
    ["gateway"],
    registry=REGISTRY,
)
_BROKER_STORED = Gauge(
    "mqtt_broker_stored_messages",
    "Messages the broker holds, all clients ($SYS/broker/store/messages/count; -1 until reported)",
    ["gateway"],
    registry=REGISTRY,
)

#: what a layer without working groups raises from group_add / group_send
_GROUP_ERRORS: tuple[type[BaseException], ...] = (
    *LAYER_ERRORS,
    AttributeError,
    NotImplementedError,
)


@dataclass
class _Pending:
    """A received QoS 1/2 message waiting for the layer; acknowledged once every event is in."""

    events: list[tuple[str, dict[str, Any]]]
    mid: int
    qos: int
    generation: int
    size: int = 0
    id: str | None = None


@dataclass
class _FilterState:
    """The broker's answer to the latest SUBSCRIBE of one filter on the current connection."""

    settled: asyncio.Event = field(default_factory=asyncio.Event)
    granted: int | None = None
    refused: str | None = None

    def reset(self) -> None:
        self.granted = None
        self.refused = None
        self.settled.clear()


def _reason(codes: list[ReasonCode]) -> ReasonCode | None:
    return codes[0] if codes else None


def claim_client_id(name: str) -> tuple[str, IO[str] | None]:
    """The default client id: ``NAME-HOSTNAME``, then ``-2``, ``-3`` … for more processes.

    Stable across restarts, so the persistent session (and what the broker queued for it) is
    found again. Two processes of one integration on one host must not share an id (the broker
    would hand the session back and forth), so each holds an ``flock`` on a file named after its
    id in the temporary directory; the lock goes with the process, and the file returned here
    must stay open for as long as the id is in use.
    """
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", os.uname().nodename) or "host"
    base = f"{name}-{host}"
    directory = Path(tempfile.gettempdir()) / f"channels-gateways-{os.getuid()}"
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
    except OSError:
        return base, None
    for n in range(1, 100):
        client_id = base if n == 1 else f"{base}-{n}"
        digest = hashlib.sha256(client_id.encode()).hexdigest()[:32]
        try:
            handle = open(directory / f"mqtt-{digest}.lock", "a")  # noqa: SIM115 (kept open)
        except OSError:
            return base, None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        return client_id, handle
    return f"{base}-{secrets.token_hex(4)}", None


class MqttGateway(Gateway[MqttGatewayConfig]):
    """One broker connection per integration; see the module docstring."""

    protocol = "mqtt"
    config_model = MqttGatewayConfig
    #: publishes wait for their PUBACK; let several be in flight (each starts in arrival order)
    command_concurrency: ClassVar[int] = 32

    def __init__(self, config: MqttGatewayConfig, layer: ChannelLayer) -> None:
        super().__init__(config, layer)
        self.settings = settings = config.mqtt
        self._id_lock: IO[str] | None = None
        if settings.client_id:
            self.client_id = settings.client_id
        else:
            self.client_id, self._id_lock = claim_client_id(config.name)
        self.default_channel = config.route("mqtt.message")
        self.table = SubscriptionTable(
            Route(
                filter=sub.topic,
                channel=config.subscription_channel(sub),
                qos=sub.qos,
                payload=sub.payload or settings.payload,
                no_local=sub.no_local,
                retain_as_published=sub.retain_as_published,
                retain_handling=sub.retain_handling,
                static=True,
            )
            for sub in settings.subscriptions
        )
        self.store = open_store(layer, config.name, enabled=settings.persist_subscriptions)
        self.buffer = EventBuffer(self, settings.buffer)
        self.connection = MqttConnection(
            self, settings, client_id=self.client_id, listener=self, events=self.buffer
        )
        #: replicas of this integration listen here for mqtt.resync
        self.replicas_group = f"{config.name}.gateways"
        #: the hold: received QoS 1/2 messages not yet taken by the layer, unacknowledged
        self._pending: asyncio.Queue[_Pending] = asyncio.Queue()
        #: QoS 1/2 messages received and not acknowledged yet (queued or being handed off)
        self._held = 0
        self._held_bytes = 0
        #: beyond the hold: QoS 1 messages are left with the broker until the session resumes
        self._deferring = False
        self._deferred = 0
        self._resuming = False
        self._hold_drops = 0  # dropped beyond the hold (non-persistent session), not yet logged
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._watch = (
            {
                SYS_DROPPED: _BROKER_DROPPED.labels(config.name),
                SYS_STORED: _BROKER_STORED.labels(config.name),
            }
            if settings.watch_broker_drops
            else {}
        )
        for gauge in self._watch.values():
            gauge.set(-1)
        self._broker_dropped: int | None = None
        self._deferred_metric = _DEFERRED.labels(config.name)
        self._resumes_metric = _SESSION_RESUMES.labels(config.name)
        self._filters: dict[str, _FilterState] = {}
        self._changes = asyncio.Lock()
        self._store_loaded = not self.store.persistent
        #: filters removed while disconnected: a resumed session still has them at the broker
        self._stale: set[str] = set()
        self._accepting = True
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        if self.store.persistent:
            try:
                await self._load_store()
            except StoreError as exc:
                self.log.warning(
                    "%s: run-time subscriptions not loaded (%s); retrying in the background",
                    self.name,
                    exc,
                )
                self._spawn(self._load_store_until_done())
            await self._join_replicas()
        try:
            await self.connection.start()
        except StartupError as exc:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.connection.close()
            await self.store.close()
            self._release_client_id()
            raise StartupError(f"MQTT broker {exc}") from exc.__cause__
        if not self.settings.persistent_session:
            self.log.warning(
                "%s: the broker session does not outlive a disconnect (clean_start: true or "
                "session_expiry: 0): QoS 1/2 messages beyond mqtt.max_pending are dropped "
                "(counted) while the layer is full, and unacknowledged ones are lost on a "
                "reconnect",
                self.name,
            )
        self.buffer.start()
        self._spawn(self._handoff_loop())
        if self.store.persistent:
            self._spawn(self._stay_in_replicas_group())
        self.log.info(
            "%s: MQTT %s, client id %r, %d subscription(s), run-time subscriptions in %s",
            self.name,
            self.settings.protocol,
            self.client_id,
            len(self.table.filters()),
            self.store.description,
        )

    async def drain(self) -> None:
        # QoS 0/1 arriving from now on are left to the broker (redelivered to the next session);
        # QoS 2 is ours once paho answered PUBREC, so it is still handed off
        self._accepting = False
        await self._pending.join()
        await self.buffer.flush(self.config.shutdown_grace)

    async def close(self) -> None:
        self._accepting = False
        await cancel_and_wait(*self._tasks)
        await self.buffer.flush(0)
        self._report_hold_drops()  # drops of the last second are not left unlogged at exit
        await self.connection.close()  # with the will first when will.on_stop
        if self.store.persistent and self.reply_channel is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    self.layer.group_discard(self.replicas_group, self.reply_channel), 2
                )
        await self.store.close()
        self._release_client_id()

    def _release_client_id(self) -> None:
        if self._id_lock is not None:
            self._id_lock.close()  # the flock goes with it
            self._id_lock = None

    def held_messages(self) -> int:
        return self._held + len(self.buffer)

    def readiness(self) -> list[str]:
        reasons = self.connection.readiness()
        if self.connection.connected:
            waiting = [f for f, s in self._filters.items() if not s.settled.is_set()]
            if waiting:
                reasons.append(f"waiting for SUBACK of {', '.join(map(repr, waiting[:5]))}")
            for filter_, state in self._filters.items():
                if state.refused is not None:
                    reasons.append(f"subscription {filter_!r} refused: {state.refused}")
        if not self._store_loaded:
            reasons.append(f"run-time subscriptions not loaded from {self.store.description}")
        if self._deferring:
            reasons.append(
                "hold full (mqtt.max_pending): further QoS 1 messages wait at the broker, "
                "unacknowledged, until the layer takes the held ones"
            )
        return reasons

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- connection events (MqttListener) -----------------------------------------------------

    def client_connected(self, details: Mapping[str, Any]) -> None:
        session_present = bool(details["session_present"])
        # a new connection: the broker sends the session's unacknowledged messages again
        self._deferring = False
        self._deferred = 0
        self._resuming = False
        self.log.info(
            "%s: %s session of client id %r",
            self.name,
            "resumed" if session_present else "new",
            self.client_id,
        )
        for sub in self.table.subscriptions():
            self._send_subscribe(sub)
        for topic in self._watch:
            with contextlib.suppress(NotConnected):
                self.connection.subscribe(topic, 0).add_done_callback(
                    partial(self._watch_suback, topic)
                )
        stale, self._stale = self._stale, set()
        for filter_ in stale - set(self.table.filters()):
            with contextlib.suppress(NotConnected):
                self.connection.unsubscribe(filter_)
        birth = self.settings.birth
        if birth is not None:
            with contextlib.suppress(NotConnected, QueueFull):
                self.connection.publish(
                    birth.topic, birth.payload.encode(), birth.qos, birth.retain
                )
        if self.store.persistent and self._store_loaded:
            self._spawn(self._resync_quietly())  # catch changes a replica made meanwhile

    def client_disconnected(self, reason: str) -> None:
        for state in self._filters.values():
            state.reset()

    def _watch_suback(self, topic: str, future: asyncio.Future[list[ReasonCode]]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        reason = _reason(future.result())
        if reason is not None and reason.is_failure:
            self.log.info(
                "%s: the broker refused %s (%s): its drop counter is not watched",
                self.name,
                topic,
                reason.getName(),
            )

    def _broker_counter(self, topic: str, payload: bytes) -> None:
        """A mosquitto $SYS counter: export it; a growing drop counter is a WARNING."""
        try:
            value = int(payload.strip() or b"0")
        except ValueError:
            return
        self._watch[topic].set(value)
        if topic != SYS_DROPPED:
            return
        before, self._broker_dropped = self._broker_dropped, value
        if before is not None and value > before:
            self.log.warning(
                "%s: the broker %s dropped %d message(s) since its last report (%d in all, "
                "every client counted): its queue limits are too small for a lossless "
                "deployment (mosquitto: max_queued_messages 0 or large, max_queued_bytes)",
                self.name,
                self.settings.broker,
                value - before,
                value,
            )

    def mqtt_message(self, message: MQTTMessage, generation: int) -> None:
        if self._watch and message.qos == 0:
            topic = topic_of(message)
            if topic in self._watch:
                self._broker_counter(topic, bytes(message.payload))
                if not self.table.match(topic):
                    return  # ours alone: not an event
        try:
            inbound = inbound_message(
                message,
                self.table,
                client_id=self.client_id,
                default_channel=self.default_channel,
                default_format=self.settings.payload,
                id_property=self.settings.id_property,
                max_payload=self.settings.max_payload,
            )
        except Exception:
            self.metrics.error("translate")
            self.log.exception(
                "%s: cannot translate a message (mid %d); acknowledging it", self.name, message.mid
            )
            self.connection.ack(message.mid, message.qos, generation)
            return
        if inbound.too_large:
            self.metrics.dropped("too_large")
            self.log.warning(
                "%s: dropped a %d-byte message on %s: over mqtt.max_payload (%d bytes)",
                self.name,
                inbound.size,
                clip(inbound.topic),
                self.settings.max_payload,
            )
            self.connection.ack(inbound.mid, inbound.qos, generation)
            return
        if not self._accepting and inbound.qos < 2:
            if inbound.qos == 0:
                self.metrics.dropped("shutdown")
            return  # QoS 1 is not acknowledged: the broker redelivers it
        events = [
            (d.channel, self.event("message", id=inbound.id, **d.keys)) for d in inbound.deliveries
        ]
        if inbound.qos == 0:
            for channel, event in events:
                self.buffer.put(event, channel=channel)
            return
        if inbound.id is not None and inbound.id in self._recent:
            self.metrics.duplicates.inc()  # handed off before: its ack did not reach the broker
        if inbound.qos == 1 and (self._deferring or self._hold_full(inbound.size)):
            self._beyond_hold(inbound.mid, generation)
            return
        # QoS 2 is held even beyond the limit: after PUBREC it is ours, the broker never
        # sends it again (only a broker ignoring receive_maximum gets it past the hold)
        self._held += 1
        self._held_bytes += inbound.size
        self._pending.put_nowait(
            _Pending(events, inbound.mid, inbound.qos, generation, inbound.size, inbound.id)
        )

    def _hold_full(self, size: int) -> bool:
        held = self._held
        if held == 0:
            return False  # one message always fits
        settings = self.settings
        return held >= settings.max_pending or self._held_bytes + size > settings.max_pending_bytes

    def _beyond_hold(self, mid: int, generation: int) -> None:
        """A QoS 1 message the hold has no room for."""
        if self.settings.persistent_session:
            if not self._deferring:
                self._deferring = True
                self.log.warning(
                    "%s: hold full (%d message(s), %d bytes): further QoS 1 messages stay with "
                    "the broker, unacknowledged, and are fetched again by resuming the session "
                    "once the layer took the held ones",
                    self.name,
                    self._held,
                    self._held_bytes,
                )
            self._deferred += 1
            self._deferred_metric.inc()
            return
        # the session ends with the connection: the broker would never send it again
        self.connection.ack(mid, 1, generation)
        self.metrics.dropped("hold_full")
        if self._hold_drops == 0:
            asyncio.get_running_loop().call_later(DROP_REPORT_INTERVAL, self._report_hold_drops)
        self._hold_drops += 1

    def _report_hold_drops(self) -> None:
        count, self._hold_drops = self._hold_drops, 0
        if count == 0:  # already reported by close()
            return
        self.log.warning(
            "%s: dropped %d QoS 1 message(s): the hold is full (mqtt.max_pending %d) and the "
            "session does not persist (clean_start: true or session_expiry: 0)",
            self.name,
            count,
            self.settings.max_pending,
        )

    # -- inbound hand-off ---------------------------------------------------------------------

    async def _handoff_loop(self) -> None:
        while True:
            # everything held goes in one hand-off: one layer round trip on core.streams
            items = [await self._pending.get()]
            while len(items) < HANDOFF_BATCH and not self._pending.empty():
                items.append(self._pending.get_nowait())
            try:
                await self._hand_off(items)
            finally:
                for item in items:
                    self._held -= 1
                    self._held_bytes -= item.size
                    self._pending.task_done()
            if self._deferring and self._pending.empty() and not self.stopping:
                self._resume_session()

    def _resume_session(self) -> None:
        """The hold is empty again: fetch what was left with the broker meanwhile."""
        if self._resuming:
            return
        self._resuming = True  # until the new connection: whatever still comes is left there
        count = self._deferred
        if self.connection.restart(
            f"resuming the session: the broker sends the {count} message(s) left with it again"
        ):
            self._resumes_metric.inc()
            self.log.info(
                "%s: hold empty; reconnecting to fetch %d message(s) left with the broker",
                self.name,
                count,
            )

    async def _hand_off(self, items: list[_Pending]) -> None:
        """Publish the items' events in order; acknowledge each item whose events are all in.

        An event no layer can take is skipped (logged and counted by ``publish_many``) and its
        message acknowledged, so the broker does not send it again forever. When the gateway
        stops first, what is not in stays unacknowledged: the broker delivers it again.
        """
        done = await self.publish_many([pair for item in items for pair in item.events])
        position = 0
        for item in items:
            position += len(item.events)
            if position > done:
                return
            if item.id is not None:
                self._recent[item.id] = None
                if len(self._recent) > RECENT_IDS:
                    self._recent.popitem(last=False)
            self.connection.ack(item.mid, item.qos, item.generation)

    # -- subscriptions ------------------------------------------------------------------------

    def _send_subscribe(self, sub: BrokerSubscription) -> _FilterState:
        state = self._filters.setdefault(sub.filter, _FilterState())
        state.reset()
        try:
            future = self.connection.subscribe(
                sub.filter,
                sub.qos,
                identifier=sub.identifier,
                no_local=sub.no_local,
                retain_as_published=sub.retain_as_published,
                retain_handling=sub.retain_handling,
            )
        except NotConnected:
            return state  # sent with all the others on the next connect
        future.add_done_callback(partial(self._suback, sub.filter, state))
        return state

    def _suback(
        self, filter_: str, state: _FilterState, future: asyncio.Future[list[ReasonCode]]
    ) -> None:
        if future.cancelled() or future.exception() is not None:
            return  # the connection closed first; every subscription is sent again on connect
        if self._filters.get(filter_) is not state:
            return  # unsubscribed meanwhile
        reason = _reason(future.result())
        if reason is None or reason.is_failure:
            state.refused = reason.getName() if reason is not None else "no reason code"
            self.metrics.error("subscribe")
            self.log.error(
                "%s: the broker refused the subscription %s: %s",
                self.name,
                clip(filter_),
                state.refused,
            )
        else:
            state.granted = int(reason.value)
            wanted = self.table.subscription(filter_)
            if wanted is not None and state.granted < wanted.qos:
                self.log.info(
                    "%s: %s granted at QoS %d (asked for %d)",
                    self.name,
                    clip(filter_),
                    state.granted,
                    wanted.qos,
                )
        state.settled.set()

    async def _send_unsubscribe(self, filter_: str, deadline: float) -> None:
        self._filters.pop(filter_, None)
        try:
            future = self.connection.unsubscribe(filter_)
        except NotConnected:
            self._stale.add(filter_)  # sent on the next connect, when the session may be back
            return
        with contextlib.suppress(TimeoutError, ConnectionLost):
            reason = _reason(await self._until(asyncio.shield(future), deadline))
            if reason is not None and reason.is_failure:
                self.log.warning(
                    "%s: the broker refused to unsubscribe %s: %s",
                    self.name,
                    clip(filter_),
                    reason.getName(),
                )

    async def _load_store(self) -> None:
        routes = await self.store.load()
        async with self._changes:
            self._apply(routes)
        self._store_loaded = True

    async def _load_store_until_done(self) -> None:
        backoff = Backoff(1.0, 30.0)
        while not self._store_loaded:
            await asyncio.sleep(backoff.next())
            try:
                await self._load_store()
            except StoreError as exc:
                self.log.warning("%s: run-time subscriptions still not loaded: %s", self.name, exc)
            else:
                self.log.info("%s: run-time subscriptions loaded", self.name)

    def _apply(self, routes: list[Route]) -> int:
        """Make the table's run-time routes equal ``routes``; tell the broker what changed."""
        wanted = {(r.filter, r.channel): r for r in routes if not self._is_static(r)}
        current = {(r.filter, r.channel): r for r in self.table.routes() if not r.static}
        touched: set[str] = set()
        for key, route in current.items():
            if key not in wanted:
                self.table.remove(route.filter, route.channel)
                touched.add(route.filter)
        for key, route in wanted.items():
            if current.get(key) != route and self.table.add(route):
                touched.add(route.filter)
        for filter_ in touched:
            sub = self.table.subscription(filter_)
            if sub is not None:
                self._send_subscribe(sub)
            else:
                loop = asyncio.get_running_loop()
                self._spawn(
                    self._send_unsubscribe(filter_, loop.time() + self.settings.command_timeout)
                )
        return len(wanted)

    def _is_static(self, route: Route) -> bool:
        existing = self.table.find(route.filter, route.channel)
        return existing is not None and existing.static

    async def _resync_quietly(self) -> None:
        try:
            await self._load_store()
        except StoreError as exc:
            self.log.warning("%s: could not re-read run-time subscriptions: %s", self.name, exc)

    async def _stay_in_replicas_group(self) -> None:
        # channels_redis forgets group members after group_expiry (a day by default)
        while True:
            await asyncio.sleep(REJOIN_INTERVAL)
            await self._join_replicas()

    async def _join_replicas(self) -> None:
        assert self.reply_channel is not None
        try:
            await asyncio.wait_for(self.layer.group_add(self.replicas_group, self.reply_channel), 5)
        except _GROUP_ERRORS as exc:
            self.log.warning(
                "%s: cannot join group %r (%s): run-time subscriptions reach other replicas only "
                "when they reconnect",
                self.name,
                self.replicas_group,
                describe_error(exc),
            )

    async def _notify_replicas(self) -> None:
        if not self.store.persistent:
            return
        try:
            await asyncio.wait_for(
                self.layer.group_send(self.replicas_group, {"type": "mqtt.resync"}), 5
            )
        except _GROUP_ERRORS as exc:
            self.log.warning(
                "%s: could not tell the other replicas (%s); they catch up when they reconnect",
                self.name,
                describe_error(exc),
            )

    # -- commands -----------------------------------------------------------------------------

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.settings.command_timeout

    async def _until(self, awaitable: Awaitable[T], deadline: float) -> T:
        remaining = deadline - asyncio.get_running_loop().time()
        return await asyncio.wait_for(awaitable, max(0.0, remaining))

    async def _wait_connected(self, deadline: float) -> None:
        if not self.connection.connected:
            try:
                await self.connection.wait_connected(deadline - asyncio.get_running_loop().time())
            except TimeoutError:
                raise CommandError(
                    f"not connected to {self.settings.broker} "
                    f"({self.connection.last_error}) within {self.settings.command_timeout:g} s"
                ) from None

    @handles("mqtt.publish")
    async def handle_publish(self, command: Command) -> dict[str, Any]:
        """``mqtt.publish``: topic, payload, qos, retain, properties (see README)."""
        try:
            action = parse_publish(command.body, mqtt5=self.settings.mqtt5)
        except InvalidCommand as exc:
            raise CommandError(str(exc)) from None
        deadline = self._deadline()
        await self._wait_connected(deadline)
        if action.qos > self.connection.max_qos:
            raise CommandError(f"the broker accepts QoS {self.connection.max_qos} at most")
        if action.retain and not self.connection.retain_available:
            raise CommandError("the broker does not support retained messages")
        try:
            mid, done = self.connection.publish(
                action.topic, action.payload, action.qos, action.retain, action.properties
            )
        except (NotConnected, QueueFull) as exc:
            raise CommandError(f"cannot publish: {exc}") from None
        try:
            reason = await self._until(asyncio.shield(done), deadline)
        except TimeoutError:
            raise CommandError(
                f"no acknowledgement from the broker within {self.settings.command_timeout:g} s "
                "(the message stays queued and may still be delivered)"
            ) from None
        except ConnectionLost as exc:
            raise CommandError(f"cannot publish: {exc}") from None
        if reason.is_failure:
            raise CommandError(f"the broker refused the message: {reason.getName()}")
        return {"topic": action.topic, "qos": action.qos, "mid": mid}

    @handles("mqtt.subscribe")
    async def handle_subscribe(self, command: Command) -> dict[str, Any]:
        """``mqtt.subscribe``: topic (filter), qos, channel, payload, MQTT 5 options."""
        try:
            route = parse_subscribe(
                command.body,
                default_channel=self.default_channel,
                default_format=self.settings.payload,
                mqtt5=self.settings.mqtt5,
            )
        except InvalidCommand as exc:
            raise CommandError(str(exc)) from None
        deadline = self._deadline()
        async with self._changes:
            previous = self.table.find(route.filter, route.channel)
            if previous is not None and previous.static:
                raise CommandError(
                    f"{clip(route.filter)} → {route.channel!r} is a static subscription (YAML)"
                )
            try:
                await self.store.save(route)
            except StoreError as exc:
                raise CommandError(f"cannot store the subscription: {exc}") from None
            changed = self.table.add(route)
            state = self._filters.get(route.filter)
            sub = self.table.subscription(route.filter)
            assert sub is not None
            if changed or state is None or state.refused is not None:
                state = self._send_subscribe(sub)
        self.log.info(
            "%s: run-time subscription %s (QoS %d) → %r",
            self.name,
            clip(route.filter),
            route.qos,
            route.channel,
        )
        try:
            await self._until(state.settled.wait(), deadline)
        except TimeoutError:
            why = self.connection.last_error or "no SUBACK"
            raise CommandError(
                f"the broker did not confirm {clip(route.filter)} within "
                f"{self.settings.command_timeout:g} s ({why}); the subscription is kept and "
                "sent again on every reconnect"
            ) from None
        if state.refused is not None:
            refused = state.refused
            async with self._changes:
                self.table.remove(route.filter, route.channel)
                if previous is not None:
                    self.table.add(previous)
                with contextlib.suppress(StoreError):
                    if previous is not None:
                        await self.store.save(previous)
                    else:
                        await self.store.delete(route.filter, route.channel)
                if route.filter not in self.table:
                    self._filters.pop(route.filter, None)
            raise CommandError(
                f"the broker refused the subscription {clip(route.filter)}: {refused}"
            )
        await self._notify_replicas()
        return {
            "topic": route.filter,
            "channel": route.channel,
            "qos": route.qos,
            "granted_qos": state.granted,
        }

    @handles("mqtt.unsubscribe")
    async def handle_unsubscribe(self, command: Command) -> dict[str, Any]:
        """``mqtt.unsubscribe``: topic (filter), optional channel."""
        try:
            action = parse_unsubscribe(command.body)
        except InvalidCommand as exc:
            raise CommandError(str(exc)) from None
        deadline = self._deadline()
        async with self._changes:
            routes = self.table.routes(action.filter)
            doomed = [r for r in routes if not r.static and action.channel in (None, r.channel)]
            if not doomed and any(r.static and action.channel in (None, r.channel) for r in routes):
                raise CommandError(
                    f"{clip(action.filter)} is a static subscription: remove it from the YAML"
                )
            try:
                for route in doomed:
                    await self.store.delete(route.filter, route.channel)
            except StoreError as exc:
                raise CommandError(f"cannot update the stored subscriptions: {exc}") from None
            before = self.table.subscription(action.filter)
            self.table.remove(action.filter, action.channel)
            after = self.table.subscription(action.filter)
            if doomed and after is None:
                await self._send_unsubscribe(action.filter, deadline)
            elif after is not None and after != before:
                self._send_subscribe(after)
        if doomed:
            self.log.info(
                "%s: removed %d run-time subscription(s) of %s",
                self.name,
                len(doomed),
                clip(action.filter),
            )
            await self._notify_replicas()
        return {"topic": action.filter, "removed": len(doomed)}

    @handles("mqtt.resync")
    async def handle_resync(self, command: Command) -> dict[str, Any]:
        """``mqtt.resync`` (internal): re-read run-time subscriptions from the store."""
        try:
            routes = await self.store.load()
        except StoreError as exc:
            raise CommandError(str(exc)) from None
        async with self._changes:
            count = self._apply(routes)
        self._store_loaded = True
        return {"subscriptions": count}
