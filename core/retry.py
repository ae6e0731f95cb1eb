"""Retrying and giving up, for both sides of the layer: the gateways and the consumer worker.

* :data:`LAYER_ERRORS`: what means "the layer cannot take this now" (full, Redis down) rather
  than "this message is wrong": retried by :meth:`core.service.Gateway.publish`,
  :class:`core.receiving.ChannelReader`, :func:`send_command` and :mod:`core.worker`.
* :class:`Backoff`: the one capped, jittered exponential backoff (reconnects, layer retries,
  the worker's redeliveries).
* :func:`send_command`: ``layer.send``, retried while the channel is full or the layer down.
  Consumers know it as ``core.consumers.send_command``.
* :class:`StartupError`: what is *not* retried: a process that cannot start exits with code 3.
* :func:`cancel_and_wait`, :func:`describe_tasks`: stopping tasks that must stop, and saying
  where the ones that did not are stuck.

It imports nothing of the gateway base (``core.service``), so the consumer side
(``core.worker``, ``core.receiving``, ``core.consumers``) can use it without loading a gateway.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable
from typing import Any

from channels.exceptions import ChannelFull

from core.types import ChannelLayer

__all__ = [
    "LAYER_ERRORS",
    "Backoff",
    "StartupError",
    "cancel_and_wait",
    "describe_error",
    "describe_tasks",
    "send_command",
]


def _layer_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ChannelFull, OSError, TimeoutError, ConnectionError]
    try:
        from redis import exceptions as redis_errors
    except ImportError:  # pragma: no cover - channels_redis depends on redis
        pass
    else:
        errors += [
            redis_errors.ConnectionError,
            redis_errors.TimeoutError,
            redis_errors.BusyLoadingError,
        ]
    return tuple(errors)


#: exceptions that mean "the layer cannot take this now" rather than "this message is wrong"
LAYER_ERRORS = _layer_errors()


class StartupError(Exception):
    """The gateway could not start (port taken, transport refused us): exit code 3."""


class Backoff:
    """Capped exponential backoff with jitter; :meth:`reset` after a success.

    Each delay is drawn from ``[cap/2, cap]`` where ``cap`` doubles from ``initial`` up to
    ``maximum``, so replicas restarted together do not reconnect in lockstep.
    """

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, factor: float = 2.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.attempts = 0

    def next(self) -> float:
        delay = self.delay(self.attempts)
        self.attempts += 1
        return delay

    def delay(self, retries: int) -> float:
        """The delay after ``retries`` earlier ones (0: the first), without counting it."""
        cap = min(self.maximum, self.initial * self.factor**retries)
        return random.uniform(cap / 2, cap)

    def reset(self) -> None:
        self.attempts = 0


def describe_error(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def cancel_and_wait(*tasks: asyncio.Future[Any], every: float = 1.0) -> None:
    """Cancel ``tasks`` and wait until every one is done, cancelling again each ``every`` s.

    One cancellation can be lost: redis-py turns a cancel that meets its own timeout into a
    ``TimeoutError`` that a retry loop catches as an outage (seen: a scheduler's lease loop went
    on sleeping and its stop hung), and on Python 3.11 ``wait_for`` returns a result that raced
    the cancel. A task that swallowed one must not hang a stop. Outcomes are retrieved and
    dropped, as ``gather(..., return_exceptions=True)`` does.
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=every)
    for task in tasks:
        if not task.cancelled():
            task.exception()


def describe_tasks(tasks: Iterable[asyncio.Task[Any]]) -> str:
    """Where each unfinished task waits: its coroutine's frame, then what that awaits, inwards
    (``Task.get_stack`` shows the outermost frame only). For hung-stop diagnostics."""
    blocks = []
    for task in tasks:
        if task.done():
            continue
        lines = [f"task {task.get_name()}:"]
        coro: Any = task.get_coro()
        while coro is not None and getattr(coro, "cr_frame", None) is not None:
            code = coro.cr_frame.f_code
            lines.append(f"  {code.co_filename}:{coro.cr_frame.f_lineno} in {code.co_name}")
            coro = coro.cr_await
        if coro is not None:
            lines.append(f"  awaiting {coro!r}"[:200])
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


async def send_command(
    layer: ChannelLayer, channel: str, message: dict[str, Any], *, timeout: float = 30.0
) -> None:
    """``layer.send(channel, message)``, retried while the channel is full or the layer down.

    Raises the last error (``ChannelFull``, a connection error) once ``timeout`` seconds passed.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    backoff = Backoff(0.05, 2.0)
    while True:
        try:
            await layer.send(channel, message)
            return
        except LAYER_ERRORS:
            delay = backoff.next()
            if loop.time() + delay > deadline:
                raise
            await asyncio.sleep(delay)
