"""HTTP/WebSocket: one unchanged Channels application (the tutorial's chat, examples/rooms) served
by Daphne, by uvicorn, and through the bridge (gateway-http-ws → Redis → ``runworker rooms``) with
one and with two workers, all in the same run, every row on the same Redis layer.

Chat rows: ``--clients`` WebSockets at once, in rooms of ``--room-size``; each client sends
``--messages`` chat messages one after the other and waits until its own message comes back
through the room's group (``group_send`` through Redis, then ``chat_message`` → ``self.send``).
msgs/s = messages sent ÷ wall time; p50/p99 are those round trips; deliveries/s counts every
copy the room members got. HTTP rows: ``--clients`` keep-alive clients doing ``--requests`` GETs
of ``/chat/`` (a Django view) each. Every server runs for the whole benchmark and the rows are
measured in turn, ``--rounds`` times (the median is reported), so load from outside falls on
each row alike. Ratios are each row's figure ÷ Daphne's.

    python -m bench.http_ws [--clients 50] [--messages 100] [--room-size 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import websockets

from bench._common import (
    command_line,
    cpu_seconds,
    machine,
    machine_lines,
    markdown_table,
    percentile,
    text_table,
    today,
    update_section,
)
from core.testing import DjangoWorker, RedisServer, Server, free_port
from tests.support.example import example_project

SECTION = "HTTP/WebSocket"
HEADER = [
    "server",
    "msgs/s",
    "ratio",
    "p50 ms",
    "p99 ms",
    "deliveries/s",
    "CPU ms/msg",
    "CPUs busy",
    "http req/s",
    "http ratio",
]
TEXT = "hello, this is a typical small chat message"


@dataclass
class Row:
    server: str
    rate: float
    deliveries: float
    p50: float
    p99: float
    http_rate: float
    #: CPU ms per chat message of each server-side process (name → ms), chat runs only
    cpu: dict[str, float]


@dataclass
class Target:
    """One way of serving the application, measured in every round."""

    name: str
    port: int
    #: server-side processes whose CPU time is counted (name → pid)
    pids: dict[str, int]
    rates: list[float] = field(default_factory=list)
    deliveries: list[float] = field(default_factory=list)
    rtts: list[float] = field(default_factory=list)
    http_rates: list[float] = field(default_factory=list)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    sent: int = 0

    def row(self) -> Row:
        cpu = {who: seconds * 1000 / self.sent for who, seconds in self.cpu_seconds.items()}
        return Row(
            self.name,
            statistics.median(self.rates),
            statistics.median(self.deliveries),
            percentile(self.rtts, 50) * 1000,
            percentile(self.rtts, 99) * 1000,
            statistics.median(self.http_rates) if self.http_rates else 0.0,
            cpu,
        )


async def chat_load(
    base: str, clients: int, messages: int, room_size: int
) -> tuple[float, float, list[float]]:
    origin = base.replace("ws://", "http://")
    sockets = [
        await websockets.connect(
            f"{base}/ws/chat/bench{i // room_size}/", origin=origin, open_timeout=60
        )
        for i in range(clients)
    ]
    delivered = 0

    async def say(index: int, ws: websockets.ClientConnection, text: str) -> None:
        nonlocal delivered
        await ws.send(json.dumps({"message": text}))
        while True:
            got = json.loads(await asyncio.wait_for(ws.recv(), 60))["message"]
            delivered += 1
            if got == text:
                return

    await asyncio.gather(*(say(i, ws, f"{i} warm-up") for i, ws in enumerate(sockets)))
    rtts: list[float] = []

    async def client(index: int, ws: websockets.ClientConnection) -> None:
        for n in range(messages):
            t0 = time.perf_counter()
            await say(index, ws, f"{index} {n} {TEXT}")
            rtts.append(time.perf_counter() - t0)

    delivered = 0
    start = time.perf_counter()
    await asyncio.gather(*(client(i, ws) for i, ws in enumerate(sockets)))
    elapsed = time.perf_counter() - start
    await asyncio.gather(*(ws.close() for ws in sockets))
    return clients * messages / elapsed, delivered / elapsed, rtts


async def http_load(base: str, clients: int, requests: int) -> float:
    async def client(http: httpx.AsyncClient) -> None:
        for _ in range(requests):
            response = await http.get("/chat/")
            assert response.status_code == 200, response.status_code

    pool = [httpx.AsyncClient(base_url=base, timeout=60) for _ in range(clients)]
    try:
        for http in pool:
            await http.get("/chat/")  # warm-up and keep-alive connection
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for http in pool))
        return clients * requests / (time.perf_counter() - start)
    finally:
        await asyncio.gather(*(http.aclose() for http in pool))


async def measure(target: Target, args: argparse.Namespace) -> None:
    """One round of the chat and the HTTP load on ``target``."""
    before = {who: cpu_seconds(pid) for who, pid in target.pids.items()}
    rate, deliveries, rtts = await chat_load(
        f"ws://127.0.0.1:{target.port}", args.clients, args.messages, args.room_size
    )
    for who, pid in target.pids.items():
        spent = cpu_seconds(pid) - before[who]
        target.cpu_seconds[who] = target.cpu_seconds.get(who, 0.0) + spent
    target.sent += args.clients * (args.messages + 1)
    target.rates.append(rate)
    target.deliveries.append(deliveries)
    target.rtts += rtts
    http_rate = 0.0
    if args.requests:
        http_rate = await http_load(f"http://127.0.0.1:{target.port}", args.clients, args.requests)
        target.http_rates.append(http_rate)
    print(f"  {target.name}: {rate:,.0f} msgs/s, {http_rate:,.0f} req/s", flush=True)


async def wait_http(port: int, path: str = "/chat/") -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        for _ in range(300):
            try:
                if (await http.get(f"http://127.0.0.1:{port}{path}")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"nothing answers on port {port}")


async def run(args: argparse.Namespace, tmp: Path) -> list[Row]:
    """Start every server at once, then measure them in turn, ``--rounds`` times: the
    machine's other load falls on every row alike."""
    targets: list[Target] = []
    processes: list[Any] = []
    with RedisServer() as redis:
        assert redis.pid is not None
        project = await asyncio.to_thread(example_project, tmp, redis.url)
        base_env = {**os.environ, "PYTHONUNBUFFERED": "1", **project.env}
        examples = Path(base_env["PYTHONPATH"])
        app = "example.asgi:application"
        servers = {
            "Daphne, in-process": [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p"],
            "uvicorn, in-process": [
                sys.executable, "-m", "uvicorn", "--ws", "websockets-sansio", "--log-level",
                "warning", "--no-access-log", "--lifespan", "off", "--port",
            ],
        }  # fmt: skip
        try:
            for name, argv in servers.items():
                port = free_port()
                server = Server([*argv, str(port), app], None, cwd=examples, env=base_env)
                processes.append(server)
                targets.append(
                    Target(name, port, {"server": server.pid, "redis-server": redis.pid})
                )
            for count in (1, 2):
                # each bridge on a database of its own: its workers take only its sockets
                layer = f"{redis.url.rsplit('/', 1)[0]}/{count}"
                port = free_port()
                env = {
                    **base_env,
                    "EXAMPLE_LAYER": layer,
                    "GATEWAYS_LAYER": layer,
                    "WEB_PORT": str(port),
                    "HEALTH_PORT": str(free_port()),
                    "GATEWAYS_LOG_LEVEL": "INFO",
                }
                gateway = project.gateway("web.yaml", env=env)
                processes.append(gateway)
                await asyncio.to_thread(gateway.start)
                pids = {"gateway": gateway.pid or 0}
                for number in range(1, count + 1):
                    worker = DjangoWorker(examples, ["rooms"], env).start()
                    processes.append(worker)
                    await asyncio.to_thread(worker.wait_for, "Running worker for channels", 60)
                    pids[f"worker {number}"] = worker.pid or 0
                pids["redis-server"] = redis.pid
                plural = "s" if count > 1 else ""
                targets.append(Target(f"bridge, {count} worker{plural}", port, pids))
            await asyncio.sleep(1)  # the last worker's listener is up: connects spread
            for target in targets:
                await wait_http(target.port)
            for number in range(1, args.rounds + 1):
                print(f"round {number} of {args.rounds}", flush=True)
                for target in targets:
                    await measure(target, args)
        finally:
            for process in reversed(processes):
                await asyncio.to_thread(process.stop)
    return [target.row() for target in targets]


def table_rows(rows: list[Row]) -> list[list[str]]:
    base = next(r for r in rows if r.server.startswith("Daphne"))
    out = []
    for row in rows:
        out.append(
            [
                row.server,
                f"{row.rate:,.0f}",
                f"{row.rate / base.rate:.2f}x",
                f"{row.p50:.1f}",
                f"{row.p99:.1f}",
                f"{row.deliveries:,.0f}",
                ", ".join(f"{who} {ms:.2f}" for who, ms in row.cpu.items()),
                f"{sum(row.cpu.values()) * row.rate / 1000:.2f}",
                f"{row.http_rate:,.0f}" if row.http_rate else "",
                f"{row.http_rate / base.http_rate:.2f}x" if base.http_rate else "",
            ]
        )
    return out


def markdown(
    rows: list[Row], args: argparse.Namespace, command: str, load: tuple[float, ...]
) -> str:
    m = machine()
    return "\n".join(
        [
            f"- Date: {today()}",
            *machine_lines(),
            f"- Load average when the run started: {' '.join(f'{x:.2f}' for x in load)}",
            f"- Command: `{command}`",
            f"- Workload: {args.clients} WebSockets at once in rooms of {args.room_size}, "
            f"each sending {args.messages} chat messages one after the other (waiting for its "
            f"own to come back through the room's group); {args.clients} keep-alive HTTP "
            f"clients doing {args.requests} GETs of `/chat/` each. Every server is its own "
            "process and runs for the whole benchmark; the rows are measured in turn, "
            f"{args.rounds} times, and each figure is the median (latencies: over every round "
            "trip of every round). The clients run in the benchmark's process.",
            "",
            markdown_table(HEADER, table_rows(rows)),
            "",
            "How to read it: every row runs the same unchanged Channels application "
            "(`examples/example/asgi.py`: the tutorial's `ChatConsumer` behind "
            "`AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(…)))`, Django's views) on "
            "the same Redis server and layer (`core.streams`): each chat message is a "
            "`group_send` through Redis in every row. Daphne and uvicorn run the application in "
            "their own process. The bridge rows are `gateway-http-ws` (uvicorn) → Redis → "
            "`manage.py runworker rooms` hosting the application, and back through the socket's "
            "reply channel: two more layer hops per message, and the work split over processes "
            "(each bridge on a Redis database of its own). ratio = the row ÷ Daphne. *CPU "
            "ms/msg*: CPU time of each server-side process during the chat runs ÷ messages sent "
            "(warm-up included); *CPUs busy*: their sum times msgs/s, the server side's share of "
            f"the machine. The machine has {m['nproc']} CPU(s), shared by the clients (about "
            "0.08 ms of CPU per message), the servers and redis-server: an in-process row is "
            "limited by its one process reaching one CPU, a bridge row by the whole machine "
            "(gateway, workers, Redis and the clients together), so on a machine this small a "
            "second worker spreads the work without adding throughput; with CPUs to spare "
            "each bridge process runs at a fraction of one.",
            "",
            "Where the time goes: per message the bridge adds one layer send and one fetch each "
            "way (client → the worker's host channel, worker → the socket's reply channel), and "
            "spreads the rest over processes. What it saves: its workers skip channels' "
            "per-message `aclose_old_connections` thread hop while no database connection is open"
            " (`core/dbclose.py`; Daphne and uvicorn pay that hop twice per chat message, for "
            "`receive` and `chat_message`). In every row `group_send` rides in the layer's "
            "batched write script (one `EVALSHA` per round trip) and a fetch wakes only the "
            "receives it has entries for. Beyond speed the bridge buys sockets that outlive a "
            "worker's restart and workers that scale out.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.http_ws", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--room-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="each row measured this often")
    parser.add_argument("--requests", type=int, default=50, help="0: no HTTP rows")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args(argv)
    command = command_line("bench.http_ws")
    load = os.getloadavg()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-http-ws-") as tmp:
        rows = asyncio.run(run(args, Path(tmp)))
    print()
    print(text_table(HEADER, table_rows(rows)))
    print(f"\n{time.monotonic() - started:.0f} s; {command}")
    if not args.no_write:
        update_section(SECTION, markdown(rows, args, command, load))
        print(f"updated the '## {SECTION}' section of BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
