"""Run gateways in tests: in this process or as a child, and wait on what they publish."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import yaml
from prometheus_client.parser import text_string_to_metric_families

from core.metrics import REGISTRY
from core.retry import describe_tasks
from core.service import Gateway
from core.testing.base import HOST, OUTPUT_LINES, WAIT, ManagedProcess, Server, free_port
from core.types import ChannelLayer, Message

#: the log line of a gateway that serves commands (``started``) and of one /readyz would pass
STARTED_LINE = "started: events"
READY_LINE = "ready: events"


async def until(
    predicate: Callable[[], object], timeout: float = WAIT, what: str = "", interval: float = 0.02
) -> object:
    """Poll ``predicate`` until it returns something truthy and return that (bounded).

    ``predicate`` may return an awaitable (``lambda: asyncio.to_thread(blocking_probe)``), which
    is awaited each time. For state that nothing signals (a metric, a file, an HTTP probe);
    prefer awaiting an event or a message where there is one. ``TimeoutError`` names ``what``.
    """

    async def check() -> object:
        result = predicate()
        return await result if inspect.isawaitable(result) else result

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (result := await check()):
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        await asyncio.sleep(interval)
    return result


async def receive(
    layer: ChannelLayer,
    channel: str,
    type_: str | None = None,
    /,
    *,
    timeout: float = WAIT,
    **keys: object,
) -> Message:
    """The next message on ``channel``; with ``type_`` / ``keys``, the next one that matches.

    Messages that do not match (``mqtt.connect`` before the ``mqtt.message`` a test waits for)
    are skipped. ``timeout`` bounds the whole wait. The first three are positional-only, so
    a message key may be called ``channel`` (``receive(layer, "ops", "irc.joined",
    channel="#ops")``).
    """

    async def matching() -> Message:
        while True:
            message = await layer.receive(channel)
            if (type_ is None or message.get("type") == type_) and all(
                message.get(key) == value for key, value in keys.items()
            ):
                return message

    return await asyncio.wait_for(matching(), timeout)


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
    return await receive(layer, result_channel, timeout=timeout)


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
        done, _ = await asyncio.wait({task, started}, timeout=timeout)
        if task not in done:
            # a hung stop is a bug to find: say where everything waits, then clean up
            stacks = describe_tasks(asyncio.all_tasks())
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise TimeoutError(f"{gateway.name} did not stop within {timeout:g} s:\n{stacks}")
    task.result()  # run() must end cleanly after stop()


class GatewayProcess(ManagedProcess):
    """``python -m gateways.<proto>.cli --config FILE`` as a child process with a health port.

    Build it with :meth:`from_config` (writes the YAML with a free health port) or from an
    existing file whose health port you know (:meth:`ExampleProject.gateway
    <tests.support.example.ExampleProject.gateway>`), then :meth:`start` (returns once the
    gateway logged ``ready_line``), :meth:`wait_ready`, :meth:`metric`, :meth:`wait_for` on a
    log line, :meth:`stop` (SIGTERM, the exit status) or :meth:`kill`.

    ``ready_line`` is :data:`READY_LINE` by default; :data:`STARTED_LINE` for a gateway that
    serves before it is ready (facing a full layer); ``None`` returns at once (a gateway that
    is expected to exit: :meth:`wait` for its status). ``prefix`` goes before the interpreter
    (``[sys.executable, "-c", "…setrlimit…; os.execvp(…)"]``), ``extra_args`` after the config
    (``["--app", "example.asgi:application"]``). The last ``output_lines`` lines of output are
    kept in :attr:`output`, across restarts.
    """

    def __init__(
        self,
        path: Path,
        health_port: int,
        *,
        gateway: str,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        ready_line: str | None = READY_LINE,
        prefix: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        output_lines: int = OUTPUT_LINES,
    ) -> None:
        super().__init__(output_lines)
        self.path = path
        self.health_port = health_port
        self.module = f"gateways.{gateway}.cli"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.cwd = cwd
        self.ready_line = ready_line
        self.prefix = list(prefix)
        self.extra_args = list(extra_args)

    @classmethod
    def from_config(
        cls, directory: Path, config: Mapping[str, Any], **options: Any
    ) -> GatewayProcess:
        """Write ``config`` plus ``health: {port}`` to a YAML file in ``directory``.

        ``options`` are the constructor's keywords (``env``, ``cwd``, ``ready_line``, …).
        """

        health_port = free_port()
        path = directory / f"{config['name']}-{health_port}.yaml"
        path.write_text(yaml.safe_dump({**config, "health": {"port": health_port}}))
        return cls(path, health_port, gateway=str(config["gateway"]), **options)

    @property
    def argv(self) -> list[str]:
        return [
            *self.prefix,
            sys.executable,
            "-m",
            self.module,
            "--config",
            str(self.path),
            *self.extra_args,
        ]

    def start(self, timeout: float = WAIT) -> Self:
        self.server = Server(
            self.argv,
            self.ready_line,
            timeout,
            cwd=self.cwd,
            env=self.env,
            output=self.output,
            name=self.module.split(".")[1],
        )
        return self

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        """GET ``path`` on the health port: (status, body)."""
        return http_get(self.health_port, path, timeout)

    async def status(self, path: str = "/readyz") -> int:
        """The status of GET ``path`` (in a thread; a refused connection raises)."""
        return (await asyncio.to_thread(self.get, path))[0]

    async def wait_ready(self, timeout: float = WAIT) -> None:
        """Wait until /readyz answers 200 (a port not yet open counts as "not yet")."""

        async def ready() -> bool:
            try:
                return await self.status() == 200
            except OSError:
                return False

        await until(ready, timeout, f"{self.path.name}: /readyz 200", interval=0.05)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the process's /metrics samples of ``name`` that carry ``labels``."""
        return metric_from_text(self.get("/metrics")[1], name, **labels)

    def stop(self) -> int | None:
        """SIGTERM (SIGKILL after a timeout); the exit status (None if never started)."""
        return self.server.stop() if self.server is not None else None


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """GET ``path`` on ``port`` of the loopback address (a health server): (status, body).

    Blocking; a refused connection raises ``OSError``.
    """
    url = f"http://{HOST}:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


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
