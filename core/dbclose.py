"""channels' per-message database clean-up, done only when there is something to clean up.

channels 4.2+ runs ``aclose_old_connections()`` in ``AsyncConsumer.dispatch`` before *every*
handler: Django's ``close_old_connections()`` on the sync thread, a hop to that thread and
back (about a third of the worker's time per message with a no-op consumer, issue 20). It
closes the database connections that are unusable or older than ``CONN_MAX_AGE`` — and with no
connection open there is nothing for it to do.

So this module keeps the rule, and skips the hop when it cannot matter. It hops (and closes,
exactly as channels does) when

* a database connection was opened since the last close, in any thread (Django's
  ``connection_created`` signal, sent by every backend's ``connect()``), or
* the last close left a connection open on the sync thread (persistent connections,
  ``CONN_MAX_AGE`` > 0 or ``None``: whether one is now too old depends on the clock, so every
  handler checks, as with channels).

Otherwise no connection exists on the sync thread, ``close_old_connections()`` would close
nothing, and the handler runs without the hop. :func:`install` puts this function where
``channels.consumer`` looks it up; ``core.worker.ConsumerWorker`` calls it, so it applies to
every channels consumer in a worker process (``manage.py runworker``, ``gateways run --app``).
"""

from __future__ import annotations

import contextlib
from typing import Any

__all__ = ["aclose_old_connections", "install"]

#: a connection was opened (anywhere) since the last close on the sync thread
_opened = False
#: the last close left a connection open on the sync thread (first dispatch: unknown, so yes)
_left_open = True
_installed = False
#: hops made so far (for tests and benchmarks: how often the rule found something to close)
hops = 0


def _connection_created(sender: Any, connection: Any = None, **kwargs: Any) -> None:
    global _opened
    _opened = True


def _close_old_connections() -> bool:
    """On the sync thread: channels' clean-up, then whether a connection is still open."""
    global _opened
    from django.db import close_old_connections, connections

    _opened = False  # before closing: a connection opened from now on is seen next time
    close_old_connections()
    return any(c.connection is not None for c in connections.all(initialized_only=True))


async def aclose_old_connections() -> None:
    """channels' ``aclose_old_connections()``, without the thread hop when nothing is open."""
    global _left_open, hops
    if not (_opened or _left_open):
        return
    from asgiref.sync import sync_to_async

    hops += 1
    _left_open = await sync_to_async(_close_old_connections)()


def install() -> None:
    """Make channels' consumers in this process use :func:`aclose_old_connections` (once).

    A no-op without channels or Django.
    """
    global _installed
    if _installed:
        return
    with contextlib.suppress(ImportError):
        import channels.consumer
        from django.db.backends.signals import connection_created

        connection_created.connect(_connection_created, dispatch_uid="core.dbclose")
        channels.consumer.aclose_old_connections = aclose_old_connections
        _installed = True
