"""How fleet state is shown to operators (the CLI, ``jobs show``, ``jobs history``)."""

from __future__ import annotations

from typing import Any

from shared.fleet import RECOVERY_REASONS

NEVER_RUN = "never"
"""The outcome filter's value for jobs without a fire in their history."""
OUTCOMES = ("succeeded", "failed", "running", "dispatched", "buffered", "retried", "expired", "skipped",
            "missed", "coalesced", "lost", NEVER_RUN)  # fmt: skip
"""The values of the jobs lists' outcome filter (CLI, API, console): a fire's final state as the
history shows it (:func:`fire_view`'s ``final``), or ``never`` (no fire yet)."""


def last_outcome(final: str | None) -> str:
    """A job's last ``final`` state as the outcome filter names it (``never`` for none)."""
    return final or NEVER_RUN


def audit_counts(counters: dict[str, int]) -> dict[str, int]:
    """What the dispatch audit found (``recovered_<reason>``) and the fires it recorded lost,
    from the fleet's counters: ``queued``, ``unacked``, ``reindexed``, ``republished``, ``lost``."""
    counts = {reason: counters.get(f"recovered_{reason}", 0) for reason in RECOVERY_REASONS}
    counts["lost"] = counters.get("lost", 0)
    return counts


def audit_line(counts: dict[str, int], awaiting: int) -> str:
    """The dispatch audit's findings in one line (``chronoq status``)."""
    return (
        f"{counts['republished']} republished, {counts['reindexed']} reindexed, {counts['lost']} lost; "
        f"{counts['queued']} still queued and {counts['unacked']} held unacked at its look; "
        f"{awaiting} dispatched, not started yet"
    )


def fire_view(raw: dict[str, str]) -> dict[str, Any]:
    """A fire hash as shown to operators: the final outcome first, times as epoch ms."""
    view: dict[str, Any] = dict(raw)
    view["final"] = raw.get("run") if raw.get("run") not in (None, "running") else raw.get("outcome")
    if raw.get("run") == "running":
        view["final"] = "running"
    for key in ("decided_ms", "dispatched_ms", "started_ms", "finished_ms", "duration_ms", "attempts"):
        if key in view:
            view[key] = int(view[key])
    return view
