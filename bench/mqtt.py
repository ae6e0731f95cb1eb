"""MQTT gateway benchmark: broker → ``gateway-mqtt`` → Redis layer → consumer, against the raw
layer, in one run on one machine.

    python -m bench.mqtt [--count N] [--latency-count M] [--rate R]
                         [--redis-layer streams|channels_redis] [--no-write]

It starts a private ``redis-server`` and ``mosquitto`` on free ports (never the system ones)
and stops them. Every actor is its own process, as in production: the ``gateway-mqtt`` binary
(``python -m gateways.mqtt.cli``, log level INFO), a consumer (``python -m bench.mqtt
_consumer``: a plain ``layer.receive()`` loop, like ``runworker`` without Django), a paho
publisher (``_publisher``) and, for the raw rows, a layer sender (``_sender``). They share the
system-wide CLOCK_MONOTONIC, so timestamps compare across processes.

The broker
    mosquitto with ``max_queued_messages 0`` and ``queue_qos0_messages true``, so the gateway
    rows can queue their messages at the broker first, and ``set_tcp_nodelay true``: with
    mosquitto's default (Nagle's algorithm on), a QoS 0 delivery waits for the gateway's
    delayed ACK whenever an earlier one is unacknowledged, which shows as ~100 ms at p99 (QoS 1
    does not suffer: its PUBACKs carry the ACK). Recommended for any latency-sensitive broker.

The message
    A 21-byte JSON reading on ``bench/qN``; the raw rows send the very ``mqtt.message`` event the
    gateway makes of it (same keys, same size), so both sides pay the same serialisation.

msgs/s (``--rounds`` rounds of ``--count`` messages; the table shows the median and range)
    *raw*: the sender calls ``layer.send`` back to back while the consumer receives.
    *gateway*: the messages are queued at the broker first (a persistent session, mosquitto with
    an unbounded queue and ``queue_qos0_messages``), then the gateway starts and drains them:
    this measures the gateway, not the publisher. Both: (messages - 1) ÷ (first → last receive).
    *CPU ms/msg*: CPU time of the producing process (sender, or gateway) between the consumer's
    first and last message, per message.

p50 / p99 (``--latency-count`` messages at ``--rate`` per second)
    The producer paces itself well below capacity and stamps each message right before
    ``layer.send`` (raw) or paho's ``publish`` (gateway); latency = consumer's receive - stamp,
    i.e. broker → gateway → Redis → consumer for the gateway rows.

no-op layer rows
    ``MqttGateway`` in this process draining ``--count`` queued messages into a layer whose
    ``send`` returns at once: the gateway's own ceiling and CPU per message (paho, translation,
    envelope, PUBACKs), with Redis out of the picture. msgs/s here includes the connect.

ratio = gateway msgs/s ÷ raw msgs/s of the same round, median over the rounds (target ≥ 80 %).
The rounds alternate raw, QoS 0 and QoS 1, so a change in the machine's load hits them alike.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:
    sys.exit("run this benchmark as a module from the repository root: python -m bench.mqtt")

import argparse
import asyncio
import json
import math
import os
import statistics
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._common import (
    REPO_ROOT,
    GatewayProcess,
    command_line,
    cpu_seconds,
    machine,
    machine_lines,
    markdown_table,
    percentile,
    publish_paced,
    text_table,
    today,
    update_section,
)
from core.envelope import new_event
from core.layers import resolve_layer
from core.testing import MosquittoServer, RedisServer

SECTION = "MQTT"
DEFAULT_COUNT = 2000
DEFAULT_ROUNDS = 5
DEFAULT_LATENCY_COUNT = 1000
DEFAULT_RATE = 100.0
CHANNEL = "bench"
TIMEOUT = 300.0
HEADER = [
    "path",
    "QoS",
    "rounds x msgs",
    "msgs/s median (range)",
    "ratio",
    "CPU ms/msg",
    "latency msgs",
    "p50 ms",
    "p99 ms",
]


def reading(stamp: float) -> bytes:
    """The benchmark payload: a JSON reading carrying the producer's monotonic stamp."""
    return json.dumps({"t": round(stamp, 6), "v": 21.5}).encode()


def sample_event(qos: int) -> dict[str, Any]:
    """The ``mqtt.message`` the gateway makes of one reading (see MqttGateway.mqtt_message)."""
    return new_event(
        "mqtt.message",
        gateway=CHANNEL,
        reply_channel=f"{CHANNEL}.send",
        id="0" * 32,
        topic=f"bench/q{qos}",
        payload=reading(0.0),
        format="bytes",
        payload_error=None,
        qos=qos,
        retain=False,
        dup=False,
        subscription=f"bench/q{qos}",
        properties={},
    )


# -- helper processes (python -m bench.mqtt _name …) ------------------------------------------


async def _consumer(url: str, count: int, out: str) -> None:
    layer = resolve_layer(url)
    await layer.send(CHANNEL, {"type": "bench.probe"})  # opens the connections first
    await layer.receive(CHANNEL)
    print("ready", flush=True)
    stamps: list[tuple[float, float]] = []
    while len(stamps) < count:
        message = await asyncio.wait_for(layer.receive(CHANNEL), TIMEOUT)
        now = time.monotonic()
        if message["type"] != "mqtt.message":
            continue
        stamps.append((json.loads(message["payload"])["t"], now))
        if len(stamps) == 1:
            print("first", flush=True)
    await layer.close_pools()
    await asyncio.to_thread(Path(out).write_text, json.dumps(stamps))


async def _sender(url: str, count: int, rate: float) -> None:
    layer = resolve_layer(url)
    event = sample_event(1)
    await layer.send(f"{CHANNEL}-probe", {"type": "bench.probe"})  # connect before timing
    cpu = time.process_time()
    started = time.monotonic()
    for n in range(count):
        if rate:
            await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
        await layer.send(CHANNEL, {**event, "payload": reading(time.monotonic())})
    print(f"cpu {(time.process_time() - cpu) / count}", flush=True)
    await layer.close_pools()


def _publisher(port: int, topic: str, count: int, qos: int, rate: float) -> None:
    publish_paced(port, topic, count, qos, rate, lambda _n, now: reading(now), TIMEOUT)


def helper_entry(name: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m bench.mqtt {name}")
    for option in ("url", "out", "topic"):
        parser.add_argument(f"--{option}", default="")
    for option in ("count", "qos", "port"):
        parser.add_argument(f"--{option}", type=int, default=0)
    parser.add_argument("--rate", type=float, default=0.0)
    a = parser.parse_args(argv)
    if name == "_consumer":
        asyncio.run(_consumer(a.url, a.count, a.out))
    elif name == "_sender":
        asyncio.run(_sender(a.url, a.count, a.rate))
    else:
        _publisher(a.port, a.topic, a.count, a.qos, a.rate)
    return 0


async def spawn(name: str, *args: str, **kwargs: Any) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.mqtt", name, *args, cwd=REPO_ROOT, **kwargs
    )


def _status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5) as response:
        return int(response.status)


class Consumer:
    """The ``_consumer`` process: says ``ready``, then ``first``, then writes its stamps."""

    def __init__(self, url: str, count: int, tmp: Path) -> None:
        self.url, self.count = url, count
        self.out = tmp / f"stamps-{time.monotonic_ns()}.json"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await spawn(
            "_consumer",
            f"--url={self.url}",
            f"--count={self.count}",
            f"--out={self.out}",
            stdout=asyncio.subprocess.PIPE,
        )
        await self._line(b"ready", 60)

    async def _line(self, wanted: bytes, timeout: float) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if line.strip() != wanted:
            raise RuntimeError(f"the consumer said {line!r}, not {wanted!r}")

    async def first(self) -> None:
        await self._line(b"first", TIMEOUT)

    async def stamps(self) -> list[tuple[float, float]]:
        assert self.proc is not None
        if await asyncio.wait_for(self.proc.wait(), TIMEOUT) != 0:
            raise RuntimeError(f"the consumer exited with {self.proc.returncode}")
        return [tuple(s) for s in json.loads(self.out.read_text())]  # type: ignore[misc]


def gateway_process(
    broker: MosquittoServer, url: str, qos: int, count: int, tmp: Path
) -> GatewayProcess:
    """``python -m gateways.mqtt.cli`` for one QoS, with a persistent session and a health port."""
    config = {
        "gateway": "mqtt",
        "name": CHANNEL,
        "layer": url,
        "mqtt": {
            "host": "127.0.0.1",
            "port": broker.port,
            "client_id": f"bench-gateway-q{qos}",
            "clean_start": False,
            "session_expiry": 3600,
            "buffer": count + 1000,
            "subscriptions": [{"topic": f"bench/q{qos}", "qos": qos}],
        },
    }
    return GatewayProcess("mqtt", config, tmp, f"gateway-q{qos}")


async def stop_gateway(gateway: GatewayProcess) -> None:
    """SIGTERM; an exit status other than 0 fails the run."""
    if code := await gateway.stop():
        raise RuntimeError(f"the gateway exited with {code}; see {gateway.log}")


# -- measurements -----------------------------------------------------------------------------


@dataclass
class Row:
    path: str
    qos: str
    count: int
    #: msgs/s and CPU seconds per message of each round
    rates: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    #: this row's rate ÷ the raw rate of the same round
    ratios: list[float] = field(default_factory=list)
    latency_count: int = 0
    p50: float = math.nan
    p99: float = math.nan

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios) if self.ratios else math.nan

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpus)


def throughput(stamps: list[tuple[float, float]]) -> float:
    received = sorted(r for _, r in stamps)
    return (len(received) - 1) / (received[-1] - received[0])


def latencies(stamps: list[tuple[float, float]]) -> tuple[float, float]:
    values = [r - s for s, r in stamps]
    return percentile(values, 50), percentile(values, 99)


async def raw_throughput(url: str, count: int, tmp: Path) -> tuple[float, float]:
    """(msgs/s, CPU s/msg of the sender) for ``count`` back-to-back sends."""
    consumer = Consumer(url, count, tmp)
    await consumer.start()
    sender = await spawn(
        "_sender", f"--url={url}", f"--count={count}", stdout=asyncio.subprocess.PIPE
    )
    stamps = await consumer.stamps()
    output, _ = await sender.communicate()
    return throughput(stamps), float(output.decode().split()[-1])


async def raw_latency(url: str, row: Row, args: argparse.Namespace, tmp: Path) -> None:
    consumer = Consumer(url, args.latency_count, tmp)
    await consumer.start()
    sender = await spawn(
        "_sender",
        f"--url={url}",
        f"--count={args.latency_count}",
        f"--rate={args.rate}",
        stdout=asyncio.subprocess.DEVNULL,
    )
    stamps = await consumer.stamps()
    await sender.wait()
    row.latency_count = len(stamps)
    row.p50, row.p99 = latencies(stamps)


async def publish(broker: MosquittoServer, qos: int, count: int, rate: float = 0.0) -> None:
    proc = await spawn(
        "_publisher",
        f"--port={broker.port}",
        f"--topic=bench/q{qos}",
        f"--count={count}",
        f"--qos={qos}",
        f"--rate={rate}",
    )
    if await asyncio.wait_for(proc.wait(), TIMEOUT) != 0:
        raise RuntimeError("the publisher failed")


async def gateway_throughput(
    gateway: GatewayProcess, qos: int, count: int, url: str, broker: MosquittoServer, tmp: Path
) -> tuple[float, float]:
    """(msgs/s, CPU s/msg of the gateway) draining ``count`` messages queued at the broker."""
    await publish(broker, qos, count)  # queued at the broker for the gateway's session
    consumer = Consumer(url, count, tmp)
    await consumer.start()
    await gateway.start()
    await consumer.first()
    cpu = cpu_seconds(gateway.pid)
    stamps = await consumer.stamps()
    cpu = (cpu_seconds(gateway.pid) - cpu) / count
    await stop_gateway(gateway)
    return throughput(stamps), cpu


async def gateway_latency(
    gateway: GatewayProcess,
    qos: int,
    row: Row,
    url: str,
    broker: MosquittoServer,
    args: argparse.Namespace,
    tmp: Path,
) -> None:
    await gateway.start()
    await gateway.ready()
    consumer = Consumer(url, args.latency_count, tmp)
    await consumer.start()
    await publish(broker, qos, args.latency_count, args.rate)
    stamps = await consumer.stamps()
    await stop_gateway(gateway)
    row.latency_count = len(stamps)
    row.p50, row.p99 = latencies(stamps)


class NullLayer:
    """A layer that takes every message at once: what is left is the gateway's own work."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.received = 0
        self.done = asyncio.Event()

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        if message["type"] == "mqtt.message":
            self.received += 1
            if self.received == self.count:
                self.done.set()

    async def receive(self, channel: str) -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def new_channel(self, prefix: str = "specific.") -> str:
        return f"{prefix}null!0"


async def gateway_alone(broker: MosquittoServer, qos: int, count: int) -> tuple[float, float]:
    """(msgs/s, CPU s/msg) of an in-process gateway draining into :class:`NullLayer`."""
    from gateways.mqtt.config import MqttGatewayConfig
    from gateways.mqtt.gateway import MqttGateway

    config = MqttGatewayConfig.model_validate(
        {
            "gateway": "mqtt",
            "name": f"alone-q{qos}",
            "mqtt": {
                "host": "127.0.0.1",
                "port": broker.port,
                "client_id": f"bench-alone-q{qos}",
                "clean_start": False,
                "session_expiry": 3600,
                "buffer": count + 1000,
                "subscriptions": [{"topic": f"bench/q{qos}", "qos": qos}],
            },
        }
    )

    async def drain(layer: NullLayer) -> tuple[float, float]:
        gateway = MqttGateway(config, layer)
        cpu, started = time.process_time(), time.monotonic()
        task = asyncio.create_task(gateway.run())
        await asyncio.wait_for(layer.done.wait(), TIMEOUT)
        cpu, elapsed = time.process_time() - cpu, time.monotonic() - started
        gateway.stop()
        await task
        return count / elapsed, cpu / count

    first = MqttGateway(config, NullLayer(0))  # once, to create the session
    task = asyncio.create_task(first.run())
    await asyncio.wait_for(first.started.wait(), TIMEOUT)  # SUBSCRIBE leaves before DISCONNECT
    first.stop()
    await task
    await publish(broker, qos, count)
    return await drain(NullLayer(count))


async def run(args: argparse.Namespace, tmp: Path) -> list[Row]:
    # see the module docstring (The broker) for why
    broker_config = ["max_queued_messages 0", "queue_qos0_messages true", "set_tcp_nodelay true"]
    with RedisServer() as redis, MosquittoServer(extra_config=broker_config) as broker:
        url = redis.url + f"?capacity=1000000&layer={args.redis_layer}"
        raw = Row("raw layer send → receive", "-", args.count)
        rows = [raw]
        gateways = {}
        for qos in (0, 1):
            rows.append(Row("broker → gateway-mqtt → layer → consumer", str(qos), args.count))
            gateways[qos] = gateway_process(broker, url, qos, args.count, tmp)
            await gateways[qos].start()  # creates the persistent session and its subscription
            await gateways[qos].ready()
            await stop_gateway(gateways[qos])
        # rounds alternate the rows, so a change in the machine's load hits them alike
        for round_ in range(1, args.rounds + 1):
            rate, cpu = await raw_throughput(url, args.count, tmp)
            raw.rates.append(rate)
            raw.cpus.append(cpu)
            line = f"  round {round_}: raw {rate:,.0f} msgs/s"
            for qos in (0, 1):
                row = rows[qos + 1]
                rate, cpu = await gateway_throughput(
                    gateways[qos], qos, args.count, url, broker, tmp
                )
                row.rates.append(rate)
                row.cpus.append(cpu)
                row.ratios.append(rate / raw.rates[-1])
                line += f", QoS {qos} {rate:,.0f} msgs/s ({row.ratios[-1]:.0%})"
            print(line, flush=True)
        await raw_latency(url, raw, args, tmp)
        for qos in (0, 1):
            await gateway_latency(gateways[qos], qos, rows[qos + 1], url, broker, args, tmp)
        for qos in (0, 1):
            row = Row("broker → gateway, in-process → no-op layer", str(qos), args.count)
            rate, cpu = await gateway_alone(broker, qos, args.count)
            row.rates.append(rate)
            row.cpus.append(cpu)
            rows.append(row)
            print(f"  gateway alone, QoS {qos}: {rate:,.0f} msgs/s", flush=True)
    return rows


# -- report -----------------------------------------------------------------------------------


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value * 1000:.2f}"


def _rates(row: Row) -> str:
    low, high = min(row.rates), max(row.rates)
    return f"{row.rate:,.0f} ({low:,.0f}-{high:,.0f})" if len(row.rates) > 1 else f"{row.rate:,.0f}"


def table_rows(rows: list[Row]) -> list[list[str]]:
    return [
        [
            r.path,
            r.qos,
            f"{len(r.rates)} x {r.count}",
            _rates(r),
            "" if math.isnan(r.ratio) else f"{r.ratio:.1%}".replace("%", " %"),
            _ms(r.cpu),
            str(r.latency_count) if r.latency_count else "-",
            _ms(r.p50),
            _ms(r.p99),
        ]
        for r in rows
    ]


def verdict(rows: list[Row], load: tuple[float, ...]) -> list[str]:
    raw, layered, alone = rows[0], rows[1:3], rows[3:]
    lines = []
    for row in layered:
        met = "meets" if row.ratio >= 0.8 else "misses"
        rounds = ", ".join(f"{r:.0%}" for r in row.ratios)
        lines.append(
            f"- QoS {row.qos}: {row.ratio:.1%} of the raw layer's rate (median of the rounds: "
            f"{rounds}): {met} the 80 % target."
        )
    gateway_cpu = max(r.cpu for r in layered)
    alone_text = ", ".join(
        f"QoS {r.qos} {r.rate:,.0f} msgs/s at {r.cpu * 1000:.2f} ms CPU" for r in alone
    )
    lines.append(
        f"- CPU per message: raw sender {raw.cpu * 1000:.2f} ms, gateway up to "
        f"{gateway_cpu * 1000:.2f} ms, both over the consumer's first → last window. The "
        "gateway does paho's reading and parsing, the translation and the PUBACKs, and hands "
        "what waits to the layer in ordered batches (`send_many` on the streams layer, one "
        "`send` each on channels_redis); the raw sender makes one `send` per message. A gateway "
        "that drains faster than the consumer finishes early and its figure here reads low. "
        f"Into a no-op layer the gateway alone does {alone_text}: it is not the "
        "limit by itself, but every process here shares the same CPUs, so its share costs "
        "throughput, most at QoS 1 (one more packet, and a wake-up of the broker, per message)."
    )
    nproc = int(machine()["nproc"])
    if load[0] >= nproc / 2:
        lines.append(
            f"- The machine was not idle (1-min load average {load[0]:.2f} on {nproc} CPUs at the "
            "start): rates move between rounds, the median ratio is the figure to read."
        )
    return lines


def markdown(
    rows: list[Row], args: argparse.Namespace, command: str, load: tuple[float, ...]
) -> str:
    m = machine()
    lines = [
        f"- Date: {today()}",
        *machine_lines(),
        f"- Load average when the run started: {' '.join(f'{x:.2f}' for x in load)}",
        f"- Command: `{command}`",
        f"- Workload: {args.rounds} rounds of {args.count} messages for msgs/s (alternating the "
        f"rows), then {args.latency_count} at "
        f"{args.rate:g}/s for latency, per row; a {len(reading(0.0))}-byte JSON payload; the raw "
        "row sends the gateway's own `mqtt.message` event for it. Private redis-server and "
        "mosquitto on free ports; mosquitto with `max_queued_messages 0` and "
        "`queue_qos0_messages true` (messages wait at the broker for the gateway's session) "
        "and `set_tcp_nodelay true` (with its default, Nagle's algorithm holds QoS 0 "
        "deliveries until the gateway's delayed ACK: p99 near 100 ms).",
        "",
        markdown_table(HEADER, table_rows(rows)),
        "",
        *verdict(rows, load),
        "",
        "How to read it (details in the docstring of `bench/mqtt.py`): every actor is its own "
        "process (the `gateway-mqtt` binary at log level INFO, a plain `layer.receive()` "
        "consumer, a paho publisher, a raw `layer.send()` sender). msgs/s = (messages - 1) ÷ "
        "(first → last receive at the consumer). For the gateway rows the messages wait at the "
        "broker (persistent session) before the gateway starts, so the publisher does not "
        "limit them. *CPU ms/msg*: CPU of the producing process (sender or gateway) per message "
        "during that window. p50/p99: producer stamp right before `publish`/`send` → the "
        f"consumer's `receive()`, at a paced {args.rate:g} msgs/s. ratio = gateway msgs/s ÷ raw "
        "msgs/s of the same round, median over the rounds; target ≥ 80 %. The no-op layer "
        "rows run the gateway in the benchmark's process against a layer whose `send` returns at "
        "once: the gateway's own ceiling, Redis out of the picture. The machine has "
        f"{m['nproc']} CPU(s), shared by every process.",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.mqtt", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, help="messages for msgs/s")
    parser.add_argument(
        "--latency-count",
        type=int,
        default=DEFAULT_LATENCY_COUNT,
        help="messages for the latency percentiles",
    )
    parser.add_argument(
        "--rate", type=float, default=DEFAULT_RATE, help="messages per second for the latency runs"
    )
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="throughput rounds")
    parser.add_argument(
        "--redis-layer",
        choices=("streams", "channels_redis"),
        default="streams",
        help="which layer redis:// selects for every process (?layer=…)",
    )
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in ("_consumer", "_sender", "_publisher"):
        return helper_entry(argv[0], argv[1:])
    args = parse_args(argv)
    command = command_line("bench.mqtt")
    load = os.getloadavg()
    started = time.monotonic()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-mqtt-") as tmp:
        rows = asyncio.run(run(args, Path(tmp)))
    print()
    print(text_table(HEADER, table_rows(rows)))
    print("\n".join(verdict(rows, load)))
    print(f"\n{time.monotonic() - started:.0f} s; {command}")
    if not args.no_write:
        update_section(SECTION, markdown(rows, args, command, load))
        print(f"updated the '## {SECTION}' section of BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
