"""How fleet state is shown to operators (the CLI, ``jobs show``, ``jobs history``)."""

from __future__ import annotations

from typing import Any

NEVER_RUN = "never"
"""The outcome filter's value for jobs without a fire in their history."""
OUTCOMES = ("succeeded", "failed", "running", "dispatched", "buffered", "retried", "expired", "skipped",
            "missed", "coalesced", NEVER_RUN)  # fmt: skip
"""The values of the jobs lists' outcome filter (CLI, API, console): a fire's final state as the
history shows it (:func:`fire_view`'s ``final``), or ``never`` (no fire yet)."""


def last_outcome(final: str | None) -> str:
    """A job's last ``final`` state as the outcome filter names it (``never`` for none)."""
    return final or NEVER_RUN


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
