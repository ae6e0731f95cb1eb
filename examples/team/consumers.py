"""The team's Slack app: new members get a welcome, ``/ticket 42`` is answered from the database.

Routed on the ``team-slack`` channel (``examples/slack.yaml``). Answers are commands to the
gateway: ``slack.send`` posts in the channel the member joined, ``slack.respond`` answers the
slash command through its ``response_url`` (only the person who asked sees it).
"""

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from channels.consumer import AsyncConsumer
from mail.models import Mail

from gateways.slack.consumers import SlackCommands

log = logging.getLogger(__name__)

TICKET = re.compile(r"^\s*#?(\d{1,18})\s*$")


class SlackTeamConsumer(AsyncConsumer):
    async def _command(
        self, message: dict[str, Any], command: Callable[[SlackCommands], Awaitable[object]]
    ) -> None:
        try:  # an exception escaping a consumer would lose what runworker has queued for it
            await command(SlackCommands(self.channel_layer, message["reply_channel"], timeout=30))
        except Exception as exc:
            log.warning("could not answer %s: %r", message["id"], exc)

    async def slack_joined(self, message: dict[str, Any]) -> None:
        text = f"Welcome <@{message['user']}>! Type `/ticket 42` to look up support ticket 42."
        await self._command(message, lambda slack: slack.send(message["channel"], text))

    async def slack_command(self, message: dict[str, Any]) -> None:
        if message["command"] != "/ticket" or not message["response_url"]:
            return
        match = TICKET.match(message["text"])
        if match is None:
            text = "Usage: `/ticket 42`"
        else:
            mail = await Mail.objects.filter(pk=int(match.group(1))).afirst()
            if mail is None:
                text = f"No ticket #{match.group(1)}"
            else:
                state = "answered" if mail.reply_message_id else "open"
                text = f"#{mail.pk} {mail.subject!r} from {mail.mail_from} ({state})"
        await self._command(
            message,
            lambda slack: slack.respond(message["response_url"], text, response_type="ephemeral"),
        )

    async def slack_connect(self, message: dict[str, Any]) -> None:
        log.info("Slack app connected as %s in %s", message["user"], message["team"])

    async def slack_disconnect(self, message: dict[str, Any]) -> None:
        log.warning("Slack app disconnected: %s", message["reason"])
