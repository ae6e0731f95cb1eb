"""Django-side helpers for the scheduler: typed commands, checked before they leave, and a
generic consumer that asks for a timed message back in one call.

    from gateways.scheduler.consumers import SchedulerConsumer

    class TimerConsumer(SchedulerConsumer):
        async def scheduler_fire(self, message):
            ...
            await self.later("10m", {"note": "check again"})   # a one-shot back to this channel

Builders (``scheduler_add``, ``scheduler_remove``, ``scheduler_list``) return the command dict and
raise :class:`core.consumers.InvalidCommand` for anything the gateway would refuse (a cron
expression that is not one, an unknown time zone, two of ``in``/``at``/``cron``/``every``, an
unknown key …), using the gateway's own parser (``translate.spec_from_command``). Checks that
depend on the gateway's state (the id of a YAML schedule, ``max_schedules``) or YAML (an ``at``
in the past is refused only beyond its ``misfire_grace``) are the gateway's. ``datetime`` and
``timedelta`` values are turned into what the command takes. :class:`SchedulerCommands` sends
them; ``wait=True`` returns the ``scheduler.result`` (``created``, ``next_fire`` …). The keys
are those of ``gateways/scheduler/README.md``; the guide is ``docs/consumers.md``.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, Literal

from core.consumers import (
    CommandId,
    Commands,
    GatewayConsumer,
    InvalidCommand,
    Message,
    Validator,
    command,
)
from gateways.scheduler.translate import (
    Overlap,
    parse_backfill,
    parse_done,
    parse_list,
    parse_remove,
    parse_targets,
    parse_trigger,
    spec_from_command,
)

__all__ = [
    "VALIDATORS",
    "SchedulerCommands",
    "SchedulerConsumer",
    "scheduler_add",
    "scheduler_backfill",
    "scheduler_done",
    "scheduler_list",
    "scheduler_pause",
    "scheduler_remove",
    "scheduler_resume",
    "scheduler_trigger",
]

Duration = float | int | str | timedelta
Instant = float | int | str | datetime
Policy = Literal["skip", "once", "all"]


def _check_add(body: Mapping[str, Any]) -> object:
    # the gateway's own channel and defaults are its own: an unlimited misfire_grace refuses no
    # `at` the gateway could take (it refuses one older than its misfire_grace)
    return spec_from_command(
        body,
        now=time.time(),
        default_channel="inbound",
        defaults={"misfire_grace": math.inf},
    )


#: every command the scheduler takes, with the gateway's own check of its keys
VALIDATORS: dict[str, Validator] = {
    "scheduler.add": _check_add,
    "scheduler.remove": parse_remove,
    "scheduler.list": parse_list,
    "scheduler.pause": parse_targets,
    "scheduler.resume": parse_targets,
    "scheduler.trigger": parse_trigger,
    "scheduler.backfill": parse_backfill,
    "scheduler.done": parse_done,
}


def _duration(value: Duration | None) -> float | int | str | None:
    return value.total_seconds() if isinstance(value, timedelta) else value


def _instant(value: Instant | None) -> float | int | str | None:
    if not isinstance(value, datetime):
        return value
    # naive: read by the gateway in the command's timezone, as in the YAML
    return value.isoformat() if value.tzinfo is None else value.timestamp()


def _checked(type_: str, id: CommandId | None, result_channel: str | None, **keys: Any) -> Message:
    return SchedulerCommands.check(command(type_, id=id, result_channel=result_channel, **keys))


def scheduler_add(
    schedule: str,
    *,
    in_: Duration | None = None,
    at: Instant | None = None,
    cron: str | None = None,
    every: Duration | None = None,
    timezone: str | None = None,
    start: Instant | None = None,
    end: Instant | None = None,
    jitter: Duration | None = None,
    misfire: Policy | None = None,
    misfire_cap: int | None = None,
    misfire_grace: Duration | None = None,
    channel: str | None = None,
    message: Mapping[str, Any] | None = None,
    id: CommandId | None = None,
    result_channel: str | None = None,
) -> Message:
    """``scheduler.add``: exactly one of ``in_`` (the ``in`` key: a one-shot this long from now),
    ``at``, ``cron`` or ``every``. ``message`` with a ``type`` is sent as it is (another
    gateway's command, e.g. ``irc_send(…)``, to that gateway's command channel as ``channel``);
    without one its keys are added to the ``scheduler.fire``. Idempotent per ``schedule`` id."""
    keys: dict[str, Any] = {
        "schedule": schedule,
        "in": _duration(in_),
        "at": _instant(at),
        "cron": cron,
        "every": _duration(every),
        "timezone": timezone,
        "start": _instant(start),
        "end": _instant(end),
        "jitter": _duration(jitter),
        "misfire": misfire,
        "misfire_cap": misfire_cap,
        "misfire_grace": _duration(misfire_grace),
        "channel": channel,
        "message": None if message is None else dict(message),
    }
    return _checked("scheduler.add", id, result_channel, **keys)


def scheduler_remove(
    schedule: str, *, id: CommandId | None = None, result_channel: str | None = None
) -> Message:
    """``scheduler.remove`` of a run-time schedule (YAML ones are edited in the file)."""
    return _checked("scheduler.remove", id, result_channel, schedule=schedule)


def scheduler_list(
    prefix: str = "", *, id: CommandId | None = None, result_channel: str | None = None
) -> Message:
    """``scheduler.list`` of the schedules whose id starts with ``prefix``; the answer is in the
    result (``schedules``), so send it with ``wait=True`` or a ``result_channel``."""
    return _checked("scheduler.list", id, result_channel, prefix=prefix)


def _targets(schedule: str | None, everything: bool) -> dict[str, Any]:
    return {"all": True} if everything else {"schedule": schedule}


def scheduler_pause(
    schedule: str | None = None,
    *,
    all: bool = False,
    note: str | None = None,
    id: CommandId | None = None,
    result_channel: str | None = None,
) -> Message:
    """``scheduler.pause`` of one schedule, or of every one with ``all=True``; ``note`` goes to
    the log and to ``scheduler.list``. Due times passed while paused follow the schedule's
    misfire policy on resume."""
    keys = _targets(schedule, all)
    return _checked("scheduler.pause", id, result_channel, note=note, **keys)


def scheduler_resume(
    schedule: str | None = None,
    *,
    all: bool = False,
    note: str | None = None,
    id: CommandId | None = None,
    result_channel: str | None = None,
) -> Message:
    """``scheduler.resume`` of one schedule, or of every one with ``all=True``."""
    keys = _targets(schedule, all)
    return _checked("scheduler.resume", id, result_channel, note=note, **keys)


def scheduler_trigger(
    schedule: str,
    *,
    request_id: str | None = None,
    overlap: Overlap | None = None,
    id: CommandId | None = None,
    result_channel: str | None = None,
) -> Message:
    """``scheduler.trigger``: fire ``schedule`` once now (``manual: true``), exactly once per
    ``request_id`` across replicas."""
    return _checked(
        "scheduler.trigger",
        id,
        result_channel,
        schedule=schedule,
        request_id=request_id,
        overlap=overlap,
    )


def scheduler_backfill(
    schedule: str,
    start: Instant,
    end: Instant,
    *,
    request_id: str | None = None,
    overlap: Overlap | None = None,
    id: CommandId | None = None,
    result_channel: str | None = None,
) -> Message:
    """``scheduler.backfill``: fire every due time of ``schedule`` from ``start`` to ``end``
    (the ``from`` and ``to`` keys; past times only), oldest first, ``backfill: true``."""
    keys = {"from": _instant(start), "to": _instant(end)}
    return _checked(
        "scheduler.backfill",
        id,
        result_channel,
        schedule=schedule,
        request_id=request_id,
        overlap=overlap,
        **keys,
    )


def scheduler_done(
    run_id: str,
    *,
    schedule: str | None = None,
    id: CommandId | None = None,
    result_channel: str | None = None,
) -> Message:
    """``scheduler.done``: the run ``run_id`` (a fire's ``run_id``) finished (overlap policies
    wait for it; ``ConsumerWorker`` sends it itself for ``report_done: worker``)."""
    return _checked("scheduler.done", id, result_channel, run_id=run_id, schedule=schedule)


class SchedulerCommands(Commands):
    """Send scheduler commands to one integration's command channel (``NAME.send``, every
    fire's ``reply_channel``).

    Every method checks its command first (:class:`~core.consumers.InvalidCommand`, nothing
    sent) and returns ``None``, or with ``wait=True`` the ``scheduler.result``
    (:class:`~core.consumers.CommandFailed` on ``ok: false``,
    :class:`~core.consumers.ResultTimeout` after ``timeout`` seconds).
    """

    protocol = "scheduler"
    validators = VALIDATORS

    async def add(
        self,
        schedule: str,
        *,
        in_: Duration | None = None,
        at: Instant | None = None,
        cron: str | None = None,
        every: Duration | None = None,
        timezone: str | None = None,
        start: Instant | None = None,
        end: Instant | None = None,
        jitter: Duration | None = None,
        misfire: Policy | None = None,
        misfire_cap: int | None = None,
        misfire_grace: Duration | None = None,
        channel: str | None = None,
        message: Mapping[str, Any] | None = None,
        id: CommandId | None = None,
        result_channel: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`scheduler_add`; the result has ``created``, ``done``, ``next_fire``."""
        command_ = scheduler_add(
            schedule,
            in_=in_,
            at=at,
            cron=cron,
            every=every,
            timezone=timezone,
            start=start,
            end=end,
            jitter=jitter,
            misfire=misfire,
            misfire_cap=misfire_cap,
            misfire_grace=misfire_grace,
            channel=channel,
            message=message,
            id=id,
            result_channel=result_channel,
        )
        return await self.submit(command_, wait=wait, timeout=timeout)

    async def remove(
        self,
        schedule: str,
        *,
        id: CommandId | None = None,
        result_channel: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`scheduler_remove`; the result has ``removed``."""
        message = scheduler_remove(schedule, id=id, result_channel=result_channel)
        return await self.submit(message, wait=wait, timeout=timeout)

    async def list(
        self,
        prefix: str = "",
        *,
        id: CommandId | None = None,
        result_channel: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`scheduler_list`; the result has ``schedules`` and ``truncated``."""
        message = scheduler_list(prefix, id=id, result_channel=result_channel)
        return await self.submit(message, wait=wait, timeout=timeout)

    async def pause(
        self,
        schedule: str | None = None,
        *,
        all: bool = False,
        note: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`scheduler_pause`; the result has ``changed`` and ``schedules``."""
        message = scheduler_pause(schedule, all=all, note=note)
        return await self.submit(message, wait=wait, timeout=timeout)

    async def resume(
        self,
        schedule: str | None = None,
        *,
        all: bool = False,
        note: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`scheduler_resume`; the result has ``changed`` and ``schedules``."""
        message = scheduler_resume(schedule, all=all, note=note)
        return await self.submit(message, wait=wait, timeout=timeout)

    async def trigger(
        self,
        schedule: str,
        *,
        request_id: str | None = None,
        overlap: Overlap | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`scheduler_trigger`; the result has ``run_id`` and ``created``."""
        message = scheduler_trigger(schedule, request_id=request_id, overlap=overlap)
        return await self.submit(message, wait=wait, timeout=timeout)

    async def backfill(
        self,
        schedule: str,
        start: Instant,
        end: Instant,
        *,
        request_id: str | None = None,
        overlap: Overlap | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`scheduler_backfill`."""
        message = scheduler_backfill(schedule, start, end, request_id=request_id, overlap=overlap)
        return await self.submit(message, wait=wait, timeout=timeout)

    async def done(
        self,
        run_id: str,
        *,
        schedule: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """See :func:`scheduler_done`; the result has ``finished``."""
        message = scheduler_done(run_id, schedule=schedule)
        return await self.submit(message, wait=wait, timeout=timeout)


class SchedulerConsumer(GatewayConsumer):
    """A consumer of ``scheduler.fire`` (handled as ``scheduler_fire``, as in any consumer) that
    asks for a timed message back in one call: :meth:`later`; :attr:`scheduler` sends any
    command. Outside a fire, commands go to :attr:`command_channel` (e.g. ``"timers.send"``)."""

    commands_class = SchedulerCommands

    @property
    def scheduler(self) -> SchedulerCommands:
        """:class:`SchedulerCommands` to the scheduler the current fire came from."""
        return SchedulerCommands(self.channel_layer, self.reply_channel())

    async def later(
        self,
        delay: Duration,
        message: Mapping[str, Any] | None = None,
        *,
        schedule: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Message | None:
        """A one-shot ``scheduler.fire`` to this consumer's own channel after ``delay`` (``600``,
        ``"10m"``, a ``timedelta``), carrying the keys of ``message``.

        ``schedule`` is its id (default: a random one). Give one derived from the event being
        handled (``f"follow-up.{event['id']}"``) so a redelivered event does not schedule it
        twice: ``scheduler.add`` is idempotent per id.
        """
        channel = self.scope.get("channel") if isinstance(self.scope, dict) else None
        if not isinstance(channel, str):
            raise InvalidCommand("later() needs a consumer routed by channel name (runworker)")
        return await self.scheduler.add(
            schedule or f"later.{uuid.uuid4().hex}",
            in_=delay,
            channel=channel,
            message=message,
            wait=wait,
            timeout=timeout,
        )
