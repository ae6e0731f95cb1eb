"""A ConsumerWorker process for tests/core/test_streams_layer.py (run as a module).

``python -m tests.core.streams_worker LAYER_PATH CHANNEL RECORD_KEY``: every message's ``id``
and ``__delivery__`` (1 when absent) is pushed as ``id:delivery`` to the Redis list
RECORD_KEY when its handler starts; a message with ``"hang": true`` then never returns (the
test SIGKILLs the process mid-handler).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import redis.asyncio as aioredis

from core.layers import resolve_layer
from core.worker import ConsumerWorker, RetryPolicy


def main() -> None:
    path, channel, record = sys.argv[1:4]
    address = "redis://" + path.partition("://")[2].partition("?")[0]
    recorder = aioredis.Redis.from_url(address)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            await recorder.rpush(record, f"{message['id']}:{message.get('__delivery__', 1)}")
            if message.get("hang"):
                await asyncio.Event().wait()

    layer = resolve_layer(path)
    print("worker ready", flush=True)
    ConsumerWorker(app, [channel], layer, retry=RetryPolicy(dead_letter="log")).run()


if __name__ == "__main__":
    main()
