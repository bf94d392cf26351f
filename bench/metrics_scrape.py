#!/usr/bin/env python3
"""What scraping /metrics costs a replica (issue #12), against a throwaway redis-server.

    python -m bench.metrics_scrape [--jobs 10000] [--scrapes 20] [--windows 3] [--window-s 20]

The replica serves ``/metrics`` from its metrics server process (``scheduler/metricsd.py``),
a child of the scheduler: CPU is read for both processes (user + system, from /proc via
psutil; not wall time) and reported for each and summed.

- ``cost``: a replica with ``--jobs`` daily crons (none fires during the run, so the loop is
  idle) and per-job series for the first ``--label-limits`` of them (``HTTP_JOB_LABEL_LIMIT``).
  CPU over ``--scrapes`` scrapes one a second, minus each process's idle CPU over as long a
  window before, per scrape: the scheduler's (it writes the job data the server asks for, at
  its next heartbeat) and the server's, with ``HTTP_FLEET_CACHE_S=0`` (every scrape reads
  Redis: the worst case) and with the default 2 s cache; the server's median and max per
  scrape (read from /proc in 10 ms clock ticks), and the ratio of the totals between the label
  limits (same run). Also the wall time and size of one scrape.
- ``lag``: the 10,000-jobs-every-10-s workload (1,000 fires/s, phases spread) on one replica
  with per-job series for ``--label-limits`` jobs; alternating windows without and with a
  scrape every second (``--windows`` each, ``--window-s`` long, the same process: one run),
  fire lag from the broker's side as in ``bench/dispatch_lag.py`` (arrival minus
  ``scheduled_at``). Reports p50 and p99 per condition, pooled and per window (the median of
  the windows' p99s is the steadier figure on a shared machine), their ratio, and the
  scheduler's and the server's CPU per second in each condition.
- ``refresh``: the scheduler's part of a scrape measured in-process (the /proc figures above
  are 10 ms clock ticks): writing the job data the server asked for, at ``--jobs`` jobs, a
  tenth of the next fire times moved since the last write, UTC and Europe/Berlin fire times.
- ``--save FILE`` writes everything as JSON (``bench/results/metrics_scrape.json``).

A benchmark, not a test: the machine is shared and noisy, so compare within one run.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.dispatch_lag import (  # noqa: E402
    QUEUE,
    Job,
    Scheduler,
    drain,
    percentile,
    spread_interval_jobs,
    start_redis,
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def daily_jobs(count: int) -> list[Job]:
    now = datetime.now(UTC)
    hour = (now.hour + 12) % 24  # half a day away: nothing fires during the run
    return [
        {"id": f"daily-{i:05d}", "task": "demo.sleep", "cron": f"{i % 60} {hour} * * *", "args": [0]}
        for i in range(count)
    ]


def server_of(scheduler: Scheduler) -> psutil.Process:
    """The replica's metrics server process (scheduler/metricsd.py), its one child here."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for child in scheduler.ps.children():
            if "scheduler.metricsd" in " ".join(child.cmdline()):
                return child
        time.sleep(0.1)
    raise SystemExit("no metrics server process under the scheduler")


def cpu_pair(scheduler: Scheduler, server: psutil.Process) -> tuple[float, float]:
    """CPU seconds (user + system) of the scheduler and of its metrics server."""
    times = server.cpu_times()
    return scheduler.cpu_s(), float(times.user + times.system)


def scrape(port: int) -> tuple[float, int]:
    started = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        size = len(reply.read())
    return time.perf_counter() - started, size


def wait_http(port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"replica's /readyz not 200 within {timeout_s}s")


def cpu_per_scrape(url: str, tmp: Path, jobs: int, scrapes: int, cache_s: float, limit: int) -> dict[str, object]:
    redis.Redis.from_url(url).flushdb()
    port = free_port()
    env = {"HTTP_PORT": str(port), "HTTP_JOB_LABEL_LIMIT": str(limit), "HTTP_FLEET_CACHE_S": str(cache_s)}
    scheduler = Scheduler(url, daily_jobs(jobs), tmp, f"cost{int(cache_s)}", extra_env=env)
    try:
        scheduler.wait_running()
        wait_http(port)
        server = server_of(scheduler)
        scrape(port)  # warm: the first scrape sorts the job list and builds the label cache
        time.sleep(2)
        idle_before = cpu_pair(scheduler, server)
        idle_started = time.monotonic()
        time.sleep(scrapes)
        idle_after = cpu_pair(scheduler, server)
        idle_rate = [(b - a) / (time.monotonic() - idle_started) for a, b in zip(idle_before, idle_after, strict=True)]
        walls, sizes = [], []
        cpus: tuple[list[float], list[float]] = ([], [])
        before = cpu_pair(scheduler, server)
        started = time.monotonic()
        for i in range(scrapes):
            cpu_before, wall_before = cpu_pair(scheduler, server), time.monotonic()
            wall, size = scrape(port)
            cpu_after, spent = cpu_pair(scheduler, server), time.monotonic() - wall_before
            for n in (0, 1):
                cpus[n].append(cpu_after[n] - cpu_before[n] - idle_rate[n] * spent)
            walls.append(wall)
            sizes.append(size)
            # the scheduler writes the job data at its next heartbeat (up to 0.25 s later): count it
            time.sleep(max(0.0, started + i + 1 - time.monotonic()))
        elapsed = time.monotonic() - started
        after = cpu_pair(scheduler, server)
        busy = [after[n] - before[n] - idle_rate[n] * elapsed for n in (0, 1)]
    finally:
        scheduler.stop()
    return {
        "jobs": jobs,
        "label_limit": limit,
        "fleet_cache_s": cache_s,
        "scrapes": scrapes,
        "cpu_ms_per_scrape": round((busy[0] + busy[1]) * 1000 / scrapes, 1),
        "scheduler_cpu_ms_per_scrape": round(busy[0] * 1000 / scrapes, 1),
        "server_cpu_ms_per_scrape": round(busy[1] * 1000 / scrapes, 1),
        "server_cpu_ms_median_scrape": round(statistics.median(cpus[1]) * 1000, 1),
        "server_cpu_ms_max_scrape": round(max(cpus[1]) * 1000, 1),
        "scheduler_idle_cpu_ms_per_s": round(idle_rate[0] * 1000, 1),
        "server_idle_cpu_ms_per_s": round(idle_rate[1] * 1000, 1),
        "wall_ms_median": round(statistics.median(walls) * 1000, 1),
        "bytes": int(statistics.median(sizes)),
    }


def refresh_cost(jobs: int, rounds: int = 50) -> dict[str, object]:
    """The scheduler's part of a scrape, in this process: answering the server's request
    (``StateWriter.write_jobs``: the job list unchanged, a tenth of the next fire times moved,
    as between two scrapes of the 10,000-jobs/10 s workload), plus building APScheduler's
    next-run-time dict; CPU time (``process_time``) per round, median and max."""
    from types import SimpleNamespace
    from zoneinfo import ZoneInfo

    from scheduler.replicastate import StateWriter

    result: dict[str, object] = {"jobs": jobs, "rounds": rounds}
    for name, tz in (("UTC", UTC), ("Europe/Berlin", ZoneInfo("Europe/Berlin"))):
        with tempfile.TemporaryDirectory() as tmp_dir:
            writer = StateWriter(Path(tmp_dir))
            specs = [SimpleNamespace(id=f"job-{i:05d}", queue="cron") for i in range(jobs)]
            base = datetime.now(tz)
            aps = [
                SimpleNamespace(id=s.id, next_run_time=base + timedelta(seconds=i % 10)) for i, s in enumerate(specs)
            ]
            row = lambda s: [s.id] * 8  # noqa: E731
            writer.write_jobs(specs, row, {j.id: j.next_run_time for j in aps}, lambda _: {}, 1.0)
            costs = []
            for n in range(rounds):
                for j in aps[n % 10 :: 10]:
                    j.next_run_time = j.next_run_time + timedelta(seconds=10)
                started = time.process_time()
                fires = {j.id: j.next_run_time for j in aps}  # what LookaheadJobStore.next_run_times does
                writer.write_jobs(specs, row, fires, lambda _: {}, 2.0 + n)
                costs.append(time.process_time() - started)
            writer.block.close()
        result[f"scheduler_cpu_ms_median_{name}"] = round(statistics.median(costs) * 1000, 2)
        result[f"scheduler_cpu_ms_max_{name}"] = round(max(costs) * 1000, 2)
    return result


class Scraper(threading.Thread):
    """Scrapes once a second while ``active`` is set."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.active = threading.Event()
        self.stopped = threading.Event()
        self.count = 0

    def run(self) -> None:
        while not self.stopped.is_set():
            if self.active.is_set():
                scrape(self.port)
                self.count += 1
            self.stopped.wait(1.0)


def lag_with_and_without_scrapes(url: str, tmp: Path, windows: int, window_s: float, limit: int) -> dict[str, object]:
    client = redis.Redis.from_url(url)
    client.flushdb()
    port = free_port()
    jobs = spread_interval_jobs("w1-10s", 10_000, 10)
    env = {"HTTP_PORT": str(port), "HTTP_JOB_LABEL_LIMIT": str(limit)}
    scheduler = Scheduler(url, jobs, tmp, "lag", extra_env=env)
    scraper = Scraper(port)
    lags: dict[bool, list[float]] = {False: [], True: []}
    window_p99: dict[bool, list[float]] = {False: [], True: []}
    window_p50: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    server_cpu: dict[bool, list[float]] = {False: [], True: []}
    try:
        scheduler.wait_running()
        wait_http(port)
        server = server_of(scheduler)
        scrape(port)
        time.sleep(8)  # past the look-ahead ramp-up
        client.delete(QUEUE)
        scraper.start()
        for window in range(2 * windows):
            scraping = window % 2 == 1
            scraper.active.set() if scraping else scraper.active.clear()
            start = datetime.now(UTC) + timedelta(seconds=1)
            end = start + timedelta(seconds=window_s)
            cpu_before, wall_before = cpu_pair(scheduler, server), time.monotonic()
            arrivals = drain(client, time.monotonic() + window_s + 2)
            cpu_after, spent = cpu_pair(scheduler, server), time.monotonic() - wall_before
            cpu[scraping].append((cpu_after[0] - cpu_before[0]) / spent)
            server_cpu[scraping].append((cpu_after[1] - cpu_before[1]) / spent)
            window_lags = [
                (t - datetime.fromisoformat(h["scheduled_at"]).timestamp()) * 1000
                for t, h in arrivals
                if start <= datetime.fromisoformat(h["scheduled_at"]) <= end
            ]
            lags[scraping] += window_lags
            window_p99[scraping].append(round(percentile(window_lags, 0.99), 1))
            window_p50[scraping].append(round(percentile(window_lags, 0.5), 1))
    finally:
        scraper.stopped.set()
        scheduler.stop()
    p99 = {k: percentile(v, 0.99) for k, v in lags.items()}
    return {
        "label_limit": limit,
        "fires_without": len(lags[False]),
        "fires_with": len(lags[True]),
        "scrapes": scraper.count,
        "lag_p50_ms_without": round(percentile(lags[False], 0.5), 1),
        "lag_p50_ms_with": round(percentile(lags[True], 0.5), 1),
        "lag_p99_ms_without": round(p99[False], 1),
        "lag_p99_ms_with": round(p99[True], 1),
        "p99_ratio_with_over_without": round(p99[True] / p99[False], 3),
        "window_p99_ms_without": window_p99[False],
        "window_p99_ms_with": window_p99[True],
        "window_p50_ms_without": window_p50[False],
        "window_p50_ms_with": window_p50[True],
        "median_window_p50_ms_without": statistics.median(window_p50[False]),
        "median_window_p50_ms_with": statistics.median(window_p50[True]),
        "median_window_p99_ms_without": statistics.median(window_p99[False]),
        "median_window_p99_ms_with": statistics.median(window_p99[True]),
        "median_window_p99_ratio": round(statistics.median(window_p99[True]) / statistics.median(window_p99[False]), 3),
        "scheduler_cpu_ms_per_s_without": round(statistics.median(cpu[False]) * 1000, 1),
        "scheduler_cpu_ms_per_s_with": round(statistics.median(cpu[True]) * 1000, 1),
        "server_cpu_ms_per_s_without": round(statistics.median(server_cpu[False]) * 1000, 1),
        "server_cpu_ms_per_s_with": round(statistics.median(server_cpu[True]) * 1000, 1),
        "errors": scheduler.errors[:3],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--scrapes", type=int, default=20)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--window-s", type=float, default=20)
    parser.add_argument("--only", choices=["cost", "lag", "refresh"])
    parser.add_argument(
        "--save", help="also write the results to this JSON file (e.g. bench/results/metrics_scrape.json)"
    )
    parser.add_argument(
        "--label-limits", default="10000,1000", help="HTTP_JOB_LABEL_LIMIT values to measure (comma-separated)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        url, server = start_redis(tmp)
        try:
            limits = [int(n) for n in args.label_limits.split(",")]
            costs: list[dict[str, object]] = []
            lags: list[dict[str, object]] = []
            refresh = refresh_cost(args.jobs) if args.only in (None, "refresh") else {}
            if refresh:
                print(json.dumps(refresh), flush=True)
            if args.only in (None, "cost"):
                for limit in limits:
                    for cache_s in (0.0, 2.0):
                        costs.append(cpu_per_scrape(url, tmp, args.jobs, args.scrapes, cache_s, limit))
                        print(json.dumps(costs[-1]), flush=True)
            if args.only in (None, "lag"):
                for limit in limits:
                    lags.append(lag_with_and_without_scrapes(url, tmp, args.windows, args.window_s, limit))
                    print(json.dumps(lags[-1]), flush=True)
        finally:
            server.terminate()
            server.wait(10)
    ratios = cost_ratios(costs, max(limits), min(limits))
    if ratios:
        print(json.dumps(ratios), flush=True)
    if args.save:
        record = {"ran_at": datetime.now(UTC).isoformat(timespec="seconds"), "args": vars(args)}
        Path(args.save).write_text(
            json.dumps({**record, "refresh": refresh, "cost": costs, "cost_ratios": ratios, "lag": lags}, indent=2)
            + "\n"
        )
    return 0


def cost_ratios(costs: list[dict[str, object]], high: int, low: int) -> dict[str, float]:
    """CPU per scrape (scheduler and server) with per-job series for ``high`` jobs over ``low``
    jobs (same run)."""
    ratios = {}
    for cache_s in (0.0, 2.0):
        pick = {c["label_limit"]: c for c in costs if c["fleet_cache_s"] == cache_s}
        if high in pick and low in pick and high != low:
            a, b = pick[high]["cpu_ms_per_scrape"], pick[low]["cpu_ms_per_scrape"]
            ratios[f"cpu_ratio_{high}_over_{low}_cache_{cache_s:g}s"] = round(float(a) / max(float(b), 1.0), 2)  # type: ignore[arg-type]
    return ratios


if __name__ == "__main__":
    sys.exit(main())
