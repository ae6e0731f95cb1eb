"""``manage.py runworker`` with :class:`core.worker.ConsumerWorker`.

Active when ``"gateways"`` comes before ``"channels"`` in ``INSTALLED_APPS``; it takes the same
arguments as channels' command and adds bounded prefetch, retries across layer outages,
redelivery of messages whose consumer failed for a transient reason, and a graceful drain on
SIGTERM (see core/worker.py for why). ``--max-attempts`` and ``--dead-letter`` override the
``GATEWAYS_WORKER`` setting; ``--health-port`` / ``--health-host`` serve /healthz, /readyz and
/metrics (core/worker_health.py; ``GATEWAYS_WORKER["HEALTH"]``), exit code 3 if the port is
taken.

Channels the application's ``ChannelNameRouter`` does not route host its ``websocket`` / ``http``
entries for gateway-http-ws (``gateways.http_ws.host``): ``runworker rooms`` runs an unchanged
Channels application for the sockets that gateway routes to ``rooms``.
"""

from __future__ import annotations

import os
from typing import Any

from channels.management.commands.runworker import Command as ChannelsRunworker
from django.core.management.base import CommandError, CommandParser

from gateways import require_own_core


class Command(ChannelsRunworker):
    def add_arguments(self, parser: CommandParser) -> None:
        super().add_arguments(parser)
        parser.add_argument(
            "--max-attempts",
            type=int,
            default=None,
            help="deliveries of a message whose consumer failed for a transient reason "
            "(default: GATEWAYS_WORKER['MAX_ATTEMPTS'] or 5)",
        )
        parser.add_argument(
            "--dead-letter",
            choices=["channel", "log"],
            default=None,
            help="what failed for good goes to CHANNEL.dead ('channel', the default) or only "
            "to an ERROR line ('log')",
        )
        parser.add_argument(
            "--health-port",
            type=int,
            default=None,
            help="serve /healthz, /readyz and /metrics on this port (0: a free one, logged; "
            "default: GATEWAYS_WORKER['HEALTH']['port'], else none)",
        )
        parser.add_argument(
            "--health-host",
            default=None,
            help="address of that server (default: GATEWAYS_WORKER['HEALTH']['host'] or 127.0.0.1)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        require_own_core()  # a project app named "core" hides ours: say so in one line
        from core.logs import setup_logging
        from core.retry import StartupError
        from core.worker import ConsumerWorker, RetryPolicy
        from core.worker_health import HealthSettings

        try:
            policy = RetryPolicy.from_settings(
                max_attempts=options["max_attempts"], dead_letter=options["dead_letter"]
            )
            health = HealthSettings.from_settings(
                host=options["health_host"], port=options["health_port"]
            )
        except ValueError as exc:
            raise CommandError(str(exc), returncode=2) from None
        level = os.environ.get("GATEWAYS_LOG_LEVEL", "INFO").strip().upper() or "INFO"
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise CommandError(f"GATEWAYS_LOG_LEVEL={level.lower()!r} is not a log level", 2)
        setup_logging(level)  # one console handler, the gateways' format (UTC, redacted)
        from gateways.http_ws.host import host_unrouted

        def worker(*, application: Any, **kwargs: Any) -> ConsumerWorker:
            return ConsumerWorker(
                application=host_unrouted(application), retry=policy, health=health, **kwargs
            )

        self.worker_class = worker
        try:
            super().handle(*args, **options)
        except StartupError as exc:  # the health port is taken
            raise CommandError(str(exc), returncode=3) from None
