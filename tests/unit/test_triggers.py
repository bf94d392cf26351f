"""Triggers and previews: chronoq's DST policy on real 2026 transitions, intervals, dates."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from apscheduler.triggers.cron import CronTrigger

from scheduler.specs import JobSpec
from scheduler.triggers import LocalCronTrigger, build_trigger, describe_trigger, next_fire_times, parse_cron

BERLIN, NEW_YORK, SYDNEY = "Europe/Berlin", "America/New_York", "Australia/Sydney"


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def cron_job(cron: str | dict[str, Any], tz: str, **fields: Any) -> JobSpec:
    return JobSpec(id="job", task="demo.sleep", cron=cron, timezone=tz, **fields)


def iso(fires: list[datetime]) -> list[str]:
    return [fire.isoformat() for fire in fires]


# The rows of docs/dst.md. Local times carry their offset, so each string is one real instant.
DST_CASES = [
    # Europe/Berlin: spring 2026-03-29 02:00 -> 03:00, fall 2026-10-25 03:00 -> 02:00
    ("30 2 * * *", BERLIN, "2026-03-28T12:00", ["2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"]),
    ("30 2 * * *", BERLIN, "2026-10-24T12:00", ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"]),
    ("30 * * * *", BERLIN, "2026-03-29T00:00", ["2026-03-29T01:30:00+01:00", "2026-03-29T03:30:00+02:00"]),
    (
        "30 * * * *",
        BERLIN,
        "2026-10-24T23:50",
        ["2026-10-25T02:30:00+02:00", "2026-10-25T02:30:00+01:00", "2026-10-25T03:30:00+01:00"],
    ),
    # America/New_York: spring 2026-03-08 02:00 -> 03:00, fall 2026-11-01 02:00 -> 01:00
    ("30 2 * * *", NEW_YORK, "2026-03-07T12:00", ["2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"]),
    ("30 1 * * *", NEW_YORK, "2026-10-31T12:00", ["2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"]),
    ("30 * * * *", NEW_YORK, "2026-03-08T06:00", ["2026-03-08T01:30:00-05:00", "2026-03-08T03:30:00-04:00"]),
    (
        "30 * * * *",
        NEW_YORK,
        "2026-11-01T05:00",
        ["2026-11-01T01:30:00-04:00", "2026-11-01T01:30:00-05:00", "2026-11-01T02:30:00-05:00"],
    ),
    # Australia/Sydney: fall 2026-04-05 03:00 -> 02:00, spring 2026-10-04 02:00 -> 03:00
    ("30 2 * * *", SYDNEY, "2026-04-04T12:00", ["2026-04-05T02:30:00+11:00", "2026-04-06T02:30:00+10:00"]),
    ("30 2 * * *", SYDNEY, "2026-10-03T12:00", ["2026-10-04T03:00:00+11:00", "2026-10-05T02:30:00+11:00"]),
    (
        "30 * * * *",
        SYDNEY,
        "2026-04-04T15:00",
        ["2026-04-05T02:30:00+11:00", "2026-04-05T02:30:00+10:00", "2026-04-05T03:30:00+10:00"],
    ),
    ("30 * * * *", SYDNEY, "2026-10-03T15:00", ["2026-10-04T01:30:00+10:00", "2026-10-04T03:30:00+11:00"]),
    # fixed times listed, and stepped hours
    (
        "0 1,13 * * *",
        NEW_YORK,
        "2026-10-31T12:00",
        ["2026-10-31T13:00:00-04:00", "2026-11-01T01:00:00-04:00", "2026-11-01T13:00:00-05:00"],
    ),
    (
        "0 */2 * * *",
        BERLIN,
        "2026-10-24T21:30",
        [
            "2026-10-25T00:00:00+02:00",
            "2026-10-25T02:00:00+02:00",
            "2026-10-25T02:00:00+01:00",
            "2026-10-25T04:00:00+01:00",
        ],
    ),
    ("0 */2 * * *", BERLIN, "2026-03-28T22:30", ["2026-03-29T00:00:00+01:00", "2026-03-29T04:00:00+02:00"]),
    # previews starting inside the repeated hour (02:20 CET, the second 02:20 of the day)
    ("*/15 2 * * *", BERLIN, "2026-10-25T01:20", ["2026-10-26T02:00:00+01:00"]),
    ("15,45 * * * *", BERLIN, "2026-10-25T01:20", ["2026-10-25T02:45:00+01:00", "2026-10-25T03:15:00+01:00"]),
    # several wall times on one instant fire once
    ("0,30 2 * * *", BERLIN, "2026-03-28T12:00", ["2026-03-29T03:00:00+02:00", "2026-03-30T02:00:00+02:00"]),
    ("0 2,3 * * *", BERLIN, "2026-03-28T12:00", ["2026-03-29T03:00:00+02:00", "2026-03-30T02:00:00+02:00"]),
    # a mapping without hour is a wildcard: every real 20 s, straight through the overlap
    (
        {"second": "*/20", "minute": "*"},
        NEW_YORK,
        "2026-11-01T05:59:30",
        ["2026-11-01T01:59:40-04:00", "2026-11-01T01:00:00-05:00", "2026-11-01T01:00:20-05:00"],
    ),
    # a mapping with a fixed hour: the gap's 3600 seconds collapse to one fire
    (
        {"hour": 2, "minute": "*", "second": "*/30"},
        BERLIN,
        "2026-03-29T00:00",
        ["2026-03-29T03:00:00+02:00", "2026-03-30T02:00:00+02:00"],
    ),
]


@pytest.mark.parametrize(("cron", "tz", "after", "expected"), DST_CASES)
def test_dst_policy(cron: str | dict[str, Any], tz: str, after: str, expected: list[str]) -> None:
    assert iso(next_fire_times(cron_job(cron, tz), utc(after), len(expected))) == expected


def test_raw_apscheduler_runs_a_fall_back_time_twice() -> None:
    """Why LocalCronTrigger exists: APScheduler 3's CronTrigger fires 01:30 at 05:30Z and 06:30Z."""
    trigger = CronTrigger.from_crontab("30 1 * * *", timezone=NEW_YORK)
    first = trigger.get_next_fire_time(None, utc("2026-11-01T00:00"))
    second = trigger.get_next_fire_time(first, first)
    assert [first.astimezone(UTC), second.astimezone(UTC)] == [utc("2026-11-01T05:30"), utc("2026-11-01T06:30")]
    ours = next_fire_times(cron_job("30 1 * * *", NEW_YORK), utc("2026-11-01T00:00"), 2)
    assert [fire.astimezone(UTC) for fire in ours] == [utc("2026-11-01T05:30"), utc("2026-11-02T06:30")]


def test_raw_apscheduler_fires_a_gap_time_at_a_local_time_that_does_not_exist() -> None:
    trigger = CronTrigger.from_crontab("30 2 * * *", timezone=BERLIN)
    fire = trigger.get_next_fire_time(None, utc("2026-03-28T12:00"))
    assert fire.isoformat() == "2026-03-29T02:30:00+01:00"  # 01:30Z, i.e. 03:30 CEST; we fire at 03:00
    assert fire.astimezone(UTC) == utc("2026-03-29T01:30")


def _oracle(cron: str, tz_name: str, start: datetime, end: datetime) -> list[datetime]:
    """The policy by brute force over every minute: an independent check of LocalCronTrigger."""
    tz = ZoneInfo(tz_name)
    walls: set[datetime] = set()
    matcher = CronTrigger.from_crontab(cron, timezone=UTC)  # matches naive wall times, as UTC
    wall = (start - timedelta(days=1)).replace(tzinfo=None)
    while (hit := matcher.get_next_fire_time(None, wall.replace(tzinfo=UTC))) < end + timedelta(days=1):
        walls.add(hit.replace(tzinfo=None))
        wall = hit.replace(tzinfo=None) + timedelta(minutes=1)
    fires: set[datetime] = set()
    if parse_cron(cron).fixed_time:
        for wall in walls:
            first = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
            if first.astimezone(tz).replace(tzinfo=None) == wall:
                fires.add(first)
            else:  # in the gap: the first real minute whose wall time is later
                instant = first - timedelta(hours=3)
                while instant.astimezone(tz).replace(tzinfo=None) < wall:
                    instant += timedelta(minutes=1)
                fires.add(instant)
    else:
        instant = start.replace(second=0, microsecond=0)
        while instant <= end:
            if instant.astimezone(tz).replace(tzinfo=None) in walls:
                fires.add(instant)
            instant += timedelta(minutes=1)
    return sorted(fire for fire in fires if start < fire <= end)


@pytest.mark.parametrize(
    "cron",
    ["30 2 * * *", "*/15 2 * * *", "0,30 1-3 * * *", "45 1 * * *", "30 * * * *", "*/20 */2 * * *", "*/10 * * * *"],
)
@pytest.mark.parametrize(
    ("tz", "transition"),
    [
        (BERLIN, "2026-03-29T01:00"),
        (BERLIN, "2026-10-25T01:00"),
        (NEW_YORK, "2026-03-08T07:00"),
        (NEW_YORK, "2026-11-01T06:00"),
        (SYDNEY, "2026-04-04T16:00"),
        (SYDNEY, "2026-10-03T16:00"),
        ("Australia/Lord_Howe", "2026-04-04T15:00"),
        ("Australia/Lord_Howe", "2026-10-03T15:30"),  # 30-minute shifts
    ],
)
def test_matches_brute_force_around_transitions(cron: str, tz: str, transition: str) -> None:
    start, end = utc(transition) - timedelta(hours=30), utc(transition) + timedelta(hours=30)
    fires = [fire.astimezone(UTC) for fire in next_fire_times(cron_job(cron, tz), start, 500) if fire <= end]
    assert fires == _oracle(cron, tz, start, end)
    assert all(a < b for a, b in itertools.pairwise(fires))  # strictly increasing, no duplicates


@pytest.mark.parametrize(
    ("after", "expected_utc"),
    [
        ("2026-10-24T22:30", ["2026-10-24T23:00", "2026-10-25T00:00", "2026-10-25T01:00", "2026-10-25T02:00"]),
        ("2026-03-28T23:30", ["2026-03-29T00:00", "2026-03-29T01:00", "2026-03-29T02:00", "2026-03-29T03:00"]),
    ],
)
def test_interval_is_exact_elapsed_time_across_dst(after: str, expected_utc: list[str]) -> None:
    spec = JobSpec(
        id="hourly",
        task="demo.sleep",
        interval={"hours": 1},
        timezone=BERLIN,
        start_date=datetime(2026, 1, 1, tzinfo=UTC),
    )
    fires = next_fire_times(spec, utc(after), 4)
    assert all(fire.tzinfo == ZoneInfo(BERLIN) for fire in fires)
    instants = [fire.astimezone(UTC) for fire in fires]  # same-zone datetimes subtract as wall times
    assert instants == [utc(text) for text in expected_utc]
    assert {(b - a).total_seconds() for a, b in itertools.pairwise(instants)} == {3600.0}


def test_interval_without_start_date_is_anchored_at_the_epoch() -> None:
    spec = JobSpec(id="beat", task="demo.sleep", interval=10)
    expected = ["2026-05-01T12:00:10+00:00", "2026-05-01T12:00:20+00:00", "2026-05-01T12:00:30+00:00"]
    # The same grid whenever it is computed: a restart or another replica agrees on every fire.
    assert iso(next_fire_times(spec, utc("2026-05-01T12:00"), 3)) == expected
    assert iso(next_fire_times(spec, datetime(2026, 5, 1, 12, 0, 3, tzinfo=UTC), 3)) == expected
    odd = next_fire_times(JobSpec(id="odd", task="demo.sleep", interval=7), utc("2026-05-01T12:00"), 3)
    assert all(fire.timestamp() % 7 == 0 for fire in odd)
    summer = next_fire_times(
        JobSpec(id="odd", task="demo.sleep", interval=7, timezone=BERLIN), utc("2026-07-01T12:00"), 3
    )
    assert all(fire.timestamp() % 7 == 0 for fire in summer)


@pytest.mark.parametrize(
    ("date", "tz", "after", "expected"),
    [
        ("2026-12-01T09:00:00+01:00", "UTC", "2026-11-01T00:00", ["2026-12-01T08:00:00+00:00"]),
        ("2026-12-01T09:00:00", BERLIN, "2026-11-01T00:00", ["2026-12-01T09:00:00+01:00"]),  # naive: job's zone
        ("2026-12-01T09:00:00+01:00", "UTC", "2026-12-01T08:00", []),  # not strictly after
    ],
)
def test_date_job_fires_once(date: str, tz: str, after: str, expected: list[str]) -> None:
    spec = JobSpec(id="launch", task="demo.number_sum", date=date, timezone=tz)
    assert iso(next_fire_times(spec, utc(after), 5)) == expected


@pytest.mark.parametrize(
    ("cron", "after", "expected"),
    [
        ("0 9 * * 1-5", "2026-03-27T12:00", ["2026-03-30T09:00:00+00:00", "2026-03-31T09:00:00+00:00"]),  # Fri -> Mon
        ("0 9 * * 0", "2026-03-27T12:00", ["2026-03-29T09:00:00+00:00", "2026-04-05T09:00:00+00:00"]),  # 0 is Sunday
        ("0 9 * * 7", "2026-03-27T12:00", ["2026-03-29T09:00:00+00:00", "2026-04-05T09:00:00+00:00"]),  # so is 7
        ("0 9 * * SAT-SUN", "2026-03-27T12:00", ["2026-03-28T09:00:00+00:00", "2026-03-29T09:00:00+00:00"]),
        (
            "0 0 13 * FRI",
            "2026-03-01T00:00",
            ["2026-03-06T00:00:00+00:00", "2026-03-13T00:00:00+00:00", "2026-03-20T00:00:00+00:00"],
        ),  # day OR weekday, as crontab(5)
        ("0 0 29 2 *", "2026-01-01T00:00", ["2028-02-29T00:00:00+00:00", "2032-02-29T00:00:00+00:00"]),
        ("0 12 * JAN,jul *", "2026-01-31T00:00", ["2026-01-31T12:00:00+00:00", "2026-07-01T12:00:00+00:00"]),
    ],
)
def test_crontab_semantics(cron: str, after: str, expected: list[str]) -> None:
    assert iso(next_fire_times(cron_job(cron, "UTC"), utc(after), len(expected))) == expected


def test_start_and_end_date_bound_the_fires() -> None:
    spec = cron_job("0 12 * * *", "UTC", start_date="2026-05-03T00:00:00Z", end_date="2026-05-05T12:00:00Z")
    assert iso(next_fire_times(spec, utc("2026-05-01T00:00"), 10)) == [
        "2026-05-03T12:00:00+00:00",
        "2026-05-04T12:00:00+00:00",
        "2026-05-05T12:00:00+00:00",
    ]


def test_trigger_never_repeats_a_fire_when_the_clock_steps_back() -> None:
    trigger = build_trigger(cron_job("30 * * * *", "UTC"))
    fire = trigger.get_next_fire_time(None, utc("2026-05-01T10:00"))
    assert trigger.get_next_fire_time(fire, utc("2026-05-01T09:00")) == utc("2026-05-01T11:30")


def test_threshold_exactly_at_spring_forward_still_runs_the_gap_fire() -> None:
    trigger = build_trigger(cron_job("30 2 * * *", BERLIN))
    assert trigger.get_next_fire_time(None, utc("2026-03-29T01:00")).isoformat() == "2026-03-29T03:00:00+02:00"


def test_build_trigger_kinds_and_no_apscheduler_jitter() -> None:
    assert isinstance(build_trigger(cron_job("0 2 * * *", BERLIN, jitter=30)), LocalCronTrigger)
    interval = build_trigger(JobSpec(id="i", task="t", interval=5, jitter=30))
    assert interval.jitter is None
    assert interval.get_next_fire_time(None, datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC)) == utc("2026-01-01T00:00:05")


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        (JobSpec(id="a", task="t", cron="0  2 * * *", timezone=BERLIN), "cron 0 2 * * * Europe/Berlin"),
        (JobSpec(id="a", task="t", cron={"second": "*/10", "minute": "*"}), "cron minute=* second=*/10 UTC"),
        (JobSpec(id="a", task="t", interval=10), "every 10s"),
        (JobSpec(id="a", task="t", interval={"hours": 1, "minutes": 30}), "every 1h30m"),
        (JobSpec(id="a", task="t", interval=0.5), "every 0.5s"),
        (JobSpec(id="a", task="t", date="2026-12-01T09:00:00+01:00"), "once at 2026-12-01T08:00:00+00:00"),
    ],
)
def test_describe_trigger(spec: JobSpec, text: str) -> None:
    assert describe_trigger(spec) == text


@pytest.mark.parametrize(
    ("cron", "message"),
    [
        ("61 * * * *", "minute must be 0-59"),
        ("* 24 * * *", "hour must be 0-23"),
        ("* * 0 * *", "day must be 1-31"),
        ("* * * 13 *", "month must be 1-12"),
        ("* * * * 8", "day_of_week must be 0-7 or sun-sat"),
        ("* * * * 5-1", "must go from low to high"),
        ("*/0 * * * *", "minute '*/0': increment must be higher than 0"),
        ("* * *", "expected 5 fields"),
        ("0 0 31 2 *", "never fires"),
        ("0 0 30 2 *", "never fires"),
        ({"second": 61}, "second must be 0-59"),
        ({"secnd": "*/10"}, "unknown field 'secnd'"),
        ({}, "at least one field"),
    ],
)
def test_parse_cron_names_the_field(cron: str | dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        parse_cron(cron)
