"""Small inline SVG charts for the pages (no JavaScript, no network): a job's recent runs and
the timeline's fires per minute. Values are numbers and escaped text only."""

from __future__ import annotations

from datetime import datetime, timedelta
from html import escape
from typing import Any

from markupsafe import Markup

OUTCOME_CLASS = {
    "succeeded": "ok",
    "dispatched": "sent",
    "running": "sent",
    "buffered": "sent",
    "failed": "bad",
    "missed": "bad",
    "expired": "bad",
    "retried": "skip",
    "skipped": "skip",
    "coalesced": "skip",
}


def runs_chart(history: list[dict[str, Any]], width: int = 1000, height: int = 150) -> Markup:
    """One bar per fire, oldest on the left: its height is the run's duration (a fire that did
    not run gets a short stub), its colour the outcome; hovering shows the details."""
    fires = list(reversed(history))
    if not fires:
        return Markup('<p class="muted">No fires recorded yet.</p>')
    longest = max([int(f.get("duration_ms", 0)) for f in fires] + [1])
    slot = width / max(len(fires), 50)
    bars = []
    for i, fire in enumerate(fires):
        final = str(fire.get("final") or "?")
        took = int(fire.get("duration_ms", 0))
        h = max(4.0, (height - 16) * took / longest) if took else 4.0
        x, y = i * slot + 1, height - 14 - h
        label = f"{fire.get('scheduled_at', '?')} {final}" + (f" {took} ms" if took else "")
        if fire.get("error"):
            label += f" {str(fire['error'])[:120]}"
        bars.append(
            f'<rect class="o-{OUTCOME_CLASS.get(final, "other")}" x="{x:.1f}" y="{y:.1f}" '
            f'width="{max(slot - 2, 1):.1f}" height="{h:.1f}"><title>{escape(label)}</title></rect>'
        )
    axis = f'<text x="0" y="{height - 2}" class="axis">longest {longest} ms; oldest left, newest right</text>'
    # Safe: only numbers and html.escape()d text go into the markup.
    return Markup(  # noqa: S704
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="durations and outcomes of the last {len(fires)} fires">{"".join(bars)}{axis}</svg>'
    )


def timeline_chart(counts: list[int], now: datetime, minutes: int, width: int = 1000, height: int = 170) -> Markup:
    """Fires per bucket over the next ``minutes``: a pile-up is a tall bar."""
    top = max([*counts, 1])
    slot = width / len(counts)
    bars = []
    for i, count in enumerate(counts):
        h = (height - 30) * count / top
        start = now + timedelta(minutes=minutes * i / len(counts))
        bars.append(
            f'<rect class="o-sent" x="{i * slot + 0.5:.1f}" y="{height - 18 - h:.1f}" width="{max(slot - 1, 1):.1f}" '
            f'height="{h:.1f}"><title>{start:%H:%M:%S} UTC: {count} fires</title></rect>'
        )
    ticks = []
    for i in range(0, len(counts) + 1, max(1, len(counts) // 6)):
        at = now + timedelta(minutes=minutes * i / len(counts))
        x = min(i * slot, width - 40)
        ticks.append(f'<text x="{x:.1f}" y="{height - 4}" class="axis">{at:%H:%M}</text>')
    peak = f'<text x="0" y="12" class="axis">peak {top} fires per {minutes * 60 // len(counts)} s</text>'
    return Markup(  # noqa: S704 (numbers and times only)
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="fires per interval over the next {minutes} minutes">{peak}{"".join(bars)}{"".join(ticks)}</svg>'
    )
