"""``manage.py runworker`` with :class:`core.worker.ConsumerWorker`.

Active when ``"gateways"`` comes before ``"channels"`` in ``INSTALLED_APPS``; it takes the same
arguments as channels' command and adds bounded prefetch, retries across layer outages and a
graceful drain on SIGTERM (see core/worker.py for why).
"""

from __future__ import annotations

from channels.management.commands.runworker import Command as ChannelsRunworker

from core.worker import ConsumerWorker


class Command(ChannelsRunworker):
    worker_class = ConsumerWorker
