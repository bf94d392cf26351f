"""The one clock of a scheduler process, injected from :mod:`scheduler.service` into the manager,
the look-ahead, the dispatcher and the leadership, so tests can drive time instead of sleeping.

Wall-clock time (``now``/``time``) dates fires; monotonic time measures intervals (the log
summary window, the look-ahead's ramp-up). Timers themselves stay on the event loop, which runs
on the monotonic clock: code that sleeps until a wall-clock instant checks again when it wakes.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


def utc_now() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


class Clock(Protocol):
    def now(self) -> datetime:
        """Wall-clock time, aware, UTC."""
        ...

    def time(self) -> float:
        """Wall-clock time, epoch seconds."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never steps (for durations only)."""
        ...


class SystemClock:
    """The machine's clocks."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK = SystemClock()
