"""``IrcGateway``: IRC events → ``irc.*`` layer events; ``irc.send`` & co → paced IRC lines.

Inbound: every event of a registered connection is translated (``translate.inbound``) and put in
the bounded :class:`EventBuffer` (IRC has no pushback: events wait there while the layer is full
and are counted as dropped once it overflows). Events carry this process's ``reply_channel``,
because an answer must leave through this connection.

Outbound: one **outbox** per process, a bounded FIFO of lines. A command is validated, split to
fit the 512-byte line, and its lines are put in the outbox together (or the command is refused
whole when they do not fit: ``ok: false``, counted). One sender task takes lines in order and
writes each when the :class:`core.pacer.Pacer` allows (burst, then a steady rate) and the
connection is up. While disconnected, lines wait up to ``queue_timeout``; then their commands
are answered with an error — none is lost in silence. The result of a command is sent once its
last line was written.

Recovery: after every (re)connect the gateway joins every channel it should be in (the YAML's
plus those joined at run time, minus those parted; at most ``max_channels``) before anything
else in the outbox, rejoins after a kick (``rejoin_after_kick``), and takes back the nick it
should hold when it frees (at once on the holder's QUIT or NICK, else every
``reclaim_interval``). Nicks and channel names are compared under the server's CASEMAPPING.

Replicas (active/standby): on a Redis layer every process takes part in a
:class:`core.lease.RedisLease` (``{prefix}:gateways:irc:{name}:lease``). Only the holder
(*active*) connects to IRC and reads the command channel; a *standby* does neither, so commands
wait in the layer for whichever replica is active, and tries to take the lease every fifth of
``lease_ttl``. Taking it = connecting (a fresh connection, the channels joined as after any
reconnect), then reading commands. An active replica that finds the lease gone (another took it
while this one was paused or cut off from Redis for ``lease_ttl``) steps down: it stops reading
commands, hands the commands in its outbox none of whose lines left back to the command channel
(:class:`HandedOver`), QUITs, answers a command partly written with an error and exits 1 (its
supervisor starts it again, as a standby). A command taken just after a pause first renews the
lease (:meth:`IrcGateway._confirm_active`) and is handed back when that fails.
On a clean stop it QUITs first and releases the lease after, so the standby connects at once
without meeting our nick. Without a Redis layer (memory://, a custom layer) there is no lease:
the one process is always active. The channels joined and parted and the nick set at run time
are written to Redis at each renewal (when changed) and read by the next active replica
(:func:`carried_over`). The exact spec is the README's "Replicas" section.

What a server can make happen at full speed (unparsable lines, kicks, refused joins, joins it
makes for us beyond ``max_channels``, renames) is logged once, then once per
:class:`core.logs.RepeatFilter` interval with a count, and counted in metrics every time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from channels.layers import InMemoryChannelLayer
from irc.client import Event
from prometheus_client import Counter, Gauge

from core.envelope import Command, CommandError
from core.lease import RedisLease, owner_id
from core.logs import RepeatFilter
from core.metrics import REGISTRY
from core.pacer import Pacer
from core.redis import LayerRedis, RedisUnavailable, layer_redis
from core.retry import StartupError, cancel_and_wait, describe_error, send_command
from core.service import EventBuffer, Gateway, handles
from core.types import ChannelLayer
from gateways.irc.config import IrcGatewayConfig
from gateways.irc.connection import IrcConnection, NotConnected
from gateways.irc.translate import (
    Context,
    InvalidCommand,
    fold,
    inbound,
    parse_join,
    parse_nick,
    parse_part,
    parse_raw,
    parse_send,
    parse_topic,
    prefix_length,
    same_nick,
    send_lines,
)

__all__ = ["LOST_LEASE", "IrcGateway"]

#: join failures (RPL numerics by the library's names): the channel is given up, with a WARNING
_JOIN_FAILED = {
    "channelisfull",
    "inviteonlychan",
    "bannedfromchan",
    "badchannelkey",
    "nosuchchannel",
    "toomanychannels",
}


_ACTIVE = Gauge(
    "irc_active",
    "1 while this replica holds the IRC lease (or has no lease: no Redis layer) and connects",
    ["gateway"],
    registry=REGISTRY,
)
_TAKEOVERS = Counter(
    "irc_takeovers", "Times this replica took the IRC lease", ["gateway"], registry=REGISTRY
)

#: why an active replica steps down when its renewal finds the lease is another's
LOST_LEASE = (
    "another replica holds the IRC lease now (this one was paused or cut off from Redis for "
    "longer than irc.lease_ttl)"
)


class HandedOver(BaseException):
    """A command's lines are taken back before any left: the command goes back to the command
    channel for the active replica. A BaseException, like CancelledError, so the command
    dispatch's catch-all for handler bugs does not answer it ``ok: false``."""


@dataclass
class _Line:
    text: str
    deadline: float
    #: the command's future, on every line of a command (None: a JOIN or NICK of our own);
    #: its result is set once the last line was written
    done: asyncio.Future[None] | None = None
    #: the command's first line: while it is in the outbox, no line of the command left
    first: bool = False
    #: the command's last line
    last: bool = False


def carried_over(
    state: Any, yaml_channels: list[tuple[str, str | None]], yaml_nick: str, limit: int
) -> tuple[list[tuple[str, str | None]], str | None]:
    """The channels (name, key) and nick a new active replica takes from the last one's
    ``state`` (the JSON :meth:`IrcGateway._state` wrote), given the YAML's now.

    A YAML channel is kept unless it was parted at run time (it is in the state's ``yaml`` list
    but not among its channels); one new in the YAML is joined; a channel joined at run time is
    kept (with the key it was joined with) unless the YAML took it away meanwhile (it was a YAML
    channel then). The nick set at run time is kept unless the YAML's nick changed. A state
    that is not what this function writes counts as none.
    """
    try:
        stored = [(str(n), None if k is None else str(k)) for n, k in state["channels"]]
        stored_yaml = {fold(str(n), "rfc1459") for n in state["yaml"]}
        nick = state.get("nick")
        same_yaml_nick = state.get("yaml_nick") == yaml_nick
    except (TypeError, KeyError, ValueError, AttributeError):
        return yaml_channels, None
    in_state = {fold(n, "rfc1459") for n, _ in stored}
    in_yaml = {fold(n, "rfc1459") for n, _ in yaml_channels}
    channels = [
        (n, k)
        for n, k in yaml_channels
        if fold(n, "rfc1459") in in_state or fold(n, "rfc1459") not in stored_yaml
    ]
    for name, key in stored:
        folded = fold(name, "rfc1459")
        if folded not in stored_yaml and folded not in in_yaml and len(channels) < limit:
            channels.append((name, key))
    return channels, nick if isinstance(nick, str) and nick and same_yaml_nick else None


@dataclass
class _Channel:
    name: str
    key: str | None = None
    rejoin: asyncio.TimerHandle | None = field(default=None, repr=False)


class _Channels:
    """The channels the gateway should be in, found by name under the server's case mapping.

    Keyed by the fold of the name; :meth:`use` re-keys when the mapping becomes known (the
    server announces it after registration) or changes, keeping the first of two names that
    become one.
    """

    def __init__(self) -> None:
        self.mapping = "rfc1459"
        self._by_key: dict[str, _Channel] = {}

    def use(self, mapping: str) -> None:
        if mapping == self.mapping:
            return
        self.mapping = mapping
        old, self._by_key = self._by_key, {}
        for channel in old.values():
            self._by_key.setdefault(fold(channel.name, mapping), channel)

    def get(self, name: str) -> _Channel | None:
        return self._by_key.get(fold(name, self.mapping))

    def add(self, name: str, key: str | None) -> _Channel:
        channel = self._by_key.setdefault(fold(name, self.mapping), _Channel(name, key))
        if key is not None:
            channel.key = key
        return channel

    def pop(self, name: str) -> _Channel | None:
        return self._by_key.pop(fold(name, self.mapping), None)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and fold(name, self.mapping) in self._by_key

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[_Channel]:
        return iter(list(self._by_key.values()))


class IrcGateway(Gateway[IrcGatewayConfig]):
    """One IRC identity; see the module docstring."""

    protocol = "irc"
    config_model = IrcGatewayConfig
    #: commands only validate and enqueue before they wait: the outbox keeps their order
    command_concurrency = 64

    def __init__(self, config: IrcGatewayConfig, layer: ChannelLayer) -> None:
        super().__init__(config, layer)
        self.settings = settings = config.irc
        self.buffer = EventBuffer(self, settings.buffer)
        self.pacer = Pacer(
            settings.flood.rate,
            settings.flood.burst,
            queue=1,
            metrics=self.metrics,
            name=f"{self.name} flood control",
        )
        self.client = self._new_client()
        #: Redis beside the layer (None: memory:// or a custom layer → no lease, always active)
        self._redis: LayerRedis | None = layer_redis(
            layer, self.protocol, self.name, timeout=settings.lease_ttl / 3
        )
        self.lease = (
            RedisLease(self._redis, owner_id(), settings.lease_ttl) if self._redis else None
        )
        self._lease_problem: str | None = None
        self._holder: str | None = None  # the active replica's owner id, as a standby saw it
        self._renewed = 0.0  # loop time the last successful renewal was sent
        self._takeover: asyncio.Task[None] | None = None
        self._dead: str | None = None
        #: why the lease is gone, once a command found out (the lease loop steps down)
        self._lost: str | None = None
        #: the run-time state last written for the next active replica (_state)
        self._saved: str | None = None
        self._lease_wake = asyncio.Event()
        #: channels we should be in (YAML + run-time joins - parts), at most max_channels
        self.channels = _Channels()
        for channel in settings.channels:
            key = channel.key.get_secret_value() if channel.key else None
            self.channels.add(channel.name, key)
        self.stall.pushback = (
            f"they wait in the event buffer (irc.buffer: {settings.buffer}); while it is full "
            "the gateway stops reading from the IRC server (TCP pushback) until the layer "
            "takes events again"
        )
        # a server can make some lines at full speed: one line, then a count every interval
        if not any(isinstance(f, RepeatFilter) for f in self.log.filters):
            self.log.addFilter(RepeatFilter(marked_only=True))
        self._outbox: deque[_Line] = deque()
        #: texts of our own lines (NICK, JOIN) waiting in the outbox: never queued twice
        self._queued_system: set[str] = set()
        self._outbox_ready = asyncio.Event()
        self._outbox_empty = asyncio.Event()
        self._outbox_empty.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._decode_warned = False

    # -- lifecycle ----------------------------------------------------------------------------

    def _new_client(self) -> IrcConnection:
        return IrcConnection(self, self.settings, listener=self, events=self.buffer)

    @property
    def active(self) -> bool:
        """Whether this replica connects to IRC and carries out commands."""
        return self.lease is None or self.lease.held

    async def open(self) -> None:
        self.buffer.start()
        self._tasks = [
            asyncio.create_task(self._send_loop(), name=f"{self.name}-sender"),
            asyncio.create_task(self._reclaim_loop(), name=f"{self.name}-reclaim"),
        ]
        try:
            if self.lease is None:
                if not isinstance(self.layer, InMemoryChannelLayer):
                    self.log.warning(
                        "%s: no IRC lease: core.redis keeps no keys beside this layer (%s; "
                        "Sentinel, a custom layer): run one gateway-irc process for this "
                        "integration, a second would be a second bot",
                        self.name,
                        type(self.layer).__name__,
                    )
                _ACTIVE.labels(self.name).set(1)
                await self.client.start()
                return
            self.take_commands(False)  # until this replica holds the lease
            sent = asyncio.get_running_loop().time()
            try:
                acquired = await self.lease.acquire() is not None
            except RedisUnavailable as exc:
                acquired = False
                self._lease_down(str(exc))
            if acquired:
                self._renewed = sent
            lease_loop = asyncio.create_task(self._lease_loop(), name=f"{self.name}-lease")
            self._tasks.append(lease_loop)
            if acquired:
                await self._activate()  # a refusal by the server fails start-up (exit 3)
            else:
                await self._refresh_holder()
                self.log.info(
                    "%s: standby: %s; commands wait in the layer meanwhile",
                    self.name,
                    self._standby_text(),
                )
        except BaseException:
            await self._cancel_tasks()
            await self._release()
            raise

    def readiness(self) -> list[str]:
        if self._dead is not None:
            return [self._dead]
        reasons = []
        if self._lease_problem is not None:
            reasons.append(f"lease store unreachable: {self._lease_problem}")
        if self.active:
            reasons += self.client.readiness()
        return reasons

    def status(self) -> list[str]:
        if self.lease is None:
            return ["role: active (no Redis layer: no lease, one replica only)"]
        if self.lease.held:
            return [f"role: active (lease token {self.lease.token}, {self.lease.owner})"]
        return [f"role: standby ({self._standby_text()})"]

    def _standby_text(self) -> str:
        holder = f"replica {self._holder}" if self._holder else "another replica"
        return f"{holder} holds the IRC lease and the connection"

    # -- active / standby -----------------------------------------------------------------------

    def _lease_down(self, problem: str) -> None:
        if self._lease_problem is None:
            self.log.warning("%s: IRC lease store unreachable: %s", self.name, problem)
        self._lease_problem = problem

    def _lease_up(self) -> None:
        if self._lease_problem is not None:
            self.log.info("%s: IRC lease store reachable again", self.name)
        self._lease_problem = None

    async def _refresh_holder(self) -> None:
        if self.lease is not None:
            with contextlib.suppress(RedisUnavailable):
                self._holder = await self.lease.holder()

    async def _lease_loop(self) -> None:
        assert self.lease is not None
        lease, ttl = self.lease, self.lease.ttl
        loop = asyncio.get_running_loop()
        while True:
            if self._lost is not None:  # a command found the lease gone (_confirm_active)
                await self._step_down(self._lost)
                return
            sent = loop.time()
            try:
                if not lease.held:
                    if await lease.acquire() is not None:
                        self._renewed = sent
                        self._start_takeover()
                    else:
                        await self._refresh_holder()
                elif await lease.renew():
                    self._renewed = sent
                    await self._save_state()
                else:
                    await self._step_down(LOST_LEASE)
                    return
                self._lease_up()
            except RedisUnavailable as exc:
                self._lease_down(str(exc))
                if lease.held and loop.time() - self._renewed > ttl:
                    lease.forget()
                    await self._step_down(f"could not renew the IRC lease for {ttl:g} s")
                    return
            self._lease_wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lease_wake.wait(), ttl / 3 if lease.held else ttl / 5)

    async def _confirm_active(self) -> bool:
        """Before a command is carried out: is the lease still this replica's?

        Free while the last renewal is recent; after a pause (SIGSTOP: commands that arrived
        meanwhile run before the lease loop wakes) one renewal decides. ``False`` starts the
        step-down.
        """
        lease = self.lease
        assert lease is not None
        if not lease.held or self._lost is not None:
            return False
        loop = asyncio.get_running_loop()
        if loop.time() - self._renewed < lease.ttl / 2:
            return True
        sent = loop.time()
        try:
            if await lease.renew():
                self._renewed = sent
                return True
        except RedisUnavailable:
            return loop.time() - self._renewed <= lease.ttl  # cannot tell: ours until it expires
        self._lost = LOST_LEASE
        self.take_commands(False)
        self._lease_wake.set()
        return False

    async def dispatch(self, message: Any) -> dict[str, Any] | None:
        """Carry out a command while active; else hand it back to the command channel."""
        if self.lease is not None and not await self._confirm_active():
            await self._hand_back(message)
            return None
        try:
            return await super().dispatch(message)
        except HandedOver:
            await self._hand_back(message)
            return None

    async def _hand_back(self, message: Any) -> None:
        """Put a command this replica will not carry out back on the command channel."""
        channel = self.config.command_channel
        kind = message.get("type") if isinstance(message, dict) else None
        try:
            await send_command(self.layer, channel, message, timeout=5)
        except Exception as exc:
            self.metrics.dropped("not_handed_back")
            self.log.error(
                "%s: could not hand a %s command back to %r: %s",
                self.name,
                kind,
                channel,
                describe_error(exc),
            )
        else:
            self.log.info("%s: handed a %s command back to %r", self.name, kind, channel)

    def _start_takeover(self) -> None:
        self._takeover = asyncio.create_task(self._activate(), name=f"{self.name}-takeover")
        self._takeover.add_done_callback(self._takeover_done)

    def _takeover_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        self._dead = f"could not take over the IRC connection: {error}"
        self.log.error("%s: %s; stopping", self.name, self._dead)
        self.metrics.error("takeover")
        self.stop()  # close() releases the lease: another replica may fare better

    async def _activate(self) -> None:
        """This replica holds the lease: connect (joins follow), then read commands."""
        assert self.lease is not None
        _ACTIVE.labels(self.name).set(1)
        _TAKEOVERS.labels(self.name).inc()
        self._holder = self.lease.owner
        self.log.info(
            "%s: active now (IRC lease token %s, %s): connecting to %s",
            self.name,
            self.lease.token,
            self.lease.owner,
            self.client.server,
        )
        await self._load_state()
        try:
            await self.client.start()
        except StartupError:
            _ACTIVE.labels(self.name).set(0)
            raise
        self.take_commands(True)

    # -- run-time state carried over to the next active replica ---------------------------------

    def _state(self) -> str:
        yaml = {c.name for c in self.settings.channels}
        channels = [[c.name, None if c.name in yaml else c.key] for c in self.channels]
        return json.dumps(
            {
                "channels": channels,
                "yaml": sorted(yaml),
                "nick": self.client.wanted_nick,
                "yaml_nick": self.settings.nick,
            },
            sort_keys=True,
        )

    async def _save_state(self) -> None:
        """Write the channels and nick (each lease renewal, when they changed) for the next
        active replica; raises RedisUnavailable like the renewal."""
        assert self._redis is not None
        state = self._state()
        if state != self._saved:
            await self._redis.call("set", self._redis.key("state"), state)
            self._saved = state

    async def _load_state(self) -> None:
        """Take over the channels joined and parted and the nick set at run time by the last
        active replica (or before a restart): :func:`carried_over`."""
        assert self._redis is not None
        try:
            raw = await self._redis.call("get", self._redis.key("state"))
        except RedisUnavailable as exc:
            self.log.warning("%s: run-time channels not read (%s); the YAML's only", self.name, exc)
            return
        if raw is None:
            return
        try:
            state = json.loads(raw)
        except ValueError:
            state = None
        yaml = [
            (c.name, c.key.get_secret_value() if c.key else None) for c in self.settings.channels
        ]
        channels, nick = carried_over(state, yaml, self.settings.nick, self.settings.max_channels)
        self.channels = _Channels()
        for name, key in channels:
            self.channels.add(name, key)
        if nick is not None:
            self.client.wanted_nick = nick
        self.log.info(
            "%s: channels %s%s (as the last active replica left them)",
            self.name,
            ", ".join(c.name for c in self.channels) or "none",
            f", nick {nick}" if nick is not None else "",
        )

    async def _step_down(self, reason: str) -> None:
        """The lease is another's: stop reading commands, QUIT, fail the outbox, and exit.

        Exiting (code 1; the supervisor starts it again, as a standby) rather than staying on as
        a standby hands back, at close, what the layer had fetched for this process and not
        yet handed out, claimable by the new active replica at once; a standby that kept it
        would keep it from everyone.
        """
        self.take_commands(False)
        _ACTIVE.labels(self.name).set(0)
        self._dead = f"stepped down: {reason}"
        self.log.error("%s: %s; stopping (exit 1)", self.name, self._dead)
        self.metrics.error("lost_lease")
        if self._takeover is not None and self._takeover is not asyncio.current_task():
            await cancel_and_wait(self._takeover)
            self._takeover = None
        self._hand_over_outbox()
        await self.client.close()
        self._fail_outbox(f"not sent: this replica stepped down ({reason})")
        self.stop()

    def _hand_over_outbox(self) -> None:
        """Commands none of whose lines left yet go back to the command channel (HandedOver,
        in their handlers); a command partly written is answered with an error instead."""
        handed = set()
        for line in self._outbox:
            if line.first and line.done is not None and not line.done.done():
                line.done.set_exception(HandedOver())
                handed.add(line.done)
        if handed:
            self._outbox = deque(line for line in self._outbox if line.done not in handed)

    async def _release(self) -> None:
        if self.lease is not None and self.lease.held:
            try:
                await self.lease.release()
            except RedisUnavailable as exc:
                self.log.warning(
                    "%s: could not release the IRC lease (%s); a standby takes over once it "
                    "expires",
                    self.name,
                    exc,
                )
            else:
                self.log.info("%s: released the IRC lease", self.name)
        _ACTIVE.labels(self.name).set(0)

    async def drain(self) -> None:
        # lines already accepted leave before QUIT (bounded by the grace period)
        if self.client.connected:
            await self._outbox_empty.wait()

    async def close(self) -> None:
        await self._cancel_tasks()
        for channel in self.channels:
            if channel.rejoin is not None:
                channel.rejoin.cancel()
        await self.client.close()  # QUIT first: the next active replica meets no old nick
        self._fail_outbox("gateway stopped")
        if self.lease is not None and self.lease.held:
            with contextlib.suppress(RedisUnavailable):
                await self._save_state()  # what changed since the last renewal
        await self._release()
        if self._redis is not None:
            await self._redis.close()
        await self.buffer.flush(1.0)

    async def _cancel_tasks(self) -> None:
        tasks = [*self._tasks, *([self._takeover] if self._takeover is not None else [])]
        await cancel_and_wait(*tasks)
        self._tasks = []
        self._takeover = None

    # -- client listener ------------------------------------------------------------------------

    def client_connected(self, details: Mapping[str, Any]) -> None:
        # joins go first, before lines that waited for the connection; our own lines queued
        # for the last connection (a JOIN, a NICK) are replaced by these
        self._queued_system.clear()
        self._outbox = deque(line for line in self._outbox if line.done is not None)
        joins = [self._join_line(c) for c in self.channels]
        deadline = asyncio.get_running_loop().time() + self.settings.queue_timeout
        for text in reversed(joins):
            self._outbox.appendleft(_Line(text, deadline))
            self._queued_system.add(text)
        if self._outbox:
            self._outbox_changed()
        else:
            self._outbox_empty.set()
        wanted = self.client.wanted_nick
        if not same_nick(self.client.nick, wanted, self.client.casemapping):
            self.log.warning(
                "%s: registered as %s; %s is taken, will reclaim it",
                self.name,
                self.client.nick,
                wanted,
            )

    def client_disconnected(self, reason: str) -> None:
        self._outbox_ready.set()  # the sender notices and waits for the next connection

    def irc_undecodable(self) -> None:
        self.metrics.error("undecodable")
        if not self._decode_warned:
            self._decode_warned = True
            self.log.warning(
                "%s: received a line that is not UTF-8; decoded as %s (counted in "
                'gateway_errors_total{kind="undecodable"}, logged once)',
                self.name,
                self.settings.fallback_encoding,
            )

    def irc_event(self, event: Event) -> None:
        own, mapping = self.client.nick, self.client.casemapping
        self.channels.use(mapping)
        self._follow(event, own, mapping)
        context = Context(own, mapping, self.settings.address)
        translated = inbound(
            event.type, event.source, event.target, event.arguments, event.tags, context
        )
        if translated is None:
            return
        message = self.event(
            translated.event,
            id=translated.id,
            time=translated.time,
            reply_channel=self.reply_channel,
            **translated.keys,
        )
        self.buffer.put(message)

    def _follow(self, event: Event, own: str, mapping: str) -> None:
        """Keep channels and nick up to date from what the server says."""
        kind = event.type
        source = event.source.nick if event.source else None
        wanted = self.client.wanted_nick
        if kind == "join" and same_nick(source, own, mapping):
            if str(event.target) not in self.channels:
                self._adopt(str(event.target))  # joined by a raw line or a server
        elif kind == "part" and same_nick(source, own, mapping):
            self.channels.pop(str(event.target))
        elif kind == "kick" and event.arguments and same_nick(event.arguments[0], own, mapping):
            self._kicked(str(event.target), event.arguments[1] if len(event.arguments) > 1 else "")
        elif kind in _JOIN_FAILED and len(event.arguments) >= 1:
            name = str(event.arguments[0])
            if self.channels.pop(name) is not None:
                self.metrics.error("join_refused")
                self.log.warning(
                    "%s: cannot join %s: %s",
                    self.name,
                    name,
                    event.arguments[-1],
                    extra={"repeat": f"{self.name}:join_refused"},
                )
        elif kind in ("quit", "nick") and same_nick(source, wanted, mapping):
            if not same_nick(own, wanted, mapping):
                self._enqueue_system(f"NICK {wanted}")  # it just became free
        elif (
            kind == "nick"
            and same_nick(event.target, own, mapping)
            and same_nick(own, wanted, mapping)
            and not same_nick(source, own, mapping)
        ):
            self.log.info(
                "%s: now using the nick %s",
                self.name,
                event.target,
                extra={"repeat": f"{self.name}:nick"},
            )

    def _adopt(self, name: str) -> None:
        if len(self.channels) >= self.settings.max_channels:
            self.metrics.error("too_many_channels")
            self.log.warning(
                "%s: the server joined us to %s, but %d channels are kept already "
                "(irc.max_channels); its events are passed on, it is not rejoined",
                self.name,
                name,
                len(self.channels),
                extra={"repeat": f"{self.name}:too_many_channels"},
            )
            return
        self.channels.add(name, None)

    def _kicked(self, channel: str, reason: str) -> None:
        wanted = self.channels.get(channel)
        self.metrics.error("kicked")
        self.log.warning(
            "%s: kicked from %s (%s)",
            self.name,
            channel,
            reason,
            extra={"repeat": f"{self.name}:kicked"},
        )
        if wanted is None:
            return
        if not self.settings.rejoin_after_kick:
            self.channels.pop(channel)
            return
        if wanted.rejoin is not None:
            wanted.rejoin.cancel()

        def rejoin() -> None:
            wanted.rejoin = None
            if self.channels.get(wanted.name) is wanted:
                self._enqueue_system(self._join_line(wanted))

        wanted.rejoin = asyncio.get_running_loop().call_later(self.settings.rejoin_delay, rejoin)

    @staticmethod
    def _join_line(channel: _Channel) -> str:
        return f"JOIN {channel.name} {channel.key}" if channel.key else f"JOIN {channel.name}"

    # -- outbox -------------------------------------------------------------------------------

    def _outbox_changed(self) -> None:
        self._outbox_empty.clear()
        self._outbox_ready.set()

    def _enqueue_system(self, text: str) -> None:
        """A line of our own (join, nick): never refused, never queued twice."""
        if text in self._queued_system:
            return
        self._queued_system.add(text)
        deadline = asyncio.get_running_loop().time() + self.settings.queue_timeout
        self._outbox.append(_Line(text, deadline))
        self._outbox_changed()

    def _left_outbox(self, line: _Line) -> None:
        if line.done is None:
            self._queued_system.discard(line.text)

    async def _send(self, lines: tuple[str, ...] | list[str]) -> None:
        """Queue ``lines`` together; return once the last was written. Raise CommandError."""
        room = self.settings.queue - len(self._outbox)
        if len(lines) > room:
            self.metrics.dropped("outbox_full")
            raise CommandError(
                f"outbound queue full ({len(self._outbox)} lines waiting, limit "
                f"{self.settings.queue}); try later"
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.queue_timeout
        done: asyncio.Future[None] = loop.create_future()
        for i, text in enumerate(lines):
            self._outbox.append(_Line(text, deadline, done, i == 0, i == len(lines) - 1))
        self._outbox_changed()
        await done

    def _fail_outbox(self, reason: str) -> None:
        while self._outbox:
            line = self._outbox.popleft()
            self._fail_line(line, reason)
        self._outbox_empty.set()

    def _fail_line(self, line: _Line, reason: str) -> None:
        self._left_outbox(line)
        self.metrics.dropped("not_sent")
        if line.done is None:
            self.log.warning("%s: not sent (%s): %.80s", self.name, reason, line.text)
        elif not line.done.done():
            line.done.set_exception(CommandError(reason))

    async def _send_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._outbox:
                self._outbox_empty.set()
                self._outbox_ready.clear()
                await self._outbox_ready.wait()
                continue
            line = self._outbox[0]
            remaining = line.deadline - loop.time()
            if remaining <= 0:
                self._outbox.popleft()
                self._fail_line(
                    line,
                    f"not sent: no connection to {self.client.server} within "
                    f"{self.settings.queue_timeout:g} s ({self.client.last_error})",
                )
                continue
            if not self.client.connected:
                with contextlib.suppress(TimeoutError):
                    await self.client.wait_connected(remaining)
                continue
            # while the server does not take what we send, our lines wait here, not in memory
            # the socket cannot hand out (the connection drops itself past its limit)
            await self.client.writable()
            await self.pacer.wait()
            try:
                self.client.send(line.text)
            except NotConnected:
                continue  # lost meanwhile: it waits for the next connection
            except ValueError as exc:  # the library's InvalidCharacters / MessageTooLong
                self._outbox.popleft()
                self._fail_line(line, f"refused by the IRC library: {exc}")
                continue
            if self._outbox and self._outbox[0] is line:
                self._outbox.popleft()
            self._left_outbox(line)
            if line.last and line.done is not None and not line.done.done():
                line.done.set_result(None)

    async def _reclaim_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reclaim_interval)
            wanted = self.client.wanted_nick
            if self.client.connected and not same_nick(
                self.client.nick, wanted, self.client.casemapping
            ):
                self._enqueue_system(f"NICK {wanted}")

    # -- commands -----------------------------------------------------------------------------

    def _prefix(self) -> int:
        return prefix_length(self.client.nick, self.client.userhost)

    @handles("irc.send")
    async def handle_send(self, command: Command) -> dict[str, Any]:
        """``irc.send``: ``target``, ``text``, ``kind`` (message | action | notice)."""
        try:
            send = parse_send(command.body)
            lines = send_lines(send.kind, send.target, send.text, self._prefix()).lines
        except InvalidCommand as exc:
            raise CommandError(str(exc)) from None
        await self._send(lines)
        return {"lines": len(lines)}

    @handles("irc.join")
    async def handle_join(self, command: Command) -> None:
        """``irc.join``: ``channel``, optional ``key``; rejoined after every reconnect."""
        try:
            name, key = parse_join(command.body)
        except InvalidCommand as exc:
            raise CommandError(str(exc)) from None
        self.channels.use(self.client.casemapping)
        if name not in self.channels and len(self.channels) >= self.settings.max_channels:
            raise CommandError(
                f"already keeping {len(self.channels)} channels (irc.max_channels); part one first"
            )
        channel = self.channels.add(name, key)
        await self._send([self._join_line(channel)])

    @handles("irc.part")
    async def handle_part(self, command: Command) -> None:
        """``irc.part``: ``channel``, optional ``reason``; not rejoined any more."""
        try:
            name, reason = parse_part(command.body)
        except InvalidCommand as exc:
            raise CommandError(str(exc)) from None
        self.channels.use(self.client.casemapping)
        channel = self.channels.pop(name)
        if channel is not None and channel.rejoin is not None:
            channel.rejoin.cancel()
        await self._send([f"PART {name} :{reason}" if reason else f"PART {name}"])

    @handles("irc.topic")
    async def handle_topic(self, command: Command) -> None:
        """``irc.topic``: ``channel``, ``topic`` (``""`` clears it)."""
        try:
            name, topic = parse_topic(command.body)
        except InvalidCommand as exc:
            raise CommandError(str(exc)) from None
        await self._send([f"TOPIC {name} :{topic}"])

    @handles("irc.nick")
    async def handle_nick(self, command: Command) -> None:
        """``irc.nick``: ``nick``; it becomes the nick this gateway holds and reclaims."""
        try:
            nick = parse_nick(command.body)
        except InvalidCommand as exc:
            raise CommandError(str(exc)) from None
        self.client.wanted_nick = nick  # registered with it after a reconnect, too
        await self._send([f"NICK {nick}"])

    @handles("irc.raw")
    async def handle_raw(self, command: Command) -> None:
        """``irc.raw``: ``line``, sent as is; only with ``irc.raw_commands: true``."""
        if not self.settings.raw_commands:
            raise CommandError("irc.raw is disabled (set irc.raw_commands: true to allow it)")
        try:
            line = parse_raw(command.body)
        except InvalidCommand as exc:
            raise CommandError(str(exc)) from None
        await self._send([line])
