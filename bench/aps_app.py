"""The hand-written contender: APScheduler 3 and ``app.send_task``, the way a typical user writes it.

    python -m bench.aps_app SPEC.json

One ``AsyncIOScheduler`` (UTC, memory job store, APScheduler's defaults: ``misfire_grace_time``
1 s, ``coalesce`` off, ``max_instances`` 1) and one job per workload entry: an
``IntervalTrigger(seconds=P, start_date=<the job's phase>)`` or ``CronTrigger.from_crontab(...)``.
The job function is a plain ``def`` calling ``app.send_task("bench.tick", args=[index],
queue=...)``: APScheduler's asyncio executor runs such functions in the event loop's default
thread pool, so the blocking publish stays off the loop without the user doing anything.

Instrumentation only: once ``scheduler.start()`` has returned (every job added), the marker file
gets the time. SIGTERM or SIGINT shuts the scheduler down and exits 0 without running the sends
still queued in the thread pool (the loop's default executor is an ordinary ``ThreadPoolExecutor``
set explicitly so it can be cancelled; ``asyncio.run`` would wait for every queued send).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from celery import Celery

from bench.workloads import TASK, JobDef, WorkloadSpec, jobs_of


def trigger_of(job: JobDef) -> BaseTrigger:
    if job.cron is not None:
        return CronTrigger.from_crontab(job.cron, timezone=UTC)
    start = None if job.start_us is None else datetime.fromtimestamp(job.start_us / 1_000_000, UTC)
    return IntervalTrigger(seconds=job.period_s or 1.0, start_date=start, timezone=UTC)


async def run(spec: WorkloadSpec) -> None:
    app = Celery("bench_aps", broker=spec.redis_url)
    app.conf.broker_connection_retry_on_startup = True

    def send(index: int) -> None:
        app.send_task(TASK, args=[index], queue=spec.queue)

    pool = ThreadPoolExecutor()  # what asyncio would create, kept so that stopping can cancel it
    loop = asyncio.get_running_loop()
    loop.set_default_executor(pool)
    scheduler = AsyncIOScheduler(timezone=UTC)
    for job in jobs_of(spec):
        scheduler.add_job(send, trigger_of(job), args=[job.index], id=job.name)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    scheduler.start()
    with open(spec.marker + ".tmp", "w") as out:
        json.dump({"ready": time.time(), "anchors": {}}, out)
    os.replace(spec.marker + ".tmp", spec.marker)
    try:
        await stop.wait()
    finally:
        scheduler.shutdown(wait=False)
        pool.shutdown(wait=False, cancel_futures=True)
        app.close()


def main(argv: list[str]) -> int:
    asyncio.run(run(WorkloadSpec.read(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
