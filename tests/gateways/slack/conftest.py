"""Helpers for the Slack gateway tests: the local Slack (core.testing.slack), an in-process
gateway and a real ``gateway-slack`` process. Redis comes from tests/conftest.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from channels.layers import InMemoryChannelLayer

from core.testing import GatewayProcess, receive, run_gateway
from core.testing.slack import FakeSlack
from gateways.slack.config import SlackGatewayConfig
from gateways.slack.gateway import SlackGateway
from tests.support.example import ROOT

SECRET = "8f742231b10e8888abcd99yyyzzz85a5"


@pytest.fixture
async def fake_slack() -> AsyncIterator[FakeSlack]:
    fake = await FakeSlack().start()
    try:
        yield fake
    finally:
        await fake.stop()


def slack_config(fake: FakeSlack, name: str = "team", **slack: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "bot_token": fake.bot_token,
        "app_token": fake.app_token,
        "signing_secret": SECRET,
        "api_url": fake.api_url,
        "response_url_prefix": fake.hooks_url,
        "pacing": {"rate": 100, "burst": 10},
        "retry": {"backoff": 0.05},
        "ping_interval": 0.5,
        "reconnect_initial": 0.05,
        "reconnect_maximum": 0.2,
    }
    section.update(slack)
    return {"gateway": "slack", "name": name, "shutdown_grace": 5, "slack": section}


@contextlib.asynccontextmanager
async def running(
    config: dict[str, Any], layer: Any | None = None
) -> AsyncIterator[tuple[SlackGateway, Any]]:
    layer = layer if layer is not None else InMemoryChannelLayer(capacity=1000)
    gateway = SlackGateway(SlackGatewayConfig.model_validate(config), layer)
    try:
        async with run_gateway(gateway):
            yield gateway, layer
    finally:
        close_pools = getattr(layer, "close_pools", None)
        if close_pools is not None:  # a Redis layer: no sockets left for the next test
            await close_pools()


async def next_event(layer: Any, type_: str, on: str = "team", **keys: Any) -> dict[str, Any]:
    """The next event of ``type_`` (with ``keys``) on layer channel ``on``; others skipped."""
    return await receive(layer, on, type_, **keys)


@contextlib.asynccontextmanager
async def gateway_process(
    tmp_path: Path, config: dict[str, Any], layer: str, **options: Any
) -> AsyncIterator[GatewayProcess]:
    """``gateway-slack`` (``python -m gateways.slack.cli``) on ``config`` and ``layer``, started
    once ready; SIGTERM at the end, which must exit 0 (``options``: GatewayProcess's)."""
    process = GatewayProcess.from_config(tmp_path, {**config, "layer": layer}, cwd=ROOT, **options)
    await asyncio.to_thread(process.start)
    try:
        yield process
    finally:
        code = await asyncio.to_thread(process.stop)
    assert code == 0, process.tail()
