"""Helpers for the scheduler tests: an in-process scheduler on a real Redis layer, a clock whose
wall time can be moved (downtime without waiting), the gateway's Redis keys, and
``gateway-scheduler`` processes with their role."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from redis import asyncio as aioredis

from core.clock import Clock, LoopClock
from core.layers import resolve_layer
from core.testing import WAIT, GatewayProcess, run_gateway
from gateways.scheduler.config import SchedulerGatewayConfig
from gateways.scheduler.gateway import SchedulerGateway


class ShiftedClock(LoopClock):
    """The real clock with a wall time ``offset`` seconds ahead: "the scheduler was down"."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def wall(self) -> float:
        return time.time() + self.offset


def scheduler_config(name: str, schedules: dict[str, Any], **scheduler: Any) -> dict[str, Any]:
    return {
        "gateway": "scheduler",
        "name": name,
        "shutdown_grace": 5,
        "scheduler": {"tick": 0.3, "schedules": schedules, **scheduler},
    }


@contextlib.asynccontextmanager
async def running(
    config: dict[str, Any], layer_url: str, clock: Clock | None = None
) -> AsyncIterator[tuple[SchedulerGateway, Any]]:
    """The gateway, and a layer of its own for the test's side (channels_redis serves the "!"
    channels of one layer instance under one prefix: the test's result channels would be a
    list nobody reads if it shared the gateway's instance)."""
    layers = [resolve_layer(layer_url), resolve_layer(layer_url)]
    gateway = SchedulerGateway(
        SchedulerGatewayConfig.model_validate(config), layers[0], clock=clock or ShiftedClock()
    )
    try:
        async with run_gateway(gateway):
            yield gateway, layers[1]
    finally:
        for layer in layers:  # their Redis connections, or they leak into the next test
            close = getattr(layer, "close_pools", None)
            if close is not None:
                await close()


def keys(name: str, what: str) -> str:
    return f"asgi:gateways:scheduler:{name}:{what}"


async def cursor(redis_url: str, name: str, schedule: str) -> float | None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        value = await client.hget(keys(name, "cursors"), schedule)
    finally:
        await client.aclose()
    return None if value is None else float(value)


async def start(directory: Path, cfg: dict[str, Any]) -> GatewayProcess:
    process = GatewayProcess.from_config(directory, cfg)
    await asyncio.to_thread(process.start)
    await process.wait_ready()
    return process


def tail(process: GatewayProcess) -> str:
    return process.server.tail() if process.server is not None else ""


async def role(process: GatewayProcess) -> str:
    status, body = await asyncio.to_thread(process.get, "/readyz")
    assert status == 200, body  # a standby is ready too
    return "leader" if "role: leader" in body else "standby"


async def wait_role(process: GatewayProcess, wanted: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while await role(process) != wanted:
        if loop.time() > deadline:
            raise TimeoutError(f"{process.path.name} never became {wanted}")
        await asyncio.sleep(0.05)
