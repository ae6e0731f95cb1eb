"""The console scripts' entry points: the shadowed-``core`` check first, then the binary.

Every binary in ``pyproject.toml`` (``gateways`` and the six ``gateway-*``) starts here, so a
project whose own ``core`` package comes first on ``sys.path`` gets the same one line from each
(:func:`gateways.exit_if_core_shadowed`, exit code 2) instead of a traceback from whichever
module imports ``core`` first. This module imports nothing of ``core``: the binary's module
(``gateways.<proto>.cli``, which does) is imported only after the check.
``manage.py rungateway`` / ``runworker`` say the same through :func:`gateways.require_own_core`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from gateways import exit_if_core_shadowed

__all__ = ["BINARIES", "email", "gateways", "http_ws", "irc", "mqtt", "run", "scheduler", "slack"]

#: binary name → the module whose ``main() -> int`` it runs
BINARIES = {
    "gateways": "gateways.cli",
    "gateway-email": "gateways.email.cli",
    "gateway-irc": "gateways.irc.cli",
    "gateway-mqtt": "gateways.mqtt.cli",
    "gateway-http-ws": "gateways.http_ws.cli",
    "gateway-slack": "gateways.slack.cli",
    "gateway-scheduler": "gateways.scheduler.cli",
}


def run(prog: str) -> int:
    """Exit 2 with one line if ``core`` is not ours; else run ``prog``'s ``main()``."""
    exit_if_core_shadowed(prog)
    main: Callable[[], int] = importlib.import_module(BINARIES[prog]).main
    return main()


def gateways() -> int:
    return run("gateways")


def email() -> int:
    return run("gateway-email")


def irc() -> int:
    return run("gateway-irc")


def mqtt() -> int:
    return run("gateway-mqtt")


def http_ws() -> int:
    return run("gateway-http-ws")


def slack() -> int:
    return run("gateway-slack")


def scheduler() -> int:
    return run("gateway-scheduler")
