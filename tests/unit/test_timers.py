# mypy: disable-error-code="no-untyped-call"
"""Compaction of the event loop's timer heap, on a real kombu Timer."""

from __future__ import annotations

from kombu.asynchronous.timer import Timer

from workers.timers import compact


def test_compact_drops_cancelled_entries_and_keeps_the_rest_in_order() -> None:
    timer = Timer()
    fired: list[int] = []
    entries = [timer.call_at(1000.0 - i, fired.append, (i,)) for i in range(1000)]  # all due already
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
