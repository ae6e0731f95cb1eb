"""Pure schedule arithmetic: when is a schedule due, what fires after a gap, what is sent.

No I/O, no asyncio, no clock: every function takes the time it reasons about (epoch seconds),
so the tests drive it with any instant they like.

House rules:

* **Due times are instants** (float epoch seconds), computed the same way by every replica:
  ``every`` is anchored at ``start`` (or the Unix epoch), so ``every: 1h`` is due on the hour
  in UTC on every process; ``cron`` is evaluated by cronsim in the schedule's zone.
* **Daylight saving (cron)**, one rule for 5 and 6 fields: cronsim only matches wall times;
  each is read in the zone here (:class:`_WallReader`). A wall time that does not exist
  (spring forward) fires once, at the first instant after the gap, and every time named in
  one gap collapses into that one fire (``30 2 * * *``, ``*/30 30 2 * * *`` and
  ``10 0 2 * * *`` in Europe/Berlin on 2027-03-28 all fire once at 03:00:00 CEST); a wall time
  that happens twice (fall back) fires once, at its first occurrence (``30 2 * * *`` on
  2026-10-25 fires at 02:30 CEST, not again at 02:30 CET), unless the minute or hour field
  starts with ``*`` (``0 * * * *``): such an expression names times in every pass, so it
  fires in both passes of the repeated hour, like Vixie cron. ``tests/gateways/scheduler/
  test_translate.py`` pins it against an oracle written from zoneinfo alone.
* **Cron fields**: five (minute hour day month weekday), or six with *seconds first* (cronsim's
  layout: ``*/10 * * * * *`` is every ten seconds). ``L`` (last day), ``#`` and ``?`` are
  cronsim's extensions. Day 31 skips short months; ``29 2`` fires in leap years only.
* **The cursor.** What has been handled is one number per schedule: the latest due time that was
  fired or given up. Everything at or before it is done. :func:`catch_up` says, for a cursor and
  a moment, which due times fire now and which are given up (the misfire policy), and
  :meth:`CatchUp.steps` the commits that carry that out (given-up due times go with the fire
  after them, so it can say how many it follows). :func:`send_deadline` is the one rule for
  how late a fire may reach the layer.
* **Overlap.** :func:`overlap_action` is the table of what a fire does while runs of its
  schedule have not finished; the Redis store runs the same table in Lua.
* **Jitter** is a per-(schedule, due time) offset in ``[0, jitter)`` derived from a hash, so
  every replica, and a successor after a takeover, picks the same one.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from core.types import check_channel_name

__all__ = [
    "DEFAULT_TYPE",
    "REQUEST_ID",
    "CatchUp",
    "Control",
    "Kind",
    "Overlap",
    "Policy",
    "ReportDone",
    "ScheduleError",
    "Spec",
    "Step",
    "backfill_dues",
    "cancel_message",
    "catch_up",
    "check_cron",
    "check_jitter",
    "check_message",
    "check_overlap",
    "check_overlap_name",
    "check_report_done",
    "check_run_timeout",
    "check_schedule_id",
    "check_timezone",
    "describe",
    "due_times",
    "fingerprint",
    "fire_message",
    "jitter_offset",
    "next_due",
    "next_fire",
    "overlap_action",
    "parse_backfill",
    "parse_done",
    "parse_duration",
    "parse_instant",
    "parse_list",
    "parse_remove",
    "parse_targets",
    "parse_trigger",
    "run_id",
    "send_deadline",
    "shortest_gap",
    "spec_from_command",
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
        "run_id",
        "report_done",
        "manual",
        "backfill",
    }
)
#: due times counted at most when working out what a long gap missed (then "at least"); it
#: bounds the work done on the event loop (a second-by-second cron: ~70 ms)
COUNT_LIMIT = 10_000

Policy = Literal["skip", "once", "all"]
Kind = Literal["cron", "every", "at"]
#: what a due time does while a run of its schedule has not finished (see :func:`overlap_action`)
Overlap = Literal["allow", "skip", "buffer_one", "cancel_other"]
#: who sends ``scheduler.done`` for a run: ConsumerWorker after the handler returned, or the
#: consumer itself (a job that goes on after its handler returned)
ReportDone = Literal["worker", "consumer"]
#: due times looked at when working out a cron expression's shortest interval (for ``jitter``)
GAP_SAMPLE = 500

_SCHEDULE_ID = re.compile(r"^[A-Za-z0-9_.:@-]{1,200}$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


class ScheduleError(ValueError):
    """A schedule or a ``scheduler.add`` is invalid; ``key`` names the offending key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.reason = message


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
    overlap: Overlap = "allow"
    #: a run that never reports ``scheduler.done`` counts as finished this long after its send
    run_timeout: float = 3600.0
    report_done: ReportDone = "worker"

    @property
    def typed(self) -> bool:
        """Its message has a ``type`` of its own: sent as written, no ``scheduler.fire`` keys."""
        return self.message is not None and "type" in self.message

    @property
    def tracks_runs(self) -> bool:
        """Whether the scheduler waits for its runs' ``scheduler.done`` (an overlap policy)."""
        return self.overlap != "allow"

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
    "overlap",
    "run_timeout",
    "report_done",
}


def spec_from_command(
    body: Mapping[str, Any], *, now: float, default_channel: str, defaults: Mapping[str, Any]
) -> Spec:
    """The :class:`Spec` a ``scheduler.add`` asks for; :class:`ScheduleError` names the key.

    Exactly one of ``in`` (duration from ``now``), ``at`` (ISO date-time or epoch; up to
    ``misfire_grace`` in the past fires at once), ``cron`` or ``every``. ``defaults`` gives
    ``misfire``, ``misfire_cap``, ``misfire_grace``, ``overlap`` and ``run_timeout`` when the
    command does not.
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
    channel = get("channel", _str_check(check_channel_name)) or default_channel
    message = get("message", check_message)
    typed = message is not None and "type" in message
    values: dict[str, Any] = {
        # the default overlap policy reaches only schedules whose fires can report runs
        "overlap": get("overlap", check_overlap_name)
        or ("allow" if typed else defaults.get("overlap", "allow")),
        "run_timeout": _pick(
            get("run_timeout", check_run_timeout), defaults.get("run_timeout", 3600.0)
        ),
        "report_done": get("report_done", check_report_done) or "worker",
        "misfire": get("misfire", _policy) or defaults.get("misfire", "once"),
        "misfire_cap": _pick(get("misfire_cap", _cap), defaults.get("misfire_cap", 100)),
        "misfire_grace": _pick(
            get("misfire_grace", parse_duration), defaults.get("misfire_grace", 60.0)
        ),
        "jitter": get("jitter", parse_duration) or 0.0,
        "start": get("start", lambda v: parse_instant(v, timezone)),
        "end": get("end", lambda v: parse_instant(v, timezone)),
        "message": message,
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
    try:
        check_jitter(spec.jitter, every=spec.every, cron=spec.cron, timezone=spec.timezone)
    except ValueError as exc:
        raise ScheduleError("jitter", str(exc)) from None
    try:
        check_overlap(spec.overlap, spec.message)
    except ValueError as exc:
        raise ScheduleError("overlap", str(exc)) from None
    return spec


def _no_unknown_keys(body: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ScheduleError(unknown[0], "unknown key")


def parse_remove(body: Mapping[str, Any]) -> str:
    """The schedule id a ``scheduler.remove`` names; :class:`ScheduleError` names the key."""
    _no_unknown_keys(body, {"schedule"})
    schedule = body.get("schedule")
    if not isinstance(schedule, str) or not schedule:
        raise ScheduleError("schedule", "required (the id given to scheduler.add)")
    return schedule


def parse_list(body: Mapping[str, Any]) -> str:
    """The id prefix a ``scheduler.list`` asks for (``""``: all)."""
    _no_unknown_keys(body, {"prefix"})
    prefix = body.get("prefix", "")
    if not isinstance(prefix, str):
        raise ScheduleError("prefix", "must be a string")
    return prefix


#: what a caller's ``request_id`` may be (it names a trigger or backfill for de-duplication)
REQUEST_ID: Final = re.compile(r"^[A-Za-z0-9_.:@-]{1,200}$")


@dataclass(frozen=True)
class Control:
    """A ``scheduler.trigger`` or ``scheduler.backfill`` as given; the gateway resolves the
    schedule, the default overlap and the window's time zone."""

    schedule: str
    #: the caller's id of this request (``None``: the gateway makes one)
    request_id: str | None = None
    overlap: Overlap | None = None
    #: backfill only: the window as given (ISO 8601 date-times or epoch seconds)
    start: Any = None
    end: Any = None


def _schedule_key(body: Mapping[str, Any]) -> str:
    schedule = body.get("schedule")
    if not isinstance(schedule, str) or not schedule:
        raise ScheduleError("schedule", "required (a schedule id)")
    return schedule


def parse_targets(body: Mapping[str, Any]) -> tuple[str | None, str]:
    """``scheduler.pause`` / ``scheduler.resume``: (the schedule id, or ``None`` for ``all``;
    the note)."""
    _no_unknown_keys(body, {"schedule", "all", "note"})
    everything = body.get("all")
    if everything is not None and everything is not True:
        raise ScheduleError("all", "must be true (or leave it out and give schedule)")
    if (body.get("schedule") is None) == (everything is None):
        raise ScheduleError("", "give schedule (an id) or all: true")
    schedule = None if everything else _schedule_key(body)
    note = body.get("note", "")
    if not isinstance(note, str) or len(note) > 1000:
        raise ScheduleError("note", "must be a string of at most 1000 characters")
    return schedule, note


def _control(body: Mapping[str, Any], keys: set[str]) -> Control:
    _no_unknown_keys(body, keys)
    schedule = _schedule_key(body)
    request = body.get("request_id")
    if request is not None and (not isinstance(request, str) or not REQUEST_ID.match(request)):
        raise ScheduleError("request_id", "1-200 letters, digits or _ . : @ -")
    overlap = body.get("overlap")
    try:
        checked = None if overlap is None else check_overlap_name(overlap)
    except ValueError as exc:
        raise ScheduleError("overlap", str(exc)) from None
    return Control(schedule, request, checked)


def parse_trigger(body: Mapping[str, Any]) -> Control:
    """A ``scheduler.trigger``: fire ``schedule`` now."""
    return _control(body, {"schedule", "request_id", "overlap"})


def parse_backfill(body: Mapping[str, Any]) -> Control:
    """A ``scheduler.backfill``: the due times of ``schedule`` between ``from`` and ``to``.

    ``from`` and ``to`` are checked here (UTC for naive date-times); the gateway reads them
    again in the schedule's own time zone.
    """
    control = _control(body, {"schedule", "from", "to", "request_id", "overlap"})
    for key in ("from", "to"):
        if body.get(key) is None:
            raise ScheduleError(key, "required (ISO 8601 date-time or epoch seconds)")
        try:
            parse_instant(body[key], "UTC")
        except ValueError as exc:
            raise ScheduleError(key, str(exc)) from None
    return Control(control.schedule, control.request_id, control.overlap, body["from"], body["to"])


def parse_done(body: Mapping[str, Any]) -> str:
    """The ``run_id`` a ``scheduler.done`` reports finished."""
    _no_unknown_keys(body, {"run_id", "schedule"})
    run = body.get("run_id")
    if not isinstance(run, str) or not run:
        raise ScheduleError("run_id", "required (the fire's run_id)")
    return run


def check_overlap_name(value: Any) -> Overlap:
    if value not in ("allow", "skip", "buffer_one", "cancel_other"):
        raise ValueError("must be allow, skip, buffer_one or cancel_other")
    result: Overlap = value
    return result


def check_report_done(value: Any) -> ReportDone:
    if value not in ("worker", "consumer"):
        raise ValueError("must be worker or consumer")
    result: ReportDone = value
    return result


def check_run_timeout(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be longer than 0 s")
    return seconds


def check_overlap(overlap: Overlap, message: Mapping[str, Any] | None) -> Overlap:
    """``overlap`` unless it needs run reports that ``message`` cannot carry."""
    if overlap != "allow" and message is not None and "type" in message:
        raise ValueError(
            f"{overlap} needs runs that report scheduler.done: a message with its own type "
            f"({message['type']}) goes out as written, without a run_id; use allow"
        )
    return overlap


def check_jitter(
    jitter: float, *, every: float | None = None, cron: str | None = None, timezone: str = "UTC"
) -> float:
    """``jitter`` unless it is longer than the schedule's interval (fires would overtake each
    other): ``every``, or a cron expression's shortest gap between two due times."""
    if jitter <= 0:
        return jitter
    if every is not None and jitter > every:
        raise ValueError(
            f"{jitter:g} s is longer than the interval (every: {every:g} s); keep it below"
        )
    if cron is not None:
        gap = shortest_gap(cron, timezone)
        if gap is not None and jitter > gap:
            raise ValueError(
                f"{jitter:g} s is longer than the shortest interval of cron {cron!r} "
                f"({gap:g} s); keep it below"
            )
    return jitter


@lru_cache(maxsize=256)
def shortest_gap(expr: str, timezone: str = "UTC") -> float | None:
    """The shortest time between two consecutive due times of ``expr`` among its first
    :data:`GAP_SAMPLE` from 2001 (``None`` for fewer than two)."""
    after = datetime(2001, 1, 1, tzinfo=UTC).timestamp()
    dues = list(itertools.islice(_cron_forward(expr, timezone, after), GAP_SAMPLE))
    return min((b - a for a, b in itertools.pairwise(dues)), default=None)


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def _str_check(check: Any) -> Any:
    def run(value: Any) -> Any:
        if not isinstance(value, str):
            raise ValueError("must be a string")
        return check(value)

    return run


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
# cronsim is used for wall-clock matching only: it iterates *naive* local times (no zone, so none
# of its own DST handling, which covers 5-field expressions with a fixed minute and hour and
# nothing else). Each naive time is then read in the zone here, one rule for every expression:
#
# * it exists once: that instant;
# * it happens twice (fall back): its first occurrence; also its second when the minute or the
#   hour field starts with "*" (the expression names times in every pass, like Debian's cron);
# * it does not exist (spring forward): the first instant after the gap, the transition itself.
#   Every time an expression names inside one gap collapses into that one instant, and so does a
#   time it names exactly there (``*/30 * * * *`` fires once at 03:00).
#
# The instants of consecutive naive times are not always in order (the second pass of a repeated
# hour comes after the first pass of every time in it), so they go through a small heap: an
# instant is yielded once no later naive time can produce an earlier one (:func:`_read_wall`'s
# bounds are monotonic in the naive time).


def _both_passes(expr: str) -> bool:
    """Whether ``expr`` names times in both passes of a repeated hour (a ``*`` minute or hour)."""
    fields = expr.split()
    minute, hour = (fields[0], fields[1]) if len(fields) == 5 else (fields[1], fields[2])
    return minute.startswith("*") or hour.startswith("*")


def _transition(tz: ZoneInfo, before: float, after: float) -> float:
    """The instant in ``(before, after]`` where ``tz``'s offset changes (to the second)."""
    low, high = math.floor(before), math.ceil(after)
    offset = tz.utcoffset(datetime.fromtimestamp(low, tz))
    while high - low > 1:
        middle = (low + high) // 2
        if tz.utcoffset(datetime.fromtimestamp(middle, tz)) == offset:
            low = middle
        else:
            high = middle
    return float(high)


class _WallReader:
    """Reads naive wall times of one zone as instants (the rules above); remembers the last
    spring-forward transition it found, since a gap yields many naive times in a row."""

    def __init__(self, tz: ZoneInfo, both: bool) -> None:
        self.tz = tz
        self.both = both
        self.gap: float | None = None

    def read(self, naive: datetime) -> tuple[tuple[float, ...], float, float]:
        """``(instants, low, high)``: no naive time after this one yields an instant before
        ``low``, none before it an instant after ``high``."""
        first = naive.replace(tzinfo=self.tz, fold=0).timestamp()
        second = naive.replace(tzinfo=self.tz, fold=1).timestamp()
        if first == second:
            return (first,), first, first
        if first < second:  # repeated: fold=0 is the first pass
            return ((first, second) if self.both else (first,)), first, second
        # skipped: fold=1 reads it with the offset after the jump, fold=0 with the one before
        if self.gap is None or not second < self.gap <= first:
            self.gap = _transition(self.tz, second, first)
        return (self.gap,), self.gap, self.gap


def _cron_forward(expr: str, timezone: str, after: float) -> Iterator[float]:
    """Due instants of ``expr`` in ``timezone`` strictly after ``after``, ascending."""
    tz = zone(timezone)
    reader = _WallReader(tz, _both_passes(expr))
    moment = datetime.fromtimestamp(after, tz)
    wall = moment.replace(tzinfo=None, microsecond=0)
    other = moment.replace(fold=1).utcoffset()
    if moment.fold == 0 and other is not None and other != moment.utcoffset():
        # `after` is in the first pass of a repeated hour: the second pass of earlier wall
        # times in that hour is still ahead
        wall -= moment.utcoffset() - other  # type: ignore[operator]
    pending: list[float] = []
    last = after
    # cronsim yields strictly later whole seconds: start one second early to include `wall`
    for naive in CronSim(expr, wall - timedelta(seconds=1)):
        instants, low, _ = reader.read(naive)
        for value in instants:
            heapq.heappush(pending, value)
        while pending and pending[0] <= low:
            value = heapq.heappop(pending)
            if value > last:
                yield value
                last = value
    while pending:  # pragma: no cover - cronsim gives up after 50 years without a match
        value = heapq.heappop(pending)
        if value > last:
            yield value
            last = value


def _cron_backward(expr: str, timezone: str, upper: float) -> Iterator[float]:
    """Due instants of ``expr`` in ``timezone`` at or before ``upper``, descending."""
    tz = zone(timezone)
    reader = _WallReader(tz, _both_passes(expr))
    moment = datetime.fromtimestamp(upper, tz)
    wall = moment.replace(tzinfo=None, microsecond=0)
    if moment.fold == 1:
        # `upper` is in the second pass of a repeated hour: the first pass of later wall times
        # in that hour lies before it
        wall += moment.replace(fold=0).utcoffset() - moment.utcoffset()  # type: ignore[operator]
    pending: list[float] = []  # negated: a max-heap
    last = math.inf
    # cronsim in reverse starts strictly before a whole second: a microsecond includes `wall`
    for naive in CronSim(expr, wall.replace(microsecond=1), reverse=True):
        instants, _, high = reader.read(naive)
        for value in instants:
            heapq.heappush(pending, -value)
        while pending and -pending[0] >= high:
            value = -heapq.heappop(pending)
            if value <= upper and value < last:
                yield value
                last = value
    while pending:  # pragma: no cover - cronsim gives up after 50 years without a match
        value = -heapq.heappop(pending)
        if value <= upper and value < last:
            yield value
            last = value


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

    ``fire``: due times to fire now, oldest first; ``late``: those of them the misfire policy
    picked among misfired ones (their send deadline counts from the decision, see
    :func:`send_deadline`). ``given_up``: due times the misfire policy gives up, oldest first;
    ``missed`` is their number, ``missed_at_least`` when there were more than
    :data:`COUNT_LIMIT` to count (older ones were not looked at). ``cursor``: the cursor once
    all this is done (unchanged when nothing was due).
    """

    fire: tuple[float, ...]
    missed: int
    cursor: float
    missed_at_least: bool = False
    late: tuple[float, ...] = ()
    given_up: tuple[float, ...] = ()

    def steps(self) -> list[Step]:
        """The commits that carry this plan out, in due-time order: one per fire (with the due
        times given up just before it), then one for those given up after the last fire."""
        out: list[Step] = []
        given_up = list(self.given_up)
        index = 0
        late = set(self.late)
        for due in self.fire:
            start = index
            while index < len(given_up) and given_up[index] < due:
                index += 1
            out.append(Step(due, True, tuple(given_up[start:index]), due in late))
        if index < len(given_up):
            out.append(Step(self.cursor, False, tuple(given_up[index:])))
        return out


@dataclass(frozen=True)
class Step:
    """One commit of a :class:`CatchUp`: fire ``due`` (``fire``), or move the cursor to it
    (``fire`` false: everything up to it was given up); ``given_up``: the due times given up
    since the previous step, committed with this one."""

    due: float
    fire: bool
    given_up: tuple[float, ...] = ()
    late: bool = False


def catch_up(spec: Spec, cursor: float, now: float) -> CatchUp:
    """Which due times in ``(cursor, now]`` fire now, and which the misfire policy gives up.

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
    given_up = late[: len(late) - len(fired_late)]
    fire = sorted(fired_late + on_time)
    handled = late + on_time
    return CatchUp(
        tuple(fire),
        len(given_up),
        max(handled) if handled else cursor,
        at_least,
        tuple(fired_late),
        tuple(given_up),
    )


def send_deadline(spec: Spec, due: float, picked: float | None = None) -> float:
    """The latest moment the layer may accept the fire of ``due``: ``misfire_grace`` after its
    fire time (due + jitter). A fire the misfire policy picked among misfired due times
    (``picked``: when it decided; already more than the grace late) gets ``misfire_grace``
    from then. Past it, the fire is not sent (counted missed, ``reason="deadline"``)."""
    if picked is not None:
        return picked + spec.misfire_grace
    return due + jitter_offset(spec, due) + spec.misfire_grace


def overlap_action(policy: Overlap, running: int, buffered: bool) -> str:
    """What a fire does while ``running`` runs of its schedule have not finished.

    ``fire`` (nothing runs, or ``allow``), ``skip`` (``skip``; ``buffer_one`` with a fire
    buffered already), ``buffer`` (``buffer_one``: it is sent when the runs finished) or
    ``cancel`` (``cancel_other``: the running runs are cancelled, then it is sent). The Redis
    store runs the same decision in Lua (connection.py), atomically with the commit.
    """
    if policy == "allow" or running == 0:
        return "fire"
    if policy == "skip":
        return "skip"
    if policy == "buffer_one":
        return "skip" if buffered else "buffer"
    return "cancel"


def run_id(spec_id: str, due: float, *, request: str | None = None, backfill: bool = False) -> str:
    """The id of a fire and of its run (the fire's ``id`` and ``run_id``), the same on every
    replica: ``S@<due>`` for a scheduled fire, ``S@manual:<request>`` for ``scheduler.trigger``,
    ``S@<due>:backfill:<request>`` for ``scheduler.backfill``."""
    if request is None:
        return f"{spec_id}@{due:.3f}"
    if backfill:
        return f"{spec_id}@{due:.3f}:backfill:{request}"
    return f"{spec_id}@manual:{request}"


def backfill_dues(spec: Spec, start: float, end: float, limit: int) -> list[float]:
    """The due times of ``spec`` in ``[start, end]``, oldest first; :class:`ScheduleError`
    (key ``from``) when there are more than ``limit``."""
    dues: list[float] = []
    for due in due_times(spec, math.nextafter(start, -math.inf), end):
        dues.append(due)
        if len(dues) > limit:
            raise ScheduleError(
                "from",
                f"more than {limit} due times between from and to (backfill_limit): "
                "backfill a shorter window at a time",
            )
    dues.reverse()
    return dues


# -- messages ---------------------------------------------------------------------------------


def fire_message(
    spec: Spec,
    due: float,
    *,
    fire_time: float,
    gateway: str,
    reply_channel: str,
    missed: int = 0,
    run: str | None = None,
    manual: bool = False,
    backfill: bool = False,
) -> dict[str, Any]:
    """What a fire of ``spec`` for ``due`` sends to its channel.

    A schedule whose ``message`` has a ``type`` sends that message unchanged (``email.send``
    straight to the email gateway). Otherwise a ``scheduler.fire`` with the envelope of DESIGN §4
    (``id`` and ``run_id``: ``run``, default :func:`run_id`, the same on every replica, for
    de-duplication) and the schedule's ``message`` keys merged in.
    """
    if spec.typed:
        assert spec.message is not None
        return dict(spec.message)
    local = datetime.fromtimestamp(due, zone(spec.timezone)).isoformat()
    id_ = run or run_id(spec.id, due)
    return {
        "type": DEFAULT_TYPE,
        "gateway": gateway,
        "id": id_,
        "time": fire_time,
        "reply_channel": reply_channel,
        "schedule": spec.id,
        "scheduled_time": due,
        "scheduled_local": local,
        "fire_time": fire_time,
        "missed": missed,
        "run_id": id_,
        "report_done": spec.report_done if spec.tracks_runs else None,
        "manual": manual,
        "backfill": backfill,
        **(spec.message or {}),
    }


def cancel_message(
    spec: Spec, cancelled: str, *, by: str, time: float, gateway: str, reply_channel: str
) -> dict[str, Any]:
    """``scheduler.cancel``: ``overlap: cancel_other`` ends run ``cancelled`` for run ``by``."""
    return {
        "type": "scheduler.cancel",
        "gateway": gateway,
        "id": f"{cancelled}:cancel",
        "time": time,
        "reply_channel": reply_channel,
        "schedule": spec.id,
        "run_id": cancelled,
        "cancelled_by": by,
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
