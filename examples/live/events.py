"""Put a line on the live page: every example consumer calls :func:`show` for what it handles.

The page's WebSockets are in the group ``live`` (``LiveConsumer`` adds each socket's reply
channel on connect), so one ``group_send`` of a ``websocket.send`` reaches every open tab through
the http_ws gateway. Showing is best effort and never raises: a full or unreachable layer must
not cost the consumer the mail or reading it is handling.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from gateways.http_ws.consumers import websocket_send

log = logging.getLogger("live")

GROUP = "live"


async def show(layer: Any, source: str, summary: str, **details: Any) -> None:
    """Broadcast one event line (``source`` mail, mqtt, web, irc, slack, scheduler …)."""
    line = {"source": source, "summary": summary, "time": time.time(), **details}
    try:
        await layer.group_send(GROUP, websocket_send(json.dumps(line)))
    except Exception as exc:
        log.warning("live page not updated (%s): %r", source, exc)
