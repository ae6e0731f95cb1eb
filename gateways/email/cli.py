"""``gateway-email --config FILE [--layer PATH] [--log-level L] [--check-config] [--version]``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from gateways import exit_if_core_shadowed


def main(argv: Sequence[str] | None = None) -> int:
    exit_if_core_shadowed("gateway-email")  # before anything imports core
    from core.cli import gateway_main
    from gateways.email.gateway import EmailGateway

    return gateway_main(EmailGateway, argv)


if __name__ == "__main__":
    sys.exit(main())
