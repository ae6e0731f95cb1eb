"""The ops channel's ticket bot: ``!ticket 42`` on IRC is answered from the mail database.

Routed on the ``ops-irc`` channel (``examples/irc.yaml``). The answer leaves through the
gateway's connection (``reply_channel``) to where the question came from: the channel, or the
person for a private message.
"""

import logging
import re
from typing import Any

from channels.consumer import AsyncConsumer
from mail.models import Mail

from gateways.irc.consumers import IrcCommands

log = logging.getLogger(__name__)

TICKET = re.compile(r"^!ticket\s+#?(\d{1,18})\s*$")


class TicketBotConsumer(AsyncConsumer):
    async def irc_receive(self, message: dict[str, Any]) -> None:
        match = TICKET.match(message["plain"])
        if message["self"] or message["kind"] == "notice" or match is None:
            return  # never answer a notice (RFC 2812 §3.3.2) or ourselves
        mail = await Mail.objects.filter(pk=int(match.group(1))).afirst()
        if mail is None:
            text = f"{message['nick']}: no ticket #{match.group(1)}"
        else:
            state = "answered" if mail.reply_message_id else "open"
            text = f"{message['nick']}: #{mail.pk} {mail.subject!r} from {mail.mail_from} ({state})"
        target = message["nick"] if message["private"] else message["target"]
        irc = IrcCommands(self.channel_layer, message["reply_channel"], timeout=30)
        try:  # an exception escaping a consumer would lose what runworker has queued for it
            await irc.send(target, text)
        except Exception as exc:
            log.warning("could not answer %s: %r", message["id"], exc)

    async def irc_connect(self, message: dict[str, Any]) -> None:
        log.info("IRC bot connected to %s as %s", message["server"], message["nick"])

    async def irc_disconnect(self, message: dict[str, Any]) -> None:
        log.warning("IRC bot disconnected from %s: %s", message["server"], message["reason"])
