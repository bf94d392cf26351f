"""From arrivals to figures: nominal slots, lag, missed and duplicated fires, drain curves.

Every contender is judged by the same rules, from the broker's side:

- **Interval (W1)**: job *i* has the grid ``base_i + k * P``. ``base_i`` is the start the harness
  gave the job (chronoq's ``start_date``, APScheduler's ``start_date``) or, for beat and RedBeat,
  which take no start, the entry's ``last_run_at`` when beat loaded its schedule. A message that
  names its nominal time (chronoq's ``scheduled_at`` header) belongs to that slot. Any other
  arrival at ``t`` belongs to the latest slot at or before ``t`` (no contender fires before its
  nominal time, and the harness reads each grid from the contender's own start), except that two
  arrivals of one job are two fires: when they fall in one slot, the earlier one moves back to the
  latest free slot before it (it was late by more than a period). So a fire without a nominal
  time is never counted as a duplicate, and one later than a whole period with no later fire
  behind it counts as a miss of its own slot and an arrival in a later one. Lag is ``t - slot``.
  Slots whose nominal time lies in the measured window are expected; an expected slot with no
  arrival by the end of the run is **missed**, each extra arrival for a slot is a **duplicate**.
  ``header_mismatch`` counts the arrivals whose header names another slot than the rule above
  would pick: how often it would have been wrong for chronoq.
- **Burst (W2)**: every job's one nominal time is the boundary. Lag is ``t - boundary`` of each
  job's first arrival; the drain time is the last first-arrival minus the boundary.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

CURVE_POINTS = 200
QUANTILES = (*np.linspace(0.0, 0.99, 100), 0.995, 0.999, 0.9999, 1.0)


def lag_summary(lags_s: FloatArray) -> dict[str, Any]:
    """p50, p99 and max lag in ms, and the lag quantiles (ms) a CDF chart is drawn from."""
    if lags_s.size == 0:
        return {"lag_p50_ms": None, "lag_p99_ms": None, "lag_max_ms": None, "lag_quantiles_ms": []}
    ms = lags_s * 1000.0
    return {
        "lag_p50_ms": round(float(np.percentile(ms, 50)), 2),
        "lag_p99_ms": round(float(np.percentile(ms, 99)), 2),
        "lag_max_ms": round(float(ms.max()), 2),
        "lag_quantiles_ms": [round(float(v), 3) for v in np.quantile(ms, QUANTILES)],
    }


def analyze_interval(
    times: FloatArray,
    indexes: IntArray,
    scheduled: FloatArray,
    bases: FloatArray,
    period_s: float,
    window: tuple[float, float],
) -> dict[str, Any]:
    """Expected, arrived, missed, duplicated and lag over the slots whose nominal time is in ``window``.

    ``bases[i]`` is job i's grid origin (epoch s; NaN when the contender did not report one).
    """
    start, end = window
    jobs = bases.size
    known = (indexes >= 0) & (indexes < jobs)
    t, idx, sched = times[known], indexes[known], scheduled[known]
    base = bases[idx]
    floor_k = distinct_slots(idx, t, np.floor((t - base) / period_s))
    has_header = ~np.isnan(sched)
    k = np.where(has_header, np.round((np.where(has_header, sched, base) - base) / period_s), floor_k)
    slot = base + k * period_s
    inside = (slot >= start) & (slot < end)
    keys = idx[inside] * 1_000_000_000 + k[inside].astype(np.int64)
    unique = int(np.unique(keys).size)
    first_k = np.ceil((start - bases) / period_s)
    last_k = np.ceil((end - bases) / period_s)
    expected = int(np.nansum(last_k - first_k))
    mismatch = int(np.count_nonzero(inside & has_header & (k != floor_k)))
    return {
        "expected": expected,
        "arrived": unique,
        "missed": expected - unique,
        "duplicates": int(keys.size) - unique,
        "unknown_jobs": int(np.count_nonzero(~known)),
        "header_mismatch": mismatch,
        "jobs_without_base": int(np.count_nonzero(np.isnan(bases))),
        **lag_summary(t[inside] - slot[inside]),
    }


def distinct_slots(indexes: IntArray, times: FloatArray, slots: FloatArray) -> FloatArray:
    """``slots`` (each arrival's latest slot at or before it) made strictly increasing per job in
    time order, by moving an arrival back to the latest slot its later arrivals leave free."""
    result = slots.copy()
    order = np.lexsort((times, indexes))
    for group in np.split(order, np.flatnonzero(np.diff(indexes[order])) + 1):
        position = np.arange(group.size)
        # slot_j = min over later arrivals i of (slot_i - (i - j)): as late as possible, one slot apart.
        result[group] = np.minimum.accumulate((slots[group] - position)[::-1])[::-1] + position
    return result


def analyze_burst(times: FloatArray, indexes: IntArray, jobs: int, boundary: float) -> dict[str, Any]:
    """Arrived, missed, duplicated, lag, first and drain time of a burst of ``jobs`` due at ``boundary``."""
    known = (indexes >= 0) & (indexes < jobs)
    t, idx = times[known], indexes[known]
    order = np.argsort(t, kind="stable")
    t, idx = t[order], idx[order]
    _, first_pos = np.unique(idx, return_index=True)
    firsts = np.sort(t[first_pos])
    since = firsts - boundary
    return {
        "expected": jobs,
        "arrived": int(firsts.size),
        "missed": jobs - int(firsts.size),
        "duplicates": int(t.size - firsts.size),
        "unknown_jobs": int(np.count_nonzero(~known)),
        "early": int(np.count_nonzero(since < 0)),
        "first_s": round(float(since[0]), 4) if since.size else None,
        "drain_s": round(float(since[-1]), 4) if since.size else None,
        "curve": arrival_curve(since),
        **lag_summary(since),
    }


def arrival_curve(since_s: FloatArray, points: int = CURVE_POINTS) -> list[list[float]]:
    """Cumulative arrivals against seconds since the boundary, at most ``points`` [s, count] pairs."""
    if since_s.size == 0:
        return []
    picks = np.unique(np.linspace(0, since_s.size - 1, min(points, since_s.size)).round().astype(np.int64))
    return [[round(float(since_s[i]), 4), int(i + 1)] for i in picks]


def median(values: list[float | None]) -> float | None:
    """The median of the values that are not None (None when there are none)."""
    present = sorted(v for v in values if v is not None and not math.isnan(v))
    if not present:
        return None
    mid = len(present) // 2
    return present[mid] if len(present) % 2 else (present[mid - 1] + present[mid]) / 2
