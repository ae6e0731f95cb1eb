"""``SlackGateway``: Slack events → ``slack.*`` layer messages; ``slack.send`` & co → Web API.

Inbound, by Socket Mode or the Events API (``slack.transport``): every envelope is translated
(``translate``), checked against the de-dup window (``dedup``), and handed to the layer with
:meth:`Gateway.publish` within ``ack_timeout``. Only once the layer took it is it acknowledged:
the ``{"envelope_id"}`` frame in Socket Mode, a 200 over HTTP. When the layer is full or down
there is no acknowledgement (Slack redelivers) or a 503 (Slack retries), and the event's id is
released from the de-dup window so the redelivery goes through. Events no layer could ever take
(over 1 MB) and payloads that cannot be read are acknowledged, logged and counted as dropped:
Slack would otherwise resend them forever.

``channel_type`` of ``slack.joined`` / ``slack.left`` (Slack sends only the id's letter) comes
from :class:`ChannelTypes`: what the channel's message events said, else ``conversations.info``
within :data:`LOOKUP_TIMEOUT`, taken out of the event's ``ack_timeout``.

Replies need no particular connection (the Web API is plain HTTPS), so events carry the command
channel as ``reply_channel`` and any replica may answer.

Outbound: each command is validated (``translate.parse_*``), paced per channel
(:class:`core.pacer.Pacer`) and sent through slack_sdk, one call at a time per channel so
messages appear in the order their commands came; 429s are retried after ``Retry-After``
and connection errors with backoff by slack_sdk's retry handlers. ``slack.result`` carries
Slack's ``ts`` and ``channel``, or Slack's error code (``channel_not_found``) as ``error``.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from core.envelope import Command, CommandError
from core.pacer import Pacer
from core.redis import layer_redis
from core.service import (
    Backoff,
    EventBuffer,
    EventRefused,
    Gateway,
    StartupError,
    cancel_and_wait,
    describe_error,
    handles,
)
from core.types import ChannelLayer
from gateways.slack.config import SlackGatewayConfig
from gateways.slack.connection import (
    FATAL_ERRORS,
    EventsApiServer,
    SlackApiFailed,
    SlackUnreachable,
    SlackWebApi,
    SocketModeConnection,
)
from gateways.slack.dedup import Claim, DedupWindow, RedisDedupWindow
from gateways.slack.translate import (
    ApiCall,
    Envelope,
    Inbound,
    InvalidCommand,
    InvalidPayload,
    channel_type_of,
    from_event_callback,
    from_interactive,
    from_slash_command,
    parse_delete,
    parse_react,
    parse_respond,
    parse_send,
    parse_update,
)

__all__ = ["ChannelTypes", "SlackGateway"]

#: seconds a conversations.info lookup may take out of an event's ack_timeout
LOOKUP_TIMEOUT: Final = 1.0
#: seconds a channel's type is remembered; a failed lookup is tried again after FAILED_FOR
KNOWN_FOR: Final = 3600.0
FAILED_FOR: Final = 60.0
#: channels remembered at once (the least recently used is forgotten first)
MAX_CHANNELS: Final = 10_000


class ChannelTypes:
    """Conversation id → ``channel_type`` (``channel``, ``group``, ``im``, ``mpim``).

    Learned for free from ``message`` events (:meth:`learn`), else asked of ``lookup``
    (``conversations.info``) once per channel however many events wait for it (:meth:`get`).
    A failed lookup is remembered as ``None`` for :data:`FAILED_FOR` seconds, so a burst of
    joins to a channel the app may not read makes one call and one log line, not one each.
    """

    def __init__(
        self,
        lookup: Callable[[str], Awaitable[str | None]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lookup = lookup
        self.clock = clock
        #: channel → (channel_type or None, expiry on ``clock``); least recently used first
        self._known: OrderedDict[str, tuple[str | None, float]] = OrderedDict()
        self._asking: dict[str, asyncio.Task[str | None]] = {}

    def __len__(self) -> int:
        return len(self._known)

    def learn(self, channel: Any, kind: Any) -> None:
        if isinstance(channel, str) and isinstance(kind, str):
            self._remember(channel, kind, KNOWN_FOR)

    def _remember(self, channel: str, kind: str | None, ttl: float) -> None:
        self._known[channel] = (kind, self.clock() + ttl)
        self._known.move_to_end(channel)
        while len(self._known) > MAX_CHANNELS:
            self._known.popitem(last=False)

    async def get(self, channel: str | None, timeout: float) -> str | None:
        """The type of ``channel``; ``None`` when it cannot be found out within ``timeout``."""
        if channel is None:
            return None
        known = self._known.get(channel)
        if known is not None and known[1] > self.clock():
            self._known.move_to_end(channel)
            return known[0]
        task = self._asking.get(channel)
        if task is None:
            task = self._asking[channel] = asyncio.create_task(self._ask(channel))
        try:
            # shielded: one waiter's timeout must not cancel the lookup the others wait for
            return await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            return None

    async def _ask(self, channel: str) -> str | None:
        try:
            kind = await self.lookup(channel)  # None when it failed (the lookup logs why)
        finally:
            self._asking.pop(channel, None)
        self._remember(channel, kind, KNOWN_FOR if kind is not None else FAILED_FOR)
        return kind

    async def close(self) -> None:
        await cancel_and_wait(*self._asking.values())


@dataclass
class _ChannelTurn:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class SlackGateway(Gateway[SlackGatewayConfig]):
    """One Slack app; see the module docstring."""

    protocol = "slack"
    config_model = SlackGatewayConfig
    #: commands wait for their channel's pacer and for Slack; other channels go on meanwhile
    command_concurrency = 64

    def __init__(self, config: SlackGatewayConfig, layer: ChannelLayer) -> None:
        super().__init__(config, layer)
        self.settings = settings = config.slack
        self.buffer = EventBuffer(self, settings.buffer)
        self.api = SlackWebApi(self, settings)
        self.pacer = Pacer(
            settings.pacing.rate,
            settings.pacing.burst,
            queue=settings.pacing.queue,
            metrics=self.metrics,
            name=f"{self.name} pacing",
        )
        redis = layer_redis(layer, "slack", self.name) if settings.dedup.redis else None
        # a "pending" mark outlives the hand-off it guards (at most ack_timeout)
        pending_for = settings.ack_timeout + 2.0
        self.dedup: DedupWindow = (
            RedisDedupWindow(
                redis,
                settings.dedup.window,
                pending_for,
                self.metrics,
                self.log,
                settings.dedup.max_entries,
            )
            if redis is not None
            else DedupWindow(settings.dedup.window, settings.dedup.max_entries, pending_for)
        )
        self.channel_types = ChannelTypes(self._lookup_channel_type)
        #: event id → the outcome of its hand-off running in this process (True: layer took it)
        self._handing_over: dict[str, asyncio.Future[bool]] = {}
        self.client: SocketModeConnection | None = None
        self.server: EventsApiServer | None = None
        if settings.transport == "socket_mode":
            self.client = SocketModeConnection(
                self, settings, self.api, listener=self, events=self.buffer
            )
        else:
            self.server = EventsApiServer(settings, self, self.log)
        #: auth.test's answer (team_id, user_id, bot_id …) once it passed
        self.identity: dict[str, Any] = {}
        self._auth_error: str | None = "auth.test not done yet"
        self._auth_task: asyncio.Task[None] | None = None
        #: one call at a time per Slack channel, so messages appear in the order they came
        self._channels: dict[str, _ChannelTurn] = {}

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        self.buffer.start()
        self.log.info("%s: de-dup window in %s", self.name, self.dedup.description)
        try:
            if self.client is not None:
                await self.client.start()
                return
            assert self.server is not None
            await self._authenticate(first=True)
            await self.server.start()
        except BaseException:
            await self.close()  # close() is not called when open() fails
            raise
        self.log.info(
            "%s: Events API on http://%s:%s%s",
            self.name,
            self.settings.events_api.host,
            self.server.port,
            self.settings.events_api.path,
        )

    async def _authenticate(self, *, first: bool) -> None:
        """auth.test for the Events API: refused → exit 3 on the first attempt; down → retried."""
        try:
            self.identity = await self.api.call("auth.test")
        except SlackApiFailed as exc:
            if first and exc.error in FATAL_ERRORS:
                raise StartupError(f"Slack refused the bot token: auth.test: {exc.error}") from None
            self._auth_error = f"auth.test: {exc.error}"
        except SlackUnreachable as exc:
            self._auth_error = str(exc)
        else:
            self._auth_error = None
            self.log.info(
                "%s: authenticated as %s in %s",
                self.name,
                self.identity.get("user"),
                self.identity.get("team"),
            )
            return
        self.log.warning("%s: not authenticated: %s; retrying", self.name, self._auth_error)
        if first:
            self._auth_task = asyncio.create_task(self._retry_auth())

    async def _retry_auth(self) -> None:
        backoff = Backoff(self.settings.reconnect_initial, self.settings.reconnect_maximum)
        while self._auth_error is not None:
            await asyncio.sleep(backoff.next())
            self.metrics.retry("connect")
            await self._authenticate(first=False)

    def readiness(self) -> list[str]:
        if self.client is not None:
            return self.client.readiness()
        reasons = []
        if self.server is None or self.server.port is None:
            reasons.append("Events API server not listening")
        if self._auth_error is not None:
            reasons.append(self._auth_error)
        return reasons

    async def drain(self) -> None:
        if self.client is not None:
            await self.client.drain()
        if self.server is not None:
            await self.server.stop()  # no new requests; Slack retries elsewhere

    async def close(self) -> None:
        if self._auth_task is not None:
            self._auth_task.cancel()
            await asyncio.gather(self._auth_task, return_exceptions=True)
        if self.client is not None:
            await self.client.close()
        if self.server is not None:
            await self.server.stop()
        await self.channel_types.close()
        await self.buffer.flush(1.0)
        await self.api.close()
        await self.dedup.close()

    # -- inbound: listener of the connection --------------------------------------------------

    def client_connected(self, details: Mapping[str, Any]) -> None:
        if self.client is not None:
            self.identity = self.client.identity

    def client_disconnected(self, reason: str) -> None:
        return None

    def slack_bad_input(self, problem: str) -> None:
        self.metrics.error("bad_input")
        self.log.warning("%s: refused: %s", self.name, problem)

    def slack_frame_too_large(self, problem: str) -> None:
        self.metrics.error("frame_too_large")
        self.log.error(
            "%s: Slack sent a frame over slack.max_frame_size (%d bytes: %s); the connection is "
            "closed with 1009 and Slack redelivers that envelope on the next one (until it gives "
            "up): raise max_frame_size to take it",
            self.name,
            self.settings.max_frame_size,
            problem,
        )

    async def slack_envelope(self, envelope: Envelope) -> bool:
        """Socket Mode: ``True`` = acknowledge (the layer took it, or it can never be taken)."""
        try:
            inbound = self._translate(envelope.type, envelope.payload)
        except InvalidPayload as exc:
            return self._unreadable(f"{envelope.type} envelope {envelope.envelope_id}", exc)
        key = inbound.id if envelope.type == "events_api" and inbound.id else envelope.envelope_id
        return await self._deliver(inbound, key)

    async def slack_request(self, kind: str, payload: dict[str, Any], retry: int) -> bool:
        """Events API: ``True`` = 200, ``False`` = 503 (Slack retries)."""
        if kind == "app_rate_limited":
            self.metrics.error("app_rate_limited")
            self.log.warning("%s: Slack says events were rate limited: %s", self.name, payload)
            return True
        try:
            inbound = self._translate(kind, payload)
        except InvalidPayload as exc:
            return self._unreadable(f"{kind} request", exc)
        if retry:
            self.log.info("%s: Slack retry #%d of %s", self.name, retry, inbound.id)
        return await self._deliver(inbound, inbound.id if kind == "event_callback" else None)

    def _translate(self, kind: str, payload: Mapping[str, Any]) -> Inbound:
        if kind in ("events_api", "event_callback"):
            own = (self.identity.get("user_id"), self.identity.get("bot_id"))
            inbound = from_event_callback(payload, own)
            if inbound.event == "message":
                self.channel_types.learn(inbound.keys["channel"], inbound.keys["channel_type"])
            return inbound
        if kind == "slash_commands":
            return from_slash_command(payload)
        if kind == "interactive":
            return from_interactive(payload)
        raise InvalidPayload(f"unknown payload type {kind!r}")

    async def _lookup_channel_type(self, channel: str) -> str | None:
        """``conversations.info`` → ``channel_type``; ``None`` (logged, counted) when it fails."""
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT * 5):  # a 429 waits its Retry-After
                answer = await self.api.call("conversations.info", {"channel": channel}, read=True)
        except (SlackApiFailed, SlackUnreachable, TimeoutError) as exc:
            problem = exc.error if isinstance(exc, SlackApiFailed) else describe_error(exc)
        else:
            kind = channel_type_of(answer.get("channel"))
            if kind is not None:
                return kind
            problem = "no conversation type in the answer"
        self.metrics.error("channel_type_lookup")
        self.log.warning(
            "%s: channel_type of %s unknown (conversations.info: %s); None for %g s",
            self.name,
            channel,
            problem,
            FAILED_FOR,
        )
        return None

    def _unreadable(self, what: str, exc: Exception) -> bool:
        self.metrics.dropped("invalid_payload")
        self.log.error(
            "%s: dropped %s: %s (acknowledged: Slack would resend it)", self.name, what, exc
        )
        return True

    async def _deliver(self, inbound: Inbound, key: str | None) -> bool:
        """Hand ``inbound`` to the layer unless it was delivered before; ``True``: acknowledge.

        ``key`` (the event id) is claimed in the de-dup window, and also kept in this process
        while its hand-off runs: a delivery that finds it there follows that hand-off's outcome
        instead of publishing again. The window alone did not do: with Redis down a claim
        leaves no mark, so a redelivery that Slack sent meanwhile (it redelivers what is not
        acknowledged within 3 s) was published beside the original once Redis was back
        (issue 21, item 12: 64 envelopes, 4-8 duplicates in 6 of 6 runs).
        """
        if self.settings.ignore_self and inbound.event == "message" and inbound.keys.get("self"):
            return True
        if key is None:
            return await self._hand_over(inbound, None)
        running = self._handing_over.get(key)
        if running is not None:
            return await self._follow(key, running)
        outcome: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._handing_over[key] = outcome
        accepted = False
        try:
            accepted = await self._hand_over(inbound, key)
        finally:
            del self._handing_over[key]
            outcome.set_result(accepted)  # False when cancelled (the connection went away)
        return accepted

    async def _follow(self, key: str, running: asyncio.Future[bool]) -> bool:
        """Another delivery of ``key`` is being handed over by this process: its outcome is
        this one's (it ends within ``ack_timeout``), so both are acknowledged, or neither."""
        try:
            accepted = await asyncio.wait_for(asyncio.shield(running), self.settings.ack_timeout)
        except TimeoutError:
            accepted = False
        if accepted:
            self.metrics.dropped("duplicate")
            self.log.debug("%s: %s delivered meanwhile; acknowledged again", self.name, key)
        else:
            self.metrics.retry("duplicate_in_flight")
            self.log.debug("%s: %s not taken meanwhile; not acknowledged", self.name, key)
        return accepted

    async def _hand_over(self, inbound: Inbound, key: str | None) -> bool:
        loop = asyncio.get_running_loop()
        # ack_timeout bounds the whole hand-off: de-dup claim, channel_type lookup, layer
        deadline = loop.time() + self.settings.ack_timeout
        claim = Claim.NEW
        if key is not None:
            try:
                async with asyncio.timeout_at(deadline):
                    claim = await self.dedup.claim(key)
            except TimeoutError:  # as when that Redis cannot answer: unchecked
                self.metrics.error("dedup_unavailable")
        if claim is Claim.DONE:
            self.metrics.dropped("duplicate")
            self.log.info("%s: %s already delivered; acknowledged again", self.name, key)
            return True
        if claim is Claim.PENDING:
            # another replica hands it over now, and may still fail: no ack yet
            self.metrics.retry("duplicate_in_flight")
            self.log.info("%s: %s is being delivered meanwhile; not acknowledged", self.name, key)
            return False
        keys = inbound.keys
        if inbound.event in ("joined", "left"):
            timeout = min(LOOKUP_TIMEOUT, max(0.0, deadline - loop.time()))
            kind = await self.channel_types.get(keys.get("channel"), timeout)
            keys = {**keys, "channel_type": kind}
        message = self.event(inbound.event, id=inbound.id, **keys)
        try:
            accepted = await self.publish(message, timeout=max(0.0, deadline - loop.time()))
        except EventRefused:
            accepted = True  # logged and counted by publish(); Slack would resend it forever
        if key is not None and accepted:
            # the layer has it: a cancel now (the socket went away) must not lose the mark
            await asyncio.shield(self.dedup.done(key))
        elif key is not None:
            await self.dedup.release(key)
        return accepted

    # -- commands -----------------------------------------------------------------------------

    async def _call(self, call: ApiCall) -> dict[str, Any]:
        if call.channel is None:
            return await self._send(call)
        await self.pacer.wait(call.channel)  # bounded (pacing.queue), keeps arrival order
        turn = self._channels.setdefault(call.channel, _ChannelTurn())
        turn.users += 1
        try:
            async with turn.lock:  # FIFO: the previous call to this channel is answered first
                return await self._send(call)
        finally:
            turn.users -= 1
            if turn.users == 0:
                del self._channels[call.channel]

    async def _send(self, call: ApiCall) -> dict[str, Any]:
        try:
            return await self.api.call(call.method, call.args)
        except SlackApiFailed as exc:
            raise CommandError(exc.error) from None
        except SlackUnreachable as exc:
            raise CommandError(f"Slack unreachable: {exc}") from None

    @staticmethod
    def _parse(parse: Any, body: Mapping[str, Any], *args: Any) -> Any:
        try:
            return parse(body, *args)
        except InvalidCommand as exc:
            raise CommandError(str(exc)) from None

    @handles("slack.send")
    async def handle_send(self, command: Command) -> dict[str, Any]:
        """``slack.send``: chat.postMessage; the result carries ``channel`` and ``ts``."""
        answer = await self._call(self._parse(parse_send, command.body))
        return {"channel": answer.get("channel"), "ts": answer.get("ts")}

    @handles("slack.update")
    async def handle_update(self, command: Command) -> dict[str, Any]:
        """``slack.update``: chat.update."""
        answer = await self._call(self._parse(parse_update, command.body))
        return {"channel": answer.get("channel"), "ts": answer.get("ts")}

    @handles("slack.delete")
    async def handle_delete(self, command: Command) -> dict[str, Any]:
        """``slack.delete``: chat.delete."""
        answer = await self._call(self._parse(parse_delete, command.body))
        return {"channel": answer.get("channel"), "ts": answer.get("ts")}

    @handles("slack.react")
    async def handle_react(self, command: Command) -> None:
        """``slack.react``: reactions.add (reactions.remove with ``remove: true``)."""
        await self._call(self._parse(parse_react, command.body))

    @handles("slack.respond")
    async def handle_respond(self, command: Command) -> None:
        """``slack.respond``: POST to a slash command's or an action's ``response_url``."""
        respond = self._parse(parse_respond, command.body, self.settings.response_url_prefix)
        try:
            await self.api.respond(respond.url, respond.body)
        except SlackApiFailed as exc:
            raise CommandError(exc.error) from None
        except SlackUnreachable as exc:
            raise CommandError(f"Slack unreachable: {exc}") from None
