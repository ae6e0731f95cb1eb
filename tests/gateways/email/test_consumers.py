"""gateways/email/consumers.py: EmailConsumer answers a mail in one call, never a machine's."""

from __future__ import annotations

from typing import Any

from gateways.email.consumers import EmailConsumer, email_send
from tests.gateways.conftest import Handle, nothing_sent, sent


def mail(**keys: Any) -> dict[str, Any]:
    base = {
        "type": "email.receive",
        "gateway": "support-mail",
        "id": "<m1@example.org>",
        "reply_channel": "support-mail.send",
        "mail_from": "bounces@example.org",
        "from": "Carol <carol@example.org>",
        "reply_to": [],
        "subject": "Printer on fire",
        "message_id": "<m1@example.org>",
        "references": ["<m0@example.org>"],
        "kind": "normal",
    }
    return {**base, **keys}


class Support(EmailConsumer):
    async def email_receive(self, message: dict[str, Any]) -> None:
        await self.reply("Thanks, we got it.", id="t1", result_channel=self.scope["channel"])


async def test_reply_is_threaded_and_goes_to_the_sender(handle: Handle) -> None:
    support = await handle(Support, mail())
    assert await sent(support, "support-mail.send") == email_send(
        ["Carol <carol@example.org>"],
        subject="Re: Printer on fire",
        text="Thanks, we got it.",
        in_reply_to="<m1@example.org>",
        references=["<m0@example.org>"],
        id="t1",
        result_channel="inbound",
    )


async def test_reply_to_wins_and_re_is_not_stacked(handle: Handle) -> None:
    support = await handle(Support, mail(reply_to=["help@example.org"], subject="Re: x"))
    reply = await sent(support, "support-mail.send")
    assert (reply["to"], reply["subject"]) == (["help@example.org"], "Re: x")


async def test_bounces_auto_replies_and_list_mail_are_never_answered(handle: Handle) -> None:
    for kind in ("bounce", "auto_reply", "list"):
        support = await handle(Support, mail(kind=kind))
        assert await nothing_sent(support, "support-mail.send")
