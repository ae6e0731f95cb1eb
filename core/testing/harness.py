"""Run gateways in tests: in this process or as a child, and wait on what they publish."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from core.metrics import REGISTRY
from core.service import Gateway
from core.testing.base import HOST, WAIT, Server, free_port
from core.types import ChannelLayer


async def until(
    predicate: Callable[[], object], timeout: float = WAIT, what: str = "", interval: float = 0.02
) -> object:
    """Poll ``predicate`` until it returns something truthy and return that (bounded).

    For state that nothing signals (a metric, a file, an HTTP probe); prefer awaiting an event
    or a message where there is one. ``TimeoutError`` names ``what``.
    """

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (result := predicate()):
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        await asyncio.sleep(interval)
    return result


def _matching_sum(
    samples: Iterable[tuple[str, Mapping[str, str], float]], name: str, **labels: str
) -> float:
    total = 0.0
    for sample_name, sample_labels, value in samples:
        if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items()):
            total += value
    return total


def metric(name: str, **labels: str) -> float:
    """The sum of this process's samples of ``name`` carrying ``labels`` (0 when none).

    ``metric("gateway_dropped_total", gateway="sensors", reason="too_large")``.
    """

    samples = (
        (sample.name, sample.labels, sample.value)
        for family in REGISTRY.collect()
        for sample in family.samples
    )
    return _matching_sum(samples, name, **labels)


def metric_from_text(text: str, name: str, **labels: str) -> float:
    """Like :func:`metric`, over a /metrics page (Prometheus text format)."""

    samples = (
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    )
    return _matching_sum(samples, name, **labels)


async def command(
    layer: ChannelLayer, channel: str, message: Mapping[str, object], *, timeout: float = WAIT
) -> dict[str, object]:
    """Send ``message`` on ``channel`` with a fresh result channel; return the result message."""

    result_channel = await layer.new_channel("test-result.")
    await layer.send(channel, {"id": "test", **message, "result_channel": result_channel})
    return await asyncio.wait_for(layer.receive(result_channel), timeout)


@contextlib.asynccontextmanager
async def run_gateway(
    gateway: Gateway[Any], *, ready: bool = True, timeout: float = WAIT
) -> AsyncIterator[Gateway[Any]]:
    """Run ``gateway`` in this process for the block; stop it and await its exit afterwards.

    Start-up errors (``StartupError``) are raised here. With ``ready`` the block starts once
    ``/readyz`` would answer 200 (every :meth:`Gateway.ready_reasons` cleared).
    """

    task = asyncio.create_task(gateway.run())
    started = asyncio.create_task(gateway.started.wait())
    try:
        await asyncio.wait({task, started}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raises why it could not start
        if not gateway.started.is_set():
            raise TimeoutError(f"{gateway.name} did not start within {timeout:g} s")
        if ready:
            await until(lambda: not gateway.ready_reasons(), timeout, f"{gateway.name} ready")
        yield gateway
    finally:
        started.cancel()
        gateway.stop()
        await asyncio.wait_for(asyncio.gather(task, started, return_exceptions=True), timeout)
    task.result()  # run() must end cleanly after stop()


class GatewayProcess:
    """``python -m gateways.<proto>.cli --config FILE`` as a child process with a health port.

    Build it with :meth:`from_config` (writes the YAML with a free health port), then
    :meth:`start` (returns once the gateway logged ``ready: events``), :meth:`wait_ready`,
    :meth:`metric`, :meth:`stop` (SIGTERM, the exit status) or :meth:`kill`.
    """

    def __init__(
        self,
        path: Path,
        health_port: int,
        *,
        gateway: str,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.path = path
        self.health_port = health_port
        self.module = f"gateways.{gateway}.cli"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.cwd = cwd
        self.server: Server | None = None

    @classmethod
    def from_config(
        cls,
        directory: Path,
        config: Mapping[str, Any],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> GatewayProcess:
        """Write ``config`` plus ``health: {port}`` to a YAML file in ``directory``."""

        health_port = free_port()
        path = directory / f"{config['name']}-{health_port}.yaml"
        path.write_text(yaml.safe_dump({**config, "health": {"port": health_port}}))
        return cls(path, health_port, gateway=str(config["gateway"]), env=env, cwd=cwd)

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", self.module, "--config", str(self.path)]

    def start(self, timeout: float = WAIT) -> GatewayProcess:
        self.server = Server(
            self.argv, "ready: events", timeout, cwd=self.cwd, env=self.env, name="gateway"
        )
        return self

    def get(self, path: str) -> tuple[int, str]:
        """GET ``path`` on the health port: (status, body)."""

        url = f"http://{HOST}:{self.health_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    async def wait_ready(self, timeout: float = WAIT) -> None:
        """Wait until /readyz answers 200."""

        async def ready() -> bool:
            return (await asyncio.to_thread(self.get, "/readyz"))[0] == 200

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await ready():
            if loop.time() > deadline:
                raise TimeoutError(f"{self.path.name}: /readyz not 200 within {timeout:g} s")
            await asyncio.sleep(0.05)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the process's /metrics samples of ``name`` that carry ``labels``."""
        return metric_from_text(self.get("/metrics")[1], name, **labels)

    def stop(self) -> int | None:
        return self.server.stop() if self.server is not None else None

    def kill(self) -> int | None:
        return self.server.kill() if self.server is not None else None


def inject_undecodable(layer: Any, redis_url: str, channel: str) -> None:
    """Write bytes that are not msgpack straight into ``channel`` of a Redis ``layer``.

    In the format of the layer it is: an entry of the channel's stream for
    :class:`core.streams.StreamsChannelLayer`, a member of the channel's sorted set for
    channels_redis (which strips a 12-byte random prefix first; 0xc1 is never valid msgpack).
    """
    import time

    import redis

    from core.streams import GROUP, StreamsChannelLayer

    raw = redis.Redis.from_url(redis_url)
    try:
        if isinstance(layer, StreamsChannelLayer):
            key = f"{layer.prefix}:stream:{channel}"
            with contextlib.suppress(redis.exceptions.ResponseError):  # BUSYGROUP
                raw.xgroup_create(key, GROUP, id="0", mkstream=True)
            raw.xadd(key, {"m": b"\xc1\xc1 not msgpack"})
        else:
            raw.zadd(layer.prefix + channel, {b"R" * 12 + b"\xc1\xc1 not msgpack": time.time()})
    finally:
        raw.close()
