# mypy: disable-error-code="no-untyped-call"
"""Compaction of the event loop's timer heap, on a real kombu Timer."""

from __future__ import annotations

from kombu.asynchronous import timer as kombu_timer
from kombu.asynchronous.timer import Timer

from workers.timers import compact


def test_compact_drops_cancelled_entries_and_keeps_the_rest_in_order() -> None:
    timer = Timer()
    fired: list[int] = []
    # Due already by the timer's own clock (kombu's module-level ``monotonic``, seconds since
    # boot): fixed times such as 1000 - i are in the future on a machine up under 17 minutes.
    now = kombu_timer.monotonic()  # type: ignore[attr-defined]
    entries = [timer.call_at(now - 1 - i, fired.append, (i,)) for i in range(1000)]
    for i, entry in enumerate(entries):
        if i % 100:
            entry.cancel()  # as the prefork pool does when a task ends before its time limit
    assert len(timer) == 1000
    assert compact(timer) == 990
    assert len(timer) == 10
    assert compact(timer) == 0
    for _, entry in iter(timer):
        if entry is None:
            break
        entry()
    assert fired == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]  # soonest first
