"""A local SMTP server that keeps what it receives (the far side of ``email.send``)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from core.testing.base import HOST

# --------------------------------------------------------------------------------------------
# SMTP sink


class SmtpSink:
    """An aiosmtpd server on the running event loop that collects what it is sent.

    Stands in for the outbound relay in tests and benchmarks. ``replies`` is a list of SMTP
    answers to give to the next DATA commands before accepting (``["451 4.3.0 busy"]`` makes the
    first delivery fail temporarily).
    """

    def __init__(self, replies: Sequence[str] = ()) -> None:
        import asyncio

        self.replies = list(replies)
        self.received: asyncio.Queue[object] = asyncio.Queue()
        self.attempts = 0
        self._server: asyncio.Server | None = None

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        self.attempts += 1
        if self.replies:
            return self.replies.pop(0)
        await self.received.put(envelope)
        return "250 OK"

    async def start(self) -> SmtpSink:
        import asyncio

        from aiosmtpd.smtp import SMTP

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: SMTP(self), HOST, 0)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
