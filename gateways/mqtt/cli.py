"""``gateway-mqtt --config FILE [--layer PATH] [--log-level L] [--check-config] [--version]``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from gateways import exit_if_core_shadowed


def main(argv: Sequence[str] | None = None) -> int:
    exit_if_core_shadowed("gateway-mqtt")  # before anything imports core
    from core.cli import gateway_main
    from gateways.mqtt.gateway import MqttGateway

    return gateway_main(MqttGateway, argv)


if __name__ == "__main__":
    sys.exit(main())
