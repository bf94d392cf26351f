#!/usr/bin/env python3
"""Dispatch lag and burst drain of run_scheduler.py, measured from the broker's side.

    python bench/dispatch_lag.py [--redis-url URL] [--jobs 1000] [--seconds 20] [--burst 10000] [--repeats 3]

Nothing consumes the queue, so the jobs use ``overlap: allow`` (with the default ``skip`` a job
would be skipped while its previous message waits).

- lag: N interval jobs every second; a consumer pops the queue as messages arrive and records
  arrival time minus the message's ``scheduled_at`` header. Reports p50/p99/max, fires expected
  against fires that arrived (missing, duplicated).
- burst: N date jobs all due at the same instant; reports the time from that instant to the
  first and the last arrival (the drain time), median over repeats.

The scheduler runs as its own process (``--no-worker``), as in production; nothing consumes the
queue but this script. Without ``--redis-url`` a throwaway redis-server is started.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import redis
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.embedded import find_redis_server_binary  # noqa: E402

QUEUE = "bench_cron"


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


def run_scheduler(url: str, jobs: list[dict[str, object]], tmp: Path, prefix: str) -> subprocess.Popen[bytes]:
    path = tmp / f"{prefix}.yaml"
    path.write_text(yaml.safe_dump({"jobs": jobs}))
    env = {
        **os.environ,
        "REDIS_URL": url,
        "CELERY_CRON_QUEUE": QUEUE,
        "REDIS_KEY_PREFIX": f"{prefix}:",
        "LOG_LEVEL": "WARNING",
        "APP_ENV": "bench",
    }
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run_scheduler.py"), "--jobs", str(path), "--no-worker"], cwd=ROOT, env=env
    )


def drain(client: redis.Redis, until: float, expect: int | None = None) -> list[tuple[float, dict[str, str]]]:
    """Pop messages as they arrive until ``until`` (monotonic) or ``expect`` messages."""
    arrivals: list[tuple[float, dict[str, str]]] = []
    while time.monotonic() < until and (expect is None or len(arrivals) < expect):
        popped = client.brpop([QUEUE], timeout=0.2)
        if popped is None:
            continue
        now = time.time()
        batch = [popped[1], *(client.rpop(QUEUE, 5000) or [])]
        arrivals += [(now, json.loads(raw)["headers"]) for raw in batch]
    return arrivals


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_lag(url: str, tmp: Path, jobs: int, seconds: float) -> dict[str, object]:
    client = redis.Redis.from_url(url)
    client.flushdb()
    scheduler = run_scheduler(
        url,
        [{"id": f"lag-{i}", "task": "demo.sleep", "interval": 1, "args": [0], "overlap": "allow"} for i in range(jobs)],
        tmp,
        "lag",
    )
    try:
        time.sleep(3)  # start-up and warm-up
        client.delete(QUEUE)
        start = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)
        arrivals = drain(client, time.monotonic() + seconds + 1)
    finally:
        scheduler.send_signal(signal.SIGTERM)
        scheduler.wait(30)
    end = start + timedelta(seconds=seconds - 1)
    window = [(t, h) for t, h in arrivals if start <= datetime.fromisoformat(h["scheduled_at"]) <= end]
    lags_ms = [(t - datetime.fromisoformat(h["scheduled_at"]).timestamp()) * 1000 for t, h in window]
    keys = [(h["job_id"], h["scheduled_at"]) for _, h in window]
    expected = jobs * seconds
    return {
        "jobs": jobs,
        "seconds": seconds,
        "expected": expected,
        "arrived": len(set(keys)),
        "missing": expected - len(set(keys)),
        "duplicates": len(keys) - len(set(keys)),
        "lag_p50_ms": round(percentile(lags_ms, 0.5), 1),
        "lag_p99_ms": round(percentile(lags_ms, 0.99), 1),
        "lag_max_ms": round(max(lags_ms), 1),
    }


def bench_burst(url: str, tmp: Path, jobs: int) -> dict[str, object]:
    client = redis.Redis.from_url(url)
    client.flushdb()
    when = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=10)
    scheduler = run_scheduler(
        url,
        [
            {"id": f"burst-{i}", "task": "demo.sleep", "date": when.isoformat(), "args": [0], "overlap": "allow"}
            for i in range(jobs)
        ],
        tmp,
        "burst",
    )
    try:
        arrivals = drain(client, time.monotonic() + 40, expect=jobs)
    finally:
        scheduler.send_signal(signal.SIGTERM)
        scheduler.wait(30)
    times = [t for t, _ in arrivals]
    return {
        "jobs": jobs,
        "arrived": len({h["job_id"] for _, h in arrivals}),
        "first_s": round(min(times) - when.timestamp(), 3),
        "drained_s": round(max(times) - when.timestamp(), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url")
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--burst", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        server = None
        url = args.redis_url
        if url is None:
            url, server = start_redis(tmp)
        try:
            lag = bench_lag(url, tmp, args.jobs, args.seconds)
            print("lag  ", json.dumps(lag))
            bursts = [bench_burst(url, tmp, args.burst) for _ in range(args.repeats)]
            for burst in bursts:
                print("burst", json.dumps(burst))
            print("burst median drained_s", statistics.median(b["drained_s"] for b in bursts))  # type: ignore[misc]
        finally:
            if server is not None:
                server.terminate()
                server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
