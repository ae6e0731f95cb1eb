"""``gateways run FILE… [--app module:application]``: several integrations in one process.

``gateways schedules FILE…`` prints the next fire times of scheduler files;
``gateways schedules list|pause|resume|trigger|backfill|done FILE …`` asks a running scheduler
(:func:`gateways.scheduler.cli.schedules_main`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from gateways import GATEWAYS

#: subcommands handled here rather than by core.cli.run_main (which lists them in --help)
OTHERS = {
    "schedules": "next fire times of scheduler YAML files (FILE... [--count N]); "
    "list|pause|resume|trigger|backfill|done FILE ...: ask a running scheduler"
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["schedules"]:
        from gateways.scheduler.cli import schedules_main

        return schedules_main(args[1:])
    from core.cli import run_main

    return run_main(GATEWAYS, argv, others=OTHERS)


if __name__ == "__main__":
    sys.exit(main())
