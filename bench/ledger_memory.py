#!/usr/bin/env python3
"""Redis memory of the fire ledger per job and per fire record, measured on a throwaway server.

    python bench/ledger_memory.py [--jobs 200] [--fires 400] [--limits 10,100]

For each history limit, ``--jobs`` jobs each decide ``--fires`` fires (dispatched, then run to
success by a pretend worker through ``start``/``finish``, as the real worker records them),
scheduled long ago so that records beyond the limit are retired at once (fence window 0). The
growth of ``used_memory`` over the empty server, divided by the jobs, is the steady-state cost
of a job; the difference between two limits, per record, is what one fire record costs (hash,
key, TTL and history entry). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.dispatch_lag import start_redis  # noqa: E402
from shared.fleet import FireIntent, FireLedger, Outcome  # noqa: E402
from shared.names import RedisKeys, fire_task_id_of, format_scheduled_at  # noqa: E402

BASE = datetime(2020, 1, 1, tzinfo=UTC)


def fill(client: redis.Redis, limit: int, jobs: int, fires: int) -> int:
    """used_memory growth after ``fires`` fires of each of ``jobs`` jobs under ``limit``."""
    client.flushall()
    before = int(client.info("memory")["used_memory"])
    keys = RedisKeys("chronoq:")
    ledger = FireLedger(client, keys, history_limit=limit, fence_window_s=0)
    for i in range(fires):
        at = format_scheduled_at(BASE + timedelta(seconds=i))
        intents = [
            FireIntent(
                f"job-{j:04d}",
                at,
                fire_task_id_of(f"job-{j:04d}", at),
                Outcome.DISPATCHED,
                slot_lapse_ms=60_000,
                list_key="cron_queue",
                payload="",
            )
            for j in range(jobs)
        ]
        ledger.decide(intents, owner="bench-host:12345:abcdef")
        for intent in intents:
            _, _, _, attempt = ledger.start(intent.job_id, at, intent.task_id, "worker-host:4242", 1_860_000)
            ledger.finish(
                intent.job_id, at, intent.task_id, Outcome.SUCCEEDED, "", "w1@worker-host", runner="worker-host:4242",
                attempt=int(attempt),
            )  # fmt: skip
        client.delete("cron_queue")
    return int(client.info("memory")["used_memory"]) - before


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--fires", type=int, default=400)
    parser.add_argument("--limits", default="10,100")
    args = parser.parse_args()
    limits = [int(x) for x in args.limits.split(",")]
    url, server = start_redis(Path(tempfile.mkdtemp(prefix="chronoq-ledger-mem-")))
    try:
        client = redis.Redis.from_url(url, decode_responses=True)
        per_job = {limit: fill(client, limit, args.jobs, args.fires) / args.jobs for limit in limits}
        sample = client.lindex("chronoq:history:job-0000", 0)
        fire_hash = client.memory_usage(f"chronoq:fire:job-0000:{sample}")
    finally:
        server.terminate()
        server.wait(10)
    low, high = min(limits), max(limits)
    result = {
        "jobs": args.jobs,
        "fires_per_job": args.fires,
        "bytes_per_job": {str(k): round(v) for k, v in per_job.items()},
        "bytes_per_fire_record": round((per_job[high] - per_job[low]) / (high - low)),
        "fire_hash_memory_usage": fire_hash,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
