#!/usr/bin/env python3
"""Soak: a steady load for a given time; does anything grow with uptime?

    python bench/soak.py [--minutes 30] [--warmup-minutes 10] [--interval-jobs 200]
                         [--cron-jobs 50] [--sample-s 10] [--out bench/results/soak.json]

A throwaway redis-server, one real scheduler (``run_scheduler.py --no-worker``) and one real
worker (``run_worker.py``). ``--interval-jobs`` jobs fire every second and ``--cron-jobs``
second-level crons once a minute (each on its own second), all running ``demo.record_fire``
(``--result-expires-s``: how long Celery keeps each result, 120 s here, 1 day by default):
the worker appends each run to ``<prefix>executions``, which this script drains every second
into memory (so the ground truth itself takes no Redis memory) and counts.

Every ``--sample-s`` it samples the scheduler's RSS and open file descriptors, the worker's
RSS (all its processes, and the Celery main process under the supervisor), Redis
``used_memory`` and the number of keys. Reported, over the samples after ``--warmup-minutes``:

- scheduler RSS slope (MB per 10 minutes, least-squares line) and its range;
- file descriptors (first and last, max);
- Redis ``used_memory``: min, max and spread relative to the mean (flat within 5%?), its slope;
- keys and bytes per job at the end (and what one fire record costs);
- duplicates (a fire run more than once) and gaps (a due fire never run), from the ledger, over
  fires due between warm-up + 10 s and the end - 15 s; and the scheduler's outcome counters.

The machine may be shared: CPU contention shows as lag and skipped fires, not as memory.

``--plain-consumer`` drains the cron queue with a plain ``BRPOP`` loop instead of a chronoq
worker: every message is taken and nothing ever reports, as with a foreign consumer or a lost
message. Then no run is counted; what is measured is whether the records of fires that never
start stay bounded (the dispatch audit republishes them, then records them lost, and they
retire). ``--set NAME=VALUE`` passes settings to the scheduler (e.g. a short
``CELERY_VISIBILITY_TIMEOUT_S`` so the audit's deadline falls inside a run of minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.dispatch_lag import start_redis  # noqa: E402

PREFIX = "chronoq:"
EXECUTIONS = PREFIX + "executions"


def write_jobs(path: Path, interval_jobs: int, cron_jobs: int) -> None:
    jobs: list[dict[str, Any]] = [
        {"id": f"every-{i}", "task": "demo.record_fire", "interval": 1} for i in range(interval_jobs)
    ]
    jobs += [
        {"id": f"cron-{i}", "task": "demo.record_fire", "cron": {"second": str(i % 60), "minute": "*"}}
        for i in range(cron_jobs)
    ]
    path.write_text(json.dumps({"jobs": jobs}))


def drain(url: str, queue: str, stop: threading.Event, eaten: list[int]) -> None:
    """A plain consumer: take every message off ``queue`` and drop it (no ack, no report)."""
    client = redis.Redis.from_url(url)
    while not stop.is_set():
        with contextlib.suppress(redis.RedisError):
            if client.brpop([queue], timeout=1):
                eaten[0] += 1
    client.close()


def child_env(url: str, log_level: str, result_expires_s: int) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "CELERY_", "WORKER_", "LOG_", "SCHEDULER_"))
    }
    env.update(
        PYTHONUNBUFFERED="1",
        REDIS_URL=url,
        REDIS_KEY_PREFIX=PREFIX,
        LOG_LEVEL=log_level,
        CELERY_RESULT_EXPIRES_S=str(result_expires_s),
        HTTP_PORT="0",
    )
    return env


def slope_per_10min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value), per 600 s."""
    if len(points) < 2:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 0.0 if den == 0 else 600 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den


def tree_rss_mb(process: psutil.Process) -> float:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total / 1e6


def celery_main(supervisor: psutil.Process) -> psutil.Process:
    """The Celery worker's main process: ``run_worker.py`` supervises it as its one child."""
    children = supervisor.children()
    return children[0] if children else supervisor


def key_census(client: redis.Redis) -> Counter[str]:
    """Keys by kind: the first segment after the prefix (fire, history, inflight, ...)."""
    kinds: Counter[str] = Counter()
    for key in client.scan_iter(count=5000):
        name = key.decode(errors="replace")
        kinds[name.removeprefix(PREFIX).split(":", 1)[0] if name.startswith(PREFIX) else "(broker/celery)"] += 1
    return kinds


def expected_fires(job_id: str, cron_jobs: int, start: datetime, end: datetime) -> set[str]:
    """The nominal fire times of ``job_id`` in [start, end], formatted as the header is."""
    out: set[str] = set()
    t = start.replace(microsecond=0) + timedelta(seconds=1)
    if job_id.startswith("every-"):
        while t <= end:
            out.add(t.isoformat())
            t += timedelta(seconds=1)
        return out
    second = int(job_id.removeprefix("cron-")) % 60
    while t <= end:
        if t.second == second:
            out.add(t.isoformat())
        t += timedelta(seconds=1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--warmup-minutes", type=float, default=None, help="default: a third of --minutes")
    parser.add_argument("--interval-jobs", type=int, default=200)
    parser.add_argument("--cron-jobs", type=int, default=50)
    parser.add_argument("--sample-s", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument(
        "--result-expires-s",
        type=int,
        default=120,
        help="CELERY_RESULT_EXPIRES_S: Celery's result keys (not chronoq's) live this long (default 1 day)",
    )
    parser.add_argument("--plain-consumer", action="store_true", help="drain the queue with BRPOP, no chronoq worker")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a scheduler setting")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args = parser.parse_args()
    extra_env = dict(item.split("=", 1) for item in args.set)
    warmup_s = (args.minutes / 3 if args.warmup_minutes is None else args.warmup_minutes) * 60
    duration_s = args.minutes * 60

    tmp = Path(tempfile.mkdtemp(prefix="chronoq-soak-"))
    url, server = start_redis(tmp)
    client = redis.Redis.from_url(url)
    jobs_path = tmp / "jobs.yaml"  # JSON is YAML, read with the json module
    write_jobs(jobs_path, args.interval_jobs, args.cron_jobs)
    procs: list[subprocess.Popen[bytes]] = []
    stop, eaten = threading.Event(), [0]
    try:
        worker: subprocess.Popen[bytes] | None = None
        if args.plain_consumer:
            threading.Thread(target=drain, args=(url, "cron_queue", stop, eaten), daemon=True).start()
        else:
            with (tmp / "worker.log").open("wb") as log:
                worker = subprocess.Popen(
                    [sys.executable, str(ROOT / "run_worker.py"), "-c", str(args.concurrency), "-n", "soak@bench"],
                    cwd=ROOT,
                    env={**child_env(url, "WARNING", args.result_expires_s), **extra_env},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            procs.append(worker)
        with (tmp / "scheduler.log").open("wb") as log:
            scheduler = subprocess.Popen(
                [sys.executable, str(ROOT / "run_scheduler.py"), "--jobs", str(jobs_path), "--no-worker"],
                cwd=ROOT,
                env={**child_env(url, "INFO", args.result_expires_s), **extra_env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        procs.append(scheduler)
        started = datetime.now(UTC)
        t0 = time.monotonic()
        sched_ps = psutil.Process(scheduler.pid)
        worker_ps = psutil.Process(worker.pid) if worker is not None else None
        runs: Counter[tuple[str, str]] = Counter()
        samples: list[dict[str, Any]] = []
        next_sample = 0.0
        print(
            f"soak: {args.interval_jobs} jobs every second + {args.cron_jobs} crons a minute for "
            f"{args.minutes} min (warm-up {warmup_s / 60:.1f} min); logs in {tmp}",
            flush=True,
        )
        while (elapsed := time.monotonic() - t0) < duration_s:
            if scheduler.poll() is not None or (worker is not None and worker.poll() is not None):
                raise SystemExit(
                    f"soak: a process exited (scheduler {scheduler.returncode}, "
                    f"worker {worker and worker.returncode}); logs in {tmp}"
                )
            with client.pipeline() as pipe:  # MULTI: read and trim atomically
                pipe.lrange(EXECUTIONS, 0, -1)
                pipe.delete(EXECUTIONS)
                raw, _ = pipe.execute()
            for item in raw:
                entry = json.loads(item)
                if entry.get("job_id"):
                    runs[(entry["job_id"], entry["scheduled_at"])] += 1
            if elapsed >= next_sample:
                info = client.info("memory")
                sample = {
                    "t_s": round(elapsed, 1),
                    "scheduler_rss_mb": round(sched_ps.memory_info().rss / 1e6, 2),
                    "scheduler_fds": sched_ps.num_fds(),
                    "worker_rss_mb": round(tree_rss_mb(worker_ps), 2) if worker_ps else 0.0,
                    "worker_main_rss_mb": round(celery_main(worker_ps).memory_info().rss / 1e6, 2)
                    if worker_ps
                    else 0.0,
                    "redis_used_memory": int(info["used_memory"]),
                    "redis_keys": int(client.dbsize()),
                    "history_every_0": int(client.llen(f"{PREFIX}history:every-0")),
                    "dispatched_not_started": int(client.zcard(f"{PREFIX}dispatched")),
                    "eaten_by_plain_consumer": eaten[0],
                    "runs": sum(runs.values()),
                    "outcomes": {k.decode(): int(v) for k, v in client.hgetall(f"{PREFIX}counters").items()},
                }
                samples.append(sample)
                print(json.dumps(sample), flush=True)
                next_sample += args.sample_s
            time.sleep(1)
        ended = datetime.now(UTC)
        census = key_census(client)
        job_ids = [f"every-{i}" for i in range(args.interval_jobs)] + [f"cron-{i}" for i in range(args.cron_jobs)]
        sample_fire = client.lindex(f"{PREFIX}history:every-0", 0)
        fire_bytes = client.memory_usage(f"{PREFIX}fire:every-0:{sample_fire.decode()}") if sample_fire else None
        history_bytes = client.memory_usage(f"{PREFIX}history:every-0")
        counters = {k.decode(): int(v) for k, v in client.hgetall(f"{PREFIX}counters").items()}
        used_end = int(client.info("memory")["used_memory"])
        with client.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.llen(f"{PREFIX}history:{job_id}")
            history_lengths = [int(n) for n in pipe.execute()]
    finally:
        stop.set()
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        server.terminate()
        server.wait(10)

    steady = [s for s in samples if s["t_s"] >= warmup_s]
    window_start = started + timedelta(seconds=warmup_s + 10)
    window_end = ended - timedelta(seconds=15)
    duplicates = sum(1 for count in runs.values() if count > 1)
    gaps = 0
    expected_total = 0
    for job_id in job_ids:
        due = expected_fires(job_id, args.cron_jobs, window_start, window_end)
        expected_total += len(due)
        gaps += sum(1 for at in due if (job_id, at) not in runs)
    # What the scheduler recorded over (about) the ledger's window: a fire not run should be one
    # recorded skipped (max_instances 1: the job's previous run still queued or running) or missed.
    inside = [s for s in samples if window_start <= started + timedelta(seconds=s["t_s"]) <= window_end]
    recorded = (
        {
            outcome: inside[-1]["outcomes"].get(outcome, 0) - inside[0]["outcomes"].get(outcome, 0)
            for outcome in ("dispatched", "skipped", "missed", "coalesced")
        }
        if len(inside) > 1
        else {}
    )
    used = [s["redis_used_memory"] for s in steady]
    mean_used = statistics.fmean(used) if used else 0.0
    result = {
        "minutes": args.minutes,
        "warmup_minutes": warmup_s / 60,
        "interval_jobs": args.interval_jobs,
        "cron_jobs": args.cron_jobs,
        "result_expires_s": args.result_expires_s,
        "plain_consumer": args.plain_consumer,
        "settings": extra_env,
        "history_length": {"max": max(history_lengths), "mean": round(statistics.fmean(history_lengths), 1)},
        "dispatched_not_started_end": samples[-1]["dispatched_not_started"] if samples else None,
        "started": started.isoformat(),
        "ended": ended.isoformat(),
        "machine": {"cpus": os.cpu_count(), "load_avg_end": os.getloadavg()},
        "scheduler_rss_mb": {
            "first": steady[0]["scheduler_rss_mb"] if steady else None,
            "last": steady[-1]["scheduler_rss_mb"] if steady else None,
            "slope_mb_per_10min": round(slope_per_10min([(s["t_s"], s["scheduler_rss_mb"]) for s in steady]), 3),
        },
        "worker_rss_mb": {
            "first": steady[0]["worker_rss_mb"] if steady else None,
            "last": steady[-1]["worker_rss_mb"] if steady else None,
            "slope_mb_per_10min": round(slope_per_10min([(s["t_s"], s["worker_rss_mb"]) for s in steady]), 3),
            "main_process_slope_mb_per_10min": round(
                slope_per_10min([(s["t_s"], s["worker_main_rss_mb"]) for s in steady]), 3
            ),
        },
        "scheduler_fds": {
            "first": steady[0]["scheduler_fds"] if steady else None,
            "last": steady[-1]["scheduler_fds"] if steady else None,
            "max": max((s["scheduler_fds"] for s in steady), default=None),
        },
        "redis_used_memory": {
            "min": min(used, default=None),
            "max": max(used, default=None),
            "mean": round(mean_used),
            "spread_pct_of_mean": round(100 * (max(used) - min(used)) / mean_used, 2) if used else None,
            "slope_bytes_per_10min": round(slope_per_10min([(s["t_s"], s["redis_used_memory"]) for s in steady])),
            "flat_within_5pct": bool(used) and (max(used) - min(used)) <= 0.05 * mean_used,
            "end": used_end,
        },
        "redis_keys": {"end": dict(census), "per_job": round(sum(census.values()) / len(job_ids), 1)},
        "bytes_per_job": round(used_end / len(job_ids)),
        "fire_record_bytes": fire_bytes,
        "history_list_bytes": history_bytes,
        "ledger": {
            "runs": sum(runs.values()),
            "distinct_fires": len(runs),
            "duplicates": duplicates,
            "expected_in_window": expected_total,
            "gaps": gaps,
            "recorded_in_window": recorded,
            "window": [window_start.isoformat(), window_end.isoformat()],
        },
        "counters": counters,
        "samples": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary, indent=2))
    print(f"soak: wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
