"""Redis memory does not grow with uptime (#11 defect 11): a fast job fired hundreds of times by a
real scheduler, run by a real worker, keeps a bounded number of fire records, and chronoq's own
keys stop growing once the history and fence window are full.

Bounded in time: 20 fires a second for about 20 s.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from shared.names import RedisKeys
from shared.settings import AppSettings
from tests.conftest import SchedulerProcess, WorkerProcess, executions, wait_for, write_jobs

pytestmark = pytest.mark.timeout(90)

LIMIT = 10
FENCE_WINDOW_S = 1
RATE = 20  # fires a second


def chronoq_bytes(client: redis.Redis, keys: RedisKeys) -> int:
    """Redis memory of chronoq's own keys (Celery's result keys and the broker list excluded:
    Celery expires its results itself)."""
    return sum(
        int(client.memory_usage(k) or 0) for k in client.scan_iter(keys.pattern, count=1000) if "executions" not in k
    )


def test_fire_records_stay_bounded_at_a_steady_fire_rate(
    settings: AppSettings,
    tmp_path: Path,
    start_scheduler: Callable[..., list[SchedulerProcess]],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    keys = RedisKeys(settings.redis.key_prefix)
    client = redis.Redis.from_url(settings.redis.connection_url(), decode_responses=True)
    jobs = write_jobs(
        tmp_path / "jobs.yaml",
        [{"id": "fast", "task": "demo.record_fire", "interval": 1 / RATE, "overlap": "allow", "max_instances": 1}],
    )
    env = {"SCHEDULER_HISTORY_LIMIT": str(LIMIT), "SCHEDULER_FENCE_WINDOW_S": str(FENCE_WINDOW_S)}
    start_worker(settings, "-Q", settings.celery.cron_queue, "-c", "2", extra_env=env)
    start_scheduler(settings, jobs, extra_env=env)

    def fired() -> int:
        return int(client.hget(keys.job_counters("fast"), "dispatched") or 0)

    bound = LIMIT + (FENCE_WINDOW_S + 1) * RATE + 2 * RATE  # history + fence window + fires queued or running
    wait_for(lambda: fired() >= 120, 40, "120 fires")
    early = chronoq_bytes(client, keys)
    records = []
    while fired() < 400:
        records.append(sum(1 for _ in client.scan_iter(keys.fire("fast", "*"), count=1000)))
        before = fired()
        wait_for(lambda n=before: fired() > n + RATE, 20, "more fires")  # type: ignore[misc]
    late = chronoq_bytes(client, keys)
    assert max(records) <= bound, f"fire records {records} exceed {bound}"
    assert client.llen(keys.history("fast")) <= bound
    # 280 more fires at ~570 bytes each would add ~160 KB; bounded state adds nothing that grows.
    assert late < early * 1.2 + 4096, f"chronoq keys grew from {early} to {late} bytes"
    assert client.hget(keys.fence, "fast") is not None
    # Ground truth: what the worker ran, each fire once.
    wait_for(lambda: len(executions(client, settings)) >= 300, 30, "the worker to run 300 fires")
    runs = [(e["job_id"], e["scheduled_at"]) for e in executions(client, settings)]
    assert len(runs) == len(set(runs)), "a fire ran twice"
    last = json.loads(client.hget(keys.last_fire, "fast") or "{}")
    assert client.exists(keys.fire("fast", last["scheduled_at"]))
