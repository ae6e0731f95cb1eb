"""The one reconnecting client for client-side transports (IRC, Slack Socket Mode, MQTT).

A gateway whose transport is a connection *it* opens (to an IRC server, Slack, a broker)
subclasses :class:`ReconnectingClient` in its ``connection.py`` and fills in three hooks; the
base class owns everything around them, the same way for every protocol:

==========================  ==================================================================
``_connect()``              one attempt: open, handshake, authenticate; return the keys of the
                            ``<proto>.connect`` event (e.g. ``{"nick": "bot"}``) once usable.
                            Raise :class:`ConnectFailed` (``fatal=True`` when the server said
                            no: bad credentials, an untrusted certificate).
``_wait_lost()``            return, with the reason, once the connection ended.
``_disconnect()``           close politely (QUIT, DISCONNECT), then drop it. Idempotent.
``_probe()`` (optional)     ask a silent server for a sign of life (IRC ``PING``).
``_abort(reason)``          drop the connection now (the watchdog's last resort).
``_hang_up(reason)``        (optional) end it on purpose for :meth:`~ReconnectingClient.restart`.
==========================  ==================================================================

House rules (what the base class guarantees, so no gateway writes them again):

* **The first attempt decides whether the gateway starts.** :meth:`ReconnectingClient.start`
  raises :class:`core.retry.StartupError` (exit code 3) when the server refused us: that
  does not fix itself. A server that is merely down is retried in the background while
  ``/readyz`` says why; later refusals are retried too (an operator may fix the account).
* **Reconnects** wait a capped, jittered :class:`core.retry.Backoff` that is reset only once a
  connection stayed up ``stable_after`` seconds, so a server that accepts and drops at once
  is not hammered; a connection the subclass dropped because the peer misbehaved
  (:meth:`ReconnectingClient.misbehaved`: a flood, a send buffer it never reads) never resets
  it, however long it lasted. Each wait is logged with the reason and the delay, and counted in
  ``gateway_retries_total{kind="connect"}``.
* **Silent connections**: with ``idle_timeout``, a connection from which nothing was heard
  (:meth:`ReconnectingClient.heard`) for that long is probed (``_probe``), and dropped when
  another ``idle_timeout`` passes in silence; the reconnect follows as for any loss.
* **Facts, not decisions**: the client reports ``client_connected(details)`` and
  ``client_disconnected(reason)`` to its :class:`ClientListener` (the gateway: re-join,
  re-subscribe) and puts ``<proto>.connect`` / ``<proto>.disconnect`` events in the gateway's
  :class:`core.service.EventBuffer`; ``gateway_transport_connected`` follows the state, and
  :meth:`ReconnectingClient.readiness` is the gateway's readiness.
* ``last_error`` always says why there is no connection (``None`` while connected).

States, h11's way: one table of what may follow what, instead of flags. An event that the
table does not allow in the current state is a bug and raises :class:`ClientStateError`.

==============  ==========  ========  ======  =======  ==========  ==========  ======
state           connected   failed    fatal   lost     retry       restart     close
==============  ==========  ========  ======  =======  ==========  ==========  ======
``IDLE``                                               CONNECTING              CLOSED
``CONNECTING``  CONNECTED   WAITING   CLOSED                                   CLOSED
``CONNECTED``                                 WAITING              RESTARTING  CLOSED
``RESTARTING``                                WAITING                          CLOSED
``WAITING``                                            CONNECTING              CLOSED
``CLOSED``                                                                     CLOSED
==============  ==========  ========  ======  =======  ==========  ==========  ======

:meth:`ReconnectingClient.start` fires the first ``retry``; ``fatal`` is only fired for the
first attempt (later refusals are ``failed``). ``restart`` is
:meth:`ReconnectingClient.restart`: the gateway ends a working connection on purpose (MQTT
fetches what it left with the broker during a stall by resuming its session); the connection
is ended by the ``_hang_up`` hook (default: ``_abort``), and the reconnect that follows the
loss waits for no backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Mapping
from typing import Any, Final, Protocol

from core.retry import Backoff, StartupError, cancel_and_wait, describe_error
from core.service import EventBuffer, Gateway

__all__ = [
    "STABLE_AFTER",
    "ClientEvent",
    "ClientListener",
    "ClientState",
    "ClientStateError",
    "ConnectFailed",
    "ReconnectingClient",
]

#: a connection that lasted this long resets the backoff (a flapping one keeps backing off)
STABLE_AFTER: Final = 10.0


class ClientState(enum.Enum):
    IDLE = "idle"  # created, start() not called yet
    CONNECTING = "connecting"  # an attempt is in flight
    CONNECTED = "connected"  # usable; the listener was told
    RESTARTING = "restarting"  # ended on purpose (restart()); the next attempt follows at once
    WAITING = "waiting"  # between attempts, backing off
    CLOSED = "closed"  # close() was called, or the first attempt was refused


class ClientEvent(enum.Enum):
    CONNECTED = "connected"
    FAILED = "failed"
    FATAL = "fatal"
    LOST = "lost"
    RETRY = "retry"
    RESTART = "restart"
    CLOSE = "close"


#: the table in the module docstring; keep them the same
TRANSITIONS: Final[Mapping[ClientState, Mapping[ClientEvent, ClientState]]] = {
    ClientState.IDLE: {
        ClientEvent.RETRY: ClientState.CONNECTING,
        ClientEvent.CLOSE: ClientState.CLOSED,
    },
    ClientState.CONNECTING: {
        ClientEvent.CONNECTED: ClientState.CONNECTED,
        ClientEvent.FAILED: ClientState.WAITING,
        ClientEvent.FATAL: ClientState.CLOSED,
        ClientEvent.CLOSE: ClientState.CLOSED,
    },
    ClientState.CONNECTED: {
        ClientEvent.LOST: ClientState.WAITING,
        ClientEvent.RESTART: ClientState.RESTARTING,
        ClientEvent.CLOSE: ClientState.CLOSED,
    },
    ClientState.RESTARTING: {
        ClientEvent.LOST: ClientState.WAITING,
        ClientEvent.CLOSE: ClientState.CLOSED,
    },
    ClientState.WAITING: {
        ClientEvent.RETRY: ClientState.CONNECTING,
        ClientEvent.CLOSE: ClientState.CLOSED,
    },
    ClientState.CLOSED: {ClientEvent.CLOSE: ClientState.CLOSED},
}


class ClientStateError(RuntimeError):
    """An event the state table does not allow: a bug in the client or its subclass."""


class ConnectFailed(Exception):
    """One connection attempt failed. ``fatal``: the server refused us, not the network."""

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


class ClientListener(Protocol):
    """What the gateway hears from its client (always on the event loop)."""

    def client_connected(self, details: Mapping[str, Any]) -> None:
        """A connection is usable; ``details`` are the keys of the ``<proto>.connect`` event."""

    def client_disconnected(self, reason: str) -> None:
        """The connection ended (also on close()); a reconnect follows unless stopping."""


class ReconnectingClient:
    """One client connection that keeps itself up; see the module docstring.

    ``server`` names the peer in logs, events (``server`` key) and readiness. ``events`` is
    the buffer ``<proto>.connect`` / ``.disconnect`` go to (never put while stopping).
    """

    def __init__(
        self,
        gateway: Gateway[Any],
        *,
        server: str,
        listener: ClientListener,
        events: EventBuffer,
        backoff: Backoff | None = None,
        connect_timeout: float = 30.0,
        stable_after: float = STABLE_AFTER,
        idle_timeout: float | None = None,
    ) -> None:
        self.gateway = gateway
        self.server = server
        self.listener = listener
        self.events = events
        self.backoff = backoff or Backoff(1.0, 60.0)
        self.connect_timeout = connect_timeout
        self.stable_after = stable_after
        self.idle_timeout = idle_timeout
        self.log = gateway.log
        self.name = gateway.name
        #: why there is no connection (None while connected)
        self.last_error: str | None = "not connected yet"
        self._state = ClientState.IDLE
        self._up = asyncio.Event()
        self._heard = 0.0
        self._misbehaved = False
        self._task: asyncio.Task[None] | None = None

    # -- hooks --------------------------------------------------------------------------------

    async def _connect(self) -> Mapping[str, Any]:
        """One attempt; the ``<proto>.connect`` keys once usable. Raise :class:`ConnectFailed`."""
        raise NotImplementedError

    async def _wait_lost(self) -> str:
        """Wait until the current connection ended; return why."""
        raise NotImplementedError

    async def _disconnect(self) -> None:
        """Close the current connection politely, then drop it. Idempotent."""
        raise NotImplementedError

    async def _probe(self) -> None:
        """Ask a silent server for a sign of life (an IRC ``PING``); the default asks nothing."""

    def _abort(self, reason: str) -> None:
        """Drop the current connection now, so ``_wait_lost`` returns ``reason``."""
        raise NotImplementedError

    def _hang_up(self, reason: str) -> None:
        """End the current connection on purpose (:meth:`restart`), so ``_wait_lost`` returns
        ``reason``; the default drops it (``_abort``), a protocol may say goodbye first."""
        self._abort(reason)

    def event_keys(self) -> dict[str, Any]:
        """Keys in both ``<proto>.connect`` and ``.disconnect`` (default: ``server``)."""
        return {"server": self.server}

    # -- state --------------------------------------------------------------------------------

    @property
    def state(self) -> ClientState:
        return self._state

    @property
    def connected(self) -> bool:
        return self._state is ClientState.CONNECTED

    @property
    def _announced(self) -> bool:
        """The listener was told of a connection and not yet of its end."""
        return self._state in (ClientState.CONNECTED, ClientState.RESTARTING)

    def _fire(self, event: ClientEvent) -> ClientState:
        try:
            new = TRANSITIONS[self._state][event]
        except KeyError:
            raise ClientStateError(
                f"{self.name}: {event.value!r} is not possible while {self._state.value}"
            ) from None
        self.log.debug("%s: %s --%s--> %s", self.name, self._state.value, event.value, new.value)
        self._state = new
        if new is ClientState.CONNECTED:
            self._up.set()
        else:
            self._up.clear()
        return new

    def readiness(self) -> list[str]:
        """``[]`` while connected, else why not (for :meth:`Gateway.readiness`)."""
        return [] if self.connected else [f"not connected to {self.server}: {self.last_error}"]

    def heard(self) -> None:
        """Note that the server just said something: feeds the idle watchdog."""
        self._heard = asyncio.get_running_loop().time()

    def restart(self, reason: str) -> bool:
        """End the working connection on purpose and reconnect at once, without backoff.

        ``reason`` is the ``last_error`` meanwhile and the ``<proto>.disconnect`` reason.
        ``False`` when there is no connection to end (the next one is new anyway).
        """
        if not self.connected:
            return False
        self._fire(ClientEvent.RESTART)
        self.last_error = reason
        self._hang_up(reason)
        return True

    def misbehaved(self) -> None:
        """The current connection ends because the peer broke the rules (a flood, a buffer it
        never reads): the backoff is not reset by how long it lasted, so a server that floods
        after a quiet start is not reconnected to at once each time."""
        self._misbehaved = True

    async def wait_connected(self, timeout: float) -> None:
        """Return once connected; ``TimeoutError`` after ``timeout`` s (for commands)."""
        await asyncio.wait_for(self._up.wait(), timeout)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Make the first attempt, then keep the connection up in the background.

        Raises :class:`StartupError` when the server refused us; a network failure is logged,
        shown in :meth:`readiness` and retried.
        """
        self._fire(ClientEvent.RETRY)
        try:
            await self._attempt(first=True)
        except ConnectFailed as exc:
            if exc.fatal:
                raise StartupError(f"{self.server}: {exc}") from exc
            self.log.warning("%s: cannot connect to %s (%s)", self.name, self.server, exc)
        self._task = asyncio.create_task(self._supervise(), name=f"{self.name}-client")

    async def close(self) -> None:
        """Stop reconnecting and close the connection. Idempotent."""
        was_connected = self._announced
        if self._state is not ClientState.CLOSED:
            self._fire(ClientEvent.CLOSE)
        if self._task is not None:
            await cancel_and_wait(self._task)  # a retry loop: a lost cancel must not hang it
            self._task = None
        with contextlib.suppress(Exception):
            await self._disconnect()
        if was_connected:
            self._lost("gateway stopped")

    async def _attempt(self, *, first: bool = False) -> None:
        try:
            details = await asyncio.wait_for(self._connect(), self.connect_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failure = self._failure(exc)
            self.last_error = str(failure)
            self._fire(ClientEvent.FATAL if failure.fatal and first else ClientEvent.FAILED)
            with contextlib.suppress(Exception):
                await self._disconnect()  # what a failed attempt opened is closed now
            if failure is exc:
                raise
            raise failure from exc
        self._fire(ClientEvent.CONNECTED)
        self.last_error = None
        self.heard()
        self.gateway.metrics.connected.set(1)
        self.log.info("%s: connected to %s", self.name, self.server)
        try:
            self.listener.client_connected(details)
        except Exception:
            self.log.exception("%s: error in the connect handler", self.name)
        if not self.gateway.stopping:
            self.events.put(self.gateway.event("connect", **self.event_keys(), **details))

    def _failure(self, exc: Exception) -> ConnectFailed:
        if isinstance(exc, ConnectFailed):
            return exc
        if isinstance(exc, TimeoutError):
            return ConnectFailed(f"no answer within {self.connect_timeout:g} s")
        if isinstance(exc, OSError | EOFError):  # a hook that let a network error through
            return ConnectFailed(describe_error(exc))
        self.log.error("%s: bug in the connect hook", self.name, exc_info=exc)
        return ConnectFailed(f"internal error: {describe_error(exc)}")

    def _lost(self, reason: str) -> None:
        self.last_error = reason
        self.gateway.metrics.connected.set(0)
        try:
            self.listener.client_disconnected(reason)
        except Exception:
            self.log.exception("%s: error in the disconnect handler", self.name)
        if not self.gateway.stopping:
            self.events.put(self.gateway.event("disconnect", **self.event_keys(), reason=reason))

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        what = f"cannot connect to {self.server}"
        while True:
            at_once = False  # a restart() skips the backoff
            if self._announced:
                up_since = loop.time()
                self._misbehaved = False
                watchdog = None
                if self.idle_timeout is not None:
                    watchdog = asyncio.create_task(self._watchdog(self.idle_timeout))
                try:
                    reason = await self._wait_lost()
                except Exception as exc:  # a bug in the hook must not end the reconnects
                    self.log.exception("%s: bug while watching the connection", self.name)
                    reason = f"internal error: {describe_error(exc)}"
                finally:
                    if watchdog is not None:
                        watchdog.cancel()
                        await asyncio.gather(watchdog, return_exceptions=True)
                with contextlib.suppress(Exception):
                    await self._disconnect()  # release what the lost connection still holds
                at_once = self._state is ClientState.RESTARTING
                self._fire(ClientEvent.LOST)
                self._lost(reason)
                if loop.time() - up_since >= self.stable_after and not self._misbehaved:
                    self.backoff.reset()
                what = f"connection to {self.server} lost"
            if at_once:
                delay = 0.0
                self.log.info("%s: reconnecting at once (%s)", self.name, self.last_error)
            else:
                delay = self.backoff.next()
                self.log.warning(
                    "%s: %s (%s); reconnecting in %.1f s", self.name, what, self.last_error, delay
                )
            self.gateway.metrics.retry("connect")
            await asyncio.sleep(delay)
            self._fire(ClientEvent.RETRY)
            try:
                await self._attempt()
            except ConnectFailed:
                what = f"cannot connect to {self.server}"
            else:
                self.log.info("%s: reconnected to %s", self.name, self.server)

    async def _watchdog(self, idle: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.0, self._heard + idle - loop.time()))
            if loop.time() - self._heard < idle:
                continue  # heard from it meanwhile
            probed_at = loop.time()
            try:
                await self._probe()
            except Exception as exc:
                self._abort(f"keep-alive probe failed: {describe_error(exc)}")
                return
            await asyncio.sleep(idle)
            if self._heard >= probed_at:
                continue
            silent = loop.time() - self._heard
            self.log.warning(
                "%s: nothing from %s for %.1f s; dropping the connection",
                self.name,
                self.server,
                silent,
            )
            self._abort(f"no data from the server for {silent:.1f} s")
            return
