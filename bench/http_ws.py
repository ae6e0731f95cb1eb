"""HTTP/WebSocket: one unchanged Channels application (the tutorial's chat, examples/rooms) served
by Daphne, by uvicorn, and through the bridge (gateway-http-ws → Redis → ``runworker rooms``) with
one and with two workers, all in the same run, every row on the same Redis layer.

Chat rows: ``--clients`` WebSockets at once, in rooms of ``--room-size``; each client sends
``--messages`` chat messages one after the other and waits until its own message comes back
through the room's group (``group_send`` through Redis, then ``chat_message`` → ``self.send``).
msgs/s = messages sent ÷ wall time; p50/p99 are those round trips; deliveries/s counts every
copy the room members got. HTTP rows: ``--clients`` keep-alive clients doing ``--requests`` GETs
of ``/chat/`` (a Django view) each. Ratios are each row's figure ÷ Daphne's.

    python -m bench.http_ws [--clients 50] [--messages 100] [--room-size 1] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

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
from core.testing import DjangoWorker, RedisServer, Server, example_project, free_port

SECTION = "HTTP/WebSocket"
HEADER = [
    "server",
    "msgs/s",
    "ratio",
    "p50 ms",
    "p99 ms",
    "deliveries/s",
    "CPU ms/msg",
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
    #: CPU ms per chat message of each server-side process (name → ms), chat run only
    cpu: dict[str, float]


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


async def measure(name: str, port: int, args: argparse.Namespace, pids: dict[str, int]) -> Row:
    before = {who: cpu_seconds(pid) for who, pid in pids.items()}
    rate, deliveries, rtts = await chat_load(
        f"ws://127.0.0.1:{port}", args.clients, args.messages, args.room_size
    )
    sent = args.clients * (args.messages + 1)
    cpu = {who: (cpu_seconds(pid) - before[who]) * 1000 / sent for who, pid in pids.items()}
    http_rate = (
        await http_load(f"http://127.0.0.1:{port}", args.clients, args.requests)
        if args.requests
        else 0.0
    )
    p50, p99 = percentile(rtts, 50) * 1000, percentile(rtts, 99) * 1000
    row = Row(name, rate, deliveries, p50, p99, http_rate, cpu)
    print(f"{name}: {rate:,.0f} msgs/s (p50 {p50:.1f} ms), {http_rate:,.0f} req/s", flush=True)
    return row


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
    rows = []
    with RedisServer() as redis:
        assert redis.pid is not None
        port = free_port()
        env = {"WEB_PORT": str(port), "GATEWAYS_LOG_LEVEL": "WARNING"}
        project = await asyncio.to_thread(example_project, tmp, redis.url, env=env)
        penv = {**os.environ, "PYTHONUNBUFFERED": "1", **project.env}
        app = "example.asgi:application"
        examples = Path(penv["PYTHONPATH"])
        servers = {
            "Daphne, in-process": [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p"],
            "uvicorn, in-process": [
                sys.executable, "-m", "uvicorn", "--ws", "websockets-sansio", "--log-level",
                "warning", "--no-access-log", "--lifespan", "off", "--port",
            ],
        }  # fmt: skip
        for name, argv in servers.items():
            port = free_port()
            server = Server([*argv, str(port), app], None, cwd=examples, env=penv, name=name)
            try:
                await wait_http(port)
                pids = {"server": server.pid, "redis-server": redis.pid}
                rows.append(await measure(name, port, args, pids))
            finally:
                server.stop()
        gateway = project.gateway("web.yaml", env={"GATEWAYS_LOG_LEVEL": "INFO"})
        await asyncio.to_thread(gateway.start)
        workers: list[DjangoWorker] = []
        bridge = int(project.env["WEB_PORT"])
        try:
            for count in (1, 2):
                worker = DjangoWorker(examples, ["rooms"], {**penv, "GATEWAYS_LOG_LEVEL": "INFO"})
                workers.append(worker.start())
                await asyncio.to_thread(worker.wait_for, "Running worker for channels", 60)
                await asyncio.sleep(1)  # its listener is up: connects spread over every worker
                await wait_http(bridge)
                pids = {"gateway": gateway.pid or 0}
                for number, each in enumerate(workers, 1):
                    pids[f"worker {number}"] = each.pid or 0
                pids["redis-server"] = redis.pid
                name = f"bridge, {count} worker{'s' if count > 1 else ''}"
                rows.append(await measure(name, bridge, args, pids))
        finally:
            for worker in workers:
                worker.stop()
            await asyncio.to_thread(gateway.stop)
    return rows


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
            "process; the clients run in the benchmark's process.",
            "",
            markdown_table(HEADER, table_rows(rows)),
            "",
            "How to read it: every row runs the same unchanged Channels application "
            "(`examples/example/asgi.py`: the tutorial's `ChatConsumer` behind "
            "`AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(…)))`, Django's views) on "
            "the same Redis layer (`core.streams`): each chat message is a `group_send` through "
            "Redis in every row. Daphne and uvicorn run it in their own process. The bridge rows "
            "are `gateway-http-ws` (uvicorn) → Redis → `manage.py runworker rooms` hosting the "
            "application, and back through the socket's reply channel: two more layer hops per "
            "message, and the work split over processes. ratio = the row ÷ Daphne. *CPU ms/msg*: "
            "CPU time of each server-side process during the chat run ÷ messages sent (warm-up "
            f"included). The machine has {m['nproc']} CPU(s), shared by the clients, the servers "
            "and redis-server.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.http_ws", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--room-size", type=int, default=1)
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
