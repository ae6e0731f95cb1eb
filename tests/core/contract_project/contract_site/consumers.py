"""The one consumer: an ordinary channels ``AsyncConsumer``, what a Django project writes.

Every handling is recorded first, as JSON on the Redis list ``handled`` (``id``, ``delivery``:
the message's ``__delivery__`` or 1, ``pid``, ``channel``), then the message's wishes:

``job.run``
    ``sleep`` (seconds), then ``fail`` (raise a transient error: the worker retries it),
    ``die`` (end the process at once, mid-handler: an OOM kill or a segfault).
``room.broadcast``
    ``group_send`` ``count`` messages ``room.message`` (``n``: 0, 1, …) to ``group``.
``db.open``
    open a database connection on the sync thread and leave it open (plain ``sync_to_async``).
``db.check``
    record whether the sync thread's connection is open now, and how often the worker hopped to
    close connections so far (core.dbclose).
"""

import asyncio
import json
import os
from typing import Any

from asgiref.sync import sync_to_async
from channels.consumer import AsyncConsumer
from django.db import connection
from redis import asyncio as aioredis

try:
    from core import dbclose
except ImportError:  # a checkout from before it (checking that the tests fail without it)
    dbclose = None

_redis = aioredis.Redis.from_url(os.environ["CONTRACT_REDIS"])


async def record(message: dict[str, Any], **extra: Any) -> None:
    entry = {
        "id": message.get("id"),
        "delivery": message.get("__delivery__", 1),
        "pid": os.getpid(),
        **extra,
    }
    await _redis.rpush("handled", json.dumps(entry))


def _open_connection() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


class ContractConsumer(AsyncConsumer):
    async def job_run(self, message: dict[str, Any]) -> None:
        await record(message, channel=self.scope["channel"])
        if message.get("sleep"):
            await asyncio.sleep(message["sleep"])
        if message.get("die"):
            os._exit(3)
        if message.get("fail"):
            raise ConnectionError("the handler failed (a transient error)")

    async def room_broadcast(self, message: dict[str, Any]) -> None:
        for n in range(message["count"]):
            await self.channel_layer.group_send(message["group"], {"type": "room.message", "n": n})
        await record(message)

    async def db_open(self, message: dict[str, Any]) -> None:
        await sync_to_async(_open_connection)()
        await record(message)

    async def db_check(self, message: dict[str, Any]) -> None:
        is_open = await sync_to_async(lambda: connection.connection is not None)()
        await record(message, open=is_open, hops=dbclose.hops if dbclose else 0)
