"""The subscriptions of one MQTT gateway: the table, the store, the replicas, the broker's SUBACKs.

The YAML's subscriptions are static; ``mqtt.subscribe`` adds run-time ones, kept in the store (a
Redis hash with a Redis layer) and told to every replica of the integration through the group
``NAME.gateways`` (``mqtt.resync``: each re-reads the store). All of them are sent again after
every reconnect, and ``/readyz`` is green only when the broker granted each one
(:meth:`Subscriptions.readiness`). Changes to the table are serialised by one lock, so a
subscribe, an unsubscribe and a resync never interleave.

:class:`Subscriptions` is driven by :class:`gateways.mqtt.gateway.MqttGateway`: ``open`` /
``close`` with the gateway, ``send_all`` / ``send_stale`` / ``catch_up`` on each connection,
``disconnected`` when it is lost, and one method per command (the gateway parses the command).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from paho.mqtt.reasoncodes import ReasonCode

from core.envelope import CommandError
from core.logs import clip
from core.retry import LAYER_ERRORS, Backoff, describe_error
from core.service import Gateway
from gateways.mqtt.config import MqttGatewayConfig
from gateways.mqtt.connection import ConnectionLost, MqttConnection, NotConnected
from gateways.mqtt.store import StoreError, SubscriptionStore
from gateways.mqtt.translate import BrokerSubscription, Route, SubscriptionTable, Unsubscribe

__all__ = ["REJOIN_INTERVAL", "FilterState", "Subscriptions", "first_reason", "within"]

T = TypeVar("T")

#: seconds between renewals of this process's membership in the replicas group
REJOIN_INTERVAL = 3600.0

#: what a layer without working groups raises from group_add / group_send
_GROUP_ERRORS: tuple[type[BaseException], ...] = (
    *LAYER_ERRORS,
    AttributeError,
    NotImplementedError,
)


@dataclass
class FilterState:
    """The broker's answer to the latest SUBSCRIBE of one filter on the current connection."""

    settled: asyncio.Event = field(default_factory=asyncio.Event)
    granted: int | None = None
    refused: str | None = None

    def reset(self) -> None:
        self.granted = None
        self.refused = None
        self.settled.clear()


def first_reason(codes: list[ReasonCode]) -> ReasonCode | None:
    """The reason code of a SUBACK / UNSUBACK for one filter (``None``: the broker sent none)."""
    return codes[0] if codes else None


async def within(awaitable: Awaitable[T], deadline: float) -> T:
    """``awaitable``'s result, or ``TimeoutError`` once the loop time ``deadline`` passed."""
    remaining = deadline - asyncio.get_running_loop().time()
    return await asyncio.wait_for(awaitable, max(0.0, remaining))


class Subscriptions:
    """The subscription lifecycle of one gateway; see the module docstring."""

    def __init__(
        self,
        gateway: Gateway[MqttGatewayConfig],
        client: MqttConnection,
        table: SubscriptionTable,
        store: SubscriptionStore,
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
    ) -> None:
        self.gateway = gateway
        self.client = client
        self.table = table
        self.store = store
        self._spawn = spawn
        self.log = gateway.log
        self.name = gateway.name
        self.command_timeout = gateway.config.mqtt.command_timeout
        #: replicas of this integration listen here for mqtt.resync
        self.replicas_group = f"{gateway.name}.gateways"
        self._filters: dict[str, FilterState] = {}
        self._changes = asyncio.Lock()
        self.loaded = not store.persistent
        #: filters removed while disconnected: a resumed session still has them at the broker
        self._stale: set[str] = set()

    # -- with the gateway ---------------------------------------------------------------------

    async def open(self) -> None:
        """Load the run-time subscriptions (in the background if the store is down) and join
        the replicas group. Before the first connection."""
        if not self.store.persistent:
            return
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

    def start(self) -> None:
        """Once connected for the first time: stay in the replicas group."""
        if self.store.persistent:
            self._spawn(self._stay_in_replicas_group())

    async def close(self) -> None:
        """Leave the replicas group and close the store."""
        reply_channel = self.gateway.reply_channel
        if self.store.persistent and reply_channel is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    self.gateway.layer.group_discard(self.replicas_group, reply_channel), 2
                )
        await self.store.close()

    def readiness(self) -> list[str]:
        reasons = []
        if self.client.connected:
            waiting = [f for f, s in self._filters.items() if not s.settled.is_set()]
            if waiting:
                reasons.append(f"waiting for SUBACK of {', '.join(map(repr, waiting[:5]))}")
            for filter_, state in self._filters.items():
                if state.refused is not None:
                    reasons.append(f"subscription {filter_!r} refused: {state.refused}")
        if not self.loaded:
            reasons.append(f"run-time subscriptions not loaded from {self.store.description}")
        return reasons

    # -- with the connection ------------------------------------------------------------------

    def send_all(self) -> None:
        """A new connection: every subscription of the table goes to the broker again."""
        for sub in self.table.subscriptions():
            self._send_subscribe(sub)

    def send_stale(self) -> None:
        """Unsubscribe what was removed while disconnected (a resumed session still has it)."""
        stale, self._stale = self._stale, set()
        for filter_ in stale - set(self.table.filters()):
            with contextlib.suppress(NotConnected):
                self.client.unsubscribe(filter_)

    def catch_up(self) -> None:
        """Re-read the store after a reconnect: a replica may have changed it meanwhile."""
        if self.store.persistent and self.loaded:
            self._spawn(self._resync_quietly())

    def disconnected(self) -> None:
        for state in self._filters.values():
            state.reset()

    # -- commands -----------------------------------------------------------------------------

    async def subscribe(self, route: Route, deadline: float) -> dict[str, Any]:
        """``mqtt.subscribe`` of ``route``: stored, told to the broker and to the replicas."""
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
            await within(state.settled.wait(), deadline)
        except TimeoutError:
            why = self.client.last_error or "no SUBACK"
            raise CommandError(
                f"the broker did not confirm {clip(route.filter)} within "
                f"{self.command_timeout:g} s ({why}); the subscription is kept and "
                "sent again on every reconnect"
            ) from None
        if state.refused is not None:
            refused = state.refused
            await self._undo(route, previous)
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

    async def _undo(self, route: Route, previous: Route | None) -> None:
        """The broker refused ``route``: put back what was there before it."""
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

    async def unsubscribe(self, action: Unsubscribe, deadline: float) -> dict[str, Any]:
        """``mqtt.unsubscribe``: the run-time routes of a filter (one channel's, or all)."""
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

    async def resync(self) -> dict[str, Any]:
        """``mqtt.resync``: re-read the run-time subscriptions from the store."""
        try:
            routes = await self.store.load()
        except StoreError as exc:
            raise CommandError(str(exc)) from None
        async with self._changes:
            count = self._apply(routes)
        self.loaded = True
        return {"subscriptions": count}

    # -- the broker ---------------------------------------------------------------------------

    def _send_subscribe(self, sub: BrokerSubscription) -> FilterState:
        state = self._filters.setdefault(sub.filter, FilterState())
        state.reset()
        try:
            future = self.client.subscribe(
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
        self, filter_: str, state: FilterState, future: asyncio.Future[list[ReasonCode]]
    ) -> None:
        if future.cancelled() or future.exception() is not None:
            return  # the connection closed first; every subscription is sent again on connect
        if self._filters.get(filter_) is not state:
            return  # unsubscribed meanwhile
        reason = first_reason(future.result())
        if reason is None or reason.is_failure:
            state.refused = reason.getName() if reason is not None else "no reason code"
            self.gateway.metrics.error("subscribe")
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
            future = self.client.unsubscribe(filter_)
        except NotConnected:
            self._stale.add(filter_)  # sent on the next connect, when the session may be back
            return
        with contextlib.suppress(TimeoutError, ConnectionLost):
            reason = first_reason(await within(asyncio.shield(future), deadline))
            if reason is not None and reason.is_failure:
                self.log.warning(
                    "%s: the broker refused to unsubscribe %s: %s",
                    self.name,
                    clip(filter_),
                    reason.getName(),
                )

    # -- the store and the replicas -----------------------------------------------------------

    async def _load_store(self) -> None:
        routes = await self.store.load()
        async with self._changes:
            self._apply(routes)
        self.loaded = True

    async def _load_store_until_done(self) -> None:
        backoff = Backoff(1.0, 30.0)
        while not self.loaded:
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
                self._spawn(self._send_unsubscribe(filter_, loop.time() + self.command_timeout))
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
        reply_channel = self.gateway.reply_channel
        assert reply_channel is not None
        try:
            await asyncio.wait_for(
                self.gateway.layer.group_add(self.replicas_group, reply_channel), 5
            )
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
                self.gateway.layer.group_send(self.replicas_group, {"type": "mqtt.resync"}), 5
            )
        except _GROUP_ERRORS as exc:
            self.log.warning(
                "%s: could not tell the other replicas (%s); they catch up when they reconnect",
                self.name,
                describe_error(exc),
            )
