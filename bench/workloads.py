"""The three workloads of the comparison and the jobs each one registers, the same for every contender.

A workload is described once, as a :class:`WorkloadSpec` written to JSON, and each contender
turns :func:`jobs_of` into its own configuration (a chronoq job file, a ``beat_schedule``, APScheduler
``add_job`` calls). Every job sends the task :data:`TASK` with ``args=[index]`` to the bench queue,
so an arrival on the queue names its job whoever sent it. The probe job of W3 has index -1.

- ``interval`` (W1): N jobs every ``period_s``; job *i* starts at ``base_us + i * period / N`` (its
  phase), for the contenders that accept a start date.
- ``cron_burst`` (W2): N jobs with the same 5-field cron, due once, at one minute boundary.
- ``startup`` (W3): N daily or weekly crons that are not due during the run, plus the probe: an
  interval job every second.

Times are integer microseconds since the Unix epoch, so every contender and the analysis see the
same grid to the microsecond.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

TASK = "bench.tick"
PROBE_INDEX = -1
Kind = Literal["interval", "cron_burst", "startup"]


@dataclass(frozen=True)
class WorkloadSpec:
    """One run's workload, as handed to a contender (JSON) and to the analysis."""

    kind: Kind
    jobs: int
    redis_url: str
    queue: str
    marker: str
    """File the contender's bench shim writes when it is ready (beat, RedBeat, APScheduler)."""
    period_s: float = 0.0
    base_us: int = 0
    """interval: the start of job 0's grid; job i starts ``i * period / jobs`` later."""
    cron: str = ""
    """cron_burst: the one cron every job has."""
    startup_hour: int = 0
    """startup: the UTC hour the run starts in; the crons avoid the two hours after it."""
    scheduler: str = ""
    """beat only: "persistent" or "redbeat"."""

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self)))
        return path

    @classmethod
    def read(cls, path: Path | str) -> WorkloadSpec:
        return cls(**json.loads(Path(path).read_text()))

    def start_us(self, index: int) -> int:
        """interval: the start of job ``index``'s grid (its first nominal fire, or any earlier one)."""
        return self.base_us + (index * round(self.period_s * 1_000_000)) // self.jobs


@dataclass(frozen=True)
class JobDef:
    """One job: exactly one of an interval (with an optional start) or a 5-field cron."""

    index: int
    period_s: float | None = None
    start_us: int | None = None
    cron: str | None = None

    @property
    def name(self) -> str:
        return "probe" if self.index == PROBE_INDEX else f"job-{self.index}"


def jobs_of(spec: WorkloadSpec) -> list[JobDef]:
    """The jobs of ``spec``, in index order (the probe last)."""
    if spec.kind == "interval":
        return [JobDef(i, period_s=spec.period_s, start_us=spec.start_us(i)) for i in range(spec.jobs)]
    if spec.kind == "cron_burst":
        return [JobDef(i, cron=spec.cron) for i in range(spec.jobs)]
    jobs = [JobDef(i, cron=_quiet_cron(i, spec.startup_hour)) for i in range(spec.jobs)]
    return [*jobs, JobDef(PROBE_INDEX, period_s=1.0)]


def _quiet_cron(index: int, hour_now: int) -> str:
    # Spread over 20 hours that start two hours from now: never due while the run lasts.
    minute, hour = index % 60, (hour_now + 2 + (index // 60) % 20) % 24
    if index % 10 == 9:
        return f"{minute} {hour} * * {index // 10 % 7}"  # one in ten weekly
    return f"{minute} {hour} * * *"


def cron_fields(cron: str) -> dict[str, str]:
    """A 5-field crontab as named fields (celery's ``crontab`` takes them in another order)."""
    minute, hour, day_of_month, month_of_year, day_of_week = cron.split()
    return {
        "minute": minute,
        "hour": hour,
        "day_of_month": day_of_month,
        "month_of_year": month_of_year,
        "day_of_week": day_of_week,
    }
