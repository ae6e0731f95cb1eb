"""Sockets outlive their worker: while 200 sockets chat through gateway-http-ws and three real
``manage.py runworker rooms`` processes (the Channels tutorial's chat, examples/rooms), one worker
is stopped with SIGTERM and replaced (a deploy) and another is killed with SIGKILL (a crash).
Daphne and uvicorn drop every socket when they restart; here no client notices more than a pause.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import websockets
from websockets.protocol import State

from core.testing import RedisServer, free_port, until
from tests.gateways.http_ws.conftest import chat_project, start_worker, wait_page

ROOMS = 20
PER_ROOM = 10
WAIT = 60


class Chatter:
    """One client socket in a room: what it sent, what it heard."""

    def __init__(self, index: int, ws: websockets.ClientConnection) -> None:
        self.index = index
        self.room = index % ROOMS
        self.ws = ws
        self.sent: list[str] = []
        self.heard: list[str] = []
        self.listener = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        async for raw in self.ws:
            self.heard.append(json.loads(raw)["message"])

    async def say(self, text: str) -> None:
        self.sent.append(text)
        await self.ws.send(json.dumps({"message": text}))


async def test_a_deploy_and_a_crash_while_200_sockets_chat(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    port = free_port()
    project = await asyncio.to_thread(chat_project, tmp_path, redis_server, WEB_PORT=str(port))
    gateway = await asyncio.to_thread(project.gateway("web.yaml").start)
    workers = [await asyncio.to_thread(start_worker, project, "rooms") for _ in range(3)]
    chatters: list[Chatter] = []
    try:
        await asyncio.to_thread(wait_page, port)
        origin = f"http://127.0.0.1:{port}"
        for index in range(ROOMS * PER_ROOM):
            url = f"ws://127.0.0.1:{port}/ws/chat/r{index % ROOMS}/"
            chatters.append(Chatter(index, await websockets.connect(url, origin=origin)))
        members = {room: [c for c in chatters if c.room == room] for room in range(ROOMS)}
        chatting = True

        async def talk(chatter: Chatter) -> None:
            await asyncio.sleep(random.uniform(0, 2))
            count = 0
            while chatting:
                await chatter.say(f"{chatter.index}:{count}")
                count += 1
                await asyncio.sleep(2)

        talkers = [asyncio.create_task(talk(c)) for c in chatters]
        await asyncio.sleep(3)
        # a deploy: the oldest worker drains (its sockets move), a new one starts
        assert await asyncio.to_thread(workers[0].stop) == 0, workers[0].tail()
        workers.append(await asyncio.to_thread(start_worker, project, "rooms"))
        await asyncio.sleep(3)
        # a crash: no goodbye; the gateway notices the silence (worker_timeout) and moves them
        await asyncio.to_thread(workers[1].kill)
        await asyncio.sleep(3)
        chatting = False
        await asyncio.gather(*talkers)

        # no message was lost: each one reached its room (the sender's own copy is replayed
        # with it when its worker stopped before handling it)
        def unheard() -> list[str]:
            heard = {room: {m for c in group for m in c.heard} for room, group in members.items()}
            return [m for c in chatters for m in c.sent if m not in heard[c.room]]

        try:
            await until(lambda: not unheard(), WAIT, "every message sent to reach its room")
        except TimeoutError:
            logs = "\n".join([gateway.tail(30), *(w.tail(10) for w in workers)])
            raise AssertionError(f"never reached their rooms: {unheard()[:20]}\n{logs}") from None
        assert all(c.ws.state is State.OPEN for c in chatters), "a socket was closed"

        # after the re-binds every socket works and nothing is lost: every member of each room
        # hears each member's message (one message at a time: the layer's capacity for one
        # process, which group_send exceeds when a burst reaches hundreds of sockets, is not
        # what is tested here)
        for speaker in chatters:
            await speaker.say(f"final {speaker.index}")

            def everyone_heard(speaker: Chatter = speaker) -> bool:
                return all(f"final {speaker.index}" in c.heard for c in members[speaker.room])

            await until(everyone_heard, WAIT, f"the final message of socket {speaker.index}")
        assert all(c.ws.state is State.OPEN for c in chatters), "a socket was closed"
        assert gateway.alive, gateway.tail()
    finally:
        await asyncio.gather(*(c.ws.close() for c in chatters), return_exceptions=True)
        for chatter in chatters:
            chatter.listener.cancel()
        for worker in workers:
            await asyncio.to_thread(worker.stop)
        await asyncio.to_thread(gateway.stop)
