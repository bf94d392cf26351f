"""JobSpec -> APScheduler 3 trigger with chronoq's DST policy, and pure previews of fire times.

DST policy (``docs/dst.md``), for cron jobs in a zone with daylight saving time:

- *fixed local time* (the hour field is neither ``*`` nor stepped): once per matching local
  time. A time in the spring-forward gap runs at the first instant after the gap; an ambiguous
  fall-back time runs once, at its first occurrence.
- *wildcard or stepped hour*: every real hour that matches. An ambiguous fall-back time runs
  twice (both occurrences, an hour apart); a time in the gap does not exist and does not run.
- wall times that map to the same instant fire once; fire times strictly increase.

Interval jobs are exact in elapsed time (APScheduler computes them on timestamps); date jobs
fire once. Jitter is never given to APScheduler: the dispatcher delays each fire itself, so the
grid of nominal fire times never drifts.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from scheduler.cron import CronExpr, parse_cron
from scheduler.specs import JobSpec

__all__ = ["CronExpr", "LocalCronTrigger", "build_trigger", "describe_trigger", "next_fire_times", "parse_cron"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)
_ONE_S = timedelta(seconds=1)
# How far ahead a fall-back is looked for; longer than any real DST shift.
_LOOKAHEAD = timedelta(hours=6)


class LocalCronTrigger(BaseTrigger):  # type: ignore[misc]  # APScheduler 3 has no type hints
    """A cron trigger on local wall-clock time with chronoq's DST policy (module docstring).

    APScheduler's own ``CronTrigger`` works on aware datetimes: it fires an ambiguous fall-back
    time twice even for a fixed-time job, and fires a gap time at a local time that does not
    exist (02:30+01:00 on Berlin's spring-forward day, i.e. 03:30 CEST). This trigger reuses
    its field matching for the next naive wall time only and maps wall times to instants here.
    """

    def __init__(
        self, expr: CronExpr, tz: ZoneInfo, start_date: datetime | None = None, end_date: datetime | None = None
    ) -> None:
        self.expr = expr
        self.timezone = tz
        self.start_date = start_date
        self.end_date = end_date

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime | None:
        """The first fire at or after ``now``, or strictly after ``previous_fire_time`` when given.

        Unlike APScheduler (which uses ``min(now, previous + 1 µs)``) ``now`` is ignored once a
        previous fire is known, so a clock stepping back never repeats a fire. Never before
        ``start_date``; None after ``end_date``. The result is aware, in the job's zone.
        """
        if previous_fire_time is not None:
            threshold = previous_fire_time.astimezone(UTC) + _ONE_US
        else:
            threshold = now.astimezone(UTC)
        if self.start_date is not None:
            threshold = max(threshold, self.start_date.astimezone(UTC))
        found = [fire for fire in (self._first_from(threshold), self._first_before(threshold)) if fire is not None]
        if not found or (self.end_date is not None and min(found) > self.end_date):
            return None
        return min(found).astimezone(self.timezone)

    def _first_from(self, threshold: datetime) -> datetime | None:
        """The earliest fire >= threshold among wall times from threshold's own wall time on.

        Over those wall times the earliest instant >= threshold never decreases, so the first
        wall time that has one holds the answer. Walls skipped on the way are only those of a
        gap or of an already-passed first occurrence, so the loop is short.
        """
        wall = threshold.astimezone(self.timezone).replace(tzinfo=None, fold=0)
        while (found := self.expr.next_wall(wall)) is not None:
            instants = [instant for instant in self._instants(found) if instant >= threshold]
            if instants:
                return min(instants)
            wall = found + _ONE_S
        return None

    def _first_before(self, threshold: datetime) -> datetime | None:
        """A fire >= threshold from a wall time *before* threshold's own: only next to a transition."""
        tz = self.timezone
        offset = _offset(threshold, tz)
        if self.expr.fixed_time:
            # Threshold exactly at a spring-forward: every gap wall time maps to this instant.
            before = _offset(threshold - _ONE_US, tz)
            if before >= offset:
                return None
            gap_start, gap_end = threshold.replace(tzinfo=None) + before, threshold.replace(tzinfo=None) + offset
            found = self.expr.next_wall(gap_start)
            return threshold if found is not None and found < gap_end else None
        # Wildcard hour and a fall-back coming within one shift: the repeated wall times before
        # threshold's own wall time occur a second time (fold=1) after threshold.
        later = _offset(threshold + _LOOKAHEAD, tz)
        if later >= offset:
            return None
        change = _transition(threshold, threshold + _LOOKAHEAD, tz).replace(tzinfo=None)
        found = self.expr.next_wall(change + later)
        if found is None or found >= change + offset:
            return None
        return (found - later).replace(tzinfo=UTC)

    def _instants(self, wall: datetime) -> list[datetime]:
        """The UTC instants a naive wall time stands for under the DST policy (0, 1 or 2)."""
        first = wall.replace(tzinfo=self.timezone, fold=0)
        second = wall.replace(tzinfo=self.timezone, fold=1)
        # Convert at once: datetimes sharing a tzinfo compare by wall time and ignore fold.
        early, late = first.astimezone(UTC), second.astimezone(UTC)
        if early == late:
            return [early]
        if early < late:  # ambiguous: fold=0 is the first occurrence
            return [early] if self.expr.fixed_time else [early, late]
        # In a gap fold=0 applies the old offset and lands after the gap, fold=1 before it.
        return [_transition(late, early, self.timezone)] if self.expr.fixed_time else []

    def __str__(self) -> str:
        return f"cron[{self.expr.text} {self.timezone.key}]"

    def __repr__(self) -> str:
        return f"<LocalCronTrigger ({self.expr.text!r}, timezone={self.timezone.key!r})>"


def _offset(instant: datetime, tz: ZoneInfo) -> timedelta:
    return instant.astimezone(tz).utcoffset() or timedelta(0)


def _transition(before: datetime, after: datetime, tz: ZoneInfo) -> datetime:
    """The instant the offset changes, between ``before`` (old offset) and ``after`` (new)."""
    new_offset = _offset(after, tz)
    low, high = int(before.timestamp()), int(after.timestamp())
    while high - low > 1:
        middle = (low + high) // 2
        if datetime.fromtimestamp(middle, tz).utcoffset() == new_offset:
            high = middle
        else:
            low = middle
    return datetime.fromtimestamp(high, UTC)


def build_trigger(spec: JobSpec) -> BaseTrigger:
    """The APScheduler 3 trigger of a valid spec; APScheduler's ``jitter`` is never set.

    An interval job without ``start_date`` is anchored at the Unix epoch: every 10 s fires at
    :00, :10, :20... UTC. So the grid is the same after every restart and on every replica,
    which is what makes a fire's (job, nominal time) identity, and so its claim and task id,
    stable. Interval arithmetic runs in UTC: the interval is elapsed time, across DST too.
    """
    tz = ZoneInfo(spec.timezone)
    if spec.kind == "cron":
        assert spec.cron is not None
        return LocalCronTrigger(parse_cron(spec.cron), tz, spec.start_date, spec.end_date)
    if spec.kind == "interval":
        assert spec.interval_s is not None
        start = spec.start_date or _EPOCH
        return IntervalTrigger(seconds=spec.interval_s, start_date=start, end_date=spec.end_date, timezone=UTC)
    return DateTrigger(run_date=spec.date, timezone=tz)


def next_fire_times(spec: JobSpec, after: datetime, count: int) -> list[datetime]:
    """Pure: the next ``count`` fire times strictly after ``after``, aware, in the job's zone.

    Uses the trigger's ``get_next_fire_time(previous, now)`` as the scheduler does. ``enabled``
    is ignored.
    Fewer than ``count`` when the schedule ends. Raises ValueError for a naive ``after``.
    """
    if after.tzinfo is None:
        raise ValueError("after must be timezone-aware")
    tz = ZoneInfo(spec.timezone)
    trigger = build_trigger(spec)
    times: list[datetime] = []
    previous: datetime | None = None
    now = after.astimezone(UTC) + _ONE_US
    while len(times) < count:
        fire: datetime | None = trigger.get_next_fire_time(previous, now)
        if fire is None:
            break
        if fire > after:  # a date job in the past is returned as is; it is not a future fire
            times.append(fire.astimezone(tz))
        previous = now = fire
    return times


def describe_trigger(spec: JobSpec) -> str:
    """Short human text: ``cron 0 2 * * * Europe/Berlin``, ``every 10s``, ``once at <UTC ISO>``."""
    if spec.kind == "cron":
        assert spec.cron is not None
        text = " ".join(spec.cron.split()) if isinstance(spec.cron, str) else parse_cron(spec.cron).text
        return f"cron {text} {spec.timezone}"
    if spec.kind == "interval":
        assert spec.interval_s is not None
        return f"every {_human_seconds(spec.interval_s)}"
    assert spec.date is not None
    return f"once at {spec.date.astimezone(UTC).isoformat()}"


def _human_seconds(seconds: float) -> str:
    if seconds != int(seconds):
        return f"{seconds:g}s"
    rest, parts = int(seconds), []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts)
