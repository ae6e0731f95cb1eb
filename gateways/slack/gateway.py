"""``SlackGateway``: Slack events → ``slack.*`` layer messages; ``slack.send`` & co → Web API.

Inbound, by Socket Mode or the Events API (``slack.transport``): every envelope is translated
(``translate``), checked against the de-dup window (``dedup``), and handed to the layer with
:meth:`Gateway.publish` within ``ack_timeout``. Only once the layer took it is it acknowledged:
the ``{"envelope_id"}`` frame in Socket Mode, a 200 over HTTP. When the layer is full or down
there is no acknowledgement (Slack redelivers) or a 503 (Slack retries), and the event's id is
released from the de-dup window so the redelivery goes through. Events no layer could ever take
(over 1 MB) and payloads that cannot be read are acknowledged, logged and counted as dropped:
Slack would otherwise resend them forever.

**Answers inside the acknowledgement** (``slack.answers``, :mod:`gateways.slack.answers`): an
event in ``answers.wait_for`` that Slack lets answer (a Socket Mode envelope with
``accepts_response_payload``; any such request over HTTP) is published with an ``ack_channel``
of its own; once the layer took it, the gateway waits there until ``answers.timeout`` after the
event's arrival for the consumer's ``slack.ack`` and acknowledges with it, or empty (logged,
counted) so Slack never retries because of a slow consumer. A redelivery that arrives while the
first delivery waits follows it (:meth:`SlackGateway._deliver`) and is acknowledged with the
same answer; one that comes after is answered from a short memory of answers.

**Many workspaces** (``slack.oauth``, :mod:`gateways.slack.workspaces`): installations live
in an installation store (:mod:`gateways.slack.installations`: the layer's Redis, else memory)
filled by the OAuth install flow on the HTTP listener. Every event carries ``team`` /
``enterprise``; a command names them to go out with that installation's bot token (consumers'
helpers copy them from the event they answer), refreshed before it expires (token rotation).
``app_uninstalled`` and ``tokens_revoked`` remove the installation.

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
Views (``slack.views_*``) and workflow functions are not paced: a ``trigger_id`` is good for
3 s only.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from core.envelope import Command, CommandError
from core.logs import RepeatFilter
from core.pacer import Pacer
from core.redis import layer_redis
from core.retry import Backoff, StartupError, cancel_and_wait, describe_error
from core.service import EventBuffer, EventRefused, Gateway, handles
from core.types import ChannelLayer
from gateways.slack.answers import Answers
from gateways.slack.config import SlackGatewayConfig
from gateways.slack.connection import (
    FATAL_ERRORS,
    EventsApiServer,
    HttpAnswer,
    OAuthRequest,
    SlackApiFailed,
    SlackUnreachable,
    SlackWebApi,
    SocketModeConnection,
)
from gateways.slack.dedup import Claim, DedupWindow, RedisDedupWindow, TtlMemory
from gateways.slack.installations import InstallationStore, RedisInstallationStore
from gateways.slack.translate import (
    ANSWERABLE,
    Ack,
    ApiCall,
    Envelope,
    Inbound,
    InvalidCommand,
    InvalidPayload,
    Route,
    channel_type_of,
    from_event_callback,
    from_interactive,
    from_slash_command,
    own_ids,
    parse_ack,
    parse_delete,
    parse_function_complete,
    parse_function_fail,
    parse_react,
    parse_respond,
    parse_route,
    parse_send,
    parse_update,
    parse_views_open,
    parse_views_publish,
    parse_views_push,
    parse_views_update,
)
from gateways.slack.workspaces import Workspaces

__all__ = ["ChannelTypes", "SlackGateway"]

#: seconds a conversations.info lookup may take out of an event's ack_timeout
LOOKUP_TIMEOUT: Final = 1.0
#: seconds a channel's type is remembered; a failed lookup is tried again after FAILED_FOR
KNOWN_FOR: Final = 3600.0
FAILED_FOR: Final = 60.0
#: channels remembered at once (the least recently used is forgotten first)
MAX_CHANNELS: Final = 10_000
#: seconds a trigger_id's arrival is remembered (to explain an expired_trigger_id), how many
TRIGGER_MEMORY: Final = 60.0
MAX_TRIGGERS: Final = 10_000
#: a function_executed's own token is kept this long for its slack.function_* (and how many)
FUNCTION_TOKEN_FOR: Final = 3600.0
MAX_FUNCTION_TOKENS: Final = 10_000

#: Slack tokens as they look (xoxb-…, xoxe.xoxb-…, xoxe-…, xapp-…, a workflow step's xwfp-…):
#: never in a log line, also not those of installations (registered secrets are the config's)
_TOKEN = re.compile(r"\b(?:xox[a-z]|xapp|xwfp|xoxe(?:\.xox[a-z])?)-[A-Za-z0-9-]+")


class _TokenFilter(logging.Filter):
    """Replaces anything shaped like a Slack token in a record with ``***``."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "xox" in message or "xapp" in message or "xwfp" in message:
            record.msg = _TOKEN.sub("***", message)
            record.args = None
        return True


class ChannelTypes:
    """Conversation id → ``channel_type`` (``channel``, ``group``, ``im``, ``mpim``).

    Learned for free from ``message`` events (:meth:`learn`), else asked of ``lookup``
    (``conversations.info`` with the token of the workspace the event came from) once per
    channel however many events wait for it (:meth:`get`). A failed lookup is remembered as
    ``None`` for :data:`FAILED_FOR` seconds, so a burst of joins to a channel the app may not
    read makes one call and one log line, not one each.
    """

    def __init__(
        self,
        lookup: Callable[[str, Route], Awaitable[str | None]],
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

    async def get(
        self, channel: str | None, timeout: float, route: Route = (None, None)
    ) -> str | None:
        """The type of ``channel``; ``None`` when it cannot be found out within ``timeout``."""
        if channel is None:
            return None
        known = self._known.get(channel)
        if known is not None and known[1] > self.clock():
            self._known.move_to_end(channel)
            return known[0]
        task = self._asking.get(channel)
        if task is None:
            task = self._asking[channel] = asyncio.create_task(self._ask(channel, route))
        try:
            # shielded: one waiter's timeout must not cancel the lookup the others wait for
            return await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            return None

    async def _ask(self, channel: str, route: Route) -> str | None:
        try:
            kind = await self.lookup(channel, route)  # None when it failed (the lookup logs why)
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
        for name in ("gateway.slack", "gateway.slack.sdk", "gateway.slack.oauth"):
            logger = logging.getLogger(name)
            if not any(isinstance(f, _TokenFilter) for f in logger.filters):
                logger.addFilter(_TokenFilter())
        if not any(isinstance(f, RepeatFilter) for f in self.log.filters):
            self.log.addFilter(RepeatFilter(marked_only=True))
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
        store: InstallationStore | None = None
        if settings.oauth is not None:
            store_redis = layer_redis(layer, "slack", self.name)
            store = (
                RedisInstallationStore(store_redis)
                if store_redis is not None
                else InstallationStore()
            )
        #: auth.test's answer (team_id, user_id, bot_id …) once it passed (one workspace)
        self.identity: dict[str, Any] = {}
        self.workspaces = Workspaces(self, settings, self.api, store, lambda: self.identity)
        self.answers = Answers(self, settings.answers)
        self.channel_types = ChannelTypes(self._lookup_channel_type)
        #: event id → the outcome of its hand-off running in this process (None: not acked)
        self._handing_over: dict[str, asyncio.Future[Ack | None]] = {}
        #: trigger_id → when its event arrived (loop time), to explain an expired_trigger_id
        self._triggers = TtlMemory(TRIGGER_MEMORY, MAX_TRIGGERS)
        #: function_execution_id → that execution's bot_access_token
        self._function_tokens = TtlMemory(FUNCTION_TOKEN_FOR, MAX_FUNCTION_TOKENS)
        self._background: set[asyncio.Task[Any]] = set()
        self.client: SocketModeConnection | None = None
        self.server: EventsApiServer | None = None
        if settings.transport == "socket_mode":
            self.client = SocketModeConnection(
                self, settings, self.api, listener=self, events=self.buffer
            )
            if settings.oauth is not None:  # the install flow still needs an HTTP listener
                self.server = EventsApiServer(settings, self, self.log, events=False)
        else:
            self.server = EventsApiServer(settings, self, self.log)
        self._auth_error: str | None = "auth.test not done yet" if settings.oauth is None else None
        self._auth_task: asyncio.Task[None] | None = None
        #: one call at a time per Slack channel, so messages appear in the order they came
        self._channels: dict[str, _ChannelTurn] = {}

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        self.buffer.start()
        self.log.info("%s: de-dup window in %s", self.name, self.dedup.description)
        if self.settings.oauth is not None:
            level = logging.INFO if self.workspaces.durable else logging.WARNING
            self.log.log(level, "%s: installations in %s", self.name, self.workspaces.description)
        try:
            if self.client is not None:
                await self.client.start()
            elif self.settings.oauth is None:
                await self._authenticate(first=True)
            if self.server is not None:
                await self.server.start()
        except BaseException:
            await self.close()  # close() is not called when open() fails
            raise
        self._spawn(self.answers.sweep_every())
        if self.settings.oauth is not None:
            self._spawn(self.workspaces.refresh_in_background())
        if self.server is not None:
            options, oauth = self.settings.events_api, self.settings.oauth
            paths = [options.path] if self.server.events else []
            paths += [oauth.install_path, oauth.redirect_path] if oauth is not None else []
            self.log.info(
                "%s: %s on http://%s:%s (%s)",
                self.name,
                "Events API" if self.server.events else "OAuth install flow",
                options.host,
                self.server.port,
                ", ".join(paths),
            )

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

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
        reasons = self.client.readiness() if self.client is not None else []
        if self.server is not None and self.server.port is None:
            reasons.append(
                "Events API server not listening"
                if self.server.events
                else "OAuth install flow not listening"
            )
        if self.client is None and self._auth_error is not None:
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
        await cancel_and_wait(*self._background)
        if self.client is not None:
            await self.client.close()
        if self.server is not None:
            await self.server.stop()
        await self.channel_types.close()
        await self.buffer.flush(1.0)
        await self.api.close()
        await self.dedup.close()
        await self.answers.close_all()
        await self.workspaces.close()

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

    async def slack_envelope(
        self, envelope: Envelope, handed_over: Callable[[], None]
    ) -> Ack | None:
        """Socket Mode: an :class:`Ack` acknowledges (the layer took it, or it can never be
        taken), with the consumer's answer when the envelope accepts one."""
        try:
            inbound = self._translate(envelope.type, envelope.payload)
        except InvalidPayload as exc:
            return self._unreadable(f"{envelope.type} envelope {envelope.envelope_id}", exc)
        key = inbound.id if envelope.type == "events_api" and inbound.id else envelope.envelope_id
        answerable = envelope.accepts_response_payload and self._waits_for(inbound)
        return await self._deliver(inbound, key, answerable, handed_over)

    async def slack_request(self, kind: str, payload: dict[str, Any], retry: int) -> Ack | None:
        """Events API: an :class:`Ack` is a 200 (with the consumer's answer as its JSON body),
        ``None`` a 503 (Slack retries)."""
        if kind == "app_rate_limited":
            self.metrics.error("app_rate_limited")
            self.log.warning("%s: Slack says events were rate limited: %s", self.name, payload)
            return Ack()
        try:
            inbound = self._translate(kind, payload)
        except InvalidPayload as exc:
            return self._unreadable(f"{kind} request", exc)
        if retry:
            self.log.info("%s: Slack retry #%d of %s", self.name, retry, inbound.id)
        key = inbound.id if kind == "event_callback" else None
        return await self._deliver(inbound, key, self._waits_for(inbound), _nothing)

    def _waits_for(self, inbound: Inbound) -> bool:
        return f"slack.{inbound.event}" in self.settings.answers.wait_for

    def _translate(self, kind: str, payload: Mapping[str, Any]) -> Inbound:
        if kind in ("events_api", "event_callback"):
            own = (self.identity.get("user_id"), self.identity.get("bot_id"))
            if own == (None, None):  # slack.oauth: the installation this event was sent to
                own = own_ids(payload)
            inbound = from_event_callback(payload, own)
            if inbound.event == "message":
                self.channel_types.learn(inbound.keys["channel"], inbound.keys["channel_type"])
            return inbound
        if kind == "slash_commands":
            return from_slash_command(payload)
        if kind == "interactive":
            return from_interactive(payload)
        raise InvalidPayload(f"unknown payload type {kind!r}")

    async def _lookup_channel_type(self, channel: str, route: Route) -> str | None:
        """``conversations.info`` → ``channel_type``; ``None`` (logged, counted) when it fails."""
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT * 5):  # a 429 waits its Retry-After
                token = await self.workspaces.token(route)
                answer = await self.api.call(
                    "conversations.info", {"channel": channel}, token=token, read=True
                )
        except (SlackApiFailed, SlackUnreachable, TimeoutError, CommandError) as exc:
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

    def _unreadable(self, what: str, exc: Exception) -> Ack:
        self.metrics.dropped("invalid_payload")
        self.log.error(
            "%s: dropped %s: %s (acknowledged: Slack would resend it)", self.name, what, exc
        )
        return Ack()

    async def _deliver(
        self, inbound: Inbound, key: str | None, answerable: bool, handed_over: Callable[[], None]
    ) -> Ack | None:
        """Hand ``inbound`` to the layer unless it was delivered before; an :class:`Ack`:
        acknowledge (with the consumer's answer, for an ``answerable`` event).

        ``key`` (the event id) is claimed in the de-dup window, and also kept in this process
        while its hand-off runs (and its answer is awaited): a delivery that finds it there
        follows that hand-off's outcome instead of publishing again. The window alone did not
        do: with Redis down a claim leaves no mark, so a redelivery that Slack sent meanwhile
        (it redelivers what is not acknowledged within 3 s) was published beside the original
        once Redis was back (issue 21, item 12: 64 envelopes, 4-8 duplicates in 6 of 6 runs).
        """
        if self.settings.ignore_self and inbound.event == "message" and inbound.keys.get("self"):
            return Ack()
        if key is None:
            return await self._hand_over(inbound, None, answerable, handed_over)
        running = self._handing_over.get(key)
        if running is not None:
            handed_over()  # following takes no handling slot
            return await self._follow(key, running)
        outcome: asyncio.Future[Ack | None] = asyncio.get_running_loop().create_future()
        self._handing_over[key] = outcome
        answer: Ack | None = None
        try:
            answer = await self._hand_over(inbound, key, answerable, handed_over)
        finally:
            del self._handing_over[key]
            outcome.set_result(answer)  # None when cancelled (the connection went away)
        return answer

    async def _follow(self, key: str, running: asyncio.Future[Ack | None]) -> Ack | None:
        """Another delivery of ``key`` is being handed over by this process: its outcome is
        this one's (it ends within ``ack_timeout``, or ``answers.timeout`` while it waits for an
        answer), so both are acknowledged alike, or neither."""
        limit = max(self.settings.ack_timeout, self.settings.answers.timeout)
        try:
            answer = await asyncio.wait_for(asyncio.shield(running), limit)
        except TimeoutError:
            answer = None
        if answer is not None:
            self.metrics.dropped("duplicate")
            self.log.debug("%s: %s delivered meanwhile; acknowledged again", self.name, key)
        else:
            self.metrics.retry("duplicate_in_flight")
            self.log.debug("%s: %s not taken meanwhile; not acknowledged", self.name, key)
        return answer

    async def _hand_over(
        self,
        inbound: Inbound,
        key: str | None,
        answerable: bool,
        handed_over: Callable[[], None],
    ) -> Ack | None:
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        # ack_timeout bounds the whole hand-off: de-dup claim, channel_type lookup, layer
        deadline = arrived + self.settings.ack_timeout
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
            return Ack(self.answers.recall(key) if key is not None else None)
        if claim is Claim.PENDING:
            # another replica hands it over now, and may still fail: no ack yet
            self.metrics.retry("duplicate_in_flight")
            self.log.info("%s: %s is being delivered meanwhile; not acknowledged", self.name, key)
            return None
        keys = inbound.keys
        route = (keys.get("enterprise"), keys.get("team"))
        if inbound.event in ("joined", "left"):
            timeout = min(LOOKUP_TIMEOUT, max(0.0, deadline - loop.time()))
            kind = await self.channel_types.get(keys.get("channel"), timeout, route)
            keys = {**keys, "channel_type": kind}
        ack_channel = await self.answers.open() if answerable else None
        if f"slack.{inbound.event}" in ANSWERABLE:
            keys = {**keys, "ack_channel": ack_channel}
        message = self.event(inbound.event, id=inbound.id, **keys)
        # before the layer has it: a consumer's answer may come before publish() returns
        self._remember(inbound, arrived)
        try:
            refused = False
            try:
                accepted = await self.publish(message, timeout=max(0.0, deadline - loop.time()))
            except EventRefused:
                accepted = refused = True  # logged, counted; Slack would resend it forever
            if key is not None and accepted:
                # the layer has it: a cancel now (the socket went away) must not lose the mark
                await asyncio.shield(self.dedup.done(key))
            elif key is not None:
                await self.dedup.release(key)
            if not accepted:
                return None
            handed_over()
            self._published(inbound)
            if ack_channel is None or refused:
                return Ack()
            limit = arrived + self.settings.answers.timeout
            payload = await self.answers.wait(ack_channel, message, limit, arrived)
            if key is not None and payload is not None:
                self.answers.remember(key, payload)
            return Ack(payload)
        finally:
            if ack_channel is not None:
                self.answers.close(ack_channel)

    async def slack_oauth(self, request: OAuthRequest) -> HttpAnswer:
        """The install flow's GETs (``slack.oauth``): :class:`Workspaces`."""
        return await self.workspaces.oauth_request(request)

    def _remember(self, inbound: Inbound, arrived: float) -> None:
        """What the gateway keeps of an event for the commands that answer it."""
        trigger = inbound.keys.get("trigger_id")
        if isinstance(trigger, str):
            self._triggers.put(trigger, arrived)
        if inbound.event == "function_executed" and inbound.secret:
            execution = inbound.keys.get("function_execution_id")
            if isinstance(execution, str):
                self._function_tokens.put(execution, inbound.secret)

    def _published(self, inbound: Inbound) -> None:
        """What follows from an event the layer took."""
        if inbound.event == "event" and inbound.keys.get("event_type") in (
            "app_uninstalled",
            "tokens_revoked",
        ):
            self._spawn(self.workspaces.uninstalled(inbound.keys))

    # -- commands -----------------------------------------------------------------------------

    async def _call(self, call: ApiCall, body: Mapping[str, Any]) -> dict[str, Any]:
        route = self._parse(parse_route, body)
        token = await self.workspaces.token(route)
        if call.channel is None:
            return await self._send(call, token)
        turn_key = f"{route[1] or route[0] or ''}/{call.channel}"
        await self.pacer.wait(turn_key)  # bounded (pacing.queue), keeps arrival order
        turn = self._channels.setdefault(turn_key, _ChannelTurn())
        turn.users += 1
        try:
            async with turn.lock:  # FIFO: the previous call to this channel is answered first
                return await self._send(call, token)
        finally:
            turn.users -= 1
            if turn.users == 0:
                del self._channels[turn_key]

    async def _send(self, call: ApiCall, token: str | None) -> dict[str, Any]:
        try:
            return await self.api.call(call.method, call.args, token=token)
        except SlackApiFailed as exc:
            if exc.error == "expired_trigger_id":
                self._explain_trigger(call)
            raise CommandError(exc.error) from None
        except SlackUnreachable as exc:
            raise CommandError(f"Slack unreachable: {exc}") from None

    def _explain_trigger(self, call: ApiCall) -> None:
        trigger = call.args.get("trigger_id")
        arrived = self._triggers.get(trigger) if isinstance(trigger, str) else None
        age = (
            f"its event came {asyncio.get_running_loop().time() - arrived:.1f} s before"
            if arrived is not None
            else "its event came to another process"
        )
        self.log.warning(
            "%s: %s: expired_trigger_id (%s; Slack takes a trigger_id for 3 s: open the view "
            "first, do slow work after)",
            self.name,
            call.method,
            age,
        )

    @staticmethod
    def _parse(parse: Any, body: Mapping[str, Any], *args: Any) -> Any:
        try:
            return parse(body, *args)
        except InvalidCommand as exc:
            raise CommandError(str(exc)) from None

    @handles("slack.send")
    async def handle_send(self, command: Command) -> dict[str, Any]:
        """``slack.send``: chat.postMessage; the result carries ``channel`` and ``ts``."""
        answer = await self._call(self._parse(parse_send, command.body), command.body)
        return {"channel": answer.get("channel"), "ts": answer.get("ts")}

    @handles("slack.update")
    async def handle_update(self, command: Command) -> dict[str, Any]:
        """``slack.update``: chat.update."""
        answer = await self._call(self._parse(parse_update, command.body), command.body)
        return {"channel": answer.get("channel"), "ts": answer.get("ts")}

    @handles("slack.delete")
    async def handle_delete(self, command: Command) -> dict[str, Any]:
        """``slack.delete``: chat.delete."""
        answer = await self._call(self._parse(parse_delete, command.body), command.body)
        return {"channel": answer.get("channel"), "ts": answer.get("ts")}

    @handles("slack.react")
    async def handle_react(self, command: Command) -> None:
        """``slack.react``: reactions.add (reactions.remove with ``remove: true``)."""
        await self._call(self._parse(parse_react, command.body), command.body)

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

    async def _view(self, parse: Any, command: Command) -> dict[str, Any]:
        answer = await self._call(self._parse(parse, command.body), command.body)
        view = answer.get("view")
        if not isinstance(view, dict):
            return {"view_id": None, "hash": None}
        return {"view_id": view.get("id"), "hash": view.get("hash")}

    @handles("slack.views_open")
    async def handle_views_open(self, command: Command) -> dict[str, Any]:
        """``slack.views_open``: views.open; the result carries the ``view_id`` and ``hash``."""
        return await self._view(parse_views_open, command)

    @handles("slack.views_push")
    async def handle_views_push(self, command: Command) -> dict[str, Any]:
        """``slack.views_push``: views.push."""
        return await self._view(parse_views_push, command)

    @handles("slack.views_update")
    async def handle_views_update(self, command: Command) -> dict[str, Any]:
        """``slack.views_update``: views.update."""
        return await self._view(parse_views_update, command)

    @handles("slack.views_publish")
    async def handle_views_publish(self, command: Command) -> dict[str, Any]:
        """``slack.views_publish``: views.publish (a user's App Home tab)."""
        return await self._view(parse_views_publish, command)

    async def _function(self, call: ApiCall, body: Mapping[str, Any]) -> None:
        token = self._function_tokens.get(call.args["function_execution_id"])
        if token is None:  # its event came to another process: the installation's bot token
            await self._call(call, body)
            return
        self._parse(parse_route, body)
        await self._send(call, token)

    @handles("slack.function_complete")
    async def handle_function_complete(self, command: Command) -> None:
        """``slack.function_complete``: functions.completeSuccess."""
        await self._function(self._parse(parse_function_complete, command.body), command.body)

    @handles("slack.function_fail")
    async def handle_function_fail(self, command: Command) -> None:
        """``slack.function_fail``: functions.completeError."""
        await self._function(self._parse(parse_function_fail, command.body), command.body)

    @handles("slack.ack")
    async def handle_ack(self, command: Command) -> None:
        """``slack.ack`` is taken on an event's ``ack_channel`` only (see the module doc)."""
        self._parse(parse_ack, command.body)  # what is wrong with it first, as the helpers say
        raise CommandError(
            "slack.ack answers one event: send it to that event's ack_channel (events in "
            "slack.answers.wait_for carry one), not to the command channel"
        )


def _nothing() -> None:
    return None
