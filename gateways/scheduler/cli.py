"""``gateway-scheduler --config FILE …`` and ``gateways schedules …``.

``gateways schedules FILE… [--count N]`` prints the next fire times of YAML files (no state is
read). ``gateways schedules list|pause|resume|trigger|backfill|done FILE …`` sends the command
to the running scheduler of FILE over its layer and prints its ``scheduler.result``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from core.cli import EXIT_CONFIG, EXIT_CRASH, EXIT_OK, EXIT_START, gateway_main
from core.config import ConfigError, load_config
from core.layers import LayerPathError, is_memory_layer, resolve_layer
from gateways.scheduler.config import SchedulerGatewayConfig
from gateways.scheduler.gateway import SchedulerGateway
from gateways.scheduler.translate import describe, next_fire, zone

#: ``gateways schedules`` sub-commands that talk to a running scheduler
CONTROL = ("list", "pause", "resume", "trigger", "backfill", "done")


def main(argv: Sequence[str] | None = None) -> int:
    return gateway_main(SchedulerGateway, argv)


def schedules_main(argv: Sequence[str] | None = None) -> int:
    """``gateways schedules …``: the next fire times, or a command to a running scheduler."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] and args[0] in CONTROL:
        return control_main(args)
    if args[:1] == ["next"]:
        args = args[1:]
    return next_main(args)


def next_main(argv: Sequence[str]) -> int:
    """``gateways schedules [next] FILE… [--count N]``: each YAML schedule's next fire times.

    Printed from now as if the schedule had never fired (no state is read), each time in the
    schedule's zone and in UTC, jitter included.
    """
    parser = argparse.ArgumentParser(
        prog="gateways schedules",
        description="Print the next fire times of every schedule in scheduler YAML files. "
        f"With {', '.join(CONTROL)} as the first argument: send that command to the running "
        "scheduler of a file (see gateways schedules COMMAND --help).",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="scheduler integration YAML")
    parser.add_argument("--count", type=int, default=5, help="fire times per schedule (5)")
    args = parser.parse_args(argv)
    now = time.time()
    for path in args.files:
        try:
            config = load_config(path, SchedulerGatewayConfig)
        except ConfigError as exc:
            print(f"gateways: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        print(f"{path}: {config.name}")
        for spec in config.scheduler.specs(config.inbound_channel):
            print(f"  {spec.id}: {describe(spec)} → {spec.channel}")
            cursor = now
            for _ in range(max(1, args.count)):
                upcoming = next_fire(spec, cursor)
                if upcoming is None:
                    print("    (no more fire times)")
                    break
                due, fire_at = upcoming
                local = datetime.fromtimestamp(fire_at, zone(spec.timezone))
                utc = datetime.fromtimestamp(fire_at, UTC)
                print(f"    {local.isoformat()} {spec.timezone}  =  {utc.isoformat()}")
                cursor = due
    return EXIT_OK


def _control_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateways schedules",
        description="Send a command to the running scheduler of FILE (over the file's layer, or "
        "--layer) and print its answer. Exit codes: 0 done, 1 the scheduler refused it, 2 usage "
        "or configuration error, 3 no answer within --timeout.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("file", metavar="FILE", help="the scheduler's integration YAML")
        p.add_argument("--layer", help="layer path (default: the file's layer:, GATEWAYS_LAYER)")
        p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (30)")
        p.add_argument("--json", action="store_true", help="print the scheduler.result as JSON")
        return p

    listing = command("list", "list the schedules: next fire, pause, runs, history")
    listing.add_argument("--prefix", default="", help="only ids starting with this")
    listing.add_argument("--history", action="store_true", help="print each run history too")
    for name, verb in (("pause", "pause"), ("resume", "resume")):
        p = command(name, f"{verb} one schedule, or --all")
        which = p.add_mutually_exclusive_group(required=True)
        which.add_argument("schedule", nargs="?", metavar="SCHEDULE")
        which.add_argument("--all", action="store_true", help=f"{verb} every schedule")
        p.add_argument("--note", default="", help="why (logged; shown by list while paused)")
    trigger = command("trigger", "fire SCHEDULE now, once (manual: true)")
    trigger.add_argument("schedule", metavar="SCHEDULE")
    backfill = command("backfill", "fire every due time of SCHEDULE between --from and --to")
    backfill.add_argument("schedule", metavar="SCHEDULE")
    backfill.add_argument("--from", dest="start", required=True, help="ISO 8601 or epoch")
    backfill.add_argument("--to", dest="end", required=True, help="ISO 8601 or epoch")
    for p in (trigger, backfill):
        p.add_argument("--request-id", help="idempotency key: the same request is queued only once")
        p.add_argument(
            "--overlap",
            choices=["allow", "skip", "buffer_one", "cancel_other"],
            help="overlap policy for these fires (default: the schedule's)",
        )
    done = command("done", "report a run finished (what ConsumerWorker does by itself)")
    done.add_argument("run_id", metavar="RUN_ID")
    return parser


def _body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"type": f"scheduler.{args.command}"}
    if args.command == "list":
        body["prefix"] = args.prefix
    elif args.command in ("pause", "resume"):
        body.update({"all": True} if args.all else {"schedule": args.schedule})
        if args.note:
            body["note"] = args.note
    elif args.command in ("trigger", "backfill"):
        body["schedule"] = args.schedule
        if args.command == "backfill":
            body["from"], body["to"] = _instant(args.start), _instant(args.end)
        if args.request_id:
            body["request_id"] = args.request_id
        if args.overlap:
            body["overlap"] = args.overlap
    else:
        body["run_id"] = args.run_id
    return body


def _instant(text: str) -> str | float:
    try:
        return float(text)
    except ValueError:
        return text


async def _ask(layer: Any, channel: str, body: dict[str, Any], timeout: float) -> Any:
    try:
        result_channel = await layer.new_channel("gateways-cli.")
        message = {**body, "id": f"cli-{uuid.uuid4().hex[:8]}", "result_channel": result_channel}
        await asyncio.wait_for(layer.send(channel, message), timeout)
        return await asyncio.wait_for(layer.receive(result_channel), timeout)
    finally:
        close = getattr(layer, "close_pools", None)
        if close is not None:
            await close()


def control_main(argv: Sequence[str]) -> int:
    """``gateways schedules COMMAND FILE …``: see :func:`_control_parser`."""
    parser = _control_parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(args.file, SchedulerGatewayConfig)
        path = args.layer or config.layer or os.environ.get("GATEWAYS_LAYER")
        if not path:
            raise LayerPathError("no layer: pass --layer, set layer: or GATEWAYS_LAYER")
        layer = resolve_layer(path)
    except (ConfigError, LayerPathError) as exc:
        print(f"gateways schedules: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if is_memory_layer(layer):
        print(
            "gateways schedules: memory:// reaches no other process: the scheduler must run "
            "on a shared layer (redis://…) to be asked",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    channel = config.command_channel
    try:
        result = asyncio.run(_ask(layer, channel, _body(args), args.timeout))
    except TimeoutError:
        print(
            f"gateways schedules: no answer on {channel!r} within {args.timeout:g} s "
            "(is the scheduler running on this layer?)",
            file=sys.stderr,
        )
        return EXIT_START
    except Exception as exc:  # the layer is unreachable
        print(f"gateways schedules: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_START
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    if not result.get("ok"):
        print(f"gateways schedules: {args.command}: {result.get('error')}", file=sys.stderr)
        return EXIT_CRASH
    if not args.json:
        _print(args, result)
    return EXIT_OK


def _when(value: Any) -> str:
    if value is None:
        return "-"
    return datetime.fromtimestamp(float(value), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _print(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if args.command == "list":
        print(f"{'SCHEDULE':24} {'NEXT FIRE':20} {'LAST DUE':20} {'STATE':8} {'OVERLAP':12} RUNS")
        for row in result["schedules"]:
            state = "paused" if row["paused"] else "active"
            print(
                f"{row['schedule']:24} {_when(row['next_fire']):20} {_when(row['last_due']):20} "
                f"{state:8} {row['overlap']:12} {len(row['running'])}"
            )
            if row["paused"] and row["pause_note"]:
                print(f"    paused {_when(row['paused_at'])}: {row['pause_note']}")
            if args.history:
                for entry in row["history"]:
                    late = entry["lateness"]
                    print(
                        f"    {_when(entry['due'])} {entry['outcome']:16} {entry['kind']:9} "
                        f"sent {_when(entry['sent'])}"
                        + (f" late {late:.3f}s" if late is not None else "")
                        + (f" x{entry['count']}" if entry["count"] != 1 else "")
                    )
        if result.get("truncated"):
            print("(truncated: list_limit)")
    elif args.command in ("pause", "resume"):
        changed = result["schedules"]
        print(f"{args.command}d {result['changed']}: {', '.join(changed) or '(no change)'}")
    elif args.command == "trigger":
        state = "queued" if result["created"] else "already requested"
        print(f"{result['schedule']}: {state}, run_id {result['run_id']}")
    elif args.command == "backfill":
        state = "queued" if result["created"] else "already requested or nothing due"
        print(
            f"{result['schedule']}: {result['count']} due time(s) {state} "
            f"({_when(result['first'])} … {_when(result['last'])}), "
            f"request_id {result['request_id']}"
        )
    else:
        print(f"{result['run_id']}: {'finished' if result['finished'] else 'was not running'}")


if __name__ == "__main__":
    sys.exit(main())
