#!/usr/bin/env python3
"""Dispatch lag, burst drain, CPU per fire and start-up of run_scheduler.py, from the broker's side.

    python bench/dispatch_lag.py [--redis-url URL] [--workloads w1,w2,cpu,startup] [--repeats 3]

The scheduler runs as its own process (``--no-worker``), as in production; nothing consumes the
queue but this script, which pops messages as they arrive and records arrival time minus the
message's ``scheduled_at`` header. Jobs use ``overlap: allow`` (nothing runs them, so with the
default ``skip`` every fire after the first would be skipped). Without ``--redis-url`` a
throwaway redis-server is started. Scheduler CPU is read from /proc (psutil) over the window.

- ``w1``: 10,000 interval jobs every 10 s and 1,000 every 1 s, phases spread uniformly
  (2,000 fires/s): lag p50/p99/max, missing/duplicate fires, scheduler CPU per fire.
- ``w2``: 10,000 cron jobs ``* * * * *`` (all due at each minute boundary): per boundary, first
  and last arrival after the boundary (drain), and the drain rate against the publish ceilings
  measured in the same run (BatchPublisher encode+push, raw LPUSH pipeline).
- ``cpu``: N interval jobs every N/1000 s, spread (1,000 fires/s at every N): CPU per fire for
  N = 1,000, 10,000, 100,000.
- ``startup``: 100,000 jobs (90% daily crons at random times, 10% hourly-ish intervals, one
  every second): seconds from spawn to "running" and to the first dispatch, RSS once running.

Every workload runs ``--repeats`` times; medians are printed. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.embedded import find_redis_server_binary  # noqa: E402

QUEUE = "bench_cron"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
Job = dict[str, object]


def start_redis(tmp: Path) -> tuple[str, subprocess.Popen[bytes]]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [
            str(find_redis_server_binary(None)),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(tmp),
        ],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return f"redis://127.0.0.1:{port}/0", server


class Scheduler:
    """run_scheduler.py on a job file, its stderr followed for the "running" line."""

    def __init__(
        self,
        url: str,
        jobs: list[Job],
        tmp: Path,
        prefix: str,
        log_level: str = "WARNING",
        extra_env: dict[str, str] | None = None,
    ) -> None:
        # Job files are capped at 1 MB each: 5,000 jobs per file, as JSON (which is YAML).
        paths = []
        for n, first in enumerate(range(0, len(jobs), 5000)):
            paths.append(tmp / f"{prefix}-{n}.yaml")
            paths[-1].write_text(json.dumps({"jobs": jobs[first : first + 5000]}))
        env = {
            **os.environ,
            "REDIS_URL": url,
            "CELERY_CRON_QUEUE": QUEUE,
            "HTTP_PORT": "0",
            "REDIS_KEY_PREFIX": f"{prefix}:",
            "LOG_LEVEL": log_level,
            "APP_ENV": "bench",
            **(extra_env or {}),
        }
        self.jobs, self.url, self.prefix = len(jobs), url, prefix
        self.started = time.monotonic()
        self.running_at: float | None = None
        self.errors: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "run_scheduler.py"), *(f"--jobs={p}" for p in paths), "--no-worker"],
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.ps = psutil.Process(self.process.pid)
        threading.Thread(target=self._follow, daemon=True).start()

    def _follow(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            if self.running_at is None and " running " in line and " jobs as " in line:
                self.running_at = time.monotonic()
            if "ERROR" in line or "CRITICAL" in line or self.process.poll() is not None:
                self.errors.append(line.rstrip())

    def wait_running(self, timeout_s: float = 120) -> float:
        deadline = time.monotonic() + timeout_s
        client = redis.Redis.from_url(self.url)
        while self.running_at is None:
            # Below INFO the "running" line is not logged: the heartbeat says so within 0.7 s.
            for raw in client.hvals(f"{self.prefix}:replicas"):
                if json.loads(raw).get("jobs") == self.jobs:
                    self.running_at = time.monotonic()
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit(
                    f"scheduler not running after {timeout_s}s (exit {self.process.poll()}): {self.errors[-5:]}"
                )
            time.sleep(0.01)
        return self.running_at - self.started

    def cpu_s(self) -> float:
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def drain(client: redis.Redis, until: float, expect: int | None = None) -> list[tuple[float, dict[str, str]]]:
    """Pop messages as they arrive until ``until`` (monotonic) or ``expect`` messages."""
    arrivals: list[tuple[float, dict[str, str]]] = []
    while time.monotonic() < until and (expect is None or len(arrivals) < expect):
        popped = client.brpop([QUEUE], timeout=0.05)
        if popped is None:
            continue
        batch = [popped[1], *(client.rpop(QUEUE, 5000) or [])]
        now = time.time()  # after the last pop: every message in the batch was there by now
        arrivals += [(now, json.loads(raw)["headers"]) for raw in batch]
    return arrivals


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def spread_interval_jobs(name: str, count: int, interval_s: float) -> list[Job]:
    """``count`` jobs every ``interval_s``, their phases spread uniformly over the interval."""
    step = interval_s / count
    return [
        {
            "id": f"{name}-{i}",
            "task": "demo.sleep",
            "interval": interval_s,
            "start_date": (EPOCH + timedelta(seconds=i * step)).isoformat(),
            "args": [0],
            "overlap": "allow",
        }
        for i in range(count)
    ]


def expected_fires(jobs: list[Job], start: datetime, end: datetime) -> int:
    """Fires of spread interval jobs with a nominal time in [start, end]."""
    total = 0
    for job in jobs:
        phase = datetime.fromisoformat(str(job["start_date"]))
        interval = float(job["interval"])  # type: ignore[arg-type]
        first = -(-(start - phase).total_seconds() // interval)
        last = (end - phase).total_seconds() // interval
        total += max(0, int(last - first) + 1)
    return total


def outcome_counters(client: redis.Redis, prefix: str) -> dict[str, int]:
    return {
        str(k, "utf-8") if isinstance(k, bytes) else k: int(v) for k, v in client.hgetall(f"{prefix}:counters").items()
    }


def bench_steady(url: str, tmp: Path, jobs: list[Job], seconds: float, prefix: str) -> dict[str, object]:
    """Run ``jobs``; over a window of ``seconds`` measure lag, completeness and CPU per fire."""
    client = redis.Redis.from_url(url)
    client.flushdb()
    scheduler = Scheduler(url, jobs, tmp, prefix)
    try:
        startup_s = scheduler.wait_running()
        time.sleep(3)  # warm-up
        client.delete(QUEUE)
        start = datetime.now(UTC) + timedelta(seconds=0.5)
        end = start + timedelta(seconds=seconds)
        time.sleep(0.5)
        cpu_before = scheduler.cpu_s()
        arrivals = drain(client, time.monotonic() + seconds + 2)
        cpu_s = scheduler.cpu_s() - cpu_before  # over seconds + 2 s; scaled below
        counters = outcome_counters(client, prefix)
    finally:
        scheduler.stop()
    window = [(t, h) for t, h in arrivals if start <= datetime.fromisoformat(h["scheduled_at"]) <= end]
    lags_ms = [(t - datetime.fromisoformat(h["scheduled_at"]).timestamp()) * 1000 for t, h in window]
    keys = {(h["job_id"], h["scheduled_at"]) for _, h in window}
    expected = expected_fires(jobs, start, end)
    fires_per_s = expected / seconds
    return {
        "jobs": len(jobs),
        "startup_s": round(startup_s, 2),
        "expected": expected,
        "missing": expected - len(keys),
        "duplicates": len(window) - len(keys),
        "early": sum(1 for lag in lags_ms if lag < 0),
        "missed_outcomes": counters.get("missed", 0),
        "lag_p50_ms": round(percentile(lags_ms, 0.5), 1),
        "lag_p99_ms": round(percentile(lags_ms, 0.99), 1),
        "lag_max_ms": round(max(lags_ms, default=float("nan")), 1),
        "cpu_ms_per_fire": round(cpu_s * 1000 / (fires_per_s * (seconds + 2)), 3),
        "errors": scheduler.errors[:3],
    }


def bench_w1(url: str, tmp: Path, seconds: float) -> dict[str, object]:
    jobs = spread_interval_jobs("w1-10s", 10_000, 10) + spread_interval_jobs("w1-1s", 1_000, 1)
    return bench_steady(url, tmp, jobs, seconds, "w1")


def bench_cpu(url: str, tmp: Path, count: int, seconds: float) -> dict[str, object]:
    return bench_steady(url, tmp, spread_interval_jobs(f"cpu{count}", count, count / 1000), seconds, f"cpu{count}")


def publish_ceilings(url: str, count: int = 10_000) -> dict[str, float]:
    """Messages/s of BatchPublisher (encode + pipelined LPUSH) and of the raw pipeline, now."""
    sys.path.insert(0, str(ROOT / "bench"))
    import publish_ceiling as pc  # a sibling script, not a package

    from scheduler.publishing import BatchPublisher
    from shared.celery_app import create_celery_app
    from shared.settings import AppSettings

    settings = AppSettings(_env_file=None, redis={"url": url}, celery={"cron_queue": QUEUE})  # type: ignore[arg-type]
    app = create_celery_app(settings, name="chronoq-bench")
    client = redis.Redis.from_url(url)
    queue = "bench_ceiling"
    rates: dict[str, list[float]] = {"batch": [], "raw": []}
    with BatchPublisher(app, url) as publisher:
        publisher.publish(pc.messages(queue, 1))
        raw = client.rpop(queue)
        assert isinstance(raw, bytes)
        payload = raw.decode()
        for _ in range(3):
            batch = pc.messages(queue, count)
            rates["batch"].append(pc.timed(partial(publisher.publish, batch), client, queue, count))
            rates["raw"].append(
                pc.timed(partial(pc.run_raw, client, queue, payload, count, 1000), client, queue, count)
            )
    client.close()
    app.close()
    return {name: statistics.median(values) for name, values in rates.items()}


def bench_w2(url: str, tmp: Path, repeats: int, jobs: int = 10_000) -> list[dict[str, object]]:
    """``jobs`` cron jobs due every minute; one result per minute boundary."""
    client = redis.Redis.from_url(url)
    client.flushdb()
    specs: list[Job] = [
        {"id": f"w2-{i}", "task": "demo.sleep", "cron": "* * * * *", "args": [0], "overlap": "allow"}
        for i in range(jobs)
    ]
    scheduler = Scheduler(url, specs, tmp, "w2")
    results = []
    try:
        scheduler.wait_running()
        for _ in range(repeats):
            now = datetime.now(UTC)
            boundary = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
            if (boundary - now).total_seconds() < 8:
                boundary += timedelta(minutes=1)
            time.sleep(max(0.0, (boundary - datetime.now(UTC)).total_seconds() - 5))
            client.delete(QUEUE)
            cpu_before = scheduler.cpu_s()
            arrivals = drain(client, time.monotonic() + 35, expect=jobs)
            cpu_s = scheduler.cpu_s() - cpu_before
            mine = [(t, h) for t, h in arrivals if h["scheduled_at"] == boundary.isoformat()]
            times = [t for t, _ in mine]
            drained = max(times) - boundary.timestamp()
            results.append(
                {
                    "boundary": boundary.isoformat(),
                    "arrived": len({h["job_id"] for _, h in mine}),
                    "early": sum(1 for t in times if t < boundary.timestamp()),
                    "first_s": round(min(times) - boundary.timestamp(), 3),
                    "drained_s": round(drained, 3),
                    "rate_msg_s": round(len(mine) / max(drained, 1e-3)),
                    "cpu_ms_per_fire": round(cpu_s * 1000 / jobs, 3),
                }
            )
            print("w2   ", json.dumps(results[-1]), flush=True)
        results[-1]["missed_outcomes"] = outcome_counters(client, "w2").get("missed", 0)
    finally:
        scheduler.stop()
    return results


def bench_startup(url: str, tmp: Path, jobs: int = 100_000) -> dict[str, object]:
    """``jobs`` jobs, mostly daily crons; spawn -> running, -> first dispatch, and RSS."""
    client = redis.Redis.from_url(url)
    client.flushdb()
    rng = random.Random(5)
    specs: list[Job] = [{"id": "probe", "task": "demo.sleep", "interval": 1, "args": [0], "overlap": "allow"}]
    for i in range(jobs - 1):
        if i % 10:
            cron = f"{rng.randrange(60)} {rng.randrange(24)} * * *"
            specs.append({"id": f"daily-{i}", "task": "demo.sleep", "cron": cron, "args": [i]})
        else:
            specs.append({"id": f"every-{i}", "task": "demo.sleep", "interval": rng.randrange(600, 7200), "args": [i]})
    scheduler = Scheduler(url, specs, tmp, "startup", log_level="INFO")
    try:
        first = drain(client, time.monotonic() + 120, expect=1)
        first_s = time.monotonic() - scheduler.started if first else float("nan")
        running_s = scheduler.wait_running()
        time.sleep(3)
        rss_mb = scheduler.ps.memory_info().rss / 2**20
    finally:
        scheduler.stop()
    return {
        "jobs": jobs,
        "running_s": round(running_s, 2),
        "first_dispatch_s": round(first_s, 2),
        "rss_mb": round(rss_mb),
    }


def median_of(results: list[dict[str, object]], key: str) -> float:
    return float(statistics.median(float(r[key]) for r in results))  # type: ignore[arg-type]


def repeat(name: str, repeats: int, run: Callable[[], dict[str, Any]], keys: list[str]) -> None:
    results = []
    for _ in range(repeats):
        results.append(run())
        print(f"{name:<5}", json.dumps(results[-1]), flush=True)
    print(f"{name:<5} medians:", json.dumps({k: median_of(results, k) for k in keys}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url")
    parser.add_argument("--workloads", default="w1,w2,cpu,startup")
    parser.add_argument("--seconds", type=float, default=20, help="measuring window of w1 and cpu")
    parser.add_argument("--cpu-jobs", default="1000,10000,100000")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    workloads = args.workloads.split(",")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        server = None
        url = args.redis_url
        if url is None:
            url, server = start_redis(tmp)
        try:
            lag_keys = ["missing", "duplicates", "early", "lag_p50_ms", "lag_p99_ms", "lag_max_ms", "cpu_ms_per_fire"]
            if "w1" in workloads:
                repeat("w1", args.repeats, lambda: bench_w1(url, tmp, args.seconds), lag_keys)
            if "w2" in workloads:
                ceilings = publish_ceilings(url)
                print("ceilings msg/s", json.dumps({k: round(v) for k, v in ceilings.items()}), flush=True)
                bursts = bench_w2(url, tmp, args.repeats)
                drained = statistics.median(float(b["drained_s"]) for b in bursts)  # type: ignore[arg-type]
                rate = 10_000 / drained
                print(
                    "w2    medians:",
                    json.dumps(
                        {
                            "drained_s": drained,
                            "rate_msg_s": round(rate),
                            "rate/batch_ceiling": round(rate / ceilings["batch"], 3),
                            "rate/raw_ceiling": round(rate / ceilings["raw"], 3),
                            "cpu_ms_per_fire": median_of(bursts, "cpu_ms_per_fire"),
                        }
                    ),
                    flush=True,
                )
            if "cpu" in workloads:
                for count in (int(c) for c in args.cpu_jobs.split(",")):
                    repeat(f"cpu{count}", args.repeats, partial(bench_cpu, url, tmp, count, args.seconds), lag_keys)
            if "startup" in workloads:
                keys = ["running_s", "first_dispatch_s", "rss_mb"]
                repeat("start", args.repeats, lambda: bench_startup(url, tmp), keys)
        finally:
            if server is not None:
                server.terminate()
                server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
