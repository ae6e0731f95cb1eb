"""``gateways run FILE… [--app module:application]``: several integrations in one process."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from gateways import REGISTRY, exit_if_core_shadowed


def main(argv: Sequence[str] | None = None) -> int:
    exit_if_core_shadowed("gateways")  # before anything imports core
    from core.cli import run_main

    return run_main(REGISTRY, argv)


if __name__ == "__main__":
    sys.exit(main())
