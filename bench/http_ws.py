"""HTTP/WebSocket: the bridge (gateway-http-ws → Redis → runworker) beside Daphne and uvicorn
serving the same echo in-process, all in the same run.

WebSocket rows: ``--clients`` connections at once, each sending ``--messages`` text frames one
after the other and waiting for each echo (a round trip). msgs/s = all echoes ÷ wall time;
p50/p99 are the round trips. HTTP rows: ``--clients`` keep-alive httpx clients doing
``--requests`` GETs of ``/api/echo`` each; req/s = all responses ÷ wall time. Ratios are the
bridge's figure ÷ uvicorn in-process (the same server code without the layer hop).

    python -m bench.http_ws [--clients 16] [--messages 300] [--requests 200] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import websockets

from bench._common import (
    REPO_ROOT,
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

SECTION = "HTTP/WebSocket"
EXAMPLES = REPO_ROOT / "examples"
HEADER = [
    "server",
    "ws msgs/s",
    "ws p50 ms",
    "ws p99 ms",
    "ws ratio",
    "CPU ms/msg",
    "http req/s",
    "http ratio",
]
PAYLOAD = '{"text": "hello, this is a typical small chat message"}'


@dataclass
class Row:
    server: str
    ws_rate: float
    p50: float
    p99: float
    http_rate: float
    #: CPU ms per WebSocket message of each server-side process (name → ms), WebSocket run only
    cpu: dict[str, float]


async def ws_load(url: str, clients: int, messages: int) -> tuple[float, list[float]]:
    sockets = [await websockets.connect(url) for _ in range(clients)]
    for ws in sockets:  # warm-up: one round trip each
        await ws.send(PAYLOAD)
        await ws.recv()
    rtts: list[float] = []

    async def client(ws: websockets.ClientConnection) -> None:
        for _ in range(messages):
            t0 = time.perf_counter()
            await ws.send(PAYLOAD)
            await ws.recv()
            rtts.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(client(ws) for ws in sockets))
    elapsed = time.perf_counter() - start
    await asyncio.gather(*(ws.close() for ws in sockets))
    return clients * messages / elapsed, rtts


async def http_load(base: str, clients: int, requests: int) -> float:
    async def client(http: httpx.AsyncClient) -> None:
        for _ in range(requests):
            response = await http.get("/api/echo")
            assert response.status_code == 200, response.status_code

    pool = [httpx.AsyncClient(base_url=base, timeout=60) for _ in range(clients)]
    try:
        for http in pool:
            await http.get("/api/echo")  # warm-up and keep-alive connection
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for http in pool))
        return clients * requests / (time.perf_counter() - start)
    finally:
        await asyncio.gather(*(http.aclose() for http in pool))


async def measure(name: str, port: int, args: argparse.Namespace, pids: dict[str, int]) -> Row:
    before = {who: cpu_seconds(pid) for who, pid in pids.items()}
    rate, rtts = await ws_load(f"ws://127.0.0.1:{port}/echo", args.clients, args.messages)
    messages = args.clients * (args.messages + 1)
    cpu = {who: (cpu_seconds(pid) - before[who]) * 1000 / messages for who, pid in pids.items()}
    http_rate = await http_load(f"http://127.0.0.1:{port}", args.clients, args.requests)
    row = Row(name, rate, percentile(rtts, 50) * 1000, percentile(rtts, 99) * 1000, http_rate, cpu)
    print(f"{name}: {rate:,.0f} msgs/s, {http_rate:,.0f} req/s", flush=True)
    return row


async def wait_http(port: int) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        for _ in range(100):
            try:
                if (await http.get(f"http://127.0.0.1:{port}/api/echo")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"nothing answers on port {port}")


async def run(args: argparse.Namespace, tmp: Path) -> list[Row]:
    env = {**os.environ, "PYTHONPATH": f"{EXAMPLES}{os.pathsep}{REPO_ROOT}"}
    rows = []
    with RedisServer() as redis:
        port = free_port()
        bridge_env = {
            **env,
            "DJANGO_SETTINGS_MODULE": "example.settings",
            "EXAMPLE_LAYER": redis.url,
            "GATEWAYS_LAYER": redis.url,
            "EXAMPLE_DB": str(tmp / "db.sqlite3"),
            "WEB_PORT": str(port),
            "GATEWAYS_LOG_LEVEL": "WARNING",
        }
        worker = DjangoWorker(EXAMPLES, ["echo"], bridge_env).start()
        gateway = Server(
            ["gateway-http-ws", "--config", str(EXAMPLES / "web.yaml")],
            "ready: events",
            cwd=REPO_ROOT,
            env={**bridge_env, "GATEWAYS_LOG_LEVEL": "INFO"},
            name="gateway-http-ws",
        )
        try:
            await wait_http(port)
            assert worker.pid is not None
            pids = {"gateway": gateway.pid, "runworker": worker.pid, "redis-server": redis.pid or 0}
            name = "bridge: gateway-http-ws + Redis + runworker"
            rows.append(await measure(name, port, args, pids))
        finally:
            gateway.stop()
            worker.stop()
    app = "bench._http_ws_app:application"
    servers = {
        "Daphne, AsyncWebsocketConsumer in-process": lambda p: [
            sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(p), app,
        ],
        "uvicorn, AsyncWebsocketConsumer in-process": lambda p: [
            sys.executable, "-m", "uvicorn", "--port", str(p), "--ws", "websockets-sansio",
            "--log-level", "warning", "--no-access-log", "--lifespan", "off", app,
        ],
    }  # fmt: skip
    for name, argv in servers.items():
        port = free_port()
        server = Server(argv(port), None, cwd=REPO_ROOT, env=env, name=name.split(",")[0])
        try:
            await wait_http(port)
            rows.append(await measure(name, port, args, {"server": server.pid}))
        finally:
            server.stop()
    return rows


def table_rows(rows: list[Row]) -> list[list[str]]:
    base = next(r for r in rows if r.server.startswith("uvicorn"))
    out = []
    for row in rows:
        bridged = row.server.startswith("bridge")
        out.append(
            [
                row.server,
                f"{row.ws_rate:,.0f}",
                f"{row.p50:.2f}",
                f"{row.p99:.2f}",
                f"{row.ws_rate / base.ws_rate:.0%}" if bridged else "",
                ", ".join(f"{who} {ms:.2f}" for who, ms in row.cpu.items()),
                f"{row.http_rate:,.0f}",
                f"{row.http_rate / base.http_rate:.0%}" if bridged else "",
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
            f"- Workload: {args.clients} WebSockets at once, {args.messages} round trips each "
            f"of a {len(PAYLOAD)}-byte text frame; {args.clients} keep-alive HTTP clients, "
            f"{args.requests} GETs of `/api/echo` each (a JSON echo of the request). Every "
            "server is its own process; the clients run in the benchmark's process.",
            "",
            markdown_table(HEADER, table_rows(rows)),
            "",
            "How to read it: the bridge row is `gateway-http-ws` (uvicorn, websockets-sansio) "
            "→ Redis → `manage.py runworker echo` running the example's `EchoConsumer` and back "
            "through the per-connection reply channel: two layer hops per message. The other "
            "rows serve a Channels `AsyncWebsocketConsumer` and `AsyncHttpConsumer` "
            "(bench/_http_ws_app.py) in the server's own process, no layer. ratio = bridge ÷ "
            "uvicorn in-process. *CPU ms/msg*: CPU time of each server-side process during the "
            "WebSocket run ÷ messages (warm-up included). "
            f"The machine has {m['nproc']} CPU(s), shared by the clients, "
            "the server and (bridge row) the worker and redis-server.",
            "",
            "Where the bridge's time goes (cProfile of `gateway-http-ws` under this echo load, "
            "2026-11-28): redis-py and channels_redis, not the bridge. Each echoed message costs "
            "the gateway about 8 Redis commands — `send` is ZREMRANGEBYSCORE + ZCOUNT + ZADD + "
            "EXPIRE, a `!`-channel receive is core's restore-backup EVAL + BZPOPMIN + the backup "
            "ZADD + its cleanup — and the worker as many again, each a round trip; the bridge's "
            "own functions are not among the top 18 by own time. The worker runs one consumer "
            "instance per channel, serially, so one `echo` channel caps the rate; more channels "
            "or workers scale it out.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.http_ws", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--requests", type=int, default=200)
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
