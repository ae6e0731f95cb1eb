"""The team's Slack app: new members get a welcome, tickets are looked up from the database.

Routed on the ``team-slack`` channel (``examples/slack.yaml``), with the generic
:class:`~gateways.slack.consumers.SlackConsumer`, so every answer goes to the workspace the
event came from (the app may be installed in several: ``slack.oauth``):

* ``/ticket 42`` is answered through the command's ``response_url`` (only the asker sees it);
* ``/ticket`` alone opens a modal (``slack.views_open`` with the command's ``trigger_id``): a
  ticket number, or a search by subject in an external select whose options come from the
  database (``slack.options``, answered inside the acknowledgement);
* submitting it is answered inside the acknowledgement too: field errors
  (``response_action: errors``) for a number that is not one or no ticket, else the modal is
  replaced by the ticket (``response_action: update``);
* the App Home tab lists the open tickets (``slack.views_publish`` on ``app_home_opened``).
"""

import logging
import re
from typing import Any

from channels.consumer import get_handler_name
from mail.models import Mail

from gateways.slack.consumers import SlackConsumer

log = logging.getLogger(__name__)

TICKET = re.compile(r"^\s*#?(\d{1,18})\s*$")
LOOKUP = "ticket_lookup"


def plain(text: str) -> dict[str, str]:
    return {"type": "plain_text", "text": text}


def section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


#: the modal /ticket opens: a number, or a search by subject (its options come from us)
LOOKUP_MODAL: dict[str, Any] = {
    "type": "modal",
    "callback_id": LOOKUP,
    "title": plain("Look up a ticket"),
    "submit": plain("Look up"),
    "close": plain("Cancel"),
    "blocks": [
        {
            "type": "input",
            "block_id": "ticket",
            "optional": True,
            "label": plain("Ticket number"),
            "element": {"type": "plain_text_input", "action_id": "number"},
        },
        {
            "type": "input",
            "block_id": "search",
            "optional": True,
            "label": plain("…or search by subject"),
            "element": {
                "type": "external_select",
                "action_id": "subject",
                "min_query_length": 1,
                "placeholder": plain("Printer"),
            },
        },
    ],
}


def describe(mail: Mail) -> str:
    state = "answered" if mail.reply_message_id else "open"
    return f"#{mail.pk} {mail.subject!r} from {mail.mail_from} ({state})"


def chosen(values: dict[str, Any]) -> str:
    """The ticket number the modal's inputs name: typed, else picked by subject."""
    typed = values.get("ticket", {}).get("number", {}).get("value") or ""
    picked = values.get("search", {}).get("subject", {}).get("selected_option") or {}
    return typed.strip() or str(picked.get("value") or "")


class SlackTeamConsumer(SlackConsumer):
    async def dispatch(self, message: dict[str, Any]) -> None:
        if getattr(self, get_handler_name(message), None) is None:
            return  # an event this app does not use (slack.message …)
        try:  # an exception escaping a consumer would lose what runworker has queued for it
            await super().dispatch(message)
        except Exception as exc:
            log.warning("could not answer %s %s: %r", message.get("type"), message.get("id"), exc)

    async def slack_joined(self, message: dict[str, Any]) -> None:
        text = f"Welcome <@{message['user']}>! Type `/ticket 42` to look up support ticket 42."
        await self.slack.send(message["channel"], text)

    async def slack_command(self, message: dict[str, Any]) -> None:
        if message["command"] != "/ticket":
            return
        if not message["text"].strip():
            # a trigger_id is good for 3 s: the modal first, anything slow after
            await self.open_view(LOOKUP_MODAL)
            return
        match = TICKET.match(message["text"])
        if match is None:
            text = "Usage: `/ticket 42`, or `/ticket` to search"
        else:
            mail = await Mail.objects.filter(pk=int(match.group(1))).afirst()
            text = describe(mail) if mail is not None else f"No ticket #{match.group(1)}"
        await self.reply(text, response_type="ephemeral")

    async def slack_options(self, message: dict[str, Any]) -> None:
        """The subject search: at most 100 options (Slack's limit), inside the ack."""
        found = Mail.objects.filter(subject__icontains=message["value"]).order_by("-pk")[:100]
        options = [
            {"text": plain(f"#{m.pk} {m.subject}"[:75]), "value": str(m.pk)} async for m in found
        ]
        await self.ack_with(options=options)

    async def slack_view_submission(self, message: dict[str, Any]) -> None:
        if message["callback_id"] != LOOKUP:
            await self.ack_with()
            return
        number = chosen(message["values"])
        if not TICKET.match(number):
            await self.ack_with(errors={"ticket": "Type a ticket number such as 42"})
            return
        mail = await Mail.objects.filter(pk=int(number)).afirst()
        if mail is None:
            await self.ack_with(errors={"ticket": f"No ticket #{number}"})
            return
        found = {
            "type": "modal",
            "callback_id": "ticket_shown",
            "title": plain(f"Ticket #{mail.pk}"),
            "close": plain("Done"),
            "blocks": [section(describe(mail)), section(mail.text[:2900] or "_(no text)_")],
        }
        await self.ack_with(response_action="update", view=found)

    async def slack_app_home_opened(self, message: dict[str, Any]) -> None:
        if message["tab"] != "home":
            return
        open_tickets = Mail.objects.filter(reply_message_id="").order_by("-pk")
        lines = [describe(m) async for m in open_tickets[:10]]
        count = await open_tickets.acount()
        view = {
            "type": "home",
            "blocks": [
                section(f"*{count} open ticket{'s' if count != 1 else ''}*"),
                *(section(line) for line in lines),
                section("Type `/ticket` anywhere to look one up."),
            ],
        }
        await self.publish_home(view)

    async def slack_connect(self, message: dict[str, Any]) -> None:
        log.info("Slack app connected as %s in %s", message["user"], message["team"])

    async def slack_disconnect(self, message: dict[str, Any]) -> None:
        log.warning("Slack app disconnected: %s", message["reason"])
