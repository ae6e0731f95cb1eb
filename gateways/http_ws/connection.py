"""The only module that touches uvicorn and sockets: one uvicorn server on the gateway's loop.

uvicorn does every byte of HTTP/1.1 and WebSocket parsing (h11 or httptools, and the
``websockets`` library), and enforces what it already knows how to: the WebSocket message size
(close 1009), keep-alive and ping timeouts, TLS. We bind the listening socket ourselves so a taken
port is an ``OSError`` (exit code 3) instead of uvicorn's ``sys.exit(1)``, and we drive
``Server.startup`` / ``main_loop`` / ``shutdown`` instead of ``Server.serve``, which would install
its own SIGTERM handler over the gateway's.

Two things uvicorn (0.30 to 0.55 at least) does not do, added here:

* **A deadline for the request head.** uvicorn's ``timeout_keep_alive`` starts only after a
  response and is cancelled by the first byte of the next request, so a connection that sends
  nothing, or its headers a byte at a time, stays open for ever (1,000 of them made every request
  503 under ``limit_concurrency``). :func:`header_deadline` wraps uvicorn's HTTP protocol: a
  connection must complete its request head (the blank line after the headers) within
  ``header_timeout`` of opening, or of the previous response, or it is closed.
* **Caps that tell WebSockets from HTTP.** ``limit_concurrency`` counts every connection, idle
  ones and upgraded WebSockets included, so it is not used: the gateway counts open WebSockets
  and HTTP requests in progress itself (``max_websockets``, ``max_requests``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Any, ClassVar

import uvicorn

from gateways.http_ws.config import HttpWsConfig

__all__ = ["UvicornServer", "header_deadline"]

log = logging.getLogger("gateway.http_ws")
# uvicorn logs every WebSocket open and close at INFO: one line per connection is noise here
# (DESIGN §8); its warnings and errors still come through
logging.getLogger("uvicorn.error").setLevel(logging.WARNING)


#: the end of a request head: a blank line (h11 also takes bare LF line ends)
_HEAD_ENDS = (b"\r\n\r\n", b"\n\n")


class _HeaderDeadline(asyncio.Protocol):
    """An HTTP protocol of uvicorn's, closed when a request head does not arrive in time.

    Everything is forwarded to the wrapped protocol; this one only watches the bytes for the
    blank line that ends a request head. A WebSocket upgrade swaps the transport's protocol for
    uvicorn's WebSocket one, which leaves this wrapper behind (its deadline was met by then).
    """

    #: the wrapped protocol class, the deadline in seconds, what to call when it passes
    settings: ClassVar[tuple[Callable[..., Any], float, Callable[[], None]]]

    def __init__(self, **kwargs: Any) -> None:
        inner_class, self.timeout, self.on_timeout = self.settings
        self.inner: Any = inner_class(**kwargs)
        self.transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""
        completed = getattr(self.inner, "on_response_complete", None)
        if callable(completed):
            # the next request's head is due within the deadline of the response's end, unless
            # uvicorn already has one in hand (pipelining: it cancels its keep-alive timer then)
            def on_response_complete() -> None:
                completed()
                idle = getattr(self.inner, "timeout_keep_alive_task", None) is not None
                if idle and self.transport is not None and not self.transport.is_closing():
                    self._arm()

            self.inner.on_response_complete = on_response_complete

    def _arm(self) -> None:
        self._disarm()
        self._tail = b""
        self._timer = asyncio.get_running_loop().call_later(self.timeout, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.on_timeout()
            self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._arm()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._timer is not None:
            seen = self._tail + data
            if any(end in seen for end in _HEAD_ENDS):
                self._disarm()
            else:
                self._tail = seen[-3:]
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        result: bool | None = self.inner.eof_received()
        return result

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


def header_deadline(
    inner: Callable[..., asyncio.Protocol], timeout: float, on_timeout: Callable[[], None]
) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class ``inner`` with a ``timeout`` s deadline for each request
    head; ``on_timeout()`` is called for each connection closed for missing it."""
    settings = (inner, timeout, on_timeout)
    return type("HeaderDeadlineProtocol", (_HeaderDeadline,), {"settings": settings})


class UvicornServer:
    """uvicorn serving ``app`` with the limits of ``config``."""

    def __init__(
        self,
        config: HttpWsConfig,
        app: Any,
        on_header_timeout: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config
        self.on_header_timeout = on_header_timeout
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
            self._uvicorn.http_protocol_class = header_deadline(
                self._uvicorn.http_protocol_class,
                self.config.header_timeout,
                self.on_header_timeout,
            )
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
