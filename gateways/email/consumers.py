"""Django-side helpers for the email gateway: ``email.send`` checked before it leaves, and a
generic consumer that answers a mail in one call.

    from gateways.email.consumers import EmailConsumer

    class SupportConsumer(EmailConsumer):
        async def email_receive(self, message):
            await self.reply("Thanks, we got it.")   # To, Re: subject, In-Reply-To, References

:func:`email_send` returns the command dict and raises :class:`core.consumers.InvalidCommand`
for anything the gateway would refuse (no recipient, an address that is not one, a line break in
a header, an unknown key …): it builds the message with the gateway's own
``translate.build_mail``. Without ``from_`` the gateway uses ``email.relay.from_address`` (it
refuses the command when that is not set either). :class:`EmailCommands` sends it; ``wait=True``
returns the ``email.result`` (``message_id`` of the sent mail, ``refused`` recipients) once the
relay took it. The keys are those of ``gateways/email/README.md``; the guide is
``docs/consumers.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from core.consumers import (
    CommandId,
    Commands,
    GatewayConsumer,
    Message,
    Validator,
    command,
)
from gateways.email.translate import build_mail

__all__ = ["VALIDATORS", "EmailCommands", "EmailConsumer", "email_send"]

log = logging.getLogger("gateway.consumers")

Addresses = str | Sequence[str]
#: stands in for email.relay.from_address, which only the gateway knows
_SOME_SENDER = "sender@example.invalid"


def _check_send(body: Mapping[str, Any]) -> object:
    return build_mail(body, default_from=_SOME_SENDER, message_id_domain="localhost")


#: every command the email gateway takes, with the gateway's own check of its keys
VALIDATORS: dict[str, Validator] = {"email.send": _check_send}


def _list(value: Addresses | None) -> str | list[str] | None:
    return value if value is None or isinstance(value, str) else list(value)


def email_send(
    to: Addresses | None = None,
    *,
    subject: str | None = None,
    text: str | None = None,
    html: str | None = None,
    cc: Addresses | None = None,
    bcc: Addresses | None = None,
    from_: str | None = None,
    reply_to: Addresses | None = None,
    attachments: Sequence[Mapping[str, Any]] | None = None,
    headers: Mapping[str, str] | Sequence[Sequence[str]] | None = None,
    in_reply_to: str | None = None,
    references: Addresses | None = None,
    id: CommandId | None = None,
    result_channel: str | None = None,
) -> Message:
    """``email.send``: addresses are ``addr`` or ``Name <addr>``; ``from_`` is the ``from`` key;
    ``attachments`` are ``{filename, content_type, content: bytes | str}``; ``in_reply_to``
    sets ``In-Reply-To`` and extends ``References``."""
    if headers is not None:
        headers = dict(headers) if isinstance(headers, Mapping) else [list(h) for h in headers]
    message = command(
        "email.send",
        id=id,
        result_channel=result_channel,
        to=_list(to),
        cc=_list(cc),
        bcc=_list(bcc),
        reply_to=_list(reply_to),
        subject=subject,
        text=text,
        html=html,
        attachments=None if attachments is None else [dict(a) for a in attachments],
        headers=headers,
        in_reply_to=in_reply_to,
        references=_list(references),
    )
    if from_ is not None:
        message["from"] = from_
    return EmailCommands.check(message)


class EmailCommands(Commands):
    """Send ``email.send`` to one integration's command channel (``NAME.send``, every event's
    ``reply_channel``). :meth:`send` checks the command first
    (:class:`~core.consumers.InvalidCommand`, nothing sent) and returns ``None``, or with
    ``wait=True`` the ``email.result`` (:class:`~core.consumers.CommandFailed` when the relay
    refused it, :class:`~core.consumers.ResultTimeout` after ``timeout`` seconds: a relay that
    retries can take minutes, see ``email.relay.retries``)."""

    protocol = "email"
    validators = VALIDATORS

    async def send(
        self,
        to: Addresses | None = None,
        *,
        subject: str | None = None,
        text: str | None = None,
        html: str | None = None,
        cc: Addresses | None = None,
        bcc: Addresses | None = None,
        from_: str | None = None,
        reply_to: Addresses | None = None,
        attachments: Sequence[Mapping[str, Any]] | None = None,
        headers: Mapping[str, str] | Sequence[Sequence[str]] | None = None,
        in_reply_to: str | None = None,
        references: Addresses | None = None,
        id: CommandId | None = None,
        result_channel: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`email_send`; the result has ``message_id`` and ``refused``."""
        message = email_send(
            to,
            subject=subject,
            text=text,
            html=html,
            cc=cc,
            bcc=bcc,
            from_=from_,
            reply_to=reply_to,
            attachments=attachments,
            headers=headers,
            in_reply_to=in_reply_to,
            references=references,
            id=id,
            result_channel=result_channel,
        )
        return await self.submit(message, wait=wait, timeout=timeout)


def reply_subject(subject: str | None) -> str:
    """``Re: subject``, without stacking a second ``Re:``."""
    subject = subject or ""
    return subject if subject.lower().startswith("re:") else f"Re: {subject}"


class EmailConsumer(GatewayConsumer):
    """A consumer of ``email.receive`` (handled as ``email_receive``, as in any consumer) that
    answers a mail in one call: :meth:`reply`; :attr:`email` sends any mail."""

    commands_class = EmailCommands

    @property
    def email(self) -> EmailCommands:
        """:class:`EmailCommands` to the integration the current mail came from."""
        return EmailCommands(self.channel_layer, self.reply_channel())

    async def reply(
        self,
        text: str | None = None,
        *,
        html: str | None = None,
        from_: str | None = None,
        attachments: Sequence[Mapping[str, Any]] | None = None,
        headers: Mapping[str, str] | Sequence[Sequence[str]] | None = None,
        id: CommandId | None = None,
        result_channel: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """Answer the current mail: to its ``Reply-To`` (else ``From``, else the envelope
        sender), ``Re:`` its subject, threaded (``In-Reply-To``, ``References``).

        Mail that is not ``kind: normal`` (a bounce, an auto-reply, list mail) is never
        answered (RFC 3834 2: two auto-responders answering each other loop): that returns
        ``None`` and sends nothing. The gateway marks the reply ``Auto-Submitted:
        auto-replied``; ``headers={"Auto-Submitted": "no"}`` for a reply a person wrote.
        """
        event = self.current("reply")
        kind = event.get("kind", "normal")
        if kind != "normal":
            log.info("not answering %s (kind: %s)", event.get("message_id"), kind)
            return None
        return await self.email.send(
            event.get("reply_to") or [event.get("from") or event.get("mail_from")],
            subject=reply_subject(event.get("subject")),
            text=text,
            html=html,
            from_=from_,
            attachments=attachments,
            headers=headers,
            in_reply_to=event.get("message_id"),
            references=event.get("references") or None,
            id=id,
            result_channel=result_channel,
            wait=wait,
            timeout=timeout,
        )
