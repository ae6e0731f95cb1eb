from django.db import models


class Reading(models.Model):
    """One sensor reading received over MQTT."""

    message_id = models.CharField(max_length=255, unique=True)  # de-duplicates redeliveries
    topic = models.CharField(max_length=255)
    device = models.CharField(max_length=255)
    quantity = models.CharField(max_length=255)
    value = models.FloatField()
    received_at = models.DateTimeField(auto_now_add=True)
    alerted = models.BooleanField(default=False)  # the broker acknowledged our alert

    class Meta:
        indexes = [models.Index(fields=["device", "quantity", "-received_at"])]

    def __str__(self) -> str:
        return f"{self.topic} = {self.value}"


class Watch(models.Model):
    """A topic filter subscribed at run time (``sensors-control/watch``) and its threshold."""

    topic = models.CharField(max_length=255, unique=True)
    threshold = models.FloatField()
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.topic} > {self.threshold}"
