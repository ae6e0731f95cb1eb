from django.db import models


class Mail(models.Model):
    """A mail received through the email gateway, and what became of our reply."""

    event_id = models.CharField(max_length=255, unique=True)  # de-duplicates redeliveries
    message_id = models.CharField(max_length=255, blank=True)
    mail_from = models.CharField(max_length=255)
    subject = models.TextField(blank=True)
    text = models.TextField(blank=True)
    attachment_count = models.PositiveIntegerField(default=0)
    # email.receive's `kind`: only "normal" mail is answered (never a bounce or an auto-reply)
    kind = models.CharField(max_length=20, default="normal")
    # DMARC verdict of the sender (`auth.dmarc.result`), "" with verify: off
    dmarc = models.CharField(max_length=20, blank=True)
    received_at = models.DateTimeField(auto_now_add=True)
    reply_message_id = models.CharField(max_length=255, blank=True)
    reply_error = models.TextField(blank=True)

    def __str__(self) -> str:
        return f"{self.message_id} from {self.mail_from}"
