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

Subscriptions (the YAML's, and run-time ones kept in a store and told to every replica) are
:mod:`gateways.mqtt.subscriptions`; the default client id and its claim are in
:mod:`gateways.mqtt.connection`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Final

from paho.mqtt.client import MQTTMessage
from paho.mqtt.reasoncodes import ReasonCode
from prometheus_client import Counter, Gauge

from core.envelope import Command, CommandError
from core.logs import clip
from core.metrics import REGISTRY
from core.retry import StartupError, cancel_and_wait
from core.service import HANDOFF_BATCH, EventBuffer, Gateway, handles
from core.types import ChannelLayer
from gateways.mqtt.config import MqttGatewayConfig
from gateways.mqtt.connection import (
    ClientIdClaim,
    ConnectionLost,
    MqttConnection,
    NotConnected,
    QueueFull,
    claim_client_id,
)
from gateways.mqtt.store import open_store
from gateways.mqtt.subscriptions import Subscriptions, first_reason, within
from gateways.mqtt.translate import (
    InvalidCommand,
    Route,
    SubscriptionTable,
    inbound_message,
    parse_publish,
    parse_subscribe,
    parse_unsubscribe,
    topic_of,
)

__all__ = ["MqttGateway"]
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


@dataclass
class _Pending:
    """A received QoS 1/2 message waiting for the layer; acknowledged once every event is in."""

    events: list[tuple[str, dict[str, Any]]]
    mid: int
    qos: int
    generation: int
    size: int = 0
    id: str | None = None


class MqttGateway(Gateway[MqttGatewayConfig]):
    """One broker connection per integration; see the module docstring."""

    protocol = "mqtt"
    config_model = MqttGatewayConfig
    #: publishes wait for their PUBACK; let several be in flight (each starts in arrival order)
    command_concurrency: ClassVar[int] = 32

    def __init__(self, config: MqttGatewayConfig, layer: ChannelLayer) -> None:
        super().__init__(config, layer)
        self.settings = settings = config.mqtt
        #: the client id, and with the default one the claim that keeps it this process's own
        self._id_claim = (
            ClientIdClaim(settings.client_id)
            if settings.client_id
            else claim_client_id(config.name)
        )
        self.client_id = self._id_claim.client_id
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
        #: the broker connection (the role object is ``self.client`` in IRC and Slack too)
        self.client = MqttConnection(
            self, settings, client_id=self.client_id, listener=self, events=self.buffer
        )
        self.subscriptions = Subscriptions(
            self, self.client, self.table, self.store, spawn=self._spawn
        )
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
        self._accepting = True
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        await self.subscriptions.open()
        try:
            await self.client.start()
        except StartupError as exc:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.client.close()
            await self.store.close()
            self._id_claim.release()
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
        self.subscriptions.start()
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
        await self.client.close()  # with the will first when will.on_stop
        await self.subscriptions.close()
        self._id_claim.release()

    def held_messages(self) -> int:
        return self._held + len(self.buffer)

    def readiness(self) -> list[str]:
        reasons = self.client.readiness() + self.subscriptions.readiness()
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
        self.subscriptions.send_all()
        for topic in self._watch:
            with contextlib.suppress(NotConnected):
                self.client.subscribe(topic, 0).add_done_callback(
                    partial(self._watch_suback, topic)
                )
        self.subscriptions.send_stale()
        birth = self.settings.birth
        if birth is not None:
            with contextlib.suppress(NotConnected, QueueFull):
                self.client.publish(birth.topic, birth.payload.encode(), birth.qos, birth.retain)
        self.subscriptions.catch_up()  # changes a replica made meanwhile

    def client_disconnected(self, reason: str) -> None:
        self.subscriptions.disconnected()

    def _watch_suback(self, topic: str, future: asyncio.Future[list[ReasonCode]]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        reason = first_reason(future.result())
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
            self.client.ack(message.mid, message.qos, generation)
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
            self.client.ack(inbound.mid, inbound.qos, generation)
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
        self.client.ack(mid, 1, generation)
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
        if self.client.restart(
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
            self.client.ack(item.mid, item.qos, item.generation)

    # -- commands -----------------------------------------------------------------------------

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.settings.command_timeout

    async def _wait_connected(self, deadline: float) -> None:
        if not self.client.connected:
            try:
                await self.client.wait_connected(deadline - asyncio.get_running_loop().time())
            except TimeoutError:
                raise CommandError(
                    f"not connected to {self.settings.broker} "
                    f"({self.client.last_error}) within {self.settings.command_timeout:g} s"
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
        if action.qos > self.client.max_qos:
            raise CommandError(f"the broker accepts QoS {self.client.max_qos} at most")
        if action.retain and not self.client.retain_available:
            raise CommandError("the broker does not support retained messages")
        try:
            mid, done = self.client.publish(
                action.topic, action.payload, action.qos, action.retain, action.properties
            )
        except (NotConnected, QueueFull) as exc:
            raise CommandError(f"cannot publish: {exc}") from None
        try:
            reason = await within(asyncio.shield(done), deadline)
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
        return await self.subscriptions.subscribe(route, self._deadline())

    @handles("mqtt.unsubscribe")
    async def handle_unsubscribe(self, command: Command) -> dict[str, Any]:
        """``mqtt.unsubscribe``: topic (filter), optional channel."""
        try:
            action = parse_unsubscribe(command.body)
        except InvalidCommand as exc:
            raise CommandError(str(exc)) from None
        return await self.subscriptions.unsubscribe(action, self._deadline())

    @handles("mqtt.resync")
    async def handle_resync(self, command: Command) -> dict[str, Any]:
        """``mqtt.resync`` (internal): re-read run-time subscriptions from the store."""
        return await self.subscriptions.resync()
