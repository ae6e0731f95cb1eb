"""Driving a consumer in this process: the generic consumers' tests (gateways/*/consumers.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from channels.layers import InMemoryChannelLayer

from core.testing import WAIT

#: ``await handle(ConsumerClass, message)``: the commands it sent, by channel
Handle = Callable[..., Awaitable[Any]]


@pytest.fixture
def handle(monkeypatch: pytest.MonkeyPatch) -> Handle:
    """Dispatch one message to a fresh consumer instance on an in-memory layer; returns the
    consumer (its ``channel_layer`` holds what it sent).

    ``AsyncConsumer.dispatch`` closes stale Django database connections first, so Django needs
    settings: the same minimal module tests/core/test_layers.py uses.
    """
    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "tests.core.django_settings")

    async def run(
        consumer_class: type[Any],
        message: dict[str, Any],
        *,
        layer: Any = None,
        channel: str = "inbound",
    ) -> Any:
        consumer = consumer_class()
        consumer.scope = {"type": "channel", "channel": channel}
        consumer.channel_layer = layer if layer is not None else InMemoryChannelLayer()
        await consumer.dispatch(message)
        return consumer

    return run


async def sent(consumer: Any, channel: str, timeout: float = WAIT) -> dict[str, Any]:
    """The next message ``consumer`` sent to ``channel``."""
    layer = consumer.channel_layer
    message: dict[str, Any] = await asyncio.wait_for(layer.receive(channel), timeout)
    return message


async def nothing_sent(consumer: Any, channel: str) -> bool:
    """Whether ``consumer`` (or anything with a ``channel_layer``) sent nothing to ``channel``:
    a marker sent now comes out first."""
    layer = consumer.channel_layer
    await layer.send(channel, {"type": "test.marker"})
    first = await asyncio.wait_for(layer.receive(channel), WAIT)
    return bool(first["type"] == "test.marker")
