"""The no-op consumers of bench/mqtt_worker.py: they only note when each ``mqtt.message`` came.

Two of them, for the same worker:

* :func:`asgi_application`: a bare ASGI application, one loop over ``receive()`` — the worker's
  own cost and nothing else (what bench/layer.py's worker rows run); it notes bench/fleet.py's
  ``email.receive`` events too, their Message-ID standing for the payload;
* :func:`channels_application`: a channels ``AsyncConsumer`` (``mqtt.message``, and ``irc.receive``
  for bench/side_by_side.py, whose IRC lines carry the same JSON) behind a ``ChannelNameRouter``, as
  a Django project routes its consumers (``runworker`` / ``gateways run --app``), so the worker
  pays what it pays there: channels' dispatch, the consumer's own process-local channel, and
  the ``aclose_old_connections()`` channels 4.2+ runs before every handler (a hop to the
  sync thread and back). It needs Django settings: :func:`configure_django`.

The handler keeps the raw payload and the CLOCK_MONOTONIC stamp; decoding waits until the end.
"""

from __future__ import annotations

import time
from typing import Any

#: (payload, handled at, delivery count) for each ``mqtt.message`` handled, in order
HANDLED: list[tuple[bytes, float, int]] = []
#: this process's CPU seconds at the first and the last handled message
CPU: list[float] = [0.0, 0.0]


def record(message: dict[str, Any]) -> None:
    now = time.monotonic()
    HANDLED.append((message["payload"], now, int(message.get("__delivery__", 1))))
    CPU[1] = time.process_time()
    if len(HANDLED) == 1:
        CPU[0] = CPU[1]


def asgi_application(channel: str) -> Any:
    """A bare ASGI consumer: ``mqtt.message`` is noted, everything else ignored."""

    async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "mqtt.message":
                record(message)
            elif message["type"] == "email.receive":  # bench/fleet.py: keyed by Message-ID
                record({**message, "payload": str(message.get("message_id")).encode()})

    return application


def configure_django() -> None:
    """The least a channels consumer needs: settings with one (never opened) database."""
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
            INSTALLED_APPS=[],
        )
        django.setup()


async def _ignore(message: dict[str, Any]) -> None:
    pass


def channels_application(channel: str) -> Any:
    """A channels ``AsyncConsumer`` on ``channel`` (call :func:`configure_django` first)."""
    from channels.consumer import AsyncConsumer
    from channels.routing import ChannelNameRouter

    class StampConsumer(AsyncConsumer):  # type: ignore[misc]
        async def mqtt_message(self, message: dict[str, Any]) -> None:
            record(message)

        async def mqtt_connect(self, message: dict[str, Any]) -> None:
            pass

        async def mqtt_disconnect(self, message: dict[str, Any]) -> None:
            pass

        async def irc_receive(self, message: dict[str, Any]) -> None:
            # bench/side_by_side.py sends the same JSON as an IRC line: noted the same way
            record({**message, "payload": message["text"].encode()})

        def __getattr__(self, name: str) -> Any:
            # the IRC gateway's other events (joins, topics, ...) are taken and dropped
            if name.startswith("irc_"):
                return _ignore
            raise AttributeError(name)

    return ChannelNameRouter({channel: StampConsumer.as_asgi()})
