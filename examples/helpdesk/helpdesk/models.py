from django.db import models


class Ticket(models.Model):
    """Something someone needs help with: opened by a mail or a sensor alert."""

    #: the event that opened it (``email.receive`` / ``mqtt.message`` ``id``): a redelivered
    #: event opens no second ticket
    event_id = models.CharField(max_length=255, unique=True)
    #: "mail" or "sensor"
    source = models.CharField(max_length=20)
    subject = models.TextField()
    requester = models.CharField(max_length=255, blank=True)
    text = models.TextField(blank=True)
    #: the mail's Message-ID, for threading the answers
    message_id = models.CharField(max_length=255, blank=True)
    opened_at = models.DateTimeField(auto_now_add=True)
    closed = models.BooleanField(default=False)

    def __str__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"#{self.pk} {self.subject!r} ({state}, from {self.requester or self.source})"


class Activity(models.Model):
    """One line of the live page, kept so a page opened later shows what happened before."""

    source = models.CharField(max_length=20)
    summary = models.TextField()
    time = models.FloatField()

    class Meta:
        ordering = ["pk"]
