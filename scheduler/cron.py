"""Cron expressions: a 5-field crontab string (crontab(5) semantics) or an APScheduler field
mapping, validated and parsed once into a :class:`CronExpr` that matches local wall-clock time.
Pure parsing; turning an expression into fire instants (with the DST policy) is
:class:`scheduler.triggers.LocalCronTrigger`'s business.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.cron.fields import MAX_VALUES, MIN_VALUES

CRON_FIELDS = ("year", "month", "day", "week", "day_of_week", "hour", "minute", "second")
_CRONTAB_FIELDS = ("minute", "hour", "day", "month", "day_of_week")
_CRONTAB_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")  # crontab: 0 and 7 are Sunday
_APS_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # APScheduler 3: 0 is Monday
_DOW_TOKEN = re.compile(r"(?:(\*)|([0-9]+|[a-z]+)(?:-([0-9]+|[a-z]+))?)(?:/([0-9]+))?")
# A calendar pattern that matches at all matches within 28 years (the weekday/leap-year cycle:
# Feb 29 on a Monday recurs after 28 years), so 200 years from 2000 never misses a real one.
_PROBE_FROM = datetime(2000, 1, 1, tzinfo=UTC)
_PROBE_UNTIL = datetime(2200, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class CronExpr:
    """A validated cron expression.

    ``alternatives`` are APScheduler field mappings matched against local wall-clock time; a
    wall time matches when any of them matches (two only under crontab's day-of-month OR
    day-of-week rule). ``fixed_time``: the hour field is neither ``*`` nor stepped, so the job
    runs at fixed local times and gets the fixed-time DST policy.
    """

    text: str
    alternatives: tuple[dict[str, str], ...]
    fixed_time: bool
    matchers: list[Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Wall-clock matchers: APScheduler's field matching in UTC, which has no DST, so its
        # "UTC" results are naive local wall times that we map to instants ourselves.
        object.__setattr__(self, "matchers", [CronTrigger(**alt, timezone=UTC) for alt in self.alternatives])

    def next_wall(self, wall: datetime) -> datetime | None:
        """The first matching naive wall-clock time at or after ``wall`` (rounded up to a second)."""
        found = [m.get_next_fire_time(None, wall.replace(tzinfo=UTC)) for m in self.matchers]
        hits: list[datetime] = [f for f in found if f is not None]
        return min(hits).replace(tzinfo=None) if hits else None


def parse_cron(value: str | Mapping[str, str | int]) -> CronExpr:
    """Validate a 5-field crontab string or an APScheduler field mapping.

    Crontab strings follow crontab(5), which APScheduler 3's ``from_crontab`` does not in two
    places: day_of_week 0 and 7 are Sunday (``from_crontab`` reads 0 as Monday, so ``1-5``
    would run Tuesday to Saturday), and when both day and day_of_week are restricted (neither
    starts with ``*``) a day matching *either* runs. Names (``MON``, ``JAN``) work as usual.
    Mappings keep APScheduler's ``CronTrigger`` semantics: keys year, month, day, week,
    day_of_week (0 is Monday), hour, minute, second; fields below the smallest given one
    default to their minimum, fields above it to ``*``.

    Raises ValueError naming the field (``minute must be 0-59``), or saying the expression
    never fires (``0 0 31 2 *``: no match between 2000 and 2199).

    Cached: 100,000 daily jobs share a few thousand expressions, and parsing one (with the
    probe that it fires at all) costs a millisecond and kilobytes of APScheduler fields. A
    CronExpr is immutable, so jobs with the same expression share one.
    """
    if isinstance(value, str):
        return _parse_cached(" ".join(value.split()), None)
    return _parse_cached(None, tuple((str(k), v) for k, v in value.items()))


@functools.lru_cache(maxsize=16384)
def _parse_cached(text: str | None, fields: tuple[tuple[str, str | int], ...] | None) -> CronExpr:
    expr = _parse_crontab(text) if text is not None else _parse_mapping(dict(fields or ()))
    probes = [CronTrigger(**alt, timezone=UTC, end_date=_PROBE_UNTIL) for alt in expr.alternatives]
    if all(p.get_next_fire_time(None, _PROBE_FROM) is None for p in probes):
        raise ValueError("never fires: no date between 2000 and 2199 matches (such as Feb 31)")
    return expr


def _parse_crontab(text: str) -> CronExpr:
    parts = text.split()
    if len(parts) != 5:
        raise ValueError(
            f"expected 5 fields (minute hour day month day_of_week), got {len(parts)}; "
            "for seconds use a mapping such as {second: '*/10', minute: '*'}"
        )
    minute, hour, day, month, dow = parts
    for name, expr in zip(_CRONTAB_FIELDS[:4], parts[:4], strict=True):
        _check_field(name, expr)
    weekdays = _crontab_weekdays(dow)
    base = {"minute": minute, "hour": hour, "month": month}
    if day.startswith("*") or dow.startswith("*"):
        alternatives: tuple[dict[str, str], ...] = ({**base, "day": day, "day_of_week": weekdays},)
    else:  # crontab(5): "if both fields are restricted, the command runs when either matches"
        alternatives = ({**base, "day": day, "day_of_week": "*"}, {**base, "day": "*", "day_of_week": weekdays})
    return CronExpr(" ".join(parts), alternatives, _is_fixed(hour))


def _parse_mapping(value: Mapping[str, str | int]) -> CronExpr:
    if not value:
        raise ValueError("a cron mapping needs at least one field, such as {minute: '*/5'}")
    for name, expr in value.items():
        if name not in CRON_FIELDS:
            raise ValueError(f"unknown field {name!r} (allowed: {', '.join(CRON_FIELDS)})")
        _check_field(name, str(expr))
    fields = {name: str(value[name]) for name in CRON_FIELDS if name in value}
    # Ask APScheduler which hour it really uses: {day: 1} means hour 0, {minute: 5} means every hour.
    hour = str(CronTrigger(**fields, timezone=UTC).fields[CRON_FIELDS.index("hour")])
    return CronExpr(" ".join(f"{k}={v}" for k, v in fields.items()), (fields,), _is_fixed(hour))


def _is_fixed(hour: str) -> bool:
    return hour != "*" and "/" not in hour


def _check_field(name: str, expr: str) -> None:
    try:
        CronTrigger.FIELDS_MAP[name](name, expr)
    except ValueError as exc:
        message = str(exc)
        if "than the maximum value" in message or "than the minimum value" in message:
            raise ValueError(f"{name} must be {MIN_VALUES[name]}-{MAX_VALUES[name]}") from None
        message = re.sub(r"^Error validating expression '.*?': ", "", message)
        raise ValueError(f"{name} {expr!r}: {message[:1].lower()}{message[1:]}") from None


def _crontab_weekdays(field_expr: str) -> str:
    """crontab(5) day_of_week (0-7, 0 and 7 Sunday, names, ranges, steps) -> APScheduler names."""
    if field_expr == "*":
        return "*"
    days: set[int] = set()
    for token in field_expr.lower().split(","):
        match = _DOW_TOKEN.fullmatch(token)
        if match is None:
            raise ValueError(f"day_of_week {field_expr!r}: unrecognised {token!r} (use 0-7 or sun-sat, ranges, steps)")
        star, first, last, step_text = match.groups()
        if star:
            low, high = 0, 6
        else:
            low = _weekday_number(first)
            high = 7 if (step_text and last is None) else low if last is None else _weekday_number(last)
            if last is not None and last == "sun" and low > 0:
                high = 7  # "sat-sun", "mon-sun": sun as a range end is 7
        step = int(step_text) if step_text else 1
        if step < 1:
            raise ValueError(f"day_of_week {field_expr!r}: a step must be at least 1")
        if low > high:
            raise ValueError(f"day_of_week {field_expr!r}: range {token!r} must go from low to high")
        days.update(day % 7 for day in range(low, high + 1, step))
    return ",".join(_APS_WEEKDAYS[index] for index in sorted((day - 1) % 7 for day in days))


def _weekday_number(text: str) -> int:
    if text.isdigit() and int(text) <= 7:
        return int(text)
    if text in _CRONTAB_WEEKDAYS:
        return _CRONTAB_WEEKDAYS.index(text)
    raise ValueError("day_of_week must be 0-7 or sun-sat")
