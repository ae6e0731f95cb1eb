from django.db import models


class Fire(models.Model):
    """A timed message that reached TimerConsumer (one row per fire, de-duplicated by its id)."""

    event_id = models.CharField(max_length=255, unique=True)
    schedule = models.CharField(max_length=200)
    scheduled_time = models.FloatField()
    fire_time = models.FloatField()
    received_at = models.DateTimeField(auto_now_add=True)
    note = models.TextField(blank=True)
    #: scheduled, manual (scheduler.trigger) or backfill (scheduler.backfill)
    kind = models.CharField(max_length=20, default="scheduled")
    run_id = models.CharField(max_length=255, blank=True, default="")
    #: due times of its schedule given up just before it (the fire's ``missed``)
    missed = models.IntegerField(default=0)
    #: times this fire arrived (a redelivery is counted, and handled once)
    deliveries = models.IntegerField(default=1)
    #: when the handler began and ended (epoch seconds): the run the overlap policy sees
    started_at = models.FloatField(null=True)
    finished_at = models.FloatField(null=True)
    #: a scheduler.cancel came for this run (overlap: cancel_other)
    cancelled = models.BooleanField(default=False)

    def __str__(self) -> str:
        return f"{self.schedule} @ {self.scheduled_time}"
