"""Side by side, in one run: each gateway beside the raw layer and its peer.

    python -m bench.side_by_side [--quick] [--stall SECONDS] [--no-write]

One process drives every measurement, one gateway after the other, so the machine's other load
falls on them within minutes of each other. Every layer is the streams layer (``redis://``) on
a private ``redis-server``; brokers and servers are private too, on free ports. Per gateway:

raw
    the streams layer alone: 16 tasks ``layer.send`` ``--raw`` events of the gateway's own
    event shape (its keys, a payload of the same size) to one channel, a plain
    ``layer.receive()`` loop in its own process takes them (bench/email.py's ``bench_raw``).
    msgs/s only.
gateway
    the real gateway process → streams → ``ConsumerWorker`` (what ``manage.py runworker``
    runs) serving a channels ``AsyncConsumer`` behind ``ChannelNameRouter`` with Django
    configured, the consumer a project writes. HTTP/WebSocket: the tutorial's ``ChatConsumer``
    (an ``AsyncWebsocketConsumer``) under ``runworker rooms``.
peer
    what a project would run instead, same traffic, same run: mqttasgi with its
    ``MqttConsumer`` (and the bare paho subscriber, the broker's ceiling); Daphne and uvicorn
    serving the same chat application in-process; bare aiosmtpd answering 250 at once; a bare
    ``irc``-library client joined to the same channel (no layer, no consumer).
stalled
    the gateway with nobody reading its channel for ``--stall`` seconds while traffic flows in
    (MQTT QoS 1 at 200 msgs/s, 8 SMTP clients retrying each 451, IRC lines at 200/s); its RSS
    sampled every 5 s (bench/stall.py); then a consumer drains the channel and counts what
    was lost. Not measured for HTTP/WebSocket: a socket without a worker is never accepted.

How each figure is taken (rates are messages ÷ first → last handled; latencies from a stamp
taken right before the message leaves its producer to the handler, processes sharing
CLOCK_MONOTONIC):

* MQTT (bench/mqtt_worker.py): rate = a QoS 1 burst queued at the broker, then drained;
  latency = the same subscribers live, the publisher paced at ``--paced`` msgs/s.
* HTTP/WebSocket (bench/http_ws.py): chat messages sent by ``--ws-clients`` WebSockets at once,
  each waiting for its own message back through the room's ``group_send``; latency = that
  round trip, under the load.
* email (bench/email.py): ``--clients`` SMTP clients at once; latency = DATA sent → the
  consumer's handler (for bare aiosmtpd: → its 250), under the load.
* IRC: a plain-socket IRC client writes a burst of PRIVMSG lines (rate), then lines paced at
  ``--paced`` a second (latency), into a channel the gateway or the bare client sits in.

``--quick`` (about two minutes) is a smoke run with small counts and a 5 s stall; it never
writes BENCHMARKS.md.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:
    sys.exit("run it as a module from the repository root: python -m bench.side_by_side")

import argparse
import asyncio
import contextlib
import json
import math
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import email as email_bench
from bench import http_ws as http_ws_bench
from bench import irc as irc_bench
from bench import mqtt_worker as mw
from bench import stall as stall_bench
from bench._common import (
    REPO_ROOT,
    command_line,
    load_average,
    machine,
    machine_lines,
    markdown_table,
    percentile,
    text_table,
    today,
    update_section,
)
from core.envelope import new_event

SECTION = "Side by side"
MODULE = "bench.side_by_side"
#: bytes of every MQTT payload and IRC line body (JSON with tag, sequence number and stamp)
PAYLOAD = 100
#: sender tasks of the raw rows (as bench/email.py's: the layer's rate with concurrent sends)
RAW_SENDERS = 16
#: MQTT messages a second and IRC lines a second while the stall runs
STALL_RATE = 200.0
#: SMTP clients retrying during the email stall
STALL_CLIENTS = 8


@dataclass
class Line:
    """One row of the table."""

    gateway: str
    kind: str  # raw | gateway | peer | ceiling
    what: str
    rate: float = math.nan
    p50: float = math.nan  # seconds
    p99: float = math.nan
    stalled: str = ""
    notes: list[str] = field(default_factory=list)
    error: str = ""


# -- event shapes for the raw rows -------------------------------------------------------------


def mqtt_event() -> dict[str, Any]:
    """An ``mqtt.message`` with the gateway's keys (gateways/mqtt/translate.py)."""
    return new_event(
        "mqtt.message", gateway="bench", reply_channel="bench.reply", topic="bench/raw",
        payload=mw.payload("raw", 0, 0.0, PAYLOAD), format="bytes", payload_error=None,
        qos=1, retain=False, dup=False, subscription="bench/raw", properties={},
    )  # fmt: skip


def irc_event() -> dict[str, Any]:
    """An ``irc.receive`` with the gateway's keys (bench/irc.py's raw row)."""
    text = mw.payload("raw", 0, 0.0, PAYLOAD).decode()
    return new_event(
        "irc.receive", gateway="bench", reply_channel="bench.reply", kind="message",
        nick="alice", user="~alice", host="127.0.0.1", target="#bench", text=text, plain=text,
        tags={}, private=False, self=False,
    )  # fmt: skip


def ws_event() -> dict[str, Any]:
    """A ``websocket.receive`` as the bridge forwards it (the chat's JSON text)."""
    text = json.dumps({"message": f"0 0 {http_ws_bench.TEXT}"})
    return new_event(
        "websocket.receive", gateway="bench", reply_channel="bench.reply", text=text,
        bytes=None, path="/ws/chat/bench0/", channel="web",
    )  # fmt: skip


async def raw_line(gateway: str, url: str, event: dict[str, Any], count: int, tmp: Path) -> Line:
    result = await email_bench.bench_raw("streams", url, event, count, RAW_SENDERS, tmp)
    what = f"raw streams layer, `{event['type']}` events, {RAW_SENDERS} senders"
    line = Line(gateway, "raw", what, result.rate)
    if result.count < count:
        line.error = f"only {result.count} of {count} received"
    return line


def from_mqtt(gateway: str, kind: str, what: str, burst: mw.Result, paced: mw.Result) -> Line:
    line = Line(gateway, kind, what, burst.rate)
    if paced.latencies:
        line.p50, line.p99 = percentile(paced.latencies, 50), percentile(paced.latencies, 99)
    for r, name in ((burst, "burst"), (paced, "paced")):
        if r.error or r.lost:
            line.error += f"{name}: lost {r.lost}/{r.sent} {r.error}".strip() + "; "
    return line


def stalled(row: stall_bench.Row) -> str:
    text = (
        f"RSS {row.rss_start:.1f} → max {row.rss_max:.1f} MB ({row.rss_max - row.rss_start:+.1f}); "
        f"{row.sent:,} in, {row.lost:,} lost"
    )
    return text + (f", {row.duplicates:,} dup" if row.duplicates else "")


# -- MQTT ----------------------------------------------------------------------------------------


async def bench_mqtt(a: argparse.Namespace, tmp: Path) -> list[Line]:
    from core.testing import MosquittoServer, RedisServer

    gw_name = "MQTT"
    lines: list[Line] = []
    lossless = ["max_queued_messages 0", "set_tcp_nodelay true"]
    with RedisServer() as redis, MosquittoServer(extra_config=lossless) as broker:
        bench = mw.Bench(a, tmp, redis, broker)
        port, url = broker.port, bench.url("streams")
        print("[MQTT] raw layer", flush=True)
        lines.append(await raw_line(gw_name, url, mqtt_event(), a.raw, tmp))
        # persistent sessions the bursts queue in
        await bench.paho_session(port, "sbs/paho", "sbs-paho")
        gateway = bench.gateway(port, url, "sbs-mqtt", "sbs/gw")
        await gateway.start()
        await gateway.ready()
        await gateway.stop()
        paced = int(a.paced * a.paced_seconds)
        print(f"[MQTT] gateway: burst {a.mqtt}, paced {paced}", flush=True)
        burst = await bench.through_worker(
            gateway, url, 1, "gw-b", a.mqtt, queued=True, port=port, topic="sbs/gw"
        )
        live = await bench.through_worker(
            gateway, url, 1, "gw-p", paced, queued=False, port=port, topic="sbs/gw", rate=a.paced
        )
        what = "`gateway-mqtt` → streams → ConsumerWorker, AsyncConsumer"
        lines.append(from_mqtt(gw_name, "gateway", what, burst, live))
        if mw.mqttasgi_available():
            count = min(a.mqtt, mw.MQTTASGI_BURST)
            print(f"[MQTT] mqttasgi: burst {count}, paced {paced}", flush=True)
            await bench.mqttasgi_session(port, "sbs/mqttasgi", "sbs-mqttasgi")
            burst = await bench.mqttasgi(
                port, "sbs/mqttasgi", "ma-b", count, queued=True, client_id="sbs-mqttasgi"
            )
            live = await bench.mqttasgi(
                port, "sbs/mqttasgi-live", "ma-p", paced, queued=False,
                client_id=bench.name("sbs-mqttasgi-live"), rate=a.paced,
            )  # fmt: skip
            what = f"mqttasgi, its `MqttConsumer` (burst of {count})"
            lines.append(from_mqtt(gw_name, "peer", what, burst, live))
        else:
            lines.append(Line(gw_name, "peer", "mqttasgi", error="not installed (a test extra)"))
        print(f"[MQTT] bare paho: burst {a.mqtt}, paced {paced}", flush=True)
        burst = await bench.paho(
            port, "sbs/paho", "pa-b", a.mqtt, queued=True, client_id="sbs-paho"
        )
        live = await bench.paho(
            port, "sbs/paho-live", "pa-p", paced, queued=False, client_id="", rate=a.paced
        )
        what = "bare paho subscriber, no layer (the broker's ceiling)"
        lines.append(from_mqtt(gw_name, "ceiling", what, burst, live))
        # the gateway's and the workers' logs (mqttasgi warns on every SIGTERM)
        findings = mw.log_findings([p for p in bench.logs if "mqttasgi" not in p.name])
    if findings:
        lines[1].notes += findings[:3]
    print(f"[MQTT] stalled consumer, {a.stall:g} s", flush=True)
    try:
        row = await stall_bench.bench_mqtt(1, a.stall / 60, STALL_RATE, tmp)
        lines[1].stalled = f"QoS 1 at {STALL_RATE:g}/s: " + stalled(row)
    except Exception as exc:  # a failed part is reported, the rest of the run goes on
        lines[1].stalled = f"failed: {type(exc).__name__}: {exc}"
    return lines


# -- HTTP/WebSocket ----------------------------------------------------------------------------


async def bench_ws(a: argparse.Namespace, tmp: Path) -> list[Line]:
    from core.testing import RedisServer

    gw_name = "HTTP / WebSocket"
    lines: list[Line] = []
    with RedisServer() as redis:
        print("[WS] raw layer", flush=True)
        lines.append(await raw_line(gw_name, redis.url, ws_event(), a.raw, tmp))
    print(f"[WS] Daphne, uvicorn, bridge: {a.ws_clients} sockets x {a.ws_messages}", flush=True)
    args = argparse.Namespace(
        clients=a.ws_clients, messages=a.ws_messages, room_size=1, rounds=1, requests=0
    )
    (tmp / "http_ws").mkdir()
    rows = await http_ws_bench.run(args, tmp / "http_ws")
    for row in rows:
        if row.server.startswith("bridge"):
            kind = "gateway" if row.server.endswith(", 1 worker") else "gateway x2"
            what = f"`gateway-http-ws` → streams → `runworker` ({row.server[8:]}), ChatConsumer"
        else:
            kind, what = "peer", f"{row.server.split(',')[0]}, the same ChatConsumer in-process"
        lines.append(Line(gw_name, kind, what, row.rate, row.p50 / 1000, row.p99 / 1000))
    for line in lines:
        if line.kind == "gateway":
            line.stalled = "- (not measured: a socket is accepted only by a worker)"
    return lines


# -- email ---------------------------------------------------------------------------------------


async def bench_email(a: argparse.Namespace, tmp: Path) -> list[Line]:
    from core.testing import RedisServer

    gw_name = "email"
    lines: list[Line] = []
    raw_mail = email_bench.sample_mail()
    print(f"[email] bare aiosmtpd, {a.mails} mails", flush=True)
    bare = await email_bench.bench_aiosmtpd(a.mails, a.clients, tmp)
    with RedisServer() as redis:
        print("[email] raw layer", flush=True)
        event = email_bench.sample_event(raw_mail, "bench-raw")
        lines.append(await raw_line(gw_name, redis.url, event, a.raw, tmp))
        print(f"[email] gateway-email → ConsumerWorker, {a.mails} mails", flush=True)
        result = await email_bench.bench_gateway_subprocess(
            "streams", redis.url, a.mails, a.clients, tmp, 2, redis.pid, app="channels"
        )
    what = "`gateway-email` (2 parser processes) → streams → ConsumerWorker, AsyncConsumer"
    gateway = Line(gw_name, "gateway", what, result.rate)
    gateway.p50, gateway.p99 = percentile(result.latencies, 50), percentile(result.latencies, 99)
    if result.count < a.mails:
        gateway.error = f"{result.count} of {a.mails} mails handled"
    gateway.notes = [n for n in result.notes if "WARNING" in n or "ERROR" in n][:3]
    lines.append(gateway)
    peer = Line(gw_name, "peer", "bare aiosmtpd, 250 at once (no parsing, no layer)", bare.rate)
    peer.p50, peer.p99 = percentile(bare.latencies, 50), percentile(bare.latencies, 99)
    lines.append(peer)
    print(f"[email] stalled consumer, {a.stall:g} s", flush=True)
    try:
        row = await stall_bench.bench_email(a.stall / 60, STALL_CLIENTS, tmp)
        gateway.stalled = f"{STALL_CLIENTS} clients retrying 451: " + stalled(row)
    except Exception as exc:
        gateway.stalled = f"failed: {type(exc).__name__}: {exc}"
    return lines


# -- IRC -----------------------------------------------------------------------------------------


def _irc_client(port: int, channel: str, count: int, out: str, quiet: float) -> None:
    """The peer: a bare ``irc``-library client (its ``Reactor``) joined to ``channel``; notes
    each PRIVMSG's text and arrival; says ``ready`` once joined; ends at ``count`` lines or
    ``quiet`` seconds without one; writes [[text, stamp], …] to ``out``."""
    import irc.client

    reactor = irc.client.Reactor()
    received: list[tuple[str, float]] = []
    joined = threading.Event()

    def on_welcome(connection: Any, event: Any) -> None:
        connection.join(channel)

    def on_join(connection: Any, event: Any) -> None:
        if event.source.nick == connection.get_nickname():
            joined.set()

    def on_pubmsg(connection: Any, event: Any) -> None:
        received.append((event.arguments[0], time.monotonic()))

    reactor.add_global_handler("welcome", on_welcome)
    reactor.add_global_handler("join", on_join)
    reactor.add_global_handler("pubmsg", on_pubmsg)
    connection = reactor.server().connect("127.0.0.1", port, "sbsbare")
    deadline = time.monotonic() + 60
    while not joined.is_set():
        if time.monotonic() > deadline:
            raise SystemExit("the bare IRC client did not join within 60 s")
        reactor.process_once(0.1)
    print("ready", flush=True)
    last, seen = time.monotonic() + mw.TIMEOUT, 0
    while len(received) < count and time.monotonic() - last < quiet:
        reactor.process_once(0.05)
        if len(received) != seen:
            seen, last = len(received), time.monotonic()
    connection.disconnect("done")
    Path(out).write_text(json.dumps(received))


async def _write_lines(peer: irc_bench.Peer, tag: str, count: int, rate: float) -> None:
    """``count`` PRIVMSG lines carrying bench/mqtt_worker.py's JSON, paced at ``rate`` (0:
    flat out), each stamped right before it is written."""
    started = time.monotonic()
    for n in range(count):
        if rate:
            await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
        body = mw.payload(tag, n, time.monotonic(), PAYLOAD).decode()
        peer.writer.write(f"PRIVMSG #bench :{body}\r\n".encode())
        if rate or n % 100 == 99:
            await peer.writer.drain()
    await peer.writer.drain()


async def _irc_gateway(
    url: str, peer: irc_bench.Peer, tag: str, count: int, rate: float, tmp: Path, name: str
) -> mw.Result:
    """``count`` lines → gateway-irc (channel ``sbsirc``) → streams → one ConsumerWorker."""
    result = mw.Result(count)
    worker = mw.Worker(url, "sbsirc", tmp, name, "channels")
    records: list[tuple[str, float, int]] = []
    try:
        await worker.start()
        await _write_lines(peer, tag, count, rate)
        await mw.watch([worker], count, mw.Sample({}), mw.STALL)
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            records = [(str(t), float(s), int(d)) for t, s, d in (await worker.stop())["handled"]]
    mw.tally(result, tag, records)
    return result


async def _irc_bare(
    port: int, peer: irc_bench.Peer, tag: str, count: int, rate: float, tmp: Path, name: str
) -> mw.Result:
    result = mw.Result(count)
    out = tmp / f"{name}.json"
    with out.with_suffix(".log").open("ab") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", MODULE, "_irc_client", f"--port={port}", f"--count={count}",
            f"--out={out}", cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE, stderr=log,
        )  # fmt: skip
    try:
        await mw.expect_line(proc, "ready", 60)
        await _write_lines(peer, tag, count, rate)
        await mw.finish(proc, "the bare IRC client")
        mw.tally(result, tag, [(t, s, 1) for t, s in json.loads(out.read_text())])
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return result


async def _irc_stall(url: str, port: int, seconds: float, tmp: Path) -> stall_bench.Row:
    """gateway-irc with nobody reading its channel while lines come at :data:`STALL_RATE`."""
    gateway = irc_bench.gateway(tmp, url, port, "sbsstall", {"burst": 10, "rate": 100})
    try:
        assert gateway.pid is not None
        pid = gateway.pid
        await asyncio.sleep(0.5)  # joined #bench
        peer = await irc_bench.Peer.connect(port, "stallpeer", "#bench")
        rss_start = stall_bench.rss_mb(pid)
        samples: list[tuple[float, float]] = []
        count = int(seconds * STALL_RATE)
        writing = asyncio.create_task(_write_lines(peer, "st", count, STALL_RATE))
        await stall_bench.sample_rss(pid, seconds, samples)
        await writing
        samples.append((seconds, stall_bench.rss_mb(pid)))
        peer.writer.close()

        def key(message: Any) -> int | None:
            if message.get("type") != "irc.receive":
                return None
            return int(json.loads(message["text"])["n"])

        seen, deliveries, took = await stall_bench.drain(
            url, "sbsstall", lambda seen, _: len(seen) >= count, key
        )
        return stall_bench.Row(
            f"irc at {STALL_RATE:g}/s", seconds / 60, count, rss_start,
            max(r for _, r in samples), samples[-1][1], took, len(seen),
            deliveries - len(seen), count - len(seen), 0,
        )  # fmt: skip
    finally:
        await asyncio.to_thread(gateway.stop)


async def bench_irc(a: argparse.Namespace, tmp: Path) -> list[Line]:
    from core.testing import NgircdServer, RedisServer

    gw_name = "IRC"
    lines: list[Line] = []
    paced = int(a.paced * a.paced_seconds)
    with RedisServer() as redis, NgircdServer() as irc:
        url = redis.url
        print("[IRC] raw layer", flush=True)
        lines.append(await raw_line(gw_name, url, irc_event(), a.raw, tmp))
        gateway = irc_bench.gateway(tmp, url, irc.port, "sbsirc", {"burst": 10, "rate": 100})
        try:
            await asyncio.sleep(0.5)  # joined #bench
            peer = await irc_bench.Peer.connect(irc.port, "sbspeer", "#bench")
            print(f"[IRC] gateway: burst {a.irc}, paced {paced}", flush=True)
            burst = await _irc_gateway(url, peer, "ig-b", a.irc, 0, tmp, "irc-worker-burst")
            live = await _irc_gateway(url, peer, "ig-p", paced, a.paced, tmp, "irc-worker-paced")
        finally:
            await asyncio.to_thread(gateway.stop)
        what = "`gateway-irc` → streams → ConsumerWorker, AsyncConsumer"
        lines.append(from_mqtt(gw_name, "gateway", what, burst, live))
        print(f"[IRC] bare irc client: burst {a.irc}, paced {paced}", flush=True)
        burst = await _irc_bare(irc.port, peer, "ib-b", a.irc, 0, tmp, "irc-bare-burst")
        live = await _irc_bare(irc.port, peer, "ib-p", paced, a.paced, tmp, "irc-bare-paced")
        peer.writer.close()
        what = "bare `irc`-library client (its Reactor), no layer"
        lines.append(from_mqtt(gw_name, "peer", what, burst, live))
        print(f"[IRC] stalled consumer, {a.stall:g} s", flush=True)
        try:
            row = await _irc_stall(url, irc.port, a.stall, tmp)
            lines[1].stalled = f"lines at {STALL_RATE:g}/s: " + stalled(row)
        except Exception as exc:
            lines[1].stalled = f"failed: {type(exc).__name__}: {exc}"
    return lines


# -- report ----------------------------------------------------------------------------------------

HEADER = [
    "gateway",
    "row",
    "msgs/s",
    "p50 ms",
    "p99 ms",
    "gateway ÷ row",
    "memory, consumer stalled",
]


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value * 1000:.1f}"


def table_rows(lines: list[Line]) -> list[list[str]]:
    rows = []
    for line in lines:
        gateway = next(
            (g for g in lines if g.gateway == line.gateway and g.kind == "gateway"), None
        )
        ratio = ""
        others = gateway is not None and line is not gateway and line.kind != "gateway x2"
        if others and gateway is not None and line.rate > 0 and not math.isnan(gateway.rate):
            ratio = f"{gateway.rate / line.rate:.2f}x"
        rate = "-" if math.isnan(line.rate) else f"{line.rate:,.0f}"
        if line.error:
            rate += " (see below)"
        rows.append(
            [line.gateway, line.what, rate, _ms(line.p50), _ms(line.p99), ratio, line.stalled]
        )
    return rows


def ratios(lines: list[Line]) -> list[str]:
    out = []
    for name in dict.fromkeys(line.gateway for line in lines):
        group = [line for line in lines if line.gateway == name]
        gateway = next((g for g in group if g.kind == "gateway"), None)
        if gateway is None or math.isnan(gateway.rate):
            continue
        parts = []
        for line in group:
            if line.kind in ("raw", "peer", "ceiling") and line.rate > 0:
                label = "raw layer" if line.kind == "raw" else line.what.split(",")[0].strip("`")
                parts.append(f"÷ {label} {gateway.rate / line.rate:.2f}x")
        out.append(f"{name}: gateway {gateway.rate:,.0f} msgs/s; " + ", ".join(parts))
    return out


def markdown(lines: list[Line], a: argparse.Namespace, command: str, loads: tuple[str, str]) -> str:
    paced = int(a.paced * a.paced_seconds)
    body = [
        f"- Date: {a.started}",
        *machine_lines(),
        *mw.versions(),
        f"- Load average when the run started: {loads[0]}; when it ended: {loads[1]} "
        f"({machine()['nproc']} CPUs shared with other sessions' tests and benchmarks)",
        f"- Command: `{command}` (one run, {a.took:.0f} s)",
        f"- Workload: raw rows {a.raw:,} events each; MQTT burst {a.mqtt:,} QoS 1 messages "
        f"(mqttasgi at most {mw.MQTTASGI_BURST:,}), IRC burst {a.irc:,} lines, both then "
        f"{paced:,} paced at {a.paced:g}/s for latency, {PAYLOAD}-byte JSON bodies; "
        f"WebSocket {a.ws_clients} sockets x {a.ws_messages} chat messages; email "
        f"{a.mails:,} mails from {a.clients} SMTP clients; stalled consumer {a.stall:g} s per "
        "gateway. One round each (no medians): read ratios within a gateway's rows, taken "
        "minutes apart, rather than across gateways.",
        "",
        markdown_table(HEADER, table_rows(lines)),
        "",
        "Ratios (gateway msgs/s ÷ the row's, same run):",
        "",
        *(f"- {r}" for r in ratios(lines)),
    ]
    notes = [f"- {line.gateway}, {line.what}: {n}" for line in lines for n in line.notes]
    notes += [f"- {line.gateway}, {line.what}: {line.error}" for line in lines if line.error]
    if notes:
        body += ["", "Errors, and log lines worth a look:", "", *notes]
    body += [
        "",
        "How to read it (details in the docstring of `bench/side_by_side.py`): every row's "
        "layer is the streams layer on a private redis-server; every gateway row is the real "
        "gateway binary → Redis → `ConsumerWorker` (what `runworker` runs) serving a channels "
        "`AsyncConsumer` (HTTP/WebSocket: the tutorial's `ChatConsumer` under `runworker "
        f"rooms`). *raw*: {RAW_SENDERS} tasks sending events of that gateway's shape to one "
        "channel, a plain `layer.receive()` loop in its own process taking them: the layer "
        "alone. msgs/s: "
        "messages ÷ first → last handled (WebSocket: sent ÷ wall time; email: mails ÷ clients' "
        "start → last handled). p50/p99: MQTT and IRC paced at "
        f"{a.paced:g}/s (producer stamp → handler); WebSocket: a chat message's round trip "
        "through the room's group under the full load; email: DATA sent → handler (aiosmtpd: "
        "→ its 250) under the full load. *gateway ÷ row*: the gateway row's msgs/s ÷ this "
        "row's. The bare `irc` client and the bare paho subscriber only note each message: "
        "their msgs/s is bounded by the producer and the server (the IRC writer's burst "
        "through ngircd, mosquitto draining a queued session), the transport's ceiling "
        "rather than a competing design. *memory, consumer stalled*: the gateway process's "
        "RSS (VmRSS, every 5 s) while "
        f"nobody read its channel for {a.stall:g} s (bench/stall.py's method; its own section "
        "ran 3 minutes on channels_redis), then what a consumer drained. Slack and the "
        "scheduler have no peer named by the issue and are not in this run: their sections "
        "below have their rates.",
    ]
    return "\n".join(body)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0])
    parser.add_argument("--raw", type=int, default=5000, help="events per raw row")
    parser.add_argument("--mqtt", type=int, default=5000, help="MQTT burst messages")
    parser.add_argument("--irc", type=int, default=3000, help="IRC burst lines")
    parser.add_argument("--paced", type=float, default=50.0, help="msgs/s of the latency rows")
    parser.add_argument("--paced-seconds", type=float, default=10.0)
    parser.add_argument("--ws-clients", type=int, default=20)
    parser.add_argument("--ws-messages", type=int, default=50, help="chat messages per socket")
    parser.add_argument("--mails", type=int, default=1600)
    parser.add_argument("--clients", type=int, default=16, help="SMTP clients")
    parser.add_argument("--stall", type=float, default=30.0, help="seconds of each stall")
    parser.add_argument(
        "--only", default="", help="comma-separated: mqtt, ws, email, irc (never writes)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run (~2 min), no write")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    a = parser.parse_args(argv)
    if a.quick:
        a.raw, a.mqtt, a.irc, a.paced_seconds = 500, 500, 300, 2.0
        a.ws_clients, a.ws_messages, a.mails, a.stall, a.no_write = 5, 10, 320, 5.0, True
    if a.only:
        a.no_write = True
    return a


async def run(a: argparse.Namespace, tmp: Path) -> list[Line]:
    parts = {"mqtt": bench_mqtt, "ws": bench_ws, "email": bench_email, "irc": bench_irc}
    wanted = a.only.split(",") if a.only else list(parts)
    lines: list[Line] = []
    for name in wanted:
        (tmp / name).mkdir()
        try:
            lines += await parts[name](a, tmp / name)
        except Exception as exc:  # one broken gateway does not hide the others
            lines.append(Line(name, "gateway", "(failed)", error=f"{type(exc).__name__}: {exc}"))
        print(text_table(HEADER, table_rows(lines)), flush=True)
    return lines


def helper_entry(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE} _irc_client")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--quiet", type=float, default=mw.QUIET)
    a = parser.parse_args(argv)
    _irc_client(a.port, "#bench", a.count, a.out, a.quiet)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_irc_client"]:
        return helper_entry(argv[1:])
    a = parse_args(argv)
    command = command_line(MODULE)
    load = load_average()
    a.started = today()
    started = time.monotonic()
    print(f"load average {load}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-side-by-side-") as tmp:
        lines = asyncio.run(run(a, Path(tmp)))
    a.took = time.monotonic() - started
    loads = (load, load_average())
    print()
    print(text_table(HEADER, table_rows(lines)))
    print("\n".join(ratios(lines)))
    for line in lines:
        if line.error or line.notes:
            print(f"{line.gateway}, {line.what}: {' '.join([line.error, *line.notes])}")
    print(f"\n{a.took:.0f} s; load average {loads[0]} → {loads[1]}; {command}")
    if not a.no_write:
        update_section(SECTION, markdown(lines, a, command, loads))
        print(f"updated the '## {SECTION}' section of BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
