"""A consumer worker that loses nothing when Redis restarts or the process is stopped.

channels' ``Worker`` (what ``manage.py runworker`` runs) has three ways to lose messages, all
seen in tests/gateways/email/test_fault.py:

* its listener moves messages from the layer into an unbounded in-memory queue per channel as
  fast as the layer gives them, so a slow consumer holds hundreds of them in memory;
* a layer error (Redis restarted) escapes the listener and ends the process, and with it every
  message in those queues;
* SIGTERM ends the process at once, with the same result.

:class:`ConsumerWorker` is the same worker with those holes closed: at most one message waits
per channel (the next ``receive()`` happens only once the consumer took the previous one), a
layer error is retried with backoff, and :meth:`ConsumerWorker.drain` (SIGTERM/SIGINT) stops
receiving and lets the consumers finish what they hold. A message without ``type`` is logged
and skipped instead of stopping its channel.

``gateways run --app`` uses it, and so does ``manage.py runworker`` when ``"gateways"`` is listed
before ``"channels"`` in ``INSTALLED_APPS`` (Django picks the first app's command).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

from asgiref.compatibility import guarantee_single_callable
from channels.worker import Worker

from core.service import LAYER_ERRORS, Backoff, describe_error

__all__ = ["ConsumerWorker"]

log = logging.getLogger("gateway.worker")


class _Inbox:
    """The consumer's ``receive``: one message at a time, and whether the consumer is idle."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)
        self.idle = asyncio.Event()

    async def get(self) -> Any:
        self.idle.set()
        message = await self.queue.get()
        self.idle.clear()
        return message

    @property
    def drained(self) -> bool:
        return self.queue.empty() and self.idle.is_set()


class ConsumerWorker(Worker):  # type: ignore[misc]
    """channels' ``Worker`` with bounded prefetch, layer retries and a graceful drain."""

    def __init__(self, *args: Any, shutdown_grace: float = 30.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shutdown_grace = shutdown_grace
        self._inboxes: dict[str, _Inbox] = {}
        self._listeners: list[asyncio.Task[None]] = []

    def get_or_create_application_instance(self, scope_id: str, scope: dict[str, Any]) -> Any:
        details = self.application_instances.get(scope_id)
        if details is not None and not details["future"].done():
            details["last_used"] = time.time()
            return details["input_queue"]
        inbox = self._inboxes[scope_id] = _Inbox()
        instance = guarantee_single_callable(self.application)  # type: ignore[no-untyped-call]
        future = asyncio.ensure_future(
            instance(
                scope=scope,
                receive=inbox.get,
                send=lambda message: self.application_send(scope, message),
            )
        )
        self.application_instances[scope_id] = {
            "input_queue": inbox.queue,
            "future": future,
            "scope": scope,
            "last_used": time.time(),
        }
        return inbox.queue

    async def handle(self) -> None:
        self._listeners = [asyncio.create_task(self.listener(c)) for c in self.channels]
        await asyncio.gather(*self._listeners)

    async def listener(self, channel: str) -> None:
        backoff = Backoff(0.2, 10.0)
        while True:
            try:
                message: Any = await self.channel_layer.receive(channel)
            except LAYER_ERRORS as exc:
                delay = backoff.next()
                log.warning(
                    "receive on %r failed (%s); retrying in %.1f s",
                    channel,
                    describe_error(exc),
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            if not isinstance(message, dict) or not message.get("type"):
                log.warning("skipped a message without 'type' on %r", channel)
                continue
            await self._deliver(channel, message)

    async def _deliver(self, channel: str, message: dict[str, Any]) -> None:
        """Hand ``message`` to the channel's consumer, waiting while it holds the previous one.

        A consumer can die while we wait (channels' consumers also listen on a channel of their
        own, and a layer outage raises there); the messages it had not taken yet are moved to
        its replacement instead of being lost with it.
        """
        pending = [message]
        while pending:
            scope = {"type": "channel", "channel": channel}
            queue = self.get_or_create_application_instance(channel, scope)
            future = self.application_instances[channel]["future"]
            put = asyncio.ensure_future(queue.put(pending[0]))
            await asyncio.wait([put, future], return_when=asyncio.FIRST_COMPLETED)
            if put.done():
                pending.pop(0)
                continue
            put.cancel()
            await asyncio.gather(put, return_exceptions=True)
            rescued = []
            while not queue.empty():
                rescued.append(queue.get_nowait())
            log.warning(
                "consumer on %r exited; handing %d waiting message(s) to a new instance",
                channel,
                len(rescued) + len(pending),
            )
            pending = rescued + pending

    async def drain(self) -> None:
        """Stop receiving; give consumers ``shutdown_grace`` s to finish what they hold."""
        for task in self._listeners:
            task.cancel()
        await asyncio.gather(*self._listeners, return_exceptions=True)
        try:
            await asyncio.wait_for(self._consumers_idle(), self.shutdown_grace)
        except TimeoutError:
            log.warning("consumers still busy after %.0f s; stopping them", self.shutdown_grace)

    async def _consumers_idle(self) -> None:
        for channel, inbox in self._inboxes.items():
            details = self.application_instances.get(channel)
            if details is None:
                continue
            while not details["future"].done():
                idle = asyncio.create_task(inbox.idle.wait())
                await asyncio.wait([idle, details["future"]], return_when=asyncio.FIRST_COMPLETED)
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
        for details in self.application_instances.values():
            details["future"].cancel()

    def run(self) -> None:
        asyncio.run(self.serve())
