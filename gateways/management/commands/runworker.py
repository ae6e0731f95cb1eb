"""``manage.py runworker`` with :class:`core.worker.ConsumerWorker`.

Active when ``"gateways"`` comes before ``"channels"`` in ``INSTALLED_APPS``; it takes the same
arguments as channels' command and adds bounded prefetch, retries across layer outages,
redelivery of messages whose consumer failed for a transient reason, and a graceful drain on
SIGTERM (see core/worker.py for why). ``--max-attempts`` and ``--dead-letter`` override the
``GATEWAYS_WORKER`` setting.

Channels the application's ``ChannelNameRouter`` does not route host its ``websocket`` / ``http``
entries for gateway-http-ws (``gateways.http_ws.consumers``): ``runworker rooms`` runs an unchanged
Channels application for the sockets that gateway routes to ``rooms``.
"""

from __future__ import annotations

import os
from typing import Any

from channels.management.commands.runworker import Command as ChannelsRunworker
from django.core.management.base import CommandError, CommandParser

from gateways import core_shadowed


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

    def handle(self, *args: Any, **options: Any) -> None:
        problem = core_shadowed()
        if problem is not None:  # a project app named "core" hides ours: say so in one line
            raise CommandError(problem, returncode=2)
        from core.logs import setup_logging
        from core.worker import ConsumerWorker, RetryPolicy

        try:
            policy = RetryPolicy.from_settings(
                max_attempts=options["max_attempts"], dead_letter=options["dead_letter"]
            )
        except ValueError as exc:
            raise CommandError(str(exc), returncode=2) from None
        level = os.environ.get("GATEWAYS_LOG_LEVEL", "INFO").strip().upper() or "INFO"
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise CommandError(f"GATEWAYS_LOG_LEVEL={level.lower()!r} is not a log level", 2)
        setup_logging(level)  # one console handler, the gateways' format (UTC, redacted)
        from gateways.http_ws.consumers import host_unrouted

        def worker(*, application: Any, **kwargs: Any) -> ConsumerWorker:
            return ConsumerWorker(application=host_unrouted(application), retry=policy, **kwargs)

        self.worker_class = worker
        super().handle(*args, **options)
