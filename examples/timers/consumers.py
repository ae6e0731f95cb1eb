"""Timed work from the scheduler (examples/scheduler.yaml), on the ``timers`` channel.

* ``daily-digest`` (weekdays 18:00 Europe/Berlin): mails the day's support mail as one digest
  through the email gateway (``email.send`` to ``support-mail.send``).
* A fire whose message carries ``follow_up: SECONDS`` (``ask-back``) asks the scheduler, on the
  fire's ``reply_channel``, for a one-shot back to this channel in that many seconds: how a
  consumer says "remind me in 10 minutes". Its id is derived from the fire's id, so a redelivered
  fire does not schedule a second reminder (``scheduler.add`` is idempotent per id).
* Every fire is recorded (``timers.models.Fire``): its kind (scheduled, or a ``manual``
  ``scheduler.trigger``, or a ``backfill``), how often it arrived, when its handler began and
  ended. A fire whose message carries ``hold: SECONDS`` stands for a long job and takes that
  long; with an overlap policy its schedule waits for it (``ConsumerWorker`` reports the run
  done once the handler returned). ``scheduler.cancel`` (``overlap: cancel_other``) marks the
  cancelled run. The heartbeat never comes here: its YAML message is an ``mqtt.publish`` that
  the scheduler sends straight to the MQTT gateway.
"""

import asyncio
import logging
import time
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from channels.consumer import AsyncConsumer
from django.conf import settings
from django.db.models import F
from mail.models import Mail

from gateways.email.consumers import EmailCommands
from gateways.scheduler.consumers import SchedulerCommands
from timers.models import Fire

log = logging.getLogger(__name__)


class TimerConsumer(AsyncConsumer):
    async def scheduler_fire(self, message: dict[str, Any]) -> None:
        kind = "manual" if message.get("manual") else "scheduled"
        fire, created = await Fire.objects.aget_or_create(
            event_id=message["id"],
            defaults={
                "schedule": message["schedule"],
                "scheduled_time": message["scheduled_time"],
                "fire_time": message["fire_time"],
                "note": str(message.get("note", "")),
                "kind": "backfill" if message.get("backfill") else kind,
                "run_id": message.get("run_id") or "",
                "missed": int(message.get("missed") or 0),
                "started_at": time.time(),
            },
        )
        if not created:  # delivered twice: counted, handled once
            await Fire.objects.filter(pk=fire.pk).aupdate(deliveries=F("deliveries") + 1)
            return
        # never let an exception escape a consumer: runworker would drop what it has queued
        try:
            if message["schedule"] == "daily-digest":
                await self.send_digest(message)
            if message.get("follow_up"):
                await self.ask_back(message, float(message["follow_up"]))
            if message.get("hold"):
                await asyncio.sleep(float(message["hold"]))  # a long job
        except Exception as exc:
            log.warning("timer %s: %r", fire, exc)
        await Fire.objects.filter(pk=fire.pk).aupdate(finished_at=time.time())

    async def scheduler_cancel(self, message: dict[str, Any]) -> None:
        """``overlap: cancel_other`` ended run ``run_id``: a real job would stop it here."""
        await Fire.objects.filter(run_id=message["run_id"]).aupdate(cancelled=True)

    async def send_digest(self, message: dict[str, Any]) -> None:
        zone = ZoneInfo(message.get("zone", "Europe/Berlin"))
        day = datetime.fromtimestamp(message["scheduled_time"], zone)
        start = day.replace(hour=0, minute=0, second=0, microsecond=0)
        mails = [m async for m in Mail.objects.filter(received_at__gte=start).order_by("pk")]
        lines = [f"#{m.pk} {m.mail_from}: {m.subject or '(no subject)'}" for m in mails]
        await EmailCommands(self.channel_layer, "support-mail.send", timeout=60).send(
            [settings.DIGEST_ADDRESS],
            from_=settings.SUPPORT_ADDRESS,
            subject=f"Support digest {day.date().isoformat()}: {len(mails)} mail(s)",
            text="\n".join(lines) + "\n" if lines else "No mail today.\n",
        )

    async def ask_back(self, message: dict[str, Any], seconds: float) -> None:
        await SchedulerCommands(self.channel_layer, message["reply_channel"], timeout=60).add(
            f"follow-up.{message['id']}",
            in_=seconds,
            channel=self.scope["channel"],
            message={"note": f"follow-up of {message['schedule']}"},
        )

    async def scheduler_result(self, message: dict[str, Any]) -> None:
        if not message["ok"]:
            log.warning("scheduler refused %s: %s", message["id"], message["error"])
