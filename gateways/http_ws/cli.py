"""``gateway-http-ws --config FILE [--app module:attr] [--layer PATH] [--check-config] …``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from core.cli import gateway_main
from gateways.http_ws.gateway import HttpWsGateway


def main(argv: Sequence[str] | None = None) -> int:
    return gateway_main(HttpWsGateway, argv)


if __name__ == "__main__":
    sys.exit(main())
