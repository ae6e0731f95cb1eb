"""The fleet: several gateway and worker processes against one Redis, then a Redis Cluster.

    python -m bench.fleet [--count N] [--mails N] [--clients C] [--rounds R] [--layer URL]
                          [--cluster] [--quick] [--no-write]

How MQTT and email throughput grow when a deployment adds processes, every actor its own
process on this machine: a private ``mosquitto`` (as bench/mqtt_worker.py's burst rows:
``max_queued_messages 0``, ``set_tcp_nodelay true``) and ``redis-server`` on free ports (never
the system ones; ``--layer URL`` names another Redis instead, whose CPU is then not measured),
``gateway-mqtt`` / ``gateway-email`` processes (bench._common.GatewayProcess, default YAML plus
what each row names), and ``core.worker.ConsumerWorker`` processes (bench/mqtt_worker.py's
``_worker``: the plain ASGI consumer of bench/_mqtt_worker_app.py that stamps each message).

Shapes (gateways + workers), each row once per round, rounds interleaved, medians reported:
1 + 1 (one process each, the base), 1 + 2, 2 + 2, 2 + 4.

MQTT
    A burst of ``--count`` 200-byte QoS 1 messages (bench/mqtt_worker.py's publisher) waits at
    the broker in the gateways' persistent sessions before anything drains it; then the workers
    start, then the gateways, which drain the sessions into one channel that every worker of
    the row serves. One gateway subscribes to the topic; two gateways are replicas (same
    integration name, own client ids) on the shared subscription ``$share/fleet/<topic>``,
    which mosquitto splits between their sessions round-robin, also while they are offline.
    msgs/s = (distinct handled - 1) ÷ (first → last handled, across the workers), as in
    bench/mqtt_worker.py. Every row has its own topic and channel, so nothing of another row or
    round can reach it.
email
    ``--clients`` SMTP connections in two client processes (bench/email.py's ``_client``,
    half the connections each, distinct Message-IDs) send ``--mails`` measured mails after
    10 warm-up mails per connection; with one gateway both processes talk to it, with two each
    talks to its own (``gateway-email`` replicas on two ports, same integration name, one
    channel). Each gateway has ``email.parser.processes: 1`` (so a gateway is two processes:
    the event loop and one parser) and ``verify: "off"`` (as bench/email.py's process rows).
    A mail is answered 250 only once the layer took it. msgs/s = measured mails ÷ (the clients'
    start → the last measured mail handled), as in bench/email.py.

lost = acknowledged (PUBACKed by the broker / answered 250, warm-up mails included) but never
handled by a worker; dup = handled more than once. CPU ms/msg per process kind: the CPU time of
all processes of that kind (gateways with their parser processes; workers; redis-server, all
six nodes for the cluster; mosquitto, or the SMTP client processes) over a window ÷ the
messages handled. The window starts for MQTT once every gateway is up (the broker is stopped
with SIGSTOP while the gateways start and let go once each serves /healthz, so a second
gateway's start-up does not overlap the first one's draining), for email at the first mail a
worker handled; it ends at the last message a worker handled (workers: their own first to
last message; clients: their measured mails). *all* is their sum, so the machine's CPUs ÷
*all* bounds msgs/s (*CPU bound*); *CPUs busy* is the CPU seconds of all of them ÷ the
window's wall seconds; the analysis lines give each kind's busiest process as a share of one
CPU. ÷ 1+1 is msgs/s ÷ the 1 + 1 row of the same protocol and layer in the same round, median
over rounds.

Redis Cluster rows (``--cluster``) run the same shapes against six local cluster nodes (three
masters with a replica each, bench/_cluster.py) through the ``redis+cluster://`` layer path;
a layer that does not accept that path skips them with a printed line, as does a run without
``--cluster``. ``--quick`` (one round, small counts: 70-80 s here on a loaded machine, 170 s
with ``--cluster``) never writes BENCHMARKS.md; a full run (about 6 minutes without
``--cluster``) replaces its ``## Fleet`` section.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:
    sys.exit("run this benchmark as a module from the repository root: python -m bench.fleet")

import argparse
import asyncio
import contextlib
import math
import os
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._common import (
    GatewayProcess,
    command_line,
    load_average,
    machine,
    machine_lines,
    markdown_table,
    text_table,
    today,
    update_section,
    wait_http_ok,
)
from bench.email import WARMUP_PER_CLIENT, _children, _run_clients
from bench.mqtt_worker import (
    STALL,
    Bench,
    Result,
    Sample,
    Worker,
    log_findings,
    tally,
    versions,
    watch,
)
from core.testing import free_port

SECTION = "Fleet"
MODULE = "bench.fleet"
#: (gateway processes, worker processes) of the rows, the first the base of the ratios
SHAPES = ((1, 1), (1, 2), (2, 2), (2, 4))
CLUSTER_PROBE = "redis+cluster://127.0.0.1:7000/"


@dataclass
class Target:
    """A layer under test: its label, its layer path and the PIDs of its Redis processes."""

    label: str
    url: str
    pids: list[int]


@dataclass
class Run:
    """One round of one row."""

    sent: int
    handled: int = 0
    distinct: int = 0
    rate: float = math.nan
    #: CPU seconds per message by process kind (gateway, worker, redis, broker / clients)
    cpu: dict[str, float] = field(default_factory=dict)
    #: CPU seconds of every process on the path ÷ wall seconds, gateways up → last handled
    busy: float = math.nan
    #: per process kind, the busiest one's CPU seconds ÷ wall seconds (workers: their mean)
    share: dict[str, float] = field(default_factory=dict)
    #: per process kind, the longest time one of them waited for a CPU ÷ wall seconds
    wait: dict[str, float] = field(default_factory=dict)
    workers: int = 0
    #: inbound events each gateway handed to the layer (its gateway_events_total)
    split: list[int] = field(default_factory=list)
    error: str = ""

    @property
    def lost(self) -> int:
        return self.sent - self.distinct

    @property
    def duplicates(self) -> int:
        return self.handled - self.distinct


@dataclass
class Row:
    protocol: str  # MQTT | email
    target: Target
    gateways: int
    workers: int
    runs: list[Run] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.gateways, self.workers)

    @property
    def rates(self) -> list[float]:
        return [r.rate for r in self.runs if not math.isnan(r.rate)]

    @property
    def rate(self) -> float:
        return statistics.median(self.rates) if self.rates else math.nan

    @property
    def busy(self) -> float:
        values = [r.busy for r in self.runs if not math.isnan(r.busy)]
        return statistics.median(values) if values else math.nan

    def share(self, kind: str) -> float:
        values = [r.share[kind] for r in self.runs if kind in r.share]
        return statistics.median(values) if values else math.nan

    def wait(self, kind: str) -> float:
        values = [r.wait[kind] for r in self.runs if kind in r.wait]
        return statistics.median(values) if values else math.nan

    def cpu(self, kind: str) -> float:
        values = [r.cpu[kind] for r in self.runs if not math.isnan(r.cpu.get(kind, math.nan))]
        return statistics.median(values) if values else math.nan


def run_queue_wait(pid: int) -> float:
    """Seconds the threads of ``pid`` spent runnable but waiting for a CPU (Linux schedstat:
    ``on-CPU ns, waiting ns, timeslices`` per thread)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((task / "schedstat").read_text().split()[1])
    return total / 1e9


class TimedSample(Sample):
    """A :class:`Sample` that also notes when its first and last readings were taken, and how
    long each process (``pids`` and the ``workers``) waited for a CPU in between."""

    def __init__(self) -> None:
        super().__init__({})
        self.started = self.ended = math.nan
        self.workers: dict[str, int] = {}
        self.waits: tuple[dict[str, float], dict[str, float]] = ({}, {})

    def take(self) -> None:
        super().take()
        self.ended = time.monotonic()
        waits = {}
        for name, pid in (self.pids | self.workers).items():
            with contextlib.suppress(OSError):
                waits[name] = run_queue_wait(pid)
        if math.isnan(self.started):
            self.started = self.ended
            self.waits = (waits, waits)
        self.waits = (self.waits[0], waits)

    def waited(self) -> dict[str, float]:
        """Per process, the seconds it waited for a CPU ÷ the wall seconds."""
        wall = self.ended - self.started
        first, last = self.waits
        if not wall > 0:
            return {}
        return {n: (last[n] - first[n]) / wall for n in first if n in last}

    def busy(self, extra: float) -> float:
        """CPU seconds of the sampled processes, plus ``extra``, ÷ the wall seconds between
        the first and the last reading: how many CPUs the path kept busy."""
        wall = self.ended - self.started
        if not wall > 0:
            return math.nan
        spent = sum(self.last[n] - self.first[n] for n in self.first if n in self.last)
        return (spent + extra) / wall

    def each(self) -> dict[str, float]:
        """Per sampled process, its CPU seconds ÷ the wall seconds: its share of one CPU."""
        wall = self.ended - self.started
        if not wall > 0:
            return {}
        return {n: (self.last[n] - self.first[n]) / wall for n in self.first if n in self.last}


def kind_cpu(sample: Sample, kind: str, messages: int) -> float:
    """CPU seconds per message of every sampled process named ``<kind> …``."""
    names = [n for n in sample.first if n.split()[0] == kind and n in sample.last]
    if not names or messages < 2:
        return math.nan
    return sum(sample.last[n] - sample.first[n] for n in names) / messages


class Fleet:
    """The broker, the names and logs of one run (through bench/mqtt_worker.py's Bench)."""

    def __init__(self, args: argparse.Namespace, tmp: Path, broker: Any) -> None:
        self.args, self.tmp, self.broker = args, tmp, broker
        self.bench = Bench(args, tmp, None, broker)

    async def mqtt(self, target: Target, gateways: int, workers: int, tag: str) -> Run:
        bench, count = self.bench, self.args.count
        port = self.broker.port
        topic = f"bench/fleet/{tag}"
        subscription = topic if gateways == 1 else f"$share/fleet/{topic}"
        channel = f"bench-fleet-{tag}"
        # connect_timeout: the gateways wait for the CONNACK of a stopped broker (below)
        fleet = [
            bench.gateway(port, target.url, channel, subscription, connect_timeout=STALL * 4)
            for _ in range(gateways)
        ]
        result = Result(count)
        procs = [
            Worker(target.url, channel, self.tmp, bench.name("worker"), "asgi")
            for _ in range(workers)
        ]
        bench.logs += [w.log for w in procs]
        sample = TimedSample()
        records: list[tuple[str, float, int]] = []
        worker_cpu = 0.0
        split: list[int] = []
        try:
            # one start makes each persistent session and its subscription; the burst waits
            # there
            await asyncio.gather(*(g.start() for g in fleet))
            try:
                await asyncio.gather(*(g.ready() for g in fleet))
            finally:
                await asyncio.gather(*(g.stop() for g in fleet))
            await bench.publish(port, topic, tag, count)
            await asyncio.gather(*(w.start() for w in procs))
            sample.workers = {f"worker {i}": w.proc.pid for i, w in enumerate(procs) if w.proc}
            # A second gateway still starting (a second of CPU for its imports) while the
            # first drains would slow the first: the broker is stopped until every gateway
            # serves /healthz, so they all get their CONNACK, and their share, at once.
            os.kill(self.broker.pid, signal.SIGSTOP)
            try:
                await asyncio.gather(*(g.start() for g in fleet))
                await asyncio.gather(
                    *(wait_http_ok(f"http://127.0.0.1:{g.health}/healthz") for g in fleet)
                )
                sample.pids = {f"gateway {i}": g.pid for i, g in enumerate(fleet)}
                sample.pids |= {f"redis {pid}": pid for pid in target.pids}
                sample.pids["broker"] = self.broker.pid
                sample.take()
            finally:
                os.kill(self.broker.pid, signal.SIGCONT)
            await watch(procs, count, sample, STALL)
            split = await events(fleet)
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        finally:
            error, records, worker_cpu = await self._stop(fleet, procs)
            result.error = result.error or error
        tally(result, tag, records)
        run = Run(count, result.handled, result.distinct, result.rate, error=result.error)
        run.split, run.workers = split, workers
        if result.stale:
            run.error = run.error or f"{result.stale} message(s) of another row handled"
        self._cpu(run, sample, worker_cpu, "broker")
        return run

    async def email(self, target: Target, gateways: int, workers: int, tag: str) -> Run:
        a, bench = self.args, self.bench
        channel = f"bench-fleet-{tag}"
        fleet: list[GatewayProcess] = []
        ports: list[int] = []
        for _ in range(gateways):
            port = free_port()
            config = {
                "gateway": "email",
                "name": channel,
                "layer": target.url,
                "email": {
                    "host": "127.0.0.1",
                    "port": port,
                    "hostname": "bench.local",
                    "accept": ["example.com"],
                    "verify": "off",
                    "parser": {"processes": 1},
                },
            }
            fleet.append(GatewayProcess("email", config, self.tmp, bench.name(channel)))
            ports.append(port)
        bench.logs += [g.log for g in fleet]
        procs = [
            Worker(target.url, channel, self.tmp, bench.name("worker"), "asgi")
            for _ in range(workers)
        ]
        bench.logs += [w.log for w in procs]
        half = a.clients // 2
        per_client = a.mails // a.clients
        run = Run(2 * half * (per_client + WARMUP_PER_CLIENT), workers=workers)
        sample = TimedSample()
        records: list[tuple[str, float, int]] = []
        data: list[dict[str, Any]] = []
        worker_cpu = 0.0
        clients: asyncio.Future[list[dict[str, Any]]] | None = None
        try:
            await asyncio.gather(*(w.start() for w in procs))
            sample.workers = {f"worker {i}": w.proc.pid for i, w in enumerate(procs) if w.proc}
            await asyncio.gather(*(g.start() for g in fleet))
            await asyncio.gather(*(g.ready() for g in fleet))
            for i, g in enumerate(fleet):
                sample.pids[f"gateway {i}"] = g.pid
                sample.pids |= {f"gateway {i} parser {p}": p for p in _children(g.pid)}
            sample.pids |= {f"redis {pid}": pid for pid in target.pids}
            # the first reading comes with the first mail handled (watch): the client
            # processes' own start-up is no part of the path
            clients = asyncio.gather(
                *(
                    _run_clients(ports[i % gateways], half, per_client, self.tmp, tag=f"{tag}c{i}.")
                    for i in range(2)
                )
            )
            await watch(procs, run.sent, sample, STALL, clients.done)
            data = await clients
            run.split = await events(fleet)
        except Exception as exc:
            run.error = f"{type(exc).__name__}: {exc}"
        finally:
            if clients is not None and not clients.done():
                clients.cancel()
                await asyncio.gather(clients, return_exceptions=True)
            error, records, worker_cpu = await self._stop(fleet, procs)
            run.error = run.error or error
        self._tally_mail(run, records, data)
        self._cpu(run, sample, worker_cpu, "clients")
        if data:
            spent = sum(float(d["cpu"]) * len(d["records"]) for d in data)
            run.cpu["clients"] = spent / max(1, sum(len(d["records"]) for d in data))
            run.busy = sample.busy(worker_cpu + spent)
        return run

    @staticmethod
    def _tally_mail(
        run: Run, records: list[tuple[str, float, int]], data: list[dict[str, Any]]
    ) -> None:
        """Lost / dup over every mail (warm-up too); the rate over the measured ones."""
        first: dict[str, float] = {}
        for message_id, stamp, _ in records:
            run.handled += 1
            key = message_id.strip("<>")
            first[key] = min(stamp, first.get(key, stamp))
        run.distinct = len(first)
        measured = [s for k, s in first.items() if k.startswith("bench-")]
        if data and measured:
            start = min(float(d["start"]) for d in data)
            if max(measured) > start:
                run.rate = len(measured) / (max(measured) - start)
        acknowledged = sum(len(d["records"]) + int(d["warmup"]) for d in data)
        if data and acknowledged != run.sent:
            run.error = run.error or f"{acknowledged} of {run.sent} mails answered 250"

    @staticmethod
    def _cpu(run: Run, sample: TimedSample, worker_cpu: float, other: str) -> None:
        run.busy = sample.busy(worker_cpu)
        # the busiest process of each kind, as a share of one CPU: a process near 1.0 is the
        # limit of its kind (one event loop, one CPU)
        for name, share in sample.each().items():
            kind = "parser" if "parser" in name else name.split()[0]
            run.share[kind] = max(share, run.share.get(kind, 0.0))
        wall = sample.ended - sample.started
        if wall > 0 and run.workers:
            run.share["worker"] = worker_cpu / run.workers / wall
        for name, share in sample.waited().items():
            kind = "parser" if "parser" in name else name.split()[0]
            run.wait[kind] = max(share, run.wait.get(kind, 0.0))
        for kind in ("gateway", "redis", "broker"):
            run.cpu[kind] = kind_cpu(sample, kind, run.distinct)
        run.cpu["worker"] = worker_cpu / run.distinct if run.distinct > 1 else math.nan
        if other != "broker":
            run.cpu.pop("broker")

    @staticmethod
    async def _stop(
        fleet: list[GatewayProcess], procs: list[Worker]
    ) -> tuple[str, list[tuple[str, float, int]], float]:
        """Stop the gateways, then the workers (which drain); the first error, what the
        workers handled, and their CPU seconds from their first to their last message."""
        error = ""
        for gateway in fleet:
            try:
                code = await gateway.stop()
                if code != 0:
                    error = error or f"a gateway exited with {code}; see {gateway.log}"
            except Exception as exc:
                error = error or f"{type(exc).__name__}: {exc}"
        records: list[tuple[str, float, int]] = []
        cpu = 0.0
        for worker in procs:
            if worker.proc is None:
                continue
            try:
                done = await worker.stop()
            except Exception as exc:
                error = error or f"{type(exc).__name__}: {exc}"
                continue
            records += [(str(p), float(s), int(d)) for p, s, d in done["handled"]]
            cpu += done["cpu"][1] - done["cpu"][0]
        return error, records, cpu


async def events(fleet: list[GatewayProcess]) -> list[int]:
    """How many inbound events each gateway handed to the layer so far."""
    counts = await asyncio.gather(*(g.metrics() for g in fleet))
    return [int(c.get("gateway_events_total", 0)) for c in counts]


def cluster_refusal() -> str | None:
    """Why this checkout's layer cannot take a ``redis+cluster://`` path, or None when it can
    (the path is only parsed: nothing is connected)."""
    from core.layers import resolve_layer

    try:
        resolve_layer(CLUSTER_PROBE)
    except Exception as exc:
        return str(exc)
    return None


# -- the run ----------------------------------------------------------------------------------


def make_rows(targets: list[Target]) -> list[Row]:
    return [
        Row(protocol, target, gateways, workers)
        for target in targets
        for protocol in ("MQTT", "email")
        for gateways, workers in SHAPES
    ]


async def measure(fleet: Fleet, rows: list[Row], rounds: int) -> None:
    for round_ in range(1, rounds + 1):
        for row in rows:
            slug = "cluster" if "Cluster" in row.target.label else "redis"
            tag = f"{row.protocol.lower()}-{slug}-{row.gateways}g{row.workers}w-r{round_}"
            measure_one = fleet.mqtt if row.protocol == "MQTT" else fleet.email
            run = await measure_one(row.target, row.gateways, row.workers, tag)
            row.runs.append(run)
            print(f"  round {round_} {tag}: {describe(run)}", flush=True)


async def run(args: argparse.Namespace, tmp: Path) -> tuple[list[Row], list[str], list[str]]:
    """Every row ``args.rounds`` times; the rows, log findings and lines on skipped rows."""
    from core.testing import MosquittoServer, RedisServer

    skipped: list[str] = []
    lossless = ["max_queued_messages 0", "set_tcp_nodelay true"]
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(MosquittoServer(extra_config=lossless))
        if args.layer:
            targets = [Target(f"Redis at {args.layer}", args.layer, [])]
        else:
            redis = stack.enter_context(RedisServer())
            targets = [Target("one Redis", redis.url, [p for p in [redis.pid] if p])]
        fleet = Fleet(args, tmp, broker)
        rows = make_rows(targets)
        await measure(fleet, rows, args.rounds)
        if not args.cluster:
            skipped.append("Redis Cluster rows skipped: run with --cluster to add them.")
        elif (refusal := cluster_refusal()) is not None:
            skipped.append(
                "Redis Cluster rows skipped: this checkout's layer does not accept "
                f"redis+cluster:// ({refusal})."
            )
        else:
            from bench._cluster import LocalCluster

            cluster = stack.enter_context(LocalCluster())
            print(f"local Redis Cluster up: {cluster.url}", flush=True)
            cluster_rows = make_rows([Target("Redis Cluster (3+3)", cluster.url, cluster.pids)])
            await measure(fleet, cluster_rows, args.rounds)
            rows += cluster_rows
        for line in skipped:
            print(line, flush=True)
        notes = log_findings(fleet.bench.logs)
    return rows, notes, skipped


def describe(run: Run) -> str:
    text = f"{run.rate:,.0f} msg/s, lost {run.lost}/{run.sent}, dup {run.duplicates}"
    if len(run.split) > 1:
        text += f", events per gateway {'/'.join(str(n) for n in run.split)}"
    cpu = ", ".join(f"{k} {v * 1000:.3f}" for k, v in run.cpu.items() if not math.isnan(v))
    text += f", CPU ms/msg: {cpu}" if cpu else ""
    return text + (f"; ERROR {run.error}" if run.error else "")


# -- report -----------------------------------------------------------------------------------

HEADER = [
    "protocol",
    "layer",
    "gateways + workers",
    "split %",
    "rounds x msgs",
    "msgs/s median (range)",
    "÷ 1+1",
    "lost",
    "dup",
    "gateway CPU ms/msg",
    "worker CPU ms/msg",
    "Redis CPU ms/msg",
    "broker / clients CPU ms/msg",
    "all CPU ms/msg",
    "CPU bound msgs/s",
    "CPUs busy",
]


def base_of(rows: list[Row], row: Row) -> Row | None:
    return next(
        (
            r
            for r in rows
            if r.protocol == row.protocol and r.target is row.target and r.shape == SHAPES[0]
        ),
        None,
    )


def ratio(row: Row, base: Row) -> float:
    """Median over the rounds of the row's rate ÷ the base row's rate in the same round."""
    values = [
        a.rate / b.rate
        for a, b in zip(row.runs, base.runs, strict=True)
        if not (math.isnan(a.rate) or math.isnan(b.rate))
    ]
    return statistics.median(values) if values else math.nan


def all_cpu(row: Row) -> float:
    other = "broker" if row.protocol == "MQTT" else "clients"
    parts = [row.cpu(k) for k in ("gateway", "worker", "redis", other)]
    known = [p for p in parts if not math.isnan(p)]
    return sum(known) if known else math.nan


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value * 1000:.3f}"


def split_text(row: Row) -> str:
    """Each gateway's share of the inbound events, per round (``-`` for one gateway)."""
    if row.gateways < 2:
        return "-"
    shares = []
    for run in row.runs:
        total = sum(run.split)
        shares.append("/".join(f"{100 * n / total:.0f}" for n in run.split) if total else "?")
    return " ; ".join(shares)


def table_rows(rows: list[Row]) -> list[list[str]]:
    nproc = int(machine()["nproc"])
    out = []
    for row in rows:
        base = base_of(rows, row)
        share = ratio(row, base) if base is not None and base is not row else math.nan
        rates = row.rates
        rate = "-" if not rates else f"{statistics.median(rates):,.0f}"
        if len(rates) > 1:
            rate += f" ({min(rates):,.0f}-{max(rates):,.0f})"
        total = all_cpu(row)
        other = "broker" if row.protocol == "MQTT" else "clients"
        out.append(
            [
                row.protocol,
                row.target.label,
                f"{row.gateways} + {row.workers}",
                split_text(row),
                f"{len(row.runs)} x {row.runs[0].sent if row.runs else 0}",
                rate,
                "" if math.isnan(share) else f"{share:.2f}x",
                " / ".join(str(r.lost) for r in row.runs),
                " / ".join(str(r.duplicates) for r in row.runs),
                _ms(row.cpu("gateway")),
                _ms(row.cpu("worker")),
                _ms(row.cpu("redis")),
                _ms(row.cpu(other)),
                _ms(total),
                "-" if math.isnan(total) else f"{nproc / total:,.0f}",
                "-" if math.isnan(row.busy) else f"{row.busy:.2f}",
            ]
        )
    return out


def analysis(rows: list[Row], loads: tuple[str, str] | None = None) -> list[str]:
    """Per protocol and layer: the curve, where it stops growing, and the numbers that say
    why (each process's share of one CPU, the CPUs the path kept busy); then the load."""
    nproc = int(machine()["nproc"])
    names = {
        "gateway": "gateway event loop",
        "parser": "parser",
        "worker": "worker",
        "redis": "redis-server",
        "broker": "mosquitto",
    }
    lines = []
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.protocol, row.target.label), []).append(row)
    for (protocol, label), group in groups.items():
        base = group[0]
        if math.isnan(base.rate):
            continue
        steps = [f"{base.gateways}+{base.workers}: {base.rate:,.0f}/s"]
        steps += [
            f"{r.gateways}+{r.workers}: {r.rate:,.0f}/s ({ratio(r, base):.2f}x)" for r in group[1:]
        ]
        peak = max(group, key=lambda r: r.rate if not math.isnan(r.rate) else -1.0)
        text = f"- {protocol} on {label}: " + ", ".join(steps) + ". "
        later = group[group.index(peak) + 1 :]
        if later:
            text += (
                f"It stops growing at {peak.gateways}+{peak.workers} (the highest rate; "
                + ", ".join(f"{r.gateways}+{r.workers}" for r in later)
                + " lower again). "
            )
        else:
            text += f"Highest at the last row, {peak.gateways}+{peak.workers}. "
        shares = [
            f"{names[kind]} {base.share(kind):.2f} (+{base.wait(kind):.2f} waiting)"
            for kind in names
            if not math.isnan(base.share(kind)) and not math.isnan(base.wait(kind))
        ]
        if shares:
            text += (
                "At 1+1 each process's share of one CPU, on it and (+) runnable but waiting "
                "for one (schedstat), the busiest of each kind: "
                + ", ".join(shares)
                + "; on + waiting near 1.00 is a process that would use a whole CPU (one "
                "event loop's limit); a large waiting share is CPU taken by other processes. "
            )
        busy = [f"{r.gateways}+{r.workers} {r.busy:.2f}" for r in group]
        text += f"CPUs the whole path kept busy: {', '.join(busy)} (of {nproc}). "
        total = [all_cpu(r) * 1000 for r in group]
        if not any(math.isnan(t) for t in total):
            text += (
                f"CPU per message over all processes: {min(total):.3f}-{max(total):.3f} ms, so "
                f"{nproc} CPUs carry at most {nproc / (max(total) / 1000):,.0f}-"
                f"{nproc / (min(total) / 1000):,.0f} msgs/s: once the path has all the CPU it "
                "can get, more processes only share it."
            )
        lines.append(text.rstrip())
    if loads is not None:
        lines.append(
            f"- The machine was shared: 1, 5 and 15-minute load averages {loads[0]} when the run "
            f"started (before any of its processes), {loads[1]} when it ended, on {nproc} CPUs: "
            "other sessions' processes wanted CPU throughout, so this run had less than "
            f"{nproc} CPUs and the *CPU bound* column is a ceiling it could not reach."
        )
    return lines


def markdown(
    rows: list[Row],
    args: argparse.Namespace,
    command: str,
    loads: tuple[str, str],
    notes: list[str],
    skipped: list[str],
) -> str:
    nproc = machine()["nproc"]
    lines = [
        f"- Date: {today()}",
        *machine_lines(),
        *versions(),
        f"- Load average when the run started: {loads[0]}; when it ended: {loads[1]} (the "
        "machine is shared: other sessions' processes ran beside this one)",
        f"- Command: `{command}`",
        f"- Workload: {args.rounds} interleaved rounds; MQTT: a burst of {args.count:,} x "
        "200-byte QoS 1 messages queued at a private mosquitto before the gateways start; "
        f"email: {args.mails:,} measured mails (2.5 KB, bench/email.py's) over {args.clients} "
        f"SMTP connections in two client processes, after {WARMUP_PER_CLIENT} warm-up mails "
        "per connection. Gateways at their default YAML (email: `parser.processes: 1`, "
        "`verify: off`), workers `ConsumerWorker` with a plain ASGI consumer, the streams "
        "layer at its defaults.",
        "",
        markdown_table(HEADER, table_rows(rows)),
        "",
        *analysis(rows, loads),
        *[f"- {line}" for line in skipped],
        "",
        "How to read it (details in the docstring of `bench/fleet.py`): every actor is its own "
        "process. *gateways + workers*: `gateway-mqtt` / `gateway-email` replicas (two MQTT "
        "gateways split a shared subscription `$share/fleet/…`; two email gateways listen on two "
        "ports, the clients split between them) and `ConsumerWorker` processes on the one "
        "channel; *split %*: each gateway's share of the inbound events (its "
        "`gateway_events_total`), per round. MQTT msgs/s = (distinct handled - 1) ÷ "
        "(first → last handled); email msgs/s = "
        "measured mails ÷ (clients start → last handled). lost / dup per round, warm-up mails "
        "included. CPU ms/msg: CPU time of every process of that kind (a `gateway-email` with "
        "its parser process; redis-server; mosquitto or the SMTP client processes) from the "
        "moment every gateway is up (for MQTT the broker is held with SIGSTOP until then, so "
        "the gateways drain at once; for email from the first mail handled) to the last "
        "handled message ÷ messages; *all* is their "
        "sum and *CPU bound* = "
        f"{nproc} CPUs ÷ *all*: the rate this machine could reach with its CPUs to this path "
        "alone; *CPUs busy*: the CPU seconds of all those processes ÷ the wall seconds of "
        "that window (median over the rounds): how many CPUs the path kept busy. "
        "÷ 1+1: msgs/s ÷ the 1 + 1 row of the same protocol and layer, same round, "
        "median over rounds.",
    ]
    if notes:
        lines += [
            "",
            "WARNING/ERROR lines in the gateway and worker logs during the run (count x line, "
            "numbers replaced by N):",
            "",
            *[f"- {n}" for n in notes[:10]],
        ]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=10_000, help="MQTT messages per burst")
    parser.add_argument("--mails", type=int, default=1600, help="measured mails per email row")
    parser.add_argument("--clients", type=int, default=16, help="SMTP connections (even)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument(
        "--layer",
        default="",
        help="the one-Redis rows' layer path (default: a private redis-server on a free port)",
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="add the same rows on a local 6-node Redis Cluster (redis+cluster://)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 round, small counts, no write"
    )
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.count, args.mails, args.clients = 1, 2000, 400, 8
        args.no_write = True
    if args.clients < 2 or args.clients % 2 or args.mails < args.clients or args.rounds < 1:
        parser.error("--clients must be even and ≥ 2, --mails ≥ --clients, --rounds ≥ 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    command = command_line(MODULE)
    load = load_average()
    started = time.monotonic()
    print(f"load average {load}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        rows, notes, skipped = asyncio.run(run(args, Path(tmp)))
    loads = (load, load_average())
    print()
    print(text_table(HEADER, table_rows(rows)))
    print("\n".join(analysis(rows, loads) + skipped))
    if notes:
        print("log lines worth a look:\n" + "\n".join(f"  {n}" for n in notes[:30]))
    print(f"\nload average at the start {loads[0]}, at the end {loads[1]}")
    print(f"{time.monotonic() - started:.0f} s; {command}")
    if not args.no_write:
        update_section(SECTION, markdown(rows, args, command, loads, notes, skipped))
        print(f"updated the '## {SECTION}' section of BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
