"""Pure schedule arithmetic: when is a schedule due, what fires after a gap, what is sent.

No I/O, no asyncio, no clock: every function takes the time it reasons about (epoch seconds),
so the tests drive it with any instant they like.

House rules:

* **Due times are instants** (float epoch seconds), computed the same way by every replica:
  ``every`` is anchored at ``start`` (or the Unix epoch), so ``every: 1h`` is due on the hour
  in UTC on every process; ``cron`` is evaluated by cronsim in the schedule's zone.
* **Daylight saving (cron).** A local time that does not exist (spring forward) fires once, at
  the first valid instant after it (``30 2 * * *`` in Europe/Berlin on 2026-03-29 fires at 03:00
  CEST); a local time that happens twice (fall back) fires once, at its first occurrence
  (``30 2 * * *`` on 2026-10-25 fires at 02:30 CEST, not again at 02:30 CET). An expression with
  a wildcard or stepped hour field (``0 * * * *``) names every hour, so it fires in both passes
  of a repeated hour, like Vixie cron; the times such an expression names inside a skipped hour
  fire once, at the first instant after the gap (``*/20 2 * * *`` fires at 03:00 on the day
  02:00-03:00 does not exist; ``*/30 * * * *`` fires once at 03:00, its own due time).
  cronsim handles 5-field expressions with a fixed minute and hour; the rest is wrapped here
  (:func:`_seconds_split`, :func:`_skipped_match`). ``tests/gateways/scheduler/
  test_translate.py`` pins it in two zones, both directions.
* **Cron fields**: five (minute hour day month weekday), or six with *seconds first* (cronsim's
  layout: ``*/10 * * * * *`` is every ten seconds). ``L`` (last day), ``#`` and ``?`` are
  cronsim's extensions. Day 31 skips short months; ``29 2`` fires in leap years only.
* **The cursor.** What has been handled is one number per schedule: the latest due time that was
  fired or given up. Everything at or before it is done. :func:`catch_up` says, for a cursor and
  a moment, which due times fire now and how many are given up (the misfire policy).
* **Jitter** is a per-(schedule, due time) offset in ``[0, jitter)`` derived from a hash, so
  every replica, and a successor after a takeover, picks the same one.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

__all__ = [
    "DEFAULT_TYPE",
    "CatchUp",
    "Kind",
    "Policy",
    "ScheduleError",
    "Spec",
    "catch_up",
    "check_cron",
    "check_message",
    "check_schedule_id",
    "check_timezone",
    "describe",
    "due_times",
    "fingerprint",
    "fire_message",
    "jitter_offset",
    "next_due",
    "next_fire",
    "parse_duration",
    "parse_instant",
    "parse_list",
    "parse_remove",
    "spec_from_command",
    "wall_clock",
    "zone",
]

#: the type of a fire whose schedule names no message type of its own
DEFAULT_TYPE = "scheduler.fire"
#: keys of a ``scheduler.fire`` that a schedule's ``message`` may not set
RESERVED_KEYS = frozenset(
    {
        "type",
        "gateway",
        "id",
        "time",
        "reply_channel",
        "schedule",
        "scheduled_time",
        "fire_time",
        "scheduled_local",
        "missed",
    }
)
#: due times counted at most when working out what a long gap missed (then "at least"); it
#: bounds the work done on the event loop (a second-by-second cron: ~70 ms)
COUNT_LIMIT = 10_000

Policy = Literal["skip", "once", "all"]
Kind = Literal["cron", "every", "at"]

_SCHEDULE_ID = re.compile(r"^[A-Za-z0-9_.:@-]{1,200}$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


class ScheduleError(ValueError):
    """A schedule or a ``scheduler.add`` is invalid; ``key`` names the offending key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.reason = message


def wall_clock() -> float:
    """Now, in epoch seconds: only for refusing a YAML ``at:`` in the past when it is loaded."""
    return time.time()


# -- parsing ----------------------------------------------------------------------------------


def parse_duration(value: Any) -> float:
    """Seconds from ``30s``, ``5m``, ``1h30m``, ``250ms``, ``2d``, ``1w`` or a plain number."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 30s, 5m or 1h")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION_PART.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise ValueError(
                    f"{value!r} is not a duration: use a number of seconds or e.g. 30s, 5m, 1h"
                ) from None
            seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    else:
        raise ValueError("must be a duration such as 30s, 5m or 1h")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("must be a finite, non-negative duration")
    return seconds


@lru_cache(maxsize=512)
def zone(name: str) -> ZoneInfo:
    """The zone ``name`` (``Europe/Berlin``, ``UTC``); ``ValueError`` for an unknown one."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(
            f"unknown time zone {name!r} (use an IANA name like Europe/Berlin)"
        ) from None


def check_timezone(name: str) -> str:
    zone(name)
    return name


def check_cron(expr: str) -> str:
    """``expr`` if cronsim accepts it (5 fields, or 6 with seconds first)."""
    fields = expr.split()
    if len(fields) not in (5, 6):
        raise ValueError(
            f"{expr!r} has {len(fields)} fields: a cron expression has 5 "
            "(minute hour day month weekday) or 6 (seconds first)"
        )
    try:
        _cron(" ".join(fields))
    except CronSimError as exc:
        raise ValueError(f"{expr!r} is not a valid cron expression: {exc}") from None
    return " ".join(fields)


def check_schedule_id(value: str) -> str:
    if not _SCHEDULE_ID.match(value):
        raise ValueError(f"{value[:60]!r} is not a schedule id: 1-200 letters, digits or _ . : @ -")
    return value


@lru_cache(maxsize=4096)
def _cron(expr: str) -> str:
    CronSim(expr, datetime(2000, 1, 1, tzinfo=UTC))  # parses, raises CronSimError
    return expr


def parse_instant(value: Any, timezone: str = "UTC") -> float:
    """Epoch seconds from an ISO 8601 date-time (naive = in ``timezone``) or a number."""
    if isinstance(value, bool):
        raise ValueError("must be an ISO 8601 date-time or epoch seconds")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError("must be finite")
        return float(value)
    if isinstance(value, datetime):  # YAML turns an unquoted date-time into one
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(
                f"{value!r} is not an ISO 8601 date-time (e.g. 2026-12-24T18:00:00+01:00)"
            ) from None
    else:
        raise ValueError("must be an ISO 8601 date-time or epoch seconds")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone(timezone))
    return moment.timestamp()


# -- the schedule -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One schedule, as the scheduler runs it (from the YAML or from ``scheduler.add``)."""

    id: str
    kind: Kind
    channel: str
    cron: str | None = None
    timezone: str = "UTC"
    every: float | None = None
    at: float | None = None
    start: float | None = None
    end: float | None = None
    jitter: float = 0.0
    misfire: Policy = "once"
    misfire_cap: int = 100
    misfire_grace: float = 60.0
    message: Mapping[str, Any] | None = field(default=None, hash=False)
    #: ``yaml`` or ``runtime`` (added by ``scheduler.add``; persisted, removable)
    source: Literal["yaml", "runtime"] = "yaml"

    @property
    def one_shot(self) -> bool:
        return self.kind == "at"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["message"] = dict(self.message) if self.message is not None else None
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Spec:
        return cls(**data)


def check_message(message: Any) -> Mapping[str, Any] | None:
    if message is None:
        return None
    if not isinstance(message, Mapping) or not all(isinstance(k, str) for k in message):
        raise ValueError("must be a mapping with string keys")
    type_ = message.get("type")
    if type_ is not None and (not isinstance(type_, str) or "." not in type_):
        raise ValueError("type must be a string like email.send")
    if type_ is None:
        clash = sorted(RESERVED_KEYS & set(message))
        if clash:
            raise ValueError(
                f"keys {clash} are set by the scheduler.fire envelope; give the message a "
                "type of its own, or rename them"
            )
    return dict(message)


_COMMAND_KEYS = {
    "schedule",
    "channel",
    "message",
    "cron",
    "timezone",
    "every",
    "at",
    "in",
    "start",
    "end",
    "jitter",
    "misfire",
    "misfire_cap",
    "misfire_grace",
}


def spec_from_command(
    body: Mapping[str, Any], *, now: float, default_channel: str, defaults: Mapping[str, Any]
) -> Spec:
    """The :class:`Spec` a ``scheduler.add`` asks for; :class:`ScheduleError` names the key.

    Exactly one of ``in`` (duration from ``now``), ``at`` (ISO date-time or epoch; up to
    ``misfire_grace`` in the past fires at once), ``cron`` or ``every``. ``defaults`` gives
    ``misfire``, ``misfire_cap`` and ``misfire_grace`` when the command does not.
    """
    unknown = sorted(set(body) - _COMMAND_KEYS)
    if unknown:
        raise ScheduleError(unknown[0], "unknown key")

    def get(key: str, check: Any) -> Any:
        if body.get(key) is None:
            return None
        try:
            return check(body[key])
        except ValueError as exc:
            raise ScheduleError(key, str(exc)) from None

    schedule = body.get("schedule")
    if not isinstance(schedule, str):
        raise ScheduleError("schedule", "required: the schedule id (a string) you choose")
    get("schedule", check_schedule_id)
    kinds = [k for k in ("in", "at", "cron", "every") if body.get(k) is not None]
    if len(kinds) != 1:
        raise ScheduleError("", "give exactly one of in, at, cron, every")
    timezone = get("timezone", _str_check(check_timezone)) or "UTC"
    channel = get("channel", _str_check(_channel_name)) or default_channel
    values: dict[str, Any] = {
        "misfire": get("misfire", _policy) or defaults.get("misfire", "once"),
        "misfire_cap": _pick(get("misfire_cap", _cap), defaults.get("misfire_cap", 100)),
        "misfire_grace": _pick(
            get("misfire_grace", parse_duration), defaults.get("misfire_grace", 60.0)
        ),
        "jitter": get("jitter", parse_duration) or 0.0,
        "start": get("start", lambda v: parse_instant(v, timezone)),
        "end": get("end", lambda v: parse_instant(v, timezone)),
        "message": get("message", check_message),
    }
    kind = kinds[0]
    if kind == "in":
        at = now + get("in", parse_duration)
        spec = Spec(schedule, "at", channel, timezone=timezone, at=at, source="runtime", **values)
    elif kind == "at":
        at = get("at", lambda v: parse_instant(v, timezone))
        if at < now - values["misfire_grace"]:
            raise ScheduleError("at", "is in the past")
        spec = Spec(schedule, "at", channel, timezone=timezone, at=at, source="runtime", **values)
    elif kind == "every":
        every = get("every", parse_duration)
        if every <= 0:
            raise ScheduleError("every", "must be longer than 0 s")
        spec = Spec(
            schedule, "every", channel, timezone=timezone, every=every, source="runtime", **values
        )
    else:
        cron = get("cron", _str_check(check_cron))
        spec = Spec(
            schedule, "cron", channel, timezone=timezone, cron=cron, source="runtime", **values
        )
    if spec.start is not None and spec.end is not None and spec.end <= spec.start:
        raise ScheduleError("end", "must be after start")
    return spec


def parse_remove(body: Mapping[str, Any]) -> str:
    """The schedule id a ``scheduler.remove`` names; :class:`ScheduleError` names the key."""
    schedule = body.get("schedule")
    if not isinstance(schedule, str) or not schedule:
        raise ScheduleError("schedule", "required (the id given to scheduler.add)")
    return schedule


def parse_list(body: Mapping[str, Any]) -> str:
    """The id prefix a ``scheduler.list`` asks for (``""``: all)."""
    prefix = body.get("prefix", "")
    if not isinstance(prefix, str):
        raise ScheduleError("prefix", "must be a string")
    return prefix


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def _str_check(check: Any) -> Any:
    def run(value: Any) -> Any:
        if not isinstance(value, str):
            raise ValueError("must be a string")
        return check(value)

    return run


def _channel_name(value: str) -> str:
    if not re.match(r"^[a-zA-Z\d\-_.]{1,99}$", value):
        raise ValueError("must be letters, digits, '-', '_' or '.', under 100 characters")
    return value


def _policy(value: Any) -> Policy:
    if value not in ("skip", "once", "all"):
        raise ValueError("must be skip, once or all")
    result: Policy = value
    return result


def _cap(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("must be a whole number of at least 1")
    return value


# -- cron -------------------------------------------------------------------------------------
#
# cronsim gives 5-field expressions with a fixed minute and hour (no leading "*") Debian cron's
# DST handling: a skipped local time fires at the first valid instant after it, a repeated one
# once. It leaves 6-field expressions alone (a skipped 02:30:00 is dropped, a repeated one fires
# twice), so a 6-field expression with a fixed minute and hour is evaluated here as its 5-field
# minutes (cronsim, with the DST handling) plus the seconds of its seconds field.


@lru_cache(maxsize=1024)
def _seconds_split(expr: str) -> tuple[str, tuple[int, ...]] | None:
    """``(5-field expression, seconds)`` for a 6-field expression that needs the DST wrap."""
    fields = expr.split()
    if len(fields) != 6 or fields[1].startswith("*") or fields[2].startswith("*"):
        return None
    probe = CronSim(f"{fields[0]} * * * * *", datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC))
    seconds = []
    for moment in probe:
        if moment.minute != 0:
            break
        seconds.append(moment.second)
    return " ".join(fields[1:]), tuple(seconds)


def _fixed_time(expr: str) -> bool:
    """cronsim applies its own DST handling (a 5-field expression, fixed minute and hour)."""
    fields = expr.split()
    return len(fields) == 5 and not fields[0].startswith("*") and not fields[1].startswith("*")


def _skipped_match(expr: str, tz: ZoneInfo, lower: float, upper: float) -> float | None:
    """The first instant after a spring-forward gap in ``(lower, upper]`` at which ``expr``
    names a local time inside the gap (cronsim skips those for expressions with a ``*`` in the
    minute or hour field); ``None`` otherwise."""

    def offset(moment: float) -> Any:
        return tz.utcoffset(datetime.fromtimestamp(moment, tz))

    # transitions are months apart: sample twice a day, then bisect to the second
    here, here_offset = lower, offset(lower)
    while here < upper:
        there = min(here + 43200.0, upper)
        there_offset = offset(there)
        if there_offset > here_offset:
            low, high = math.floor(here), math.ceil(there)
            while high - low > 1:
                middle = (low + high) // 2
                if offset(middle) == here_offset:
                    low = middle
                else:
                    high = middle
            transition = float(high)
            # the skipped wall-clock times: [wall time at the transition - jump, that time)
            wall_end = datetime.fromtimestamp(transition, tz).replace(tzinfo=None)
            wall_start = wall_end - (there_offset - here_offset)
            probe = CronSim(expr, wall_start - timedelta(seconds=1))
            if next(probe) < wall_end and lower < transition <= upper:
                return transition
        here, here_offset = there, there_offset
    return None


def _cron_forward(expr: str, timezone: str, after: float) -> Iterator[float]:
    """Due instants of ``expr`` in ``timezone`` strictly after ``after``, ascending."""
    tz = zone(timezone)
    split = _seconds_split(expr)
    if split is None:
        fixed = _fixed_time(expr)
        lower = after
        # cronsim drops the fraction of a second and yields strictly later whole seconds
        for moment in CronSim(expr, datetime.fromtimestamp(math.floor(after), tz)):
            value = moment.timestamp()
            if value <= after:
                continue
            gap = None if fixed else _skipped_match(expr, tz, lower, value)
            if gap is not None and gap < value:
                yield gap
            yield value
            lower = value
        return  # pragma: no cover - cronsim iterates forever
    minutes, seconds = split
    minute = math.floor(after / 60) * 60  # the minute `after` is in may still be due
    for moment in CronSim(minutes, datetime.fromtimestamp(minute - 1, tz)):
        base = moment.timestamp()
        for second in seconds:
            if base + second > after:
                yield base + second


def _cron_backward(expr: str, timezone: str, upper: float) -> Iterator[float]:
    """Due instants of ``expr`` in ``timezone`` at or before ``upper``, descending."""
    tz = zone(timezone)
    split = _seconds_split(expr)
    if split is None:
        fixed = _fixed_time(expr)
        moment = datetime.fromtimestamp(upper, tz)
        if moment.microsecond == 0:
            # cronsim in reverse starts strictly before a whole second: include `upper` itself
            moment = moment.replace(microsecond=1)
        higher = upper
        for found in CronSim(expr, moment, reverse=True):
            value = found.timestamp()
            gap = None if fixed else _skipped_match(expr, tz, value, higher)
            # `higher` is `upper` itself (yield a gap there) or a due time (a gap equal to it
            # is that same fire)
            if gap is not None and (gap < higher or higher == upper):
                yield gap
            yield value
            higher = value
        return  # pragma: no cover - cronsim iterates forever
    minutes, seconds = split
    start = datetime.fromtimestamp(math.floor(upper / 60) * 60, tz).replace(microsecond=1)
    for moment in CronSim(minutes, start, reverse=True):
        base = moment.timestamp()
        for second in reversed(seconds):
            if base + second <= upper:
                yield base + second


# -- due times --------------------------------------------------------------------------------


def next_due(spec: Spec, after: float) -> float | None:
    """The first due time strictly after ``after`` (within start/end), or ``None``."""
    if spec.start is not None and after < spec.start:
        after = math.nextafter(spec.start, -math.inf)  # start itself may be due
    due: float | None
    if spec.kind == "at":
        assert spec.at is not None
        due = spec.at if spec.at > after else None
    elif spec.kind == "every":
        assert spec.every is not None
        anchor = spec.start if spec.start is not None else 0.0
        steps = math.floor((after - anchor) / spec.every) + 1
        due = anchor + steps * spec.every
        while due <= after:  # float rounding
            steps += 1
            due = anchor + steps * spec.every
    else:
        assert spec.cron is not None
        due = next(_cron_forward(spec.cron, spec.timezone, after), None)
    if due is None or (spec.end is not None and due > spec.end):
        return None
    return due


def _previous_due(spec: Spec, before: float) -> float | None:
    """The latest due time at or before ``before`` (ignoring start), or ``None``."""
    if spec.kind == "at":
        assert spec.at is not None
        return spec.at if spec.at <= before else None
    if spec.kind == "every":
        assert spec.every is not None
        anchor = spec.start if spec.start is not None else 0.0
        if before < anchor:
            return None
        return anchor + math.floor((before - anchor) / spec.every) * spec.every
    assert spec.cron is not None
    return next(_cron_backward(spec.cron, spec.timezone, before), None)


def due_times(spec: Spec, after: float, until: float) -> Iterator[float]:
    """Due times in ``(after, until]``, newest first."""
    upper = until if spec.end is None else min(until, spec.end)
    lower = after if spec.start is None else max(after, math.nextafter(spec.start, -math.inf))
    if spec.kind == "every":
        assert spec.every is not None
        last = _previous_due(spec, upper)
        if last is None:
            return
        anchor = spec.start if spec.start is not None else 0.0
        step = round((last - anchor) / spec.every)
        while True:
            due = anchor + step * spec.every
            if due <= lower:
                return
            if due <= upper:
                yield due
            step -= 1
    elif spec.kind == "at":
        assert spec.at is not None
        if lower < spec.at <= upper:
            yield spec.at
    else:
        assert spec.cron is not None
        for due in _cron_backward(spec.cron, spec.timezone, upper):
            if due <= lower:
                return
            yield due


def jitter_offset(spec: Spec, due: float) -> float:
    """The schedule's jitter for ``due``: in ``[0, jitter)``, the same on every replica."""
    if spec.jitter <= 0:
        return 0.0
    digest = hashlib.blake2b(f"{spec.id}\0{due!r}".encode(), digest_size=8).digest()
    return spec.jitter * (int.from_bytes(digest, "big") / 2.0**64)


def next_fire(spec: Spec, cursor: float) -> tuple[float, float] | None:
    """``(due, fire time)`` of the first due time after ``cursor``, or ``None`` (finished)."""
    due = next_due(spec, cursor)
    if due is None:
        return None
    return due, due + jitter_offset(spec, due)


@dataclass(frozen=True)
class CatchUp:
    """What to do at ``now`` for a schedule whose cursor is ``cursor``.

    ``fire``: due times to fire now, oldest first. ``missed``: due times given up by the misfire
    policy; ``missed_at_least`` when there were more than :data:`COUNT_LIMIT` to count.
    ``cursor``: the cursor once all this is done (unchanged when nothing was due).
    """

    fire: tuple[float, ...]
    missed: int
    cursor: float
    missed_at_least: bool = False


def catch_up(spec: Spec, cursor: float, now: float) -> CatchUp:
    """Which due times in ``(cursor, now]`` fire now, and how many the misfire policy gives up.

    A due time is *ready* once ``now`` reached its fire time (due + jitter); only the oldest
    ready ones in a row count (a due time still waiting for its jitter holds back newer ones).
    A ready due time is *on time* while ``now`` is within ``misfire_grace`` of its fire time: it
    always fires (late by less than the grace: after a takeover, a short stall). Older ones
    misfired, and the policy decides: ``skip`` fires none of them, ``once`` fires the newest of
    them unless an on-time one fires anyway, ``all`` fires the newest ``misfire_cap`` of them,
    in order.
    """
    dues: list[float] = []
    at_least = False
    for due in due_times(spec, cursor, now):
        dues.append(due)
        if len(dues) >= COUNT_LIMIT:
            at_least = True
            break
    dues.reverse()
    on_time: list[float] = []
    late: list[float] = []
    for due in dues:
        fire_at = due + jitter_offset(spec, due)
        if fire_at > now:
            break
        (on_time if now - fire_at <= spec.misfire_grace else late).append(due)
    if spec.misfire == "skip" or (spec.misfire == "once" and on_time):
        fired_late: list[float] = []
    elif spec.misfire == "once":
        fired_late = late[-1:]
    else:
        fired_late = late[-spec.misfire_cap :]
    handled = late + on_time
    return CatchUp(
        tuple(fired_late + on_time),
        len(late) - len(fired_late),
        max(handled) if handled else cursor,
        at_least,
    )


# -- messages ---------------------------------------------------------------------------------


def fire_message(
    spec: Spec,
    due: float,
    *,
    fire_time: float,
    gateway: str,
    reply_channel: str,
    missed: int = 0,
) -> dict[str, Any]:
    """What a fire of ``spec`` for ``due`` sends to its channel.

    A schedule whose ``message`` has a ``type`` sends that message unchanged (``email.send``
    straight to the email gateway). Otherwise a ``scheduler.fire`` with the envelope of DESIGN §4
    (``id`` is ``<schedule>@<due>``, the same on every replica, for de-duplication) and the
    schedule's ``message`` keys merged in.
    """
    if spec.message is not None and "type" in spec.message:
        return dict(spec.message)
    local = datetime.fromtimestamp(due, zone(spec.timezone)).isoformat()
    return {
        "type": DEFAULT_TYPE,
        "gateway": gateway,
        "id": f"{spec.id}@{due:.3f}",
        "time": fire_time,
        "reply_channel": reply_channel,
        "schedule": spec.id,
        "scheduled_time": due,
        "scheduled_local": local,
        "fire_time": fire_time,
        "missed": missed,
        **(spec.message or {}),
    }


def fingerprint(spec: Spec) -> str:
    """A digest of what decides a YAML schedule's due times (``""`` for run-time ones, which
    never change): when it changes, the schedule's cursor starts again at now."""
    if spec.source != "yaml":
        return ""
    timing = (spec.kind, spec.cron, spec.timezone, spec.every, spec.at, spec.start, spec.end)
    return hashlib.blake2b(repr(timing).encode(), digest_size=8).hexdigest()


def describe(spec: Spec) -> str:
    """One line for logs and ``scheduler.list``: ``cron '0 7 * * *' Europe/Berlin``."""
    if spec.kind == "cron":
        return f"cron {spec.cron!r} {spec.timezone}"
    if spec.kind == "every":
        return f"every {spec.every:g}s"
    assert spec.at is not None
    return f"at {datetime.fromtimestamp(spec.at, UTC).isoformat()}"
