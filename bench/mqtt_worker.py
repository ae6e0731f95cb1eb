"""MQTT through the real worker: broker → ``gateway-mqtt`` → Redis → ``ConsumerWorker``.

    python -m bench.mqtt_worker [--count N] [--rounds R] [--paced-rate 1000]
                                [--paced-seconds S] [--rows a,b] [--quick] [--no-write]

The path a Django project runs, every actor its own process: a private ``mosquitto`` and
``redis-server`` on free ports (never the system ones), the ``gateway-mqtt`` binary (log level
INFO), one or two worker processes (``python -m bench.mqtt_worker _worker``: a
``core.worker.ConsumerWorker`` — what ``runworker`` and ``gateways run --app`` run — serving a
consumer of bench/_mqtt_worker_app.py that notes when each message was handled: by default a
channels ``AsyncConsumer`` behind ``ChannelNameRouter`` with Django configured, what a project
writes; in the ``streams1_asgi`` row a plain ASGI callable), a paho publisher
(``_publisher``) and, beside them, a bare paho subscriber (``_subscriber``, the ceiling) and
mqttasgi (PyPI; its own protocol server running a Django ``MqttConsumer`` that notes the same,
bench/_mqttasgi_app.py; its rows are left out when it is not installed). Processes share the
system-wide CLOCK_MONOTONIC (``time.monotonic``), so stamps compare across them.

Every message is a ~200-byte JSON payload, QoS 1, carrying a tag for its row and round, a
sequence number and the publisher's stamp right before ``publish``. Lost = sent - distinct
sequence numbers handled; duplicates = handled - distinct (a redelivery by the layer counts
there too; its ``__delivery__`` is noted).

Rows (rounds interleaved: round 1 of every row, then round 2, …; medians reported)

burst
    ``--count`` messages are queued at the broker first (a persistent session made beforehand,
    mosquitto with ``max_queued_messages 0``, i.e. unbounded, and ``set_tcp_nodelay true`` as
    in bench/mqtt.py), the workers are started and connected, then the gateway starts and
    drains the session. msgs/s = (distinct handled - 1) ÷ (first → last handled, across the
    workers). CPU ms/msg: CPU of the gateway (and of the workers, and of redis-server) over
    that window ÷ messages. Rows: one worker on the streams layer (``redis://``) with the
    AsyncConsumer, the same with the plain callable, two workers, one worker on
    channels_redis (``redis://…?layer=channels_redis``), and, draining the same queued burst
    in sessions of their own, the bare paho subscriber (the broker + client ceiling: no
    gateway, no Redis, no worker) and mqttasgi (at most :data:`MQTTASGI_BURST` messages: it
    takes about a hundred a second).
paced
    The gateway and one worker (streams, AsyncConsumer) live; the publisher sends
    ``--paced-rate`` msg/s for ``--paced-seconds``; latency = handled stamp - publisher stamp
    (broker → gateway → Redis → worker → handler).
default broker
    A second mosquitto with its defaults (the config names only the listener; plus the
    ``allow_anonymous true`` / ``persistence false`` every test broker here has):
    ``max_queued_messages 1000``, ``max_inflight_messages 20``. The gateway (default YAML) and
    one worker (streams, AsyncConsumer) subscribed live, the publisher bursts ``--count`` QoS 1
    as fast as it can; what the broker cannot queue for a slow subscriber it drops. Beside it,
    on the same broker and in the same round, one after the other (not at once): a bare paho
    subscriber and mqttasgi, subscribed live to the same burst.

The streams layer and the gateway YAML are at their defaults: capacity 100, and the gateway's
``inbound_capacity`` (100,000) for its inbound channel, so a burst waits in Redis.
channels_redis has no per-channel capacity of its own: its capacity is raised
(``?capacity=1000000``) so its row measures the path rather than ChannelFull push-back.
``--quick`` is a short smoke run (1 round, 1,000 messages, 2 paced seconds) that never writes
BENCHMARKS.md.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:
    sys.exit("run this benchmark as a module from the repository root: python -m bench.mqtt_worker")

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._common import (
    REPO_ROOT,
    GatewayProcess,
    command_line,
    cpu_seconds,
    load_average,
    machine,
    machine_lines,
    markdown_table,
    percentile,
    program_version,
    publish_paced,
    text_table,
    today,
    update_section,
)

SECTION = "MQTT through the worker"
MODULE = "bench.mqtt_worker"
PAYLOAD_SIZE = 200
TIMEOUT = 600.0
#: a burst or paced measurement ends this long after the last progress (the rest is lost)
STALL = 30.0
#: a default-broker burst ends this long after the publisher finished and nothing moved
QUIET = 5.0
#: once as many messages as were sent were handled, wait this long for stragglers
SETTLE = 2.0
#: messages of the mqttasgi burst row at most (it drains about 100 a second)
MQTTASGI_BURST = 2000
#: the issue's targets (issue 20, "Done when")
TARGET_RATE = 5000.0
TARGET_P99 = 0.010
TARGET_DEFAULT_LOSS = 0.0


def payload(tag: str, n: int, stamp: float, size: int = PAYLOAD_SIZE) -> bytes:
    """The benchmark message: JSON with the row tag, sequence number and stamp, padded to
    ``size`` bytes."""
    head = f'{{"r":"{tag}","n":{n},"t":{stamp:.6f},"p":"'
    return (head + "x" * max(0, size - len(head) - 2) + '"}').encode()


# -- helper processes (python -m bench.mqtt_worker _name …) -----------------------------------


def _publisher(port: int, topic: str, tag: str, count: int, rate: float) -> None:
    took = publish_paced(port, topic, count, 1, rate, lambda n, now: payload(tag, n, now), TIMEOUT)
    print(f"published {count} in {took:.3f} s", flush=True)


def _subscriber(
    port: int, topic: str, client_id: str, count: int, out: str, mode: str, quiet: float
) -> None:
    """``mode`` session: make a persistent session subscribed to ``topic`` and leave.
    drain: resume that session and take what it queued. live: a clean session, subscribed.
    Says ``ready`` once subscribed (or connected, to drain); ends at ``count`` messages or
    ``quiet`` seconds without one; writes [[payload, stamp], …] to ``out``."""
    from paho.mqtt.client import Client, MQTTv5
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    received: list[tuple[bytes, float]] = []
    moved, ready = threading.Event(), threading.Event()

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        received.append((message.payload, time.monotonic()))
        moved.set()

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if mode == "drain":
            ready.set()
        else:
            client.subscribe(topic, qos=1)

    persistent = mode != "live"
    client = Client(
        CallbackAPIVersion.VERSION2, client_id=client_id if persistent else "", protocol=MQTTv5
    )
    client.on_message = on_message
    client.on_connect = on_connect
    client.on_subscribe = lambda *args: ready.set()
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 3600 if persistent else 0
    client.connect("127.0.0.1", port, clean_start=not persistent, properties=properties)
    client.loop_start()
    if not ready.wait(60):
        raise SystemExit("the subscriber did not connect or subscribe within 60 s")
    print("ready", flush=True)
    if mode != "session":
        wait = TIMEOUT  # for the first message
        while len(received) < count:
            if not moved.wait(wait):
                break
            moved.clear()
            wait = quiet
    client.disconnect()
    client.loop_stop()
    if mode != "session":
        Path(out).write_text(json.dumps([(p.decode(), s) for p, s in received]))


async def _worker(url: str, channel: str, out: str, consumer: str) -> None:
    from bench import _mqtt_worker_app as app
    from core.cli import install_layer
    from core.layers import resolve_layer
    from core.logs import setup_logging
    from core.worker import ConsumerWorker, RetryPolicy

    setup_logging("INFO")
    layer: Any = resolve_layer(url)
    if consumer == "channels":
        app.configure_django()
        install_layer(layer)  # the consumer's own channel, as under `gateways run --app`
        application = app.channels_application(channel)
    else:
        application = app.asgi_application(channel)
    probe = f"bench-probe-{os.getpid()}"
    await layer.send(probe, {"type": "bench.probe"})  # connect before anything is timed
    await layer.receive(probe)
    worker = ConsumerWorker(
        application,
        [channel],
        layer,
        retry=RetryPolicy(dead_letter="log"),
        shutdown_grace=10,
    )

    async def report() -> None:
        told = -1
        while True:
            if len(app.HANDLED) != told:
                told = len(app.HANDLED)
                print(f"n {told}", flush=True)
            await asyncio.sleep(0.02)

    print("ready", flush=True)
    reporting = asyncio.create_task(report())
    try:
        await worker.serve()
    finally:
        reporting.cancel()
        print(f"n {len(app.HANDLED)}", flush=True)
        records = [(p.decode(), s, d) for p, s, d in app.HANDLED]
        text = json.dumps({"handled": records, "cpu": app.CPU})
        await asyncio.to_thread(Path(out).write_text, text)
        close = getattr(layer, "close_pools", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await close()


def helper_entry(name: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE} {name}")
    for option in ("url", "out", "topic", "tag", "channel", "client-id", "mode", "consumer"):
        parser.add_argument(f"--{option}", default="")
    for option in ("count", "port"):
        parser.add_argument(f"--{option}", type=int, default=0)
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--quiet", type=float, default=QUIET)
    a = parser.parse_args(argv)
    if name == "_worker":
        asyncio.run(_worker(a.url, a.channel, a.out, a.consumer))
    elif name == "_publisher":
        _publisher(a.port, a.topic, a.tag, a.count, a.rate)
    else:
        _subscriber(a.port, a.topic, a.client_id, a.count, a.out, a.mode, a.quiet)
    return 0


# -- the processes, seen from the benchmark ---------------------------------------------------


async def spawn(name: str, *args: str, log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as handle:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            MODULE,
            name,
            *args,
            cwd=REPO_ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=handle,
        )


async def expect_line(proc: asyncio.subprocess.Process, wanted: str, timeout: float) -> None:
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), timeout)).decode().strip()
    if line != wanted:
        raise RuntimeError(f"a helper said {line!r}, not {wanted!r} (exit {proc.returncode})")


async def finish(proc: asyncio.subprocess.Process, what: str, timeout: float = TIMEOUT) -> None:
    try:
        code = await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"{what} hung (killed after {timeout:.0f} s)") from None
    if code != 0:
        raise RuntimeError(f"{what} exited with {code}")


class Worker:
    """One ``_worker`` process: ``ready``, then ``n COUNT`` lines as it handles messages."""

    def __init__(self, url: str, channel: str, tmp: Path, name: str, consumer: str) -> None:
        self.url, self.channel, self.consumer = url, channel, consumer
        self.out = tmp / f"{name}.json"
        self.log = tmp / f"{name}.log"
        self.count = 0
        self.moved = asyncio.Event()
        self.proc: asyncio.subprocess.Process | None = None
        self._reading: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await spawn(
            "_worker",
            f"--url={self.url}",
            f"--channel={self.channel}",
            f"--out={self.out}",
            f"--consumer={self.consumer}",
            log=self.log,
        )
        await expect_line(self.proc, "ready", 60)
        self._reading = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            words = line.split()
            if len(words) == 2 and words[0] == b"n":
                self.count = int(words[1])
                self.moved.set()

    async def stop(self) -> dict[str, Any]:
        """SIGTERM (the worker drains), then what it handled."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        await finish(self.proc, f"a worker ({self.log.name})", 60)
        if self._reading is not None:
            await self._reading
        result: dict[str, Any] = json.loads(self.out.read_text())
        return result


class MqttasgiProcess(Worker):
    """mqttasgi's protocol server running bench/_mqttasgi_app.py: subscribes to ``topic`` with
    a persistent session named ``client_id``; ``ready`` and ``n COUNT`` lines as a worker's."""

    def __init__(self, port: int, topic: str, client_id: str, tmp: Path, name: str) -> None:
        super().__init__("", "", tmp, name, "mqttasgi")
        self.port, self.topic, self.client_id = port, topic, client_id

    async def start(self) -> None:
        env = {**os.environ, "BENCH_TOPIC": self.topic, "BENCH_OUT": str(self.out)}
        with self.log.open("ab") as handle:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "mqttasgi.cli",
                *("-H", "127.0.0.1", "-p", str(self.port), "-i", self.client_id, "-c", "False"),
                "bench._mqttasgi_app:application",
                cwd=REPO_ROOT,
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=handle,
            )
        await expect_line(self.proc, "ready", 60)
        self._reading = asyncio.create_task(self._read())


def mqttasgi_available() -> bool:
    """mqttasgi is a test extra; a checkout without it runs every other row."""
    import importlib.util

    return importlib.util.find_spec("mqttasgi") is not None


@dataclass
class Sample:
    """CPU seconds of the gateway and redis-server, read whenever a worker moved."""

    pids: dict[str, int]
    first: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)

    def take(self) -> None:
        now = {}
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError):
                now[name] = cpu_seconds(pid)
        if not self.first:
            self.first = now
        self.last = now

    def per_message(self, name: str, messages: int) -> float:
        if name not in self.first or name not in self.last or messages < 2:
            return math.nan
        return (self.last[name] - self.first[name]) / messages


async def watch(
    workers: list[Worker],
    expected: int,
    sample: Sample,
    idle: float,
    until: Callable[[], bool] = lambda: True,
) -> None:
    """Return once the workers handled ``expected`` messages and then nothing more for
    :data:`SETTLE` seconds (a duplicate counts too, so the last distinct ones may still be on
    their way), or nothing moved for ``idle`` seconds after ``until()`` became true (and at
    least one message came). Samples CPU at the first and every later movement."""
    total = sum(w.count for w in workers)
    still_since = started = time.monotonic()
    while True:
        for w in workers:
            w.moved.clear()
        waits = [asyncio.create_task(w.moved.wait()) for w in workers]
        _, pending = await asyncio.wait(waits, timeout=0.25)
        for task in pending:
            task.cancel()
        now_total = sum(w.count for w in workers)
        if now_total != total:
            total, still_since = now_total, time.monotonic()
            sample.take()
            continue
        still = time.monotonic() - still_since
        if total >= expected and still > SETTLE:
            return
        if any(w.proc is not None and w.proc.returncode is not None for w in workers):
            raise RuntimeError("a worker exited during the measurement")
        if time.monotonic() - started > TIMEOUT:
            raise RuntimeError(f"no end after {TIMEOUT:.0f} s")
        if until() and total and still > idle:
            return
        if until() and not total and still > STALL * 2:
            return


# -- measurements -----------------------------------------------------------------------------


@dataclass
class Result:
    """One round of one row."""

    sent: int
    handled: int = 0
    distinct: int = 0
    stale: int = 0
    redelivered: int = 0
    rate: float = math.nan
    latencies: list[float] = field(default_factory=list)
    gateway_cpu: float = math.nan
    worker_cpu: float = math.nan
    redis_cpu: float = math.nan
    #: the gateway's own counters at the end: session resumes, messages left with the broker
    #: beyond its hold, redeliveries it recognised as handed off before
    resumes: int = 0
    deferred: int = 0
    gateway_duplicates: int = 0
    error: str = ""

    @property
    def lost(self) -> int:
        return self.sent - self.distinct

    @property
    def duplicates(self) -> int:
        return self.handled - self.distinct


def tally(result: Result, tag: str, records: list[tuple[str, float, int]]) -> list[float]:
    """Fill ``result`` from (payload, handled stamp, delivery) records; the handled stamps of
    the first handling of each distinct message, in order."""
    seen: dict[int, float] = {}
    for text, stamp, delivery in records:
        data = json.loads(text)
        if data["r"] != tag:
            result.stale += 1
            continue
        result.handled += 1
        result.redelivered += delivery > 1
        if data["n"] not in seen:
            seen[data["n"]] = stamp
            result.latencies.append(stamp - data["t"])
    result.distinct = len(seen)
    stamps = sorted(seen.values())
    if len(stamps) > 1 and stamps[-1] > stamps[0]:
        result.rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return stamps


class Bench:
    """Brokers, Redis and the row bookkeeping of one run."""

    def __init__(self, args: argparse.Namespace, tmp: Path, redis: Any, broker: Any) -> None:
        self.args, self.tmp, self.redis, self.broker = args, tmp, redis, broker
        self.default_broker: Any = None
        self.logs: list[Path] = []
        self._names = 0

    def name(self, what: str) -> str:
        self._names += 1
        return f"{what}-{self._names}"

    def url(self, layer: str) -> str:
        """The streams layer as it comes (the gateway's inbound_capacity, 100,000 by default,
        holds a burst); channels_redis with its capacity raised (it has no per-channel one)."""
        if layer == "streams":
            return self.redis.url
        return f"{self.redis.url}?capacity=1000000&layer={layer}"

    async def publish(self, port: int, topic: str, tag: str, count: int, rate: float = 0) -> None:
        log = self.tmp / f"{self.name('publisher')}.log"
        proc = await spawn(
            "_publisher",
            f"--port={port}",
            f"--topic={topic}",
            f"--tag={tag}",
            f"--count={count}",
            f"--rate={rate}",
            log=log,
        )
        await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"the publisher exited with {proc.returncode}; see {log}")

    def gateway(self, port: int, url: str, channel: str, topic: str, **mqtt: Any) -> GatewayProcess:
        client_id = self.name("bench-gw")
        config = {
            "gateway": "mqtt",
            "name": channel,
            "layer": url,
            "mqtt": {
                "host": "127.0.0.1",
                "port": port,
                "client_id": client_id,
                "clean_start": False,
                "session_expiry": 3600,
                "subscriptions": [{"topic": topic, "qos": 1}],
                **mqtt,
            },
        }
        gateway = GatewayProcess("mqtt", config, self.tmp, client_id)
        self.logs.append(gateway.log)
        return gateway

    async def through_worker(
        self,
        gateway: GatewayProcess,
        url: str,
        workers: int,
        tag: str,
        count: int,
        *,
        queued: bool,
        port: int,
        topic: str,
        rate: float = 0.0,
        consumer: str = "channels",
    ) -> Result:
        """One measurement of gateway → Redis → ``workers`` ConsumerWorker processes.

        ``queued``: the burst waits at the broker before the gateway starts; else the gateway
        and workers are live and the publisher sends (at ``rate``, 0 = as fast as it can).
        """
        result = Result(count)
        channel = gateway.settings["name"]
        procs = [
            Worker(url, channel, self.tmp, self.name("worker"), consumer) for _ in range(workers)
        ]
        sample = Sample({})
        for w in procs:
            self.logs.append(w.log)
        publishing: asyncio.Task[None] | None = None
        try:
            if queued:
                await self.publish(port, topic, tag, count)
            for w in procs:
                await w.start()
            await gateway.start()
            sample.pids = {"gateway": gateway.pid, "redis": self.redis.pid}
            if not queued:
                await gateway.ready()
                publishing = asyncio.create_task(self.publish(port, topic, tag, count, rate))
            idle = STALL if queued or rate else QUIET
            await watch(procs, count, sample, idle, lambda: publishing is None or publishing.done())
            if publishing is not None:
                await publishing
            metrics = await gateway.metrics()
            result.resumes = int(metrics.get("mqtt_session_resumes_total", 0))
            result.deferred = int(metrics.get("mqtt_deferred_total", 0))
            result.gateway_duplicates = int(metrics.get("gateway_duplicates_total", 0))
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        finally:
            if publishing is not None and not publishing.done():
                publishing.cancel()
                await asyncio.gather(publishing, return_exceptions=True)
            try:
                code = await gateway.stop()
                if code != 0:
                    result.error = result.error or f"the gateway exited with {code}"
            except Exception as exc:
                result.error = result.error or f"{type(exc).__name__}: {exc}"
            records: list[tuple[str, float, int]] = []
            worker_cpu = 0.0
            for w in procs:
                try:
                    done = await w.stop()
                except Exception as exc:
                    result.error = result.error or f"{type(exc).__name__}: {exc}"
                    continue
                records += [tuple(r) for r in done["handled"]]  # type: ignore[misc]
                worker_cpu += done["cpu"][1] - done["cpu"][0]
        tally(result, tag, records)
        if result.distinct > 1:
            result.gateway_cpu = sample.per_message("gateway", result.distinct)
            result.redis_cpu = sample.per_message("redis", result.distinct)
            result.worker_cpu = worker_cpu / result.distinct
        return result

    async def paho(
        self,
        port: int,
        topic: str,
        tag: str,
        count: int,
        *,
        queued: bool,
        client_id: str,
        rate: float = 0.0,
    ) -> Result:
        """The bare paho subscriber: drain a queued burst, or take a live one (published at
        ``rate`` a second; 0: as fast as it can)."""
        result = Result(count)
        out = self.tmp / f"{self.name('paho')}.json"
        log = out.with_suffix(".log")
        self.logs.append(log)
        try:
            if queued:
                await self.publish(port, topic, tag, count)
            proc = await spawn(
                "_subscriber",
                f"--port={port}",
                f"--topic={topic}",
                f"--client-id={client_id}",
                f"--count={count}",
                f"--out={out}",
                f"--mode={'drain' if queued else 'live'}",
                f"--quiet={STALL if queued else QUIET}",
                log=log,
            )
            await expect_line(proc, "ready", 60)
            if not queued:
                await self.publish(port, topic, tag, count, rate)
            await finish(proc, "the paho subscriber")
            records = [(p, s, 1) for p, s in json.loads(out.read_text())]
            tally(result, tag, records)
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        return result

    async def mqttasgi(
        self,
        port: int,
        topic: str,
        tag: str,
        count: int,
        *,
        queued: bool,
        client_id: str,
        rate: float = 0.0,
    ) -> Result:
        """mqttasgi's server with the stamping consumer: drain a queued burst, or take a live
        one (then with a session of its own, made and subscribed as it starts)."""
        result = Result(count)
        proc = MqttasgiProcess(port, topic, client_id, self.tmp, self.name("mqttasgi"))
        self.logs.append(proc.log)
        publishing: asyncio.Task[None] | None = None
        records: list[tuple[str, float, int]] = []
        try:
            if queued:
                await self.publish(port, topic, tag, count)
            await proc.start()
            if not queued:
                publishing = asyncio.create_task(self.publish(port, topic, tag, count, rate))
            idle = STALL if queued or rate else QUIET
            done = lambda: publishing is None or publishing.done()  # noqa: E731
            await watch([proc], count, Sample({}), idle, done)
            if publishing is not None:
                await publishing
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        finally:
            if publishing is not None and not publishing.done():
                publishing.cancel()
                await asyncio.gather(publishing, return_exceptions=True)
            try:
                if proc.proc is not None:
                    handled = await proc.stop()
                    records = [tuple(r) for r in handled["handled"]]  # type: ignore[misc]
            except Exception as exc:
                result.error = result.error or f"{type(exc).__name__}: {exc}"
        tally(result, tag, records)
        return result

    async def mqttasgi_session(self, port: int, topic: str, client_id: str) -> None:
        proc = MqttasgiProcess(port, topic, client_id, self.tmp, self.name("mqttasgi-session"))
        self.logs.append(proc.log)
        await proc.start()
        await proc.stop()

    async def paho_session(self, port: int, topic: str, client_id: str) -> None:
        log = self.tmp / f"{client_id}.log"
        proc = await spawn(
            "_subscriber",
            f"--port={port}",
            f"--topic={topic}",
            f"--client-id={client_id}",
            "--mode=session",
            log=log,
        )
        await expect_line(proc, "ready", 60)
        await finish(proc, "the paho session subscriber", 60)


@dataclass
class Row:
    key: str
    path: str
    kind: str  # burst | paced | default
    run: Callable[[str], Awaitable[Result]]
    results: list[Result] = field(default_factory=list)

    def median(self, attribute: str) -> float:
        values = [getattr(r, attribute) for r in self.results if not r.error]
        values = [v for v in values if not math.isnan(v)]
        return statistics.median(values) if values else math.nan

    @property
    def rates(self) -> list[float]:
        return [r.rate for r in self.results if not math.isnan(r.rate)]

    @property
    def loss_shares(self) -> list[float]:
        return [r.lost / r.sent for r in self.results if r.sent]

    def percentile_median(self, pct: float) -> float:
        values = [percentile(r.latencies, pct) for r in self.results if r.latencies]
        return statistics.median(values) if values else math.nan

    def max_median(self) -> float:
        values = [max(r.latencies) for r in self.results if r.latencies]
        return statistics.median(values) if values else math.nan


async def build_rows(bench: Bench) -> list[Row]:
    """Make the persistent sessions the burst rows drain, and the rows."""
    a = bench.args
    port = bench.broker.port
    rows: list[Row] = []

    paho_id = "bench-paho-burst"
    await bench.paho_session(port, "bench/burst/paho", paho_id)

    async def paho_burst(tag: str) -> Result:
        return await bench.paho(
            port, "bench/burst/paho", tag, a.count, queued=True, client_id=paho_id
        )

    rows.append(Row("paho", "bare paho subscriber (the ceiling)", "burst", paho_burst))
    sessions: list[GatewayProcess] = []

    def burst(
        key: str, layer: str, workers: int, path: str, consumer: str = "asgi", **mqtt: Any
    ) -> None:
        url, topic = bench.url(layer), f"bench/burst/{key}"
        gateway = bench.gateway(port, url, f"bench-{key}", topic, **mqtt)
        sessions.append(gateway)

        async def run(tag: str) -> Result:
            return await bench.through_worker(
                gateway,
                url,
                workers,
                tag,
                a.count,
                queued=True,
                port=port,
                topic=topic,
                consumer=consumer,
            )

        rows.append(Row(key, path, "burst", run))

    asyncconsumer = "channels AsyncConsumer"
    burst("streams1", "streams", 1, f"gateway-mqtt → streams → ConsumerWorker x1, {asyncconsumer}")
    burst(
        "streams1_asgi",
        "streams",
        1,
        "gateway-mqtt → streams → ConsumerWorker x1, plain ASGI callable",
        "asgi",
    )
    burst("streams2", "streams", 2, f"gateway-mqtt → streams → ConsumerWorker x2, {asyncconsumer}")
    burst(
        "cr1",
        "channels_redis",
        1,
        f"gateway-mqtt → channels_redis → ConsumerWorker x1, {asyncconsumer}",
    )
    # mosquitto 2.0.11 lets a resumed session's queue through past receive_maximum: with the
    # old default hold (max_pending 1,000) the gateway left the rest with the broker and
    # resumed again, ~count/1000 times; the default is 20,000 since. Only with --rows.
    if "streams1_hold" in a.rows.split(","):
        burst(
            "streams1_hold",
            "streams",
            1,
            "gateway-mqtt (max_pending 1,000, the old default) → streams → ConsumerWorker x1",
            "asgi",
            max_pending=1000,
        )
    if mqttasgi_available():
        mqttasgi_id = "bench-mqttasgi-burst"
        await bench.mqttasgi_session(port, "bench/burst/mqttasgi", mqttasgi_id)

        async def mqttasgi_burst(tag: str) -> Result:
            # it takes about one message per 10 ms (its paho loop sleeps 10 ms between reads):
            # a rate needs no more than this
            count = min(a.count, MQTTASGI_BURST)
            return await bench.mqttasgi(
                port, "bench/burst/mqttasgi", tag, count, queued=True, client_id=mqttasgi_id
            )

        rows.append(
            Row("mqttasgi", f"mqttasgi, {asyncconsumer} (MqttConsumer)", "burst", mqttasgi_burst)
        )
    for gateway in sessions:  # one start makes the session and its subscription
        await gateway.start()
        await gateway.ready()
        await gateway.stop()

    paced_count = int(a.paced_rate * a.paced_seconds)
    paced_url = bench.url("streams")
    paced_gateway = bench.gateway(port, paced_url, "bench-paced", "bench/paced")

    async def paced(tag: str) -> Result:
        return await bench.through_worker(
            paced_gateway,
            paced_url,
            1,
            tag,
            paced_count,
            queued=False,
            port=port,
            topic="bench/paced",
            rate=a.paced_rate,
        )

    rows.append(
        Row(
            "paced",
            f"gateway-mqtt → streams → ConsumerWorker x1, paced {a.paced_rate:,.0f}/s",
            "paced",
            paced,
        )
    )

    default_port = bench.default_broker.port
    default_gateway = bench.gateway(default_port, paced_url, "bench-default", "bench/default/gw")

    async def default_gw(tag: str) -> Result:
        return await bench.through_worker(
            default_gateway,
            paced_url,
            1,
            tag,
            a.count,
            queued=False,
            port=default_port,
            topic="bench/default/gw",
        )

    async def default_paho(tag: str) -> Result:
        return await bench.paho(
            default_port, "bench/default/paho", tag, a.count, queued=False, client_id=""
        )

    rows.append(
        Row(
            "default_gw",
            "default mosquitto: gateway-mqtt → streams → ConsumerWorker x1",
            "default",
            default_gw,
        )
    )
    rows.append(
        Row("default_paho", "default mosquitto: bare paho subscriber", "default", default_paho)
    )
    if mqttasgi_available():

        async def default_mqttasgi(tag: str) -> Result:
            return await bench.mqttasgi(
                default_port,
                "bench/default/mqttasgi",
                tag,
                a.count,
                queued=False,
                client_id=bench.name("bench-mqttasgi-default"),
            )

        rows.append(
            Row("default_mqttasgi", "default mosquitto: mqttasgi", "default", default_mqttasgi)
        )
    return rows


async def run(args: argparse.Namespace, tmp: Path) -> tuple[list[Row], list[str]]:
    from core.testing import MosquittoServer, RedisServer

    # see the module docstring (burst) for why
    lossless = ["max_queued_messages 0", "set_tcp_nodelay true"]
    with (
        RedisServer() as redis,
        MosquittoServer(extra_config=lossless) as broker,
        MosquittoServer() as default_broker,
    ):
        bench = Bench(args, tmp, redis, broker)
        bench.default_broker = default_broker
        rows = await build_rows(bench)
        if args.rows:
            rows = [row for row in rows if row.key in args.rows.split(",")]
        for round_ in range(1, args.rounds + 1):
            for row in rows:
                result = await row.run(f"{row.key}-{round_}")
                row.results.append(result)
                print(f"  round {round_} {row.key}: {describe(result)}", flush=True)
        notes = log_findings(bench.logs)
    return rows, notes


def describe(r: Result) -> str:
    text = f"{r.rate:,.0f} msg/s, lost {r.lost}/{r.sent}, dup {r.duplicates}"
    if r.redelivered or r.stale:
        text += f", redelivered {r.redelivered}, stale {r.stale}"
    if r.latencies:
        text += (
            f", p50 {percentile(r.latencies, 50) * 1000:.1f} ms, "
            f"p99 {percentile(r.latencies, 99) * 1000:.1f} ms"
        )
    if not math.isnan(r.gateway_cpu):
        text += f", gateway CPU {r.gateway_cpu * 1000:.3f} ms/msg"
        text += (
            f", {r.resumes} session resumes ({r.deferred} deferred), gateway counted "
            f"{r.gateway_duplicates} duplicates"
        )
    if r.error:
        text += f"; ERROR {r.error}"
    return text


_NOTEWORTHY = re.compile(r"\b(WARNING|ERROR|CRITICAL|Traceback)\b")


def log_findings(logs: list[Path]) -> list[str]:
    """WARNING/ERROR lines of every gateway and helper log, counted by their shape."""
    counts: dict[str, int] = {}
    for path in logs:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            if _NOTEWORTHY.search(line):
                # the message without time stamps and numbers, so repeats group together
                shape = re.sub(r"\d+(\.\d+)?", "N", line.split(" ", 2)[-1])[:200]
                counts[shape] = counts.get(shape, 0) + 1
    return [f"{n} x `{shape}`" for shape, n in sorted(counts.items(), key=lambda kv: -kv[1])]


# -- report -----------------------------------------------------------------------------------

HEADER = [
    "path",
    "rounds x msgs",
    "msgs/s median (range)",
    "÷ bare paho",
    "lost",
    "dup",
    "gateway CPU ms/msg",
    "worker CPU ms/msg",
    "Redis CPU ms/msg",
    "session resumes (deferred)",
    "p50 ms",
    "p99 ms",
    "max ms",
]


def _ms(value: float, digits: int = 2) -> str:
    return "-" if math.isnan(value) else f"{value * 1000:.{digits}f}"


def _rate(row: Row) -> str:
    rates = row.rates
    if not rates:
        return "-"
    text = f"{statistics.median(rates):,.0f}"
    return text + f" ({min(rates):,.0f}-{max(rates):,.0f})" if len(rates) > 1 else text


def _lost(row: Row) -> str:
    if row.kind == "default":
        shares = row.loss_shares
        text = f"{statistics.median(shares):.1%}" if shares else "-"
        if len(shares) > 1:
            text += f" ({min(shares):.1%}-{max(shares):.1%})"
        return text
    return " / ".join(str(r.lost) for r in row.results)


def _resumes(row: Row) -> str:
    if row.key.endswith("paho"):
        return "-"
    return " / ".join(f"{r.resumes} ({r.deferred:,})" for r in row.results)


def ratio(rows: dict[str, Row], key: str, base: str) -> float:
    """Median over the rounds of ``key``'s rate ÷ ``base``'s rate in the same round."""
    if key not in rows or base not in rows:
        return math.nan
    values = [
        a.rate / b.rate
        for a, b in zip(rows[key].results, rows[base].results, strict=True)
        if not (math.isnan(a.rate) or math.isnan(b.rate))
    ]
    return statistics.median(values) if values else math.nan


def table_rows(rows: list[Row]) -> list[list[str]]:
    by_key = {r.key: r for r in rows}
    table = []
    for row in rows:
        base = {"burst": "paho", "default": "default_paho"}.get(row.kind)
        share = ratio(by_key, row.key, base) if base and row.key != base else math.nan
        latency = row.kind == "paced"
        table.append(
            [
                row.path,
                f"{len(row.results)} x {row.results[0].sent if row.results else 0}",
                _rate(row),
                "" if math.isnan(share) else f"{share:.1%}".replace("%", " %"),
                _lost(row),
                " / ".join(str(r.duplicates) for r in row.results),
                _ms(row.median("gateway_cpu"), 3),
                _ms(row.median("worker_cpu"), 3),
                _ms(row.median("redis_cpu"), 3),
                _resumes(row),
                _ms(row.percentile_median(50)) if latency else "-",
                _ms(row.percentile_median(99)) if latency else "-",
                _ms(row.max_median()) if latency else "-",
            ]
        )
    return table


def verdict(rows: list[Row]) -> list[str]:
    """The issue's targets beside the medians measured, and what else a reader must know."""
    by_key = {r.key: r for r in rows}

    def met(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    def rate(key: str) -> float:
        return statistics.median(by_key[key].rates or [0])

    lines = []
    one, two, cr = by_key.get("streams1"), by_key.get("streams2"), by_key.get("cr1")
    if one is not None:
        lost = sum(r.lost for r in one.results)
        dup = sum(r.duplicates for r in one.results)
        lines.append(
            f"- Target ≥ {TARGET_RATE:,.0f} msg/s, zero loss, zero duplicates with one worker "
            "and a channels AsyncConsumer: "
            f"{rate('streams1'):,.0f} msg/s, {lost} lost, {dup} duplicates over "
            f"{len(one.results)} round(s): "
            f"{met(rate('streams1') >= TARGET_RATE and lost == 0 and dup == 0)}."
        )
    if one is not None and two is not None:
        rounds = ", ".join(f"{x:.2f}x" for x in per_round(two, one))
        lines.append(
            f"- Target two workers > one: {rate('streams2'):,.0f} against "
            f"{rate('streams1'):,.0f} msg/s (per round: {rounds}): "
            f"{met(rate('streams2') > rate('streams1'))}."
        )
    paced = by_key.get("paced")
    if paced is not None:
        p99, lost = paced.percentile_median(99), sum(r.lost for r in paced.results)
        lines.append(
            f"- Target p99 ≤ {TARGET_P99 * 1000:.0f} ms at a paced "
            f"{paced.path.rsplit(' ', 1)[-1]}: p99 {_ms(p99)} ms (p50 "
            f"{_ms(paced.percentile_median(50))} ms, max {_ms(paced.max_median())} ms; median of "
            f"the rounds), {lost} lost: {met(p99 <= TARGET_P99 and lost == 0)}."
        )
    default, default_paho = by_key.get("default_gw"), by_key.get("default_paho")
    if default is not None and default.loss_shares:
        loss = statistics.median(default.loss_shares)
        beside = ""
        if default_paho is not None and default_paho.loss_shares:
            beside = f", {statistics.median(default_paho.loss_shares):.1%} by the bare paho "
            beside += "subscriber"
        mqttasgi = by_key.get("default_mqttasgi")
        if mqttasgi is not None and mqttasgi.loss_shares:
            beside += f", {statistics.median(mqttasgi.loss_shares):.1%} by mqttasgi"
        lines.append(
            f"- Target no loss at a default broker with the default YAML: {loss:.1%} lost "
            f"through the gateway and worker (median of the rounds){beside}: "
            f"{met(loss <= TARGET_DEFAULT_LOSS)}."
        )
    if one is not None and cr is not None:
        lines.append(
            f"- streams ÷ channels_redis (one worker, same round, median): "
            f"{ratio(by_key, 'streams1', 'cr1'):.2f}x; gateway CPU per message "
            f"{_ms(one.median('gateway_cpu'), 3)} ms on streams against "
            f"{_ms(cr.median('gateway_cpu'), 3)} ms on channels_redis."
        )
    if one is not None and "paho" in by_key:
        lines.append(
            f"- gateway-worker ÷ bare paho (burst, one worker): "
            f"{ratio(by_key, 'streams1', 'paho'):.1%}."
        )
    if one is not None and "streams1_asgi" in by_key:
        lines.append(
            f"- channels AsyncConsumer ÷ plain ASGI callable (one worker, same round): "
            f"{ratio(by_key, 'streams1', 'streams1_asgi'):.1%}; worker CPU per message "
            f"{_ms(one.median('worker_cpu'), 3)} ms against "
            f"{_ms(by_key['streams1_asgi'].median('worker_cpu'), 3)} ms."
        )
    if one is not None and "mqttasgi" in by_key:
        lines.append(
            f"- gateway-worker ÷ mqttasgi (burst, one process each, same round): "
            f"{ratio(by_key, 'streams1', 'mqttasgi'):.2f}x."
        )
    old = by_key.get("streams1_hold")
    churn = [r for r in (old.results if old is not None else []) if r.resumes]
    if churn and old is not None and one is not None:
        lines.append(
            f"- Session resumes with the old hold (max_pending 1,000): draining the queued "
            f"burst, the gateway resumed its session {churn[0].resumes} times and left "
            f"{churn[0].deferred:,} deliveries with the broker (round 1) for "
            f"{churn[0].sent:,} messages. mosquitto 2.0.11 lets a resumed session's queue "
            "through past the gateway's receive_maximum (100) once PUBACKs flow; what does not "
            "fit in the hold is read, left unacknowledged and sent again after the next resume: "
            "about count²/(2 x max_pending) deliveries for one burst. Gateway CPU per message: "
            f"{_ms(old.median('gateway_cpu'), 3)} ms with the old hold, "
            f"{_ms(one.median('gateway_cpu'), 3)} ms with the default (20,000)."
        )
    for row in rows:
        for i, r in enumerate(row.results):
            if r.duplicates:
                lines.append(
                    f"- Duplicates in {row.key}, round {i + 1}: {r.duplicates} handled twice; "
                    f"{r.redelivered} of the handlings were layer redeliveries "
                    f"(`__delivery__` > 1); the gateway counted {r.gateway_duplicates} MQTT "
                    f"redeliveries of messages it had handed off ({r.resumes} session resumes)."
                )
            if r.stale:
                lines.append(
                    f"- {row.key}, round {i + 1}: {r.stale} message(s) of the previous round "
                    "were handled in this one (left in Redis when that round's workers stopped)."
                )
            if r.error:
                lines.append(f"- ERROR in {row.key}, round {i + 1}: {r.error}")
    return lines


def per_round(a: Row, b: Row) -> list[float]:
    return [
        x.rate / y.rate
        for x, y in zip(a.results, b.results, strict=True)
        if not (math.isnan(x.rate) or math.isnan(y.rate))
    ]


def versions() -> list[str]:
    import paho.mqtt
    import redis

    return [
        f"- redis-server: {program_version('redis-server', '--version')}",
        f"- mosquitto: {program_version('mosquitto', '-h')}",
        f"- redis-py {redis.__version__}, paho-mqtt {paho.mqtt.__version__}",
    ]


def markdown(
    rows: list[Row],
    args: argparse.Namespace,
    command: str,
    loads: tuple[str, str],
    notes: list[str],
) -> str:
    lines = [
        f"- Date: {today()}",
        *machine_lines(),
        *versions(),
        f"- Load average when the run started: {loads[0]}; when it ended: {loads[1]}",
        f"- Command: `{command}`",
        f"- Workload: {args.rounds} interleaved rounds; {args.count:,} x {PAYLOAD_SIZE}-byte "
        f"QoS 1 messages per burst; {args.paced_rate:,.0f} msg/s for {args.paced_seconds:g} s "
        "paced. Private redis-server and mosquitto on free ports. The streams layer and the "
        "gateway YAML at their defaults (capacity 100, inbound_capacity 100,000); channels_redis "
        "with its capacity raised to 1,000,000 (it has no per-channel capacity of its own).",
        "",
        markdown_table(HEADER, table_rows(rows)),
        "",
        "Targets (issue 20), against the medians above:",
        "",
        *verdict(rows),
        "",
        "How to read it (details in the docstring of `bench/mqtt_worker.py`): every actor is its "
        "own process — mosquitto, redis-server, the `gateway-mqtt` binary, each "
        "`ConsumerWorker` process (a no-op consumer that notes the CLOCK_MONOTONIC stamp when "
        "it gets a message: a channels `AsyncConsumer` behind `ChannelNameRouter` with Django "
        "configured, what a project writes, or in the *plain ASGI callable* row a bare ASGI "
        "loop), a paho publisher, the bare paho subscriber, mqttasgi's server (a Django "
        "`MqttConsumer`, the same stamping). Gateway defaults except the persistent session and "
        "a fixed "
        "client id. Burst rows: the messages wait at the broker (persistent session, "
        "unbounded queue) before the gateway or the paho subscriber starts; msgs/s = (distinct "
        "handled - 1) ÷ (first → last handled). lost / dup: per round. CPU ms/msg: CPU time of "
        "that process over the first → last window ÷ messages (for x2: both workers). Paced "
        "row: publisher stamp before `publish` → handler stamp. Default mosquitto rows: a "
        "broker with its defaults (`max_queued_messages 1000`), subscribers live, a publisher "
        "bursting as fast as it can; the bare paho subscriber runs on the same broker right "
        "after the gateway row of the same round (not at the same time), on its own topic. "
        f"÷ bare paho: msgs/s of the row ÷ the bare paho row of its kind, same round, median. "
        f"The machine has {machine()['nproc']} CPU(s), shared by every process.",
    ]
    if notes:
        lines += [
            "",
            "WARNING/ERROR lines in the gateway and worker logs during the run (count x line, "
            "numbers replaced by N):",
            "",
            *[f"- {n}" for n in notes[:15]],
        ]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=10_000, help="messages per burst")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--paced-rate", type=float, default=1000.0, help="msg/s of the paced row")
    parser.add_argument(
        "--paced-seconds", type=float, default=10.0, help="seconds the paced row publishes"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 round, 1,000 messages, no write"
    )
    parser.add_argument(
        "--rows",
        default="",
        help="only these rows, comma-separated: paho, streams1, streams1_asgi, streams2, cr1, "
        "mqttasgi, paced, default_gw, default_paho, default_mqttasgi, and streams1_hold (the "
        "old max_pending; only when named) (never writes BENCHMARKS.md)",
    )
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.rows:
        args.no_write = True
    if args.quick:
        args.rounds, args.count, args.paced_seconds, args.no_write = 1, 1000, 2.0, True
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in ("_worker", "_publisher", "_subscriber"):
        return helper_entry(argv[0], argv[1:])
    args = parse_args(argv)
    command = command_line(MODULE)
    load = load_average()
    started = time.monotonic()
    print(f"load average {load}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-mqtt-worker-") as tmp:
        rows, notes = asyncio.run(run(args, Path(tmp)))
    loads = (load, load_average())
    print()
    print(text_table(HEADER, table_rows(rows)))
    print("\n".join(verdict(rows)))
    if notes:
        print("log lines worth a look:\n" + "\n".join(f"  {n}" for n in notes[:30]))
    print(f"\n{time.monotonic() - started:.0f} s; {command}")
    if not args.no_write:
        update_section(SECTION, markdown(rows, args, command, loads, notes))
        print(f"updated the '## {SECTION}' section of BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
