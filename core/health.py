"""A tiny HTTP server for /healthz, /readyz and /metrics (DESIGN §8).

It answers GET only, one request per connection, with ``Connection: close``: probes and
Prometheus need nothing more, and it keeps the server a page long.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from core.metrics import REGISTRY

__all__ = ["HealthServer"]

log = logging.getLogger("gateway.health")

#: returns the reasons the integration is not ready; an empty list means ready
ReadinessCheck = Callable[[], list[str]]


class HealthServer:
    """Serves /healthz (alive), /readyz (every check passes) and /metrics on one port."""

    def __init__(
        self,
        host: str,
        port: int,
        checks: list[ReadinessCheck],
        details: list[Callable[[], list[str]]] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.checks = checks
        #: extra lines for the /readyz body, ready or not (e.g. the scheduler's role)
        self.details = details or []
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("health server on http://%s:%d/", self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def _respond(self, path: str) -> tuple[int, str, bytes]:
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            reasons = [reason for check in self.checks for reason in check()]
            extra = [line for detail in self.details for line in detail()]
            if reasons:
                return 503, "text/plain", ("\n".join([*reasons, *extra]) + "\n").encode()
            return 200, "text/plain", ("\n".join(["ready", *extra]) + "\n").encode()
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
        return 404, "text/plain", b"not found\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, _, rest = request.decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            if method != "GET":
                status, ctype, body = 405, "text/plain", b"GET only\n"
            else:
                status, ctype, body = self._respond(path)
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}.get(
                status, "Service Unavailable"
            )
            head = (
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            pass
        finally:
            writer.close()
