"""What the dispatcher says about the fires it decided: one line per fire while few are
decided, one summary line a second past that, and a counter of outcomes."""

from __future__ import annotations

from collections import Counter
from datetime import datetime

from loguru import logger

from scheduler.fires import Fire
from shared.clock import Clock
from shared.fleet import Outcome
from shared.names import format_scheduled_at

QUIET_BATCH = 20
"""Past this many fires decided in one second, fires are logged as one summary line a second."""


class DecisionLog:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.outcomes: Counter[str] = Counter()
        """Outcomes this replica decided (the fleet's are in Redis)."""
        self._window_s = 0.0
        self._count = 0
        self._summary: Counter[str] = Counter()
        self._lags: list[float] = []

    def record(self, fires: list[Fire], results: list[str], now: datetime) -> None:
        """One line per fire while fewer than QUIET_BATCH a second are decided; past that, one
        summary line a second (at 2,000 fires a second, a line each costs more than the fire)."""
        self.outcomes.update(result for result in results if result != "decided")
        now_s = self.clock.monotonic()
        if now_s - self._window_s >= 1.0:
            self.flush()
            self._window_s, self._count = now_s, 0
        self._count += len(fires)
        if self._count <= QUIET_BATCH:
            for fire, result in zip(fires, results, strict=True):
                self._one(fire, result, now)
            return
        for fire, result in zip(fires, results, strict=True):
            if result == "decided":
                continue
            self._summary[result] += 1
            if result == Outcome.DISPATCHED:
                self._lags.append((now - fire.scheduled_at).total_seconds() * 1000)

    def _one(self, fire: Fire, result: str, now: datetime) -> None:
        log = logger.bind(job_id=fire.job.id, scheduled_at=format_scheduled_at(fire.scheduled_at), task_id=fire.task_id)
        if result == "decided":
            log.debug("fire already decided by another replica")
        elif result == Outcome.DISPATCHED:
            lag_ms = (now - fire.scheduled_at).total_seconds() * 1000
            log.info("fire dispatched lag_ms={:.1f}{}", lag_ms, " (as backup)" if fire.backup else "")
        elif result == Outcome.BUFFERED:
            log.info("fire waiting for a free slot")
        else:
            log.warning("fire {} ({})", result, fire.reason or "overlap: max_instances in flight")

    def flush(self) -> None:
        summary, self._summary = self._summary, Counter()
        lags, self._lags = sorted(self._lags), []
        if not summary:
            return
        counts = " ".join(f"{outcome}={n}" for outcome, n in sorted(summary.items()))
        p50, top = (lags[len(lags) // 2], lags[-1]) if lags else (0.0, 0.0)
        problems = summary.keys() - {Outcome.DISPATCHED, Outcome.BUFFERED}
        (logger.warning if problems else logger.info)(
            "decided {} fires: {} lag_ms p50={:.1f} max={:.1f}", sum(summary.values()), counts, p50, top
        )
