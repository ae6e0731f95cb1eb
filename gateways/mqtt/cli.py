"""``gateway-mqtt --config FILE [--layer PATH] [--log-level L] [--check-config] [--version]``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from core.cli import gateway_main
from gateways.mqtt.gateway import MqttGateway


def main(argv: Sequence[str] | None = None) -> int:
    return gateway_main(MqttGateway, argv)


if __name__ == "__main__":
    sys.exit(main())
