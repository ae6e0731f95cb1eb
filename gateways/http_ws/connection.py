"""The only module that touches uvicorn and sockets: one uvicorn server on the gateway's loop.

uvicorn does every byte of HTTP/1.1 and WebSocket parsing (h11 or httptools, and the
``websockets`` library), and enforces what it already knows how to: the WebSocket message size
(close 1009), the connection cap (503), keep-alive and ping timeouts, TLS. We bind the listening
socket ourselves so a taken port is an ``OSError`` (exit code 3) instead of uvicorn's
``sys.exit(1)``, and we drive ``Server.startup`` / ``main_loop`` / ``shutdown`` instead of
``Server.serve``, which would install its own SIGTERM handler over the gateway's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

import uvicorn

from gateways.http_ws.config import HttpWsConfig

__all__ = ["UvicornServer"]

log = logging.getLogger("gateway.http_ws")
# uvicorn logs every WebSocket open and close at INFO: one line per connection is noise here
# (DESIGN §8); its warnings and errors still come through
logging.getLogger("uvicorn.error").setLevel(logging.WARNING)


class UvicornServer:
    """uvicorn serving ``app`` with the limits of ``config``."""

    def __init__(self, config: HttpWsConfig, app: Any) -> None:
        self.config = config
        tls = config.tls
        self._uvicorn = uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            lifespan="off",  # the gateway has its own lifecycle; Django has no lifespan
            ws="websockets-sansio",  # the legacy "websockets" one is deprecated
            ws_max_size=config.max_message_size,
            ws_ping_interval=config.ping_interval,
            ws_ping_timeout=config.ping_interval,
            limit_concurrency=config.max_connections,
            timeout_keep_alive=int(max(1, config.keepalive_timeout)),
            proxy_headers=config.forwarded_allow_ips is not None,
            forwarded_allow_ips=config.forwarded_allow_ips or [],
            server_header=False,
            log_config=None,
            access_log=False,
            ssl_certfile=str(tls.cert_file) if tls else None,
            ssl_keyfile=str(tls.key_file) if tls else None,
            ssl_keyfile_password=tls.key_password.get_secret_value()
            if tls and tls.key_password
            else None,
        )
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.closing = False

    @property
    def port(self) -> int:
        if self._socket is None:
            return self.config.port
        return int(self._socket.getsockname()[1])

    @property
    def listening(self) -> bool:
        return self._server is not None and bool(self._server.servers) and not self.closing

    async def start(self) -> None:
        """Bind and serve; ``OSError`` when the port is taken."""
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.config.host, self.config.port))
            sock.listen(2048)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._socket = sock
        if not self._uvicorn.loaded:
            self._uvicorn.load()
        server = uvicorn.Server(self._uvicorn)
        server.lifespan = self._uvicorn.lifespan_class(self._uvicorn)
        await server.startup(sockets=[sock])
        self._server = server
        # main_loop refreshes the Date header once a second and ends when should_exit is set
        self._ticker = asyncio.create_task(server.main_loop())
        scheme = "https" if self.config.tls else "http"
        log.info("listening on %s://%s:%d", scheme, self.config.host, self.port)

    def stop_accepting(self) -> None:
        """Close the listening socket; open connections carry on."""
        self.closing = True
        if self._server is not None:
            for server in self._server.servers:
                server.close()

    async def close(self, timeout: float) -> None:
        """Stop uvicorn: connections still open after ``timeout`` s are cut (1012 for sockets)."""
        self.stop_accepting()
        server = self._server
        if server is None:
            return
        self._uvicorn.timeout_graceful_shutdown = max(1, int(timeout))
        server.should_exit = True
        if self._ticker is not None:
            await asyncio.gather(self._ticker, return_exceptions=True)
        await server.shutdown(sockets=[self._socket] if self._socket else None)
        self._server = None
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.close()
            self._socket = None
