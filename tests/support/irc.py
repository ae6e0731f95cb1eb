"""A scripted IRC server on a loopback port: the hostile (or merely odd) server of a test.

Real servers (ngircd, InspIRCd) are well behaved; what a malicious or broken one does (floods
PINGs and never reads, sends CAP LS continuations for ever, 100k unparsable lines, JOINs at
full speed) is written here as a *script*: a coroutine that gets each accepted connection as
an :class:`IrcSession` and talks raw lines on it::

    async def flood_pings(session: IrcSession) -> None:
        await session.register()
        await session.flood(lambda i: b"PING :%d\\r\\n" % i)  # and never read again

    async with ScriptedIrcServer(flood_pings) as server:
        ...  # point a gateway at server.port; server.sessions are the connections so far

The server itself only accepts; everything else is the script's. :meth:`IrcSession.register`
does the ordinary handshake (CAP LS / REQ / END, NICK, USER, then 001, 005 and the end of the
MOTD). ``receive_buffer`` shrinks the kernel's receive buffer of accepted sockets, so a client
that writes to a server that does not read fills its own buffers after kilobytes instead of
megabytes. Nothing here imports pytest.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Self

from core.testing.base import HOST, WAIT

__all__ = ["IrcSession", "ScriptedIrcServer"]

#: the name the scripted server gives itself in its replies
SERVER_NAME = "hostile.test"


def command_of(line: str) -> str:
    """The command of a raw line (``PRIVMSG``, ``001``), tags and prefix skipped, upper case."""
    words = line.split(" ")
    while words and (words[0].startswith("@") or words[0].startswith(":")):
        words.pop(0)
    return words[0].upper() if words else ""


class IrcSession:
    """One accepted connection, as a script sees it."""

    def __init__(
        self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        #: 0 for the first connection the server accepted, 1 for the next, …
        self.index = index
        self.reader, self.writer = reader, writer
        #: the client's nick once :meth:`register` returned
        self.nick = ""
        #: every line read so far
        self.received: list[str] = []
        #: lines written by :meth:`flood`
        self.flooded = 0
        self.closed = asyncio.Event()

    async def line(self, timeout: float = WAIT) -> str | None:
        """The next line from the client (without CR LF); ``None`` once it hung up."""
        try:
            raw = await asyncio.wait_for(self.reader.readline(), timeout)
        except (ConnectionError, asyncio.IncompleteReadError):
            return None
        if not raw:
            return None
        text = raw.decode("utf-8", "replace").rstrip("\r\n")
        self.received.append(text)
        return text

    async def expect(self, *commands: str, timeout: float = WAIT) -> str:
        """Read until a line with one of ``commands``; return it. ``ConnectionError`` at EOF."""
        wanted = {c.upper() for c in commands}
        while True:
            text = await self.line(timeout)
            if text is None:
                raise ConnectionError("the client hung up")
            if command_of(text) in wanted:
                return text

    async def read_all(self) -> None:
        """Read (and record) until the client hangs up."""
        while await self.line(timeout=3600) is not None:
            pass

    async def read_for(self, seconds: float) -> None:
        """Read (and record) for ``seconds``, or until the client hangs up.

        Not ``wait_for(read_all(), seconds)``: on Python 3.11 a cancel that meets a line
        already read is lost, and a client that keeps writing is read for ever.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (left := deadline - loop.time()) > 0:
            try:
                if await self.line(timeout=left) is None:
                    return
            except TimeoutError:
                return

    def send(self, *lines: str | bytes) -> None:
        """Queue raw lines (CR LF added); :meth:`drain` waits until the client took them."""
        for line in lines:
            data = line.encode() if isinstance(line, str) else line
            self.writer.write(data + b"\r\n")

    async def drain(self) -> bool:
        """Wait until what was sent left; ``False`` if the client is gone."""
        try:
            await self.writer.drain()
        except (ConnectionError, OSError):
            return False
        return True

    async def register(
        self,
        *,
        caps: str = "",
        isupport: Sequence[str] = ("CASEMAPPING=ascii", "CHANTYPES=#&"),
    ) -> str:
        """Answer an ordinary registration; return the client's nick.

        ``caps`` is offered to ``CAP LS`` (every ``CAP REQ`` is acknowledged); once NICK and
        USER came (and ``CAP END`` if the client started with ``CAP``) the client is welcomed
        with 001, the ``isupport`` tokens (005) and 376.
        """
        nick, user, capping = "", False, False
        while not (nick and user and not capping):
            text = await self.expect("CAP", "NICK", "USER", "PASS")
            words = text.split(" ")
            command = command_of(text)
            if command == "CAP" and len(words) > 1:
                sub = words[1].upper()
                if sub == "LS":
                    capping = True
                    self.send(f":{SERVER_NAME} CAP * LS :{caps}")
                elif sub == "REQ":
                    self.send(f":{SERVER_NAME} CAP * ACK :{text.split(':', 1)[-1]}")
                elif sub == "END":
                    capping = False
            elif command == "NICK" and len(words) > 1:
                nick = words[1].lstrip(":")
            elif command == "USER":
                user = True
        self.nick = nick
        self.send(
            f":{SERVER_NAME} 001 {nick} :Welcome {nick}",
            f":{SERVER_NAME} 005 {nick} {' '.join(isupport)} :are supported by this server",
            f":{SERVER_NAME} 376 {nick} :End of MOTD",
        )
        await self.drain()
        return nick

    async def flood(
        self, make: Callable[[int], bytes], count: int | None = None, *, batch: int = 500
    ) -> int:
        """Write ``make(i)`` (a whole line, CR LF included) for i = 0, 1, … ``count`` (None: until
        the client hangs up), ``batch`` at a time as fast as the client takes them; how many."""
        sent = 0
        while count is None or sent < count:
            size = batch if count is None else min(batch, count - sent)
            self.writer.write(b"".join(make(sent + i) for i in range(size)))
            sent += size
            self.flooded = sent
            if not await self.drain():
                break
        return sent

    def close(self) -> None:
        self.writer.close()


Script = Callable[[IrcSession], Awaitable[None]]


class ScriptedIrcServer:
    """An IRC server on ``127.0.0.1:port`` that runs ``script`` for every connection.

    A script that returns closes its connection; one that raises ``ConnectionError`` (the
    client went away) ends quietly, any other error is kept in :attr:`errors`.
    """

    def __init__(self, script: Script, *, receive_buffer: int | None = None) -> None:
        self.script = script
        self.receive_buffer = receive_buffer
        self.sessions: list[IrcSession] = []
        self.errors: list[BaseException] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepted = asyncio.Condition()

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> Self:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.receive_buffer is not None:  # inherited by accepted sockets
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
        sock.bind((HOST, 0))
        self._server = await asyncio.start_server(self._serve, sock=sock)
        return self

    async def stop(self) -> None:
        """Stop listening, drop every connection, end every script."""
        if self._server is not None:
            self._server.close()
        for session in self.sessions:
            session.writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def session(self, index: int, timeout: float = WAIT) -> IrcSession:
        """The ``index``-th connection (0 = the first), once the client made it."""
        async with self._accepted:
            await asyncio.wait_for(
                self._accepted.wait_for(lambda: len(self.sessions) > index), timeout
            )
        return self.sessions[index]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        session = IrcSession(len(self.sessions), reader, writer)
        async with self._accepted:
            self.sessions.append(session)
            self._accepted.notify_all()
        try:
            await self.script(session)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # stop() cancelled the script: end quietly (asyncio's stream callback would log a
            # cancelled client_connected_cb task as an error)
            pass
        except Exception as exc:  # a broken script: the test says so
            self.errors.append(exc)
        finally:
            session.closed.set()
            self._tasks.discard(task)
            writer.transport.abort()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
