"""``gateways run FILE… [--app module:application]``: several integrations in one process."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from core.cli import run_main
from gateways import REGISTRY


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(REGISTRY, argv)


if __name__ == "__main__":
    sys.exit(main())
