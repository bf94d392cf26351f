"""How fleet state is shown to operators (the CLI, ``jobs show``, ``jobs history``)."""

from __future__ import annotations

from typing import Any


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
