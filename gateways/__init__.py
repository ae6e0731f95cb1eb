"""The gateways of channels-gateways, one package per transport.

Add ``"gateways"`` to ``INSTALLED_APPS`` for ``manage.py rungateway FILE…``.

This module imports nothing of ``core``: every entry point checks :func:`core_shadowed` first,
so that a Django project with a ``core`` package of its own gets one clear line instead of
``No module named 'core.cli'`` (issues 6 and 29): the binaries through :mod:`gateways.entry`
(:func:`exit_if_core_shadowed`), ``manage.py rungateway`` / ``runworker`` through
:func:`require_own_core`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

#: YAML ``gateway:`` value → the gateway class that serves it
GATEWAYS = {
    "email": "gateways.email.gateway:EmailGateway",
    "irc": "gateways.irc.gateway:IrcGateway",
    "mqtt": "gateways.mqtt.gateway:MqttGateway",
    "http_ws": "gateways.http_ws.gateway:HttpWsGateway",
    "slack": "gateways.slack.gateway:SlackGateway",
    "scheduler": "gateways.scheduler.gateway:SchedulerGateway",
}

__all__ = ["GATEWAYS", "core_shadowed", "exit_if_core_shadowed", "require_own_core"]

_OURS = Path(__file__).resolve().parent.parent / "core"


def core_shadowed() -> str | None:
    """One line saying what shadows channels-gateways' ``core`` package, or ``None``.

    channels-gateways ships a top-level ``core`` package. A project with its own ``core`` (a
    Django app, say) earlier on ``sys.path`` — ``manage.py`` puts the project directory first —
    hides it. ``find_spec`` looks without importing anything.
    """
    try:
        spec = importlib.util.find_spec("core")
    except (ImportError, ValueError):
        spec = None
    found: Path | None = None
    if spec is not None:
        if spec.origin and spec.origin not in ("namespace", "built-in"):
            found = Path(spec.origin).resolve().parent
        elif spec.submodule_search_locations:
            found = Path(next(iter(spec.submodule_search_locations))).resolve()
    if found == _OURS:
        return None
    where = f"'core' is {found}" if found else "no 'core' package is importable"
    return (
        f"channels-gateways needs its own top-level package 'core' ({_OURS}), but {where}: "
        "a package of your project named 'core' comes first on sys.path. Run the gateways "
        "as their own binaries outside the project directory (gateway-email / gateway-mqtt / "
        "gateways run --layer redis://…; they import nothing of your project), use channels' "
        "own runworker (list 'channels' before 'gateways' in INSTALLED_APPS), or rename your "
        "'core' package; see docs/running.md, \"A project with its own core app\""
    )


def exit_if_core_shadowed(prog: str) -> None:
    """Print :func:`core_shadowed`'s line as ``prog: …`` and exit 2 when ``core`` is not ours."""
    problem = core_shadowed()
    if problem is not None:
        import sys

        print(f"{prog}: {problem}", file=sys.stderr)
        raise SystemExit(2)


def require_own_core() -> None:
    """The management commands' form of :func:`exit_if_core_shadowed`: Django's
    ``CommandError`` with :func:`core_shadowed`'s line and exit code 2."""
    problem = core_shadowed()
    if problem is not None:
        from django.core.management.base import CommandError

        raise CommandError(problem, returncode=2)
