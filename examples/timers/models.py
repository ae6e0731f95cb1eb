from django.db import models


class Fire(models.Model):
    """A timed message that reached TimerConsumer (one row per fire, de-duplicated by its id)."""

    event_id = models.CharField(max_length=255, unique=True)
    schedule = models.CharField(max_length=200)
    scheduled_time = models.FloatField()
    fire_time = models.FloatField()
    received_at = models.DateTimeField(auto_now_add=True)
    note = models.TextField(blank=True)

    def __str__(self) -> str:
        return f"{self.schedule} @ {self.scheduled_time}"
