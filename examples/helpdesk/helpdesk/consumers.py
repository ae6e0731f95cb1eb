"""The helpdesk's consumers: one per integration, each written with that gateway's helpers.

- ``helpdesk-mail``, :class:`MailDesk`: a mail opens a ticket; the sender gets its number back.
- ``helpdesk-sensors``, :class:`SensorDesk`: a reading over the threshold opens a ticket and
  publishes an alert.
- ``helpdesk-irc``, :class:`IrcDesk`: ``!ticket 1`` and ``!close 1`` in ``#support``.
- ``helpdesk-slack``, :class:`SlackDesk`: ``/ticket 1``; an @mention is answered in its thread.
- ``helpdesk-timers``, :class:`DigestDesk`: the scheduler's ``digest``, the open tickets mailed.
- ``helpdesk-web``, :class:`LivePage`: the live page (``/``) and its WebSocket (``/live``).

A new ticket is announced in ``#support`` on IRC and in the Slack channel (the integrations
named in ``settings.HELPDESK_ANNOUNCE``), through their command channels
(``helpdesk-irc.send``, ``helpdesk-slack.send``), and every step is a line on the live page.
The demo (``examples/demo.py``) runs exactly these consumers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

from channels.consumer import get_handler_name
from django.conf import settings

from core.consumers import GatewayConsumer
from gateways.email.consumers import EmailCommands, EmailConsumer
from gateways.http_ws.consumers import HttpWsConsumer, websocket_send
from gateways.irc.consumers import IrcCommands, IrcConsumer
from gateways.mqtt.consumers import MqttConsumer
from gateways.scheduler.consumers import SchedulerConsumer
from gateways.slack.consumers import SlackCommands, SlackConsumer
from helpdesk.models import Activity, Ticket

log = logging.getLogger("helpdesk")

#: the live page's sockets (every one joins it on connect)
LIVE_GROUP = "helpdesk-live"
#: the integrations' command channels (``NAME.send``), for commands outside their own events
MAIL_COMMANDS = "helpdesk-mail.send"
IRC_COMMANDS = "helpdesk-irc.send"
SLACK_COMMANDS = "helpdesk-slack.send"
#: how long an announcement may wait for its gateway's answer
ANNOUNCE_TIMEOUT = 10.0

PAGE = (Path(__file__).parent / "page.html").read_bytes()
NUMBER = re.compile(r"^\s*#?(\d{1,18})\s*$")


# -- shared by every consumer --------------------------------------------------------------


async def show(layer: Any, source: str, summary: str) -> None:
    """A line on the live page (kept, so a page opened later shows it too); never raises: the
    page is worth less than the event being handled."""
    line: dict[str, Any] = {"source": source, "summary": summary, "time": time.time()}
    try:
        line["id"] = (await Activity.objects.acreate(**line)).pk
        await layer.group_send(LIVE_GROUP, websocket_send(json.dumps(line)))
    except Exception as exc:
        log.warning("live page not updated (%s): %r", source, exc)


async def open_ticket(layer: Any, event_id: str, **fields: str) -> Ticket | None:
    """Open a ticket for the event ``event_id`` and announce it; ``None`` when that event
    already opened one (a redelivery)."""
    ticket, created = await Ticket.objects.aget_or_create(event_id=event_id, defaults=fields)
    if not created:
        return None
    await show(layer, fields["source"], f"ticket #{ticket.pk} opened: {ticket.subject}")
    await announce(layer, ticket)
    return ticket


async def announce(layer: Any, ticket: Ticket) -> None:
    """Say so on IRC and Slack (both at once), and put what became of it on the page."""
    text = f"New ticket #{ticket.pk}: {ticket.subject} (from {ticket.requester})"
    sends = []
    if "irc" in settings.HELPDESK_ANNOUNCE:
        irc = IrcCommands(layer, IRC_COMMANDS, timeout=ANNOUNCE_TIMEOUT)
        sends.append(("irc", settings.HELPDESK_IRC_CHANNEL, irc.send))
    if "slack" in settings.HELPDESK_ANNOUNCE:
        slack = SlackCommands(layer, SLACK_COMMANDS, timeout=ANNOUNCE_TIMEOUT)
        sends.append(("slack", settings.HELPDESK_SLACK_CHANNEL, slack.send))
    # wait=True: the gateway's result (ok, or Slack's own error code) is what the page shows
    outcomes = await asyncio.gather(
        *(send(where, text, wait=True) for _, where, send in sends), return_exceptions=True
    )
    for (source, where, _), outcome in zip(sends, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            log.warning("ticket #%s not announced on %s: %r", ticket.pk, source, outcome)
            await show(layer, source, f"ticket #{ticket.pk} not announced in {where}: {outcome}")
        else:
            await show(layer, source, f"ticket #{ticket.pk} announced in {where}")


async def describe(number: str) -> str:
    """What ``!ticket 1`` and ``/ticket 1`` answer."""
    match = NUMBER.match(number)
    if match is None:
        return "Usage: ticket NUMBER, e.g. 1"
    ticket = await Ticket.objects.filter(pk=int(match.group(1))).afirst()
    return str(ticket) if ticket is not None else f"No ticket #{match.group(1)}"


class Desk(GatewayConsumer):
    """What the helpdesk's consumers share: events they have no handler for (``irc.joined``,
    ``slack.connect`` …) are skipped rather than failing, and the ``email.result`` of a mail
    sent with ``result_channel`` set to the consumer's own channel goes on the page."""

    async def dispatch(self, message: dict[str, Any]) -> None:
        if getattr(self, get_handler_name(message), None) is None:
            log.debug("%s: no handler for %s", type(self).__name__, message.get("type"))
            return
        await super().dispatch(message)

    async def email_result(self, message: dict[str, Any]) -> None:
        what = message["id"]
        if message["ok"]:
            await show(self.channel_layer, "mail", f"{what} sent")
        else:
            await show(self.channel_layer, "mail", f"{what} failed: {message['error']}")


# -- one consumer per integration -----------------------------------------------------------


class MailDesk(Desk, EmailConsumer):
    """``helpdesk-mail``: every mail to support@ opens a ticket; the sender gets its number."""

    async def email_receive(self, message: dict[str, Any]) -> None:
        sender = message["from"] or message["mail_from"] or ""
        ticket = await open_ticket(
            self.channel_layer,
            message["id"],
            source="mail",
            subject=message["subject"] or "(no subject)",
            requester=sender,
            text=message["text"] or "",
            message_id=message["message_id"] or "",
        )
        if ticket is None:
            return  # the same mail again (the sender retried after a 451): answered once
        # to Reply-To (else From), "Re:", threaded; never to a bounce or an auto-reply
        await self.reply(
            f"Thanks, we filed your mail as ticket #{ticket.pk}.\n",
            from_=settings.HELPDESK_SUPPORT_ADDRESS,
            id=f"reply to {sender} for ticket #{ticket.pk}",
            result_channel=self.scope["channel"],
        )


def reading_value(payload: Any) -> float | None:
    """The number in a reading (``41.5`` or ``{"value": 41.5}``), else ``None``."""
    if isinstance(payload, dict):
        payload = payload.get("value")
    if isinstance(payload, bool) or not isinstance(payload, int | float):
        return None
    return float(payload) if math.isfinite(payload) else None


class SensorDesk(Desk, MqttConsumer):
    """``helpdesk-sensors``: ``sensors/<device>/<quantity>`` readings; one over the threshold
    opens a ticket and publishes ``alerts/<device>/<quantity>`` (QoS 1)."""

    async def mqtt_message(self, message: dict[str, Any]) -> None:
        value = reading_value(message["payload"])
        if value is None:
            log.warning("ignoring %s: not a reading: %r", message["topic"], message["payload"])
            return
        _, device, quantity = [*message["topic"].split("/"), "", ""][:3]
        await show(self.channel_layer, "mqtt", f"{message['topic']} = {value:g}")
        threshold = settings.HELPDESK_ALERT_THRESHOLD
        if value <= threshold:
            return
        ticket = await open_ticket(
            self.channel_layer,
            message["id"],
            source="sensor",
            subject=f"{device} {quantity} at {value:g} (over {threshold:g})",
            requester=device,
        )
        if ticket is not None:
            alert = {"ticket": ticket.pk, "value": value, "threshold": threshold}
            await self.mqtt.publish(f"alerts/{device}/{quantity}", alert, qos=1)


class IrcDesk(Desk, IrcConsumer):
    """``helpdesk-irc``: ``!ticket 1`` answers with the ticket, ``!close 1`` closes it."""

    async def irc_receive(self, message: dict[str, Any]) -> None:
        command, _, argument = message["plain"].partition(" ")
        if command == "!ticket":
            await self.reply(f"{message['nick']}: {await describe(argument)}")
        elif command == "!close" and (match := NUMBER.match(argument)):
            number = match.group(1)
            closed = await Ticket.objects.filter(pk=int(number)).aupdate(closed=True)
            text = f"ticket #{number} closed" if closed else f"no ticket #{number}"
            await self.reply(f"{message['nick']}: {text}")
            if closed:
                await show(self.channel_layer, "irc", f"{message['nick']} closed ticket #{number}")


class SlackDesk(Desk, SlackConsumer):
    """``helpdesk-slack``: ``/ticket 1`` (only the asker sees the answer); an @mention is
    answered in its thread."""

    async def slack_command(self, message: dict[str, Any]) -> None:
        if message["command"] == "/ticket":
            await self.reply(await describe(message["text"]))

    async def slack_mention(self, message: dict[str, Any]) -> None:
        address = settings.HELPDESK_SUPPORT_ADDRESS
        await self.reply(f"Mail {address} and you get a ticket number back.", thread=True)


class DigestDesk(Desk, SchedulerConsumer):
    """``helpdesk-timers``: the ``digest`` schedule mails the open tickets to the team."""

    async def scheduler_fire(self, message: dict[str, Any]) -> None:
        if message["schedule"] != "digest":
            return
        tickets = [str(t) async for t in Ticket.objects.filter(closed=False).order_by("pk")]
        to = settings.HELPDESK_DIGEST_ADDRESS
        await show(self.channel_layer, "scheduler", f"digest: {len(tickets)} open ticket(s)")
        await EmailCommands(self.channel_layer, MAIL_COMMANDS).send(
            [to],
            from_=settings.HELPDESK_SUPPORT_ADDRESS,
            subject=f"Helpdesk digest: {len(tickets)} open ticket(s)",
            text="\n".join(tickets) + "\n" if tickets else "No open tickets.\n",
            id=f"digest to {to}",
            result_channel=self.scope["channel"],
        )


class LivePage(Desk, HttpWsConsumer):
    """``helpdesk-web``: the page at ``/``; its socket (``/live``) gets what happened so far,
    then every new line (the group :data:`LIVE_GROUP`)."""

    groups = [LIVE_GROUP]

    async def request(self, message: dict[str, Any]) -> None:
        if message["path"] != "/":
            await self.respond(404, b"Not Found", headers=[[b"content-type", b"text/plain"]])
            return
        headers = [[b"content-type", b"text/html; charset=utf-8"], [b"cache-control", b"no-store"]]
        await self.respond(200, PAGE, headers=headers)

    async def connect(self) -> None:
        await self.accept()
        past = Activity.objects.order_by("-pk")[:200]
        lines = [
            {"id": a.pk, "source": a.source, "summary": a.summary, "time": a.time}
            async for a in past
        ]
        for line in reversed(lines):  # the page skips a line it has (by id)
            await self.send(json.dumps(line))


#: channel → consumer (helpdesk/asgi.py routes them; ``runworker`` takes any subset)
CHANNELS: dict[str, type[Desk]] = {
    "helpdesk-mail": MailDesk,
    "helpdesk-sensors": SensorDesk,
    "helpdesk-irc": IrcDesk,
    "helpdesk-slack": SlackDesk,
    "helpdesk-timers": DigestDesk,
    "helpdesk-web": LivePage,
}
