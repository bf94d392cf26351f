"""Celery beat and RedBeat, configured from a bench workload as a user following their docs would.

    BENCH_SPEC=spec.json celery -A bench.beat_app beat -s DIR/celerybeat-schedule --pidfile DIR/beat.pid

Like ``workers/app.py``, this module builds its app at import because ``celery -A`` needs one; it
is only ever imported by that command, never by the harness.

- Each job is a ``beat_schedule`` entry: an interval job is ``"schedule": timedelta(seconds=P)``
  (beat has no start date or phase for these: every entry starts counting at beat's start, then
  "every P seconds after the last run"); a cron job is ``crontab(minute=..., hour=...)``. Each
  entry sends ``bench.tick`` with ``args=(index,)`` and ``options={"queue": <bench queue>}``.
- ``"scheduler": "persistent"`` keeps the default PersistentScheduler (a shelve file given with
  ``-s``); ``"redbeat"`` sets ``beat_scheduler = "redbeat.RedBeatScheduler"`` and
  ``redbeat_redis_url`` (RedBeat's docs), with the entries still taken from ``beat_schedule``.

Instrumentation only (it changes nothing beat does): at ``beat_init``, which beat sends right
after its scheduler has loaded the schedule and before the first tick, the marker file gets the
time and, for interval workloads, each entry's ``last_run_at``: the instant beat's own schedule
counts from, read from the shelve-backed schedule or from RedBeat's hashes in Redis.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from typing import Any

from celery import Celery
from celery.schedules import crontab
from celery.signals import beat_init

from bench.workloads import WorkloadSpec, cron_fields, jobs_of

spec = WorkloadSpec.read(os.environ["BENCH_SPEC"])
app = Celery("bench_beat", broker=spec.redis_url)
app.conf.timezone = "UTC"
app.conf.broker_connection_retry_on_startup = True
app.conf.beat_schedule = {
    job.name: {
        "task": "bench.tick",
        "schedule": timedelta(seconds=job.period_s) if job.period_s else crontab(**cron_fields(job.cron or "")),
        "args": (job.index,),
        "options": {"queue": spec.queue},
    }
    for job in jobs_of(spec)
}
if spec.scheduler == "redbeat":
    app.conf.beat_scheduler = "redbeat.RedBeatScheduler"
    app.conf.redbeat_redis_url = spec.redis_url


def _write_marker(sender: Any = None, **_: Any) -> None:
    ready = time.time()
    anchors: dict[str, float] = {}
    if spec.kind == "interval":
        anchors = _redbeat_anchors() if spec.scheduler == "redbeat" else _shelve_anchors(sender.scheduler)
    with open(spec.marker + ".tmp", "w") as out:
        json.dump({"ready": ready, "anchors": anchors}, out)
    os.replace(spec.marker + ".tmp", spec.marker)


def _shelve_anchors(scheduler: Any) -> dict[str, float]:
    return {name: entry.last_run_at.timestamp() for name, entry in scheduler.schedule.items()}


def _redbeat_anchors() -> dict[str, float]:
    from redbeat.schedulers import RedBeatSchedulerEntry, get_redis

    names = list(app.conf.beat_schedule)
    with get_redis(app).pipeline() as pipe:
        for name in names:
            pipe.hget(RedBeatSchedulerEntry.generate_key(app, name), "meta")
        metas = pipe.execute()
    return {
        name: meta["last_run_at"].timestamp()
        for name, raw in zip(names, metas, strict=True)
        if (meta := RedBeatSchedulerEntry.decode_meta(raw))["last_run_at"] is not None
    }


beat_init.connect(_write_marker)
