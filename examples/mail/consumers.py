"""Stores every mail that reaches ``support-mail`` and answers the ones a person wrote.

The reply goes back through the gateway (``email.send`` on ``reply_channel``) with the threading
headers set, and the gateway reports the outcome as ``email.result`` on this same channel. Mail
whose ``kind`` is not ``normal`` (a bounce, an auto-reply, list mail) is stored and never
answered: two auto-responders answering each other is a mail loop (RFC 3834 2). Our replies carry
``Auto-Submitted: auto-replied`` (the gateway sets it), so a well-behaved responder on the other
side does not answer them either.
"""

import asyncio
import logging
from pathlib import Path
from typing import Any

from channels.consumer import AsyncConsumer
from django.conf import settings
from live.events import show

from gateways.email.consumers import EmailCommands
from mail.models import Mail

log = logging.getLogger(__name__)


class MailConsumer(AsyncConsumer):
    async def email_receive(self, message: dict[str, Any]) -> None:
        text = message["text"]
        if text is None and message.get("text_path"):
            # a body too large for the layer was stored like an attachment
            text = await asyncio.to_thread(Path(message["text_path"]).read_text, "utf-8")
        auth = message.get("auth") or {}
        kind = message.get("kind", "normal")
        mail, created = await Mail.objects.aget_or_create(
            event_id=message["id"],
            defaults={
                "message_id": message["message_id"] or "",
                "mail_from": message["mail_from"] or "",
                "subject": message["subject"] or "",
                "text": text or "",
                "attachment_count": len(message["attachments"]),
                "kind": kind,
                "dmarc": (auth.get("dmarc") or {}).get("result", ""),
            },
        )
        if not created:
            return  # the same mail delivered twice (the sender retried after a 451): answered once
        await show(
            self.channel_layer,
            "mail",
            f"{message['from'] or message['mail_from']}: {message['subject'] or '(no subject)'}",
            **{"from": message["mail_from"], "subject": message["subject"] or ""},
            message_id=message["message_id"],
        )
        if kind != "normal":
            log.info("not answering %s: it is a %s", mail.message_id, kind)
            return
        reply_to = message["reply_to"] or [message["from"] or message["mail_from"]]
        subject = message["subject"] or ""
        email = EmailCommands(self.channel_layer, message["reply_channel"], timeout=60)
        # never let an exception escape a consumer: runworker would drop what it has queued
        try:
            await email.send(
                reply_to,
                id=str(mail.pk),
                result_channel=self.scope["channel"],
                from_=settings.SUPPORT_ADDRESS,
                subject=subject if subject.lower().startswith("re:") else f"Re: {subject}",
                text=f"Thanks, we got your mail and filed it as #{mail.pk}.\n",
                in_reply_to=message["message_id"],
                references=message["references"],
            )
        except Exception as exc:
            log.warning("could not queue the reply to %s: %r", mail.message_id, exc)
            await Mail.objects.filter(pk=mail.pk).aupdate(reply_error=f"not queued: {exc!r}")

    async def email_result(self, message: dict[str, Any]) -> None:
        if message["ok"]:
            await Mail.objects.filter(pk=message["id"]).aupdate(
                reply_message_id=message["message_id"]
            )
        else:
            await Mail.objects.filter(pk=message["id"]).aupdate(reply_error=message["error"])
