"""``gateway-email --config FILE [--layer PATH] [--log-level L] [--check-config] [--version]``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from core.cli import gateway_main
from gateways.email.gateway import EmailGateway


def main(argv: Sequence[str] | None = None) -> int:
    return gateway_main(EmailGateway, argv)


if __name__ == "__main__":
    sys.exit(main())
