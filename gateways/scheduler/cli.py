"""``gateway-scheduler --config FILE …`` and ``gateways schedules FILE…`` (the next fire times)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from core.cli import EXIT_CONFIG, EXIT_OK, gateway_main
from core.config import ConfigError, load_config
from gateways.scheduler.config import SchedulerGatewayConfig
from gateways.scheduler.gateway import SchedulerGateway
from gateways.scheduler.translate import describe, next_fire, wall_clock, zone


def main(argv: Sequence[str] | None = None) -> int:
    return gateway_main(SchedulerGateway, argv)


def schedules_main(argv: Sequence[str] | None = None) -> int:
    """``gateways schedules FILE… [--count N]``: each YAML schedule's next fire times.

    Printed from now as if the schedule had never fired (no state is read), each time in the
    schedule's zone and in UTC, jitter included.
    """
    parser = argparse.ArgumentParser(
        prog="gateways schedules",
        description="Print the next fire times of every schedule in scheduler YAML files.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="scheduler integration YAML")
    parser.add_argument("--count", type=int, default=5, help="fire times per schedule (5)")
    args = parser.parse_args(argv)
    now = wall_clock()
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


if __name__ == "__main__":
    sys.exit(main())
