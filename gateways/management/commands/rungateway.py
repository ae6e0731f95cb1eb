"""``manage.py rungateway FILE… [--layer PATH]``: run integrations with the project's layer.

The layer defaults to ``django`` (this project's ``CHANNEL_LAYERS["default"]``). Consumers keep
running under ``manage.py runworker``; with an in-memory layer pass ``--with-consumers`` to run
them here too. Relative FILE paths are taken from the working directory.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from gateways import GATEWAYS, require_own_core


class Command(BaseCommand):
    help = "Run channels-gateways integrations (YAML files) against this project's channel layer."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("files", nargs="+", metavar="FILE")
        parser.add_argument("--layer", default="django", help="layer path (default: django)")
        parser.add_argument(
            "--with-consumers",
            action="store_true",
            help="also run this project's consumers (ASGI_APPLICATION) in this process",
        )
        parser.add_argument("--check-config", action="store_true")
        parser.add_argument("--log-level", default="INFO")

    def handle(self, *args: Any, **options: Any) -> None:
        require_own_core()  # a project app named "core" hides ours: say so in one line
        from core.cli import run_main

        argv = ["run", *options["files"], "--layer", options["layer"]]
        argv += ["--log-level", options["log_level"]]
        if options["check_config"]:
            argv.append("--check-config")
        if options["with_consumers"]:
            from django.conf import settings

            module, _, attr = str(settings.ASGI_APPLICATION).rpartition(".")
            argv += ["--app", f"{module}:{attr}"]
        else:
            argv.append("--no-consumers")
        code = run_main(GATEWAYS, argv)
        if code:
            raise CommandError(f"rungateway exited with code {code}", returncode=code)
