"""The pure schedule arithmetic: cron in zones across DST, month ends, leap days, intervals,
one-shots, the misfire policies, jitter, and scheduler.add validation. No clock is read: every
instant is given."""

from __future__ import annotations

import itertools
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateways.scheduler.translate import (
    DEFAULT_TYPE,
    ScheduleError,
    Spec,
    backfill_dues,
    catch_up,
    check_cron,
    due_times,
    fire_message,
    jitter_offset,
    next_due,
    next_fire,
    overlap_action,
    parse_duration,
    parse_instant,
    run_id,
    send_deadline,
    spec_from_command,
)

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def cron(expr: str, timezone: str = "UTC", **keys: object) -> Spec:
    return Spec("s", "cron", "ch", cron=check_cron(expr), timezone=timezone, **keys)  # type: ignore[arg-type]


def every(seconds: float, **keys: object) -> Spec:
    return Spec("s", "every", "ch", every=seconds, **keys)  # type: ignore[arg-type]


def at(when: float, **keys: object) -> Spec:
    return Spec("s", "at", "ch", at=when, **keys)  # type: ignore[arg-type]


def local(zone: ZoneInfo, *parts: int, fold: int = 0) -> float:
    return datetime(*parts, tzinfo=zone, fold=fold).timestamp()  # type: ignore[misc]


def fires(spec: Spec, start: float, count: int) -> list[datetime]:
    zone = ZoneInfo(spec.timezone)
    out, cursor = [], start
    for _ in range(count):
        due = next_due(spec, cursor)
        assert due is not None
        out.append(datetime.fromtimestamp(due, zone))
        cursor = due
    return out


def iso(moments: list[datetime]) -> list[str]:
    return [m.isoformat() for m in moments]


# -- DST, two zones, both directions ----------------------------------------------------------


def test_berlin_spring_forward_skipped_time_fires_once_at_the_next_valid_time() -> None:
    # 2026-03-29: 02:00 CET → 03:00 CEST; 02:30 does not exist that day
    spec = cron("30 2 * * *", "Europe/Berlin")
    got = fires(spec, local(BERLIN, 2026, 3, 28, 12), 3)
    assert iso(got) == [
        "2026-03-29T03:00:00+02:00",
        "2026-03-30T02:30:00+02:00",
        "2026-03-31T02:30:00+02:00",
    ]


def test_berlin_fall_back_repeated_time_fires_once() -> None:
    # 2026-10-25: 03:00 CEST → 02:00 CET; 02:30 happens twice
    spec = cron("30 2 * * *", "Europe/Berlin")
    got = fires(spec, local(BERLIN, 2026, 10, 24, 12), 2)
    assert iso(got) == ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"]


def test_new_york_spring_forward_and_fall_back() -> None:
    # 2026-03-08 02:00 EST → 03:00 EDT; 2026-11-01 02:00 EDT → 01:00 EST
    spring = fires(cron("30 2 * * *", "America/New_York"), local(NEW_YORK, 2026, 3, 7, 12), 2)
    assert iso(spring) == ["2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"]
    fall = fires(cron("30 1 * * *", "America/New_York"), local(NEW_YORK, 2026, 10, 31, 12), 2)
    assert iso(fall) == ["2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"]


def test_a_start_inside_the_repeated_hour_does_not_fire_it_again() -> None:
    # the 01:30 EDT fire happened; the cursor sits at 01:10 EST (second pass)
    spec = cron("30 1 * * *", "America/New_York")
    second_pass = local(NEW_YORK, 2026, 11, 1, 1, 10, fold=1)
    fired = local(NEW_YORK, 2026, 11, 1, 1, 30, fold=0)
    assert next_due(spec, fired) == local(NEW_YORK, 2026, 11, 2, 1, 30)
    assert second_pass > fired


def test_wildcard_hours_fire_in_both_passes_of_a_repeated_hour() -> None:
    spec = cron("0 * * * *", "Europe/Berlin")
    got = fires(spec, local(BERLIN, 2026, 10, 25, 1, 10), 3)
    assert iso(got) == [
        "2026-10-25T02:00:00+02:00",
        "2026-10-25T02:00:00+01:00",
        "2026-10-25T03:00:00+01:00",
    ]
    # and the skipped hour of spring collapses into one fire at 03:00
    half_hourly = cron("*/30 * * * *", "Europe/Berlin")
    got = fires(half_hourly, local(BERLIN, 2026, 3, 29, 1, 10), 3)
    assert iso(got) == [
        "2026-03-29T01:30:00+01:00",
        "2026-03-29T03:00:00+02:00",
        "2026-03-29T03:30:00+02:00",
    ]


def test_times_named_inside_a_skipped_hour_fire_once_after_the_gap() -> None:
    # cronsim skips them for expressions with "*" in the minute or hour field; translate wraps
    every_20 = fires(cron("*/20 2 * * *", "America/New_York"), local(NEW_YORK, 2026, 3, 8), 2)
    assert iso(every_20) == ["2026-03-08T03:00:00-04:00", "2026-03-09T02:00:00-04:00"]
    two_hourly = fires(cron("0 */2 * * *", "America/New_York"), local(NEW_YORK, 2026, 3, 8, 1), 2)
    assert iso(two_hourly) == ["2026-03-08T03:00:00-04:00", "2026-03-08T04:00:00-04:00"]
    seconds = fires(cron("0 */20 2 * * *", "Europe/Berlin"), local(BERLIN, 2026, 3, 29, 1), 2)
    assert iso(seconds) == ["2026-03-29T03:00:00+02:00", "2026-03-30T02:00:00+02:00"]
    # a yearly one: the gap lies between two fires that are both in winter time
    yearly = fires(cron("*/30 2 8 3 *", "America/New_York"), local(NEW_YORK, 2025, 3, 1), 4)
    assert iso(yearly) == [
        "2025-03-08T02:00:00-05:00",
        "2025-03-08T02:30:00-05:00",
        "2026-03-08T03:00:00-04:00",
        "2027-03-08T02:00:00-05:00",
    ]


def test_six_fields_with_a_fixed_time_get_the_same_dst_rules() -> None:
    # cronsim leaves 6-field expressions without DST handling; translate reads every
    # expression's wall times itself: a skipped time fires at the first instant after the gap
    spec = cron("15 30 2 * * *", "Europe/Berlin")
    spring = fires(spec, local(BERLIN, 2026, 3, 28, 12), 2)
    assert iso(spring) == ["2026-03-29T03:00:00+02:00", "2026-03-30T02:30:15+02:00"]
    fall = fires(spec, local(BERLIN, 2026, 10, 24, 12), 2)
    assert iso(fall) == ["2026-10-25T02:30:15+02:00", "2026-10-26T02:30:15+01:00"]
    several = fires(cron("*/20 30 1 * * *", "America/New_York"), local(NEW_YORK, 2026, 11, 1), 4)
    assert iso(several) == [
        "2026-11-01T01:30:00-04:00",
        "2026-11-01T01:30:20-04:00",
        "2026-11-01T01:30:40-04:00",
        "2026-11-02T01:30:00-05:00",
    ]


# -- an independent oracle: the README's DST rules, from zoneinfo alone (no cronsim) ----------


def _field(text: str, low: int, high: int) -> set[int]:
    """The values a cron field names (numbers, ranges, steps, lists, '*')."""
    values: set[int] = set()
    for part in text.split(","):
        base, _, step = part.partition("/")
        if base == "*":
            first, last = low, high
        elif "-" in base:
            first, last = (int(x) for x in base.split("-"))
        else:
            first = last = int(base)
            if step:
                last = high
        values.update(range(first, last + 1, int(step or 1)))
    return values


def oracle(expr: str, zone_name: str, day: date) -> list[float]:
    """Due instants of ``expr`` whose wall time falls on local ``day``: a wall time that exists
    once is that instant; one that happens twice is its first occurrence, and also its second
    when the minute or hour field starts with '*'; one that does not exist collapses into the
    first instant after the gap (found by scanning the day's UTC minutes for the offset
    change). Only the time fields are matched: the days in these tests are every day."""
    tz = ZoneInfo(zone_name)
    fields = expr.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    seconds = sorted(_field(fields[0], 0, 59))
    minutes, hours = _field(fields[1], 0, 59), _field(fields[2], 0, 23)
    both = fields[1].startswith("*") or fields[2].startswith("*")
    midnight = datetime(day.year, day.month, day.day, tzinfo=tz).timestamp()
    transition = None
    for minute in range(1, 30 * 60):
        here = datetime.fromtimestamp(midnight + 60 * minute, tz).utcoffset()
        before = datetime.fromtimestamp(midnight + 60 * (minute - 1), tz).utcoffset()
        if here != before:
            transition = midnight + 60 * minute
            break
    out: set[float] = set()
    for hour in sorted(hours):
        for minute in sorted(minutes):
            for second in seconds:
                naive = datetime(day.year, day.month, day.day, hour, minute, second)
                first = naive.replace(tzinfo=tz, fold=0)
                second_pass = naive.replace(tzinfo=tz, fold=1)
                roundtrip = first.astimezone(UTC).astimezone(tz).replace(tzinfo=None)
                if roundtrip != naive:  # does not exist
                    assert transition is not None
                    out.add(transition)
                elif first.utcoffset() != second_pass.utcoffset():  # happens twice
                    out.add(first.timestamp())
                    if both:
                        out.add(second_pass.timestamp())
                else:
                    out.add(first.timestamp())
    return sorted(out)


#: the 2027 DST days: (zone, spring forward, fall back)
DST_2027 = [
    ("Europe/Berlin", date(2027, 3, 28), date(2027, 10, 31)),
    ("America/New_York", date(2027, 3, 14), date(2027, 11, 7)),
]
DST_CRONS = [
    # 5 fields
    "30 2 * * *",
    "0 2 * * *",
    "0 3 * * *",
    "59 1 * * *",
    "*/20 2 * * *",
    "*/30 * * * *",
    "0 * * * *",
    "15 */2 * * *",
    "0,30 1-3 * * *",
    "*/15 1 * * *",
    "45 2,3 * * *",
    "0 1 * * *",
    "30 1 * * *",
    "5-10 2 * * *",
    # 6 fields, seconds first
    "*/30 30 2 * * *",
    "15,45 30 2 * * *",
    "10 0 2 * * *",
    "15 */20 2 * * *",
    "0 30 1 * * *",
    "*/20 30 1 * * *",
    "30 * 2 * * *",
    "0 0 * * * *",
    "*/10 59 1 * * *",
    "0 */30 * * * *",
    "59 59 1 * * *",
    "0 0 3 * * *",
    "* 0 2 * * *",
    "30 15 1-2 * * *",
]


@pytest.mark.parametrize("expr", DST_CRONS)
@pytest.mark.parametrize(("zone_name", "spring", "fall"), DST_2027)
def test_dst_days_match_the_zoneinfo_oracle(
    expr: str, zone_name: str, spring: date, fall: date
) -> None:
    spec = cron(expr, zone_name)
    tz = ZoneInfo(zone_name)
    for day in (spring, fall):
        start = datetime(day.year, day.month, day.day, tzinfo=tz).timestamp()
        end = (datetime(day.year, day.month, day.day, tzinfo=tz) + timedelta(days=1)).timestamp()
        expected = oracle(expr, zone_name, day)
        forward, cursor = [], start - 0.5
        while (due := next_due(spec, cursor)) is not None and due < end:
            forward.append(due)
            cursor = due
        assert forward == expected, (day, [datetime.fromtimestamp(t, tz) for t in forward])
        backward = list(reversed(list(due_times(spec, start - 0.5, end - 0.5))))
        assert backward == expected, day


@pytest.mark.parametrize(
    ("expr", "zone_name", "day", "expected"),
    [
        # issue 22: each fired twice, or kept its seconds, or fired at another time in the gap
        ("*/30 30 2 * * *", "Europe/Berlin", date(2027, 3, 28), "2027-03-28T03:00:00+02:00"),
        ("15,45 30 2 * * *", "Europe/Berlin", date(2027, 3, 28), "2027-03-28T03:00:00+02:00"),
        ("10 0 2 * * *", "Europe/Berlin", date(2027, 3, 28), "2027-03-28T03:00:00+02:00"),
        ("15 */20 2 * * *", "America/New_York", date(2027, 3, 14), "2027-03-14T03:00:00-04:00"),
    ],
)
def test_a_six_field_time_in_the_gap_fires_once_at_the_first_instant_after_it(
    expr: str, zone_name: str, day: date, expected: str
) -> None:
    tz = ZoneInfo(zone_name)
    start = datetime(day.year, day.month, day.day, tzinfo=tz).timestamp()
    got = fires(cron(expr, zone_name, start=start), start, 2)
    assert got[0].isoformat() == expected
    assert got[1].date() > day  # no second fire that day: the next one is the next day's


@pytest.mark.parametrize(
    ("expr", "zone", "start", "days"),
    [
        ("30 2 * * *", "Europe/Berlin", (2026, 3, 27), 4),
        ("30 2 * * *", "Europe/Berlin", (2026, 10, 23), 4),
        ("0 * * * *", "Europe/Berlin", (2026, 10, 24, 20), 1),
        ("*/30 * * * *", "America/New_York", (2026, 3, 7, 20), 1),
        ("30 1 * * *", "America/New_York", (2026, 10, 30), 4),
        ("15 30 2 * * *", "Europe/Berlin", (2026, 3, 27), 4),
        ("15 30 2 * * *", "Europe/Berlin", (2026, 10, 23), 4),
        ("0 0 L * *", "UTC", (2028, 1, 1), 400),
        ("*/20 2 * * *", "America/New_York", (2026, 3, 6), 4),
        ("0 */2 * * *", "America/New_York", (2026, 3, 7, 20), 1),
        ("0 */20 2 * * *", "Europe/Berlin", (2026, 3, 28), 2),
        ("*/20 2 * * *", "America/New_York", (2026, 10, 31), 2),
        ("*/30 2 8 3 *", "America/New_York", (2025, 3, 1), 800),
    ],
)
def test_backwards_and_forwards_agree_across_dst(
    expr: str, zone: str, start: tuple[int, ...], days: int
) -> None:
    # catch-up enumerates newest first: it must see exactly the due times the timer fires
    spec = cron(expr, zone)
    begin = datetime(*start, tzinfo=ZoneInfo(zone)).timestamp()  # type: ignore[misc]
    until = begin + days * 86400
    forward, cursor = [], begin
    while (due := next_due(spec, cursor)) is not None and due <= until:
        forward.append(due)
        cursor = due
    assert list(reversed(list(due_times(spec, begin, until)))) == forward


def test_every_is_immune_to_dst() -> None:
    spec = every(3600, timezone="Europe/Berlin")
    start = local(BERLIN, 2026, 3, 29, 0, 30)
    dues = []
    cursor = start
    for _ in range(4):
        due = next_due(spec, cursor)
        assert due is not None
        dues.append(due)
        cursor = due
    assert [b - a for a, b in itertools.pairwise(dues)] == [3600.0] * 3


# -- calendars ---------------------------------------------------------------------------------


def test_day_31_skips_short_months_and_L_is_the_last_day() -> None:
    got = fires(cron("0 9 31 * *", "Europe/Berlin"), local(BERLIN, 2026, 1, 1), 4)
    assert [m.date().isoformat() for m in got] == [
        "2026-01-31",
        "2026-03-31",
        "2026-05-31",
        "2026-07-31",
    ]
    last = fires(cron("0 9 L * *", "America/New_York"), local(NEW_YORK, 2026, 1, 1), 4)
    assert [m.date().isoformat() for m in last] == [
        "2026-01-31",
        "2026-02-28",
        "2026-03-31",
        "2026-04-30",
    ]
    leap = fires(cron("0 9 L 2 *"), datetime(2027, 3, 1, tzinfo=UTC).timestamp(), 2)
    assert [m.date().isoformat() for m in leap] == ["2028-02-29", "2029-02-28"]


def test_february_29_fires_in_leap_years_only() -> None:
    got = fires(cron("0 0 29 2 *", "Europe/Berlin"), local(BERLIN, 2026, 1, 1), 3)
    assert [m.date().isoformat() for m in got] == ["2028-02-29", "2032-02-29", "2036-02-29"]


def test_six_fields_put_seconds_first() -> None:
    got = fires(cron("*/20 * * * * *"), datetime(2026, 1, 1, tzinfo=UTC).timestamp(), 3)
    assert [m.second for m in got] == [20, 40, 0]


def test_start_is_inclusive_end_is_the_last_possible_due() -> None:
    start = datetime(2026, 5, 1, 12, tzinfo=UTC).timestamp()
    spec = every(60, start=start, end=start + 120)
    assert next_due(spec, 0) == start
    assert next_due(spec, start) == start + 60
    assert next_due(spec, start + 60) == start + 120
    assert next_due(spec, start + 120) is None
    daily = cron("0 12 * * *", start=start, end=start + 86400)
    assert next_due(daily, 0) == start
    assert next_due(daily, start + 86400) is None


def test_at_fires_once() -> None:
    spec = at(1000.0)
    assert next_due(spec, 999) == 1000.0
    assert next_due(spec, 1000) is None
    assert list(due_times(spec, 0, 2000)) == [1000.0]


def test_due_times_are_newest_first_and_bounded() -> None:
    assert list(due_times(every(10), 0, 35)) == [30, 20, 10]
    assert list(due_times(every(10), 10, 30)) == [30, 20]
    hours = list(due_times(cron("0 * * * *"), 0, 3 * 3600))
    assert hours == [10800, 7200, 3600]


@given(
    st.floats(min_value=1e9, max_value=3e9),
    st.sampled_from([1.0, 7.5, 60.0, 3600.0, 86400.0]),
)
def test_every_due_time_is_strictly_after_and_on_the_grid(after: float, step: float) -> None:
    due = next_due(every(step), after)
    assert due is not None and after < due <= after + step
    assert abs(due / step - round(due / step)) < 1e-6


# -- misfire policy ----------------------------------------------------------------------------


def test_on_time_due_times_all_fire_whatever_the_policy() -> None:
    spec = every(1, misfire="skip", misfire_grace=60)
    plan = catch_up(spec, 100.0, 103.5)  # a takeover after 3 s: 101, 102, 103 are on time
    assert plan.fire == (101.0, 102.0, 103.0) and plan.missed == 0 and plan.cursor == 103.0


@pytest.mark.parametrize(
    ("policy", "cap", "fired", "missed"),
    [
        ("skip", 100, (), 11),
        ("once", 100, (600.0,), 10),
        ("all", 3, (480.0, 540.0, 600.0), 8),
        ("all", 100, tuple(float(60 * k) for k in range(11)), 0),
    ],
)
def test_misfire_policies_after_downtime(
    policy: str, cap: int, fired: tuple[float, ...], missed: int
) -> None:
    # down from -1 to 630: due times 0, 60, …, 600 are all more than 10 s late
    spec = every(60, misfire=policy, misfire_cap=cap, misfire_grace=10)
    plan = catch_up(spec, -1.0, 630.0)
    assert plan.fire == fired
    assert plan.missed == missed
    assert plan.cursor == 600.0


def test_once_fires_nothing_extra_when_an_on_time_due_time_fires() -> None:
    spec = every(60, misfire="once", misfire_grace=10)
    plan = catch_up(spec, -1.0, 605.0)  # 600 is on time, 0 … 540 are late
    assert plan.fire == (600.0,) and plan.missed == 10


def test_nothing_due_changes_nothing() -> None:
    plan = catch_up(every(60), 600.0, 650.0)
    assert plan.fire == () and plan.missed == 0 and plan.cursor == 600.0


def test_a_huge_gap_is_counted_up_to_a_limit() -> None:
    spec = every(1, misfire="once", misfire_grace=0.5)
    plan = catch_up(spec, 0.0, 10_000_000.0)
    assert plan.fire == (10_000_000.0,)
    assert plan.missed_at_least and plan.missed >= 9_999


def test_a_one_shot_missed_under_skip_is_given_up() -> None:
    plan = catch_up(at(100.0, misfire="skip", misfire_grace=5), 0.0, 200.0)
    assert plan.fire == () and plan.missed == 1 and plan.cursor == 100.0
    plan = catch_up(at(100.0, misfire="once", misfire_grace=5), 0.0, 200.0)
    assert plan.fire == (100.0,) and plan.missed == 0


# -- jitter -----------------------------------------------------------------------------------


@given(st.floats(min_value=0, max_value=4e9), st.floats(min_value=0.001, max_value=3600))
def test_jitter_stays_in_bounds_and_is_the_same_everywhere(due: float, jitter: float) -> None:
    spec = every(7200, jitter=jitter)
    offset = jitter_offset(spec, due)
    assert 0 <= offset < jitter
    assert jitter_offset(replace(spec), due) == offset


def test_jitter_delays_readiness_not_the_due_time() -> None:
    spec = every(60, jitter=30)
    due, fire_at = next_fire(spec, 0.0) or (0.0, 0.0)
    assert due == 60.0 and 60.0 <= fire_at < 90.0
    assert catch_up(spec, 0.0, fire_at - 0.001).fire == ()
    assert catch_up(spec, 0.0, fire_at).fire == (60.0,)
    assert jitter_offset(every(60), 60.0) == 0.0


# -- parsing and messages ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("5m", 300),
        ("1h", 3600),
        ("1h30m", 5400),
        ("250ms", 0.25),
        (2, 2),
        ("1.5", 1.5),
        ("2d", 172800),
        ("1w", 604800),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5 minutes", "1x", "-1s", True, None, "s", "nan"])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_instants() -> None:
    assert parse_instant("2026-07-01T12:00:00Z") == datetime(2026, 7, 1, 12, tzinfo=UTC).timestamp()
    assert parse_instant("2026-07-01T12:00:00", "Europe/Berlin") == local(BERLIN, 2026, 7, 1, 12)
    assert parse_instant(12.5) == 12.5
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_instant("tomorrow")


@pytest.mark.parametrize("expr", ["61 * * * *", "* * *", "* * * * * * *", "0 25 * * *", "hello"])
def test_invalid_cron(expr: str) -> None:
    with pytest.raises(ValueError):
        check_cron(expr)


def add(**body: object) -> Spec:
    return spec_from_command(
        {"schedule": "a1", **body}, now=1000.0, default_channel="inbox", defaults={}
    )


def test_add_builds_each_kind() -> None:
    assert add(**{"in": "10m"}).at == 1600.0
    assert add(at=1500).at == 1500.0
    assert add(every="5m", channel="other").channel == "other"
    spec = add(cron="0 7 * * *", timezone="Europe/Berlin", misfire="skip")
    assert (spec.kind, spec.misfire, spec.channel, spec.source) == (
        "cron",
        "skip",
        "inbox",
        "runtime",
    )


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ({"every": "0s"}, "every"),
        ({"cron": "99 * * * *"}, "cron"),
        ({"cron": "0 * * * *", "timezone": "Mars/Olympus"}, "timezone"),
        ({"at": 100}, "at"),
        ({"in": "soon"}, "in"),
        ({"in": 5, "every": 5}, ""),
        ({}, ""),
        ({"in": 5, "colour": "red"}, "colour"),
        ({"in": 5, "misfire": "sometimes"}, "misfire"),
        ({"in": 5, "message": {"type": 3}}, "message"),
        ({"in": 5, "message": {"schedule": "x"}}, "message"),
        ({"in": 5, "channel": "bad channel!"}, "channel"),
        ({"every": 5, "start": 100, "end": 50}, "end"),
    ],
)
def test_add_rejects_with_the_key(body: dict[str, object], key: str) -> None:
    with pytest.raises(ScheduleError) as info:
        add(**body)
    assert info.value.key == key


def test_add_needs_a_schedule_id() -> None:
    with pytest.raises(ScheduleError, match="schedule"):
        spec_from_command({"in": 5}, now=0, default_channel="c", defaults={})
    with pytest.raises(ScheduleError, match="schedule"):
        spec_from_command({"schedule": "a b", "in": 5}, now=0, default_channel="c", defaults={})


def test_fire_messages() -> None:
    spec = every(60, message={"digest": "daily"}, timezone="Europe/Berlin")
    message = fire_message(
        spec, 1800.0, fire_time=1800.25, gateway="timers", reply_channel="t.send"
    )
    assert message == {
        "type": DEFAULT_TYPE,
        "gateway": "timers",
        "id": "s@1800.000",
        "time": 1800.25,
        "reply_channel": "t.send",
        "schedule": "s",
        "scheduled_time": 1800.0,
        "scheduled_local": "1970-01-01T01:30:00+01:00",
        "fire_time": 1800.25,
        "missed": 0,
        "run_id": "s@1800.000",
        "report_done": None,
        "manual": False,
        "backfill": False,
        "digest": "daily",
    }
    own = every(60, message={"type": "mqtt.publish", "topic": "t", "payload": "x"})
    assert fire_message(own, 60.0, fire_time=61.0, gateway="g", reply_channel="r") == {
        "type": "mqtt.publish",
        "topic": "t",
        "payload": "x",
    }


def test_spec_json_round_trip() -> None:
    spec = add(cron="0 7 * * *", message={"a": [1, 2]})
    assert Spec.from_json(spec.to_json()) == spec


# -- the rules of issue 22: missed, the send deadline, jitter, overlap ---------------------------


def test_given_up_due_times_go_with_the_fire_after_them() -> None:
    # skip: 0 … 540 misfired, 600 on time: one commit fires 600 carrying the ten given up
    plan = catch_up(every(60, misfire="skip", misfire_grace=10), -1.0, 605.0)
    assert plan.given_up == tuple(float(60 * k) for k in range(10))
    (step,) = plan.steps()
    assert (step.due, step.fire, len(step.given_up), step.late) == (600.0, True, 10, False)
    # nothing on time: one commit moves the cursor past all eleven, firing none
    plan = catch_up(every(60, misfire="skip", misfire_grace=10), -1.0, 630.0)
    (step,) = plan.steps()
    assert (step.due, step.fire, len(step.given_up)) == (600.0, False, 11)
    # once: the newest misfired one fires (picked late), after the ten before it
    plan = catch_up(every(60, misfire="once", misfire_grace=10), -1.0, 630.0)
    (step,) = plan.steps()
    assert (step.due, step.fire, len(step.given_up), step.late) == (600.0, True, 10, True)


def test_the_send_deadline_is_the_grace_after_the_fire_time_however_late_it_was_decided() -> None:
    spec = every(1, misfire_grace=4)
    # an on-time fire decided 3 s late (its schedule was busy) keeps its own deadline
    plan = catch_up(spec, 100.0, 104.0)
    assert [s.late for s in plan.steps()] == [False] * 4
    assert send_deadline(spec, 101.0) == 105.0
    # a fire the misfire policy picked among misfired ones gets the grace from the decision
    assert send_deadline(spec, 50.0, picked=104.0) == 108.0
    jittered = every(60, jitter=30, misfire_grace=4)
    assert send_deadline(jittered, 60.0) == 60.0 + jitter_offset(jittered, 60.0) + 4


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"every": "1m", "jitter": "2m"}, "120 s is longer than the interval (every: 60 s)"),
        (
            {"cron": "*/5 * * * *", "jitter": "10m"},
            "shortest interval of cron '*/5 * * * *' (300 s)",
        ),
        ({"cron": "0 9 * * mon-fri", "jitter": "25h"}, "(86400 s)"),
    ],
)
def test_jitter_longer_than_the_interval_is_refused_naming_the_key(
    body: dict[str, object], message: str
) -> None:
    with pytest.raises(ScheduleError) as info:
        add(**body)
    assert info.value.key == "jitter" and message in info.value.reason
    assert add(every="1m", jitter="1m").jitter == 60.0  # up to the interval is fine
    assert add(**{"in": "1h", "jitter": "2h"}).jitter == 7200.0  # a one-shot has no interval


def test_overlap_needs_a_scheduler_fire() -> None:
    assert add(every="1m", overlap="skip").tracks_runs
    with pytest.raises(ScheduleError) as info:
        add(every="1m", overlap="skip", message={"type": "mqtt.publish", "topic": "t"})
    assert info.value.key == "overlap" and "use allow" in info.value.reason
    typed = spec_from_command(
        {"schedule": "m", "every": 60, "message": {"type": "mqtt.publish"}},
        now=0,
        default_channel="c",
        defaults={"overlap": "skip"},
    )
    assert typed.overlap == "allow"  # the section's default reaches only scheduler.fire ones
    with pytest.raises(ScheduleError) as info:
        add(every="1m", overlap="sometimes")
    assert info.value.key == "overlap"


@pytest.mark.parametrize(
    ("policy", "running", "buffered", "action"),
    [
        ("allow", 3, False, "fire"),
        ("skip", 0, False, "fire"),
        ("skip", 1, False, "skip"),
        ("buffer_one", 1, False, "buffer"),
        ("buffer_one", 1, True, "skip"),
        ("buffer_one", 0, True, "fire"),
        ("cancel_other", 2, False, "cancel"),
        ("cancel_other", 0, False, "fire"),
    ],
)
def test_overlap_actions(policy: str, running: int, buffered: bool, action: str) -> None:
    assert overlap_action(policy, running, buffered) == action  # type: ignore[arg-type]


def test_backfill_dues_are_oldest_first_and_bounded() -> None:
    spec = every(60)
    assert backfill_dues(spec, 0.0, 300.0, 10) == [0.0, 60.0, 120.0, 180.0, 240.0, 300.0]
    assert backfill_dues(spec, 1.0, 59.0, 10) == []
    with pytest.raises(ScheduleError) as info:
        backfill_dues(spec, 0.0, 3600.0, 10)
    assert info.value.key == "from" and "backfill_limit" in info.value.reason


def test_run_ids_and_the_fire_keys_of_manual_fires() -> None:
    assert run_id("s", 60.0) == "s@60.000"
    assert run_id("s", 60.0, request="r1") == "s@manual:r1"
    assert run_id("s", 60.0, request="r1", backfill=True) == "s@60.000:backfill:r1"
    spec = every(60, overlap="skip")
    message = fire_message(
        spec, 60.0, fire_time=61.0, gateway="g", reply_channel="r", run="s@manual:r1", manual=True
    )
    assert (message["id"], message["run_id"], message["manual"], message["backfill"]) == (
        "s@manual:r1",
        "s@manual:r1",
        True,
        False,
    )
    assert message["report_done"] == "worker"
    assert (
        fire_message(every(60), 60.0, fire_time=61, gateway="g", reply_channel="r")["report_done"]
        is None
    )  # overlap: allow waits for no report
