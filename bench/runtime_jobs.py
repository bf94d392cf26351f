#!/usr/bin/env python3
"""Jobs changed at runtime (#13): how fast a change reaches every replica, with many jobs.

    python bench/runtime_jobs.py [--jobs 100000] [--replicas 2] [--changes 200]

1. ``--jobs`` API jobs are created through :class:`scheduler.api.AsyncClient` (the real write
   path: validation and the jobwrite script; 64 in flight), daily crons spread over the day.
2. ``--replicas`` run_scheduler.py processes start against them, one after another: each
   logs how long loading the stored API jobs took (read + validate every record) and the bench
   times the whole start-up (process start to "running N jobs").
3. ``--changes`` changes one after another (alternately an args edit, an interval edit and a
   new job): for each, the time from the client call returning to each replica logging that
   it runs the new definition (its log line's timestamp; both clocks are this host's).
   Reported: p50, p95, p99 and max over every (change, replica) pair, and as a baseline from
   the same run, the median Redis round trip (PING) seen by the client.

Writes ``bench/results/runtime_jobs.json``. A throwaway redis-server is started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.dispatch_lag import start_redis  # noqa: E402
from scheduler.api import AsyncClient  # noqa: E402
from shared.settings import AppSettings  # noqa: E402

PREFIX = "rtb:"
_LINE = re.compile(r"^(\S+ \S+) \| INFO .*API job (?:updated|created) \(version (\d+)\) \[job_id=([^\]\s]+)")


def settings_for(url: str) -> AppSettings:
    return AppSettings(_env_file=None, redis={"url": url, "key_prefix": PREFIX}, celery={"cron_queue": "rtb_cron"})


async def create_jobs(url: str, count: int) -> float:
    """Create ``count`` jobs through the API, 64 at a time; returns creates per second."""
    rng = random.Random(13)
    started = time.perf_counter()
    async with AsyncClient(settings_for(url), by="bench") as client:
        queue = iter(range(count))

        async def worker() -> None:
            for i in queue:
                cron = f"{rng.randrange(60)} {rng.randrange(24)} * * *"
                await client.create({"id": f"job-{i:06d}", "task": "demo.sleep", "cron": cron, "args": [i]})

        await asyncio.gather(*(worker() for _ in range(64)))
    return count / (time.perf_counter() - started)


def start_replicas(
    url: str, tmp: Path, count: int, first: int = 0
) -> list[tuple[subprocess.Popen[bytes], Path, float]]:
    jobs = tmp / "none.yaml"
    jobs.write_text("jobs: []\n")
    env = {**os.environ, "REDIS_URL": url, "REDIS_KEY_PREFIX": PREFIX, "CELERY_CRON_QUEUE": "rtb_cron",
           "LOG_LEVEL": "INFO", "APP_ENV": "bench"}  # fmt: skip
    started = []
    for n in range(first, first + count):
        log = tmp / f"replica-{n}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, str(ROOT / "run_scheduler.py"), "--jobs", str(jobs), "--no-worker"],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        started.append((process, log, time.time()))
    return started


def wait_running(replicas: list[tuple[subprocess.Popen[bytes], Path, float]], timeout_s: float) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    deadline = time.time() + timeout_s
    for process, log, started in replicas:
        while " jobs as " not in log.read_text(errors="replace"):
            if process.poll() is not None or time.time() > deadline:
                raise SystemExit(f"replica did not start:\n{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        text = log.read_text(errors="replace")
        ready = _stamp(re.search(r"^(\S+ \S+) \|.* running \d+ jobs as", text, re.MULTILINE)[1])  # type: ignore[index]
        loaded = re.search(r"loaded (\d+) API jobs in ([\d.]+)s", text)
        assert loaded is not None
        found.append({"jobs": int(loaded[1]), "load_s": float(loaded[2]), "start_s": round(ready - started, 2)})
    return found


def _stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").timestamp()


def applied_at(log: Path) -> dict[tuple[str, int], float]:
    """(job id, version) -> when the replica logged running it."""
    found: dict[tuple[str, int], float] = {}
    for line in log.read_text(errors="replace").splitlines():
        if (m := _LINE.match(line)) is not None:
            found.setdefault((m[3], int(m[2])), _stamp(m[1]))
    return found


async def make_changes(url: str, count: int, jobs: int, logs: list[Path]) -> list[float]:
    """Latency (s) of each (change, replica) from the call returning to the replica's log line."""
    rng = random.Random(7)
    returned: list[tuple[str, int, float]] = []
    async with AsyncClient(settings_for(url), by="bench") as client:
        for n in range(count):
            job_id = f"job-{rng.randrange(jobs):06d}"
            if n % 3 == 0:
                record = await client.update(job_id, {"args": [n]})
            elif n % 3 == 1:
                record = await client.update(job_id, {"interval": rng.randrange(60, 3600)})
            else:
                record = await client.create({"id": f"new-{n}", "task": "demo.sleep", "interval": 3600})
            returned.append((record.id, record.version, time.time()))
            await asyncio.sleep(0.02)
    deadline = time.time() + 30
    while time.time() < deadline:
        seen = [applied_at(log) for log in logs]
        if all((j, v) in s for s in seen for j, v, _ in returned):
            break
        await asyncio.sleep(0.2)
    seen = [applied_at(log) for log in logs]
    missing = [(j, v) for s in seen for j, v, _ in returned if (j, v) not in s]
    if missing:
        raise SystemExit(f"{len(missing)} changes never applied, e.g. {missing[:3]}")
    # Log stamps have ms resolution and the replica may apply before the reply reaches the
    # client: a negative difference is 0.
    return [max(0.0, s[(j, v)] - at) for s in seen for j, v, at in returned]


def ping_ms(url: str, count: int = 200) -> float:
    client = redis.Redis.from_url(url)
    times = []
    for _ in range(count):
        t = time.perf_counter()
        client.ping()
        times.append((time.perf_counter() - t) * 1000)
    client.close()
    return statistics.median(times)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "runtime_jobs.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        url, server = start_redis(tmp)
        replicas: list[tuple[subprocess.Popen[bytes], Path, float]] = []
        try:
            rate = asyncio.run(create_jobs(url, args.jobs))
            print(f"created {args.jobs} API jobs through the API: {rate:.0f}/s")
            starts = []
            for n in range(args.replicas):  # one after another (a rolling start): each load alone
                replicas += start_replicas(url, tmp, 1, n)
                starts += wait_running(replicas[-1:], timeout_s=300)
            for n, start in enumerate(starts):
                print(
                    f"replica {n}: loaded {start['jobs']} API jobs in {start['load_s']} s, running {start['start_s']} s after its start"
                )
            time.sleep(2)  # past the start-up's registry write and first look-ahead
            baseline = ping_ms(url)
            latencies = asyncio.run(make_changes(url, args.changes, args.jobs, [log for _, log, _ in replicas]))
            result = {
                "jobs": args.jobs,
                "replicas": args.replicas,
                "changes": args.changes,
                "creates_per_s": round(rate),
                "start": starts,
                "apply_ms": {
                    name: round(percentile(latencies, q) * 1000, 1)
                    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("max", 1.0))
                },
                "redis_ping_ms_median": round(baseline, 3),
            }
            print(json.dumps(result, indent=1))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")
        finally:
            for process, _, _ in replicas:
                process.terminate()
            for process, _, _ in replicas:
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    main()
