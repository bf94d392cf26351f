#!/usr/bin/env python3
"""The web console (#14) with many jobs: page and API latency, and what polling consoles do to
fire lag.

    python bench/console.py [--jobs 10000] [--requests 60] [--consoles 20] [--phase-s 40] [--windows 3]

1. ``--jobs`` API jobs are created through :class:`scheduler.api.AsyncClient` (daily crons
   spread over the day, as ``bench/runtime_jobs.py``), then ``chronoq web`` starts against them.
2. Latency: each page and API call below ``--requests`` times, one after another, after a
   warm-up; p50 and p95 in ms. The baseline from the same run and process is a static file
   (no Redis, no template): the rest is the console's own work.
3. Fire lag: one scheduler replica (``--no-worker``) also runs 50 file jobs firing every
   second. Alternating windows of ``--phase-s``: no console open, then ``--consoles`` consoles
   polling as the pages do (overview and a job page every 5 s, the jobs table every 10 s, the
   timeline every 15 s, each with htmx's headers and, as a browser, If-None-Match with the
   last ETag), ``--windows`` times, and a last quiet window. Lag = ``decided_ms`` minus the
   nominal time of every fire of the file jobs in the window (from the fire records; no worker
   runs, so after the first fire a job's fires are decided "skipped" by its overlap policy, on
   the same path and at the same moment a dispatch would be). The console's CPU per second of
   each window from /proc.
   Reported: p50/p99 per window, pooled p50/p99 per condition and their p99 ratio, and the
   ratio of the medians of the per-window p99s.

Writes ``bench/results/console.json``. A throwaway redis-server is started; every process the
bench starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.dispatch_lag import start_redis  # noqa: E402
from bench.runtime_jobs import PREFIX, create_jobs, percentile  # noqa: E402
from shared.names import RedisKeys  # noqa: E402

FAST_JOBS = 50
HX = {"HX-Request": "true"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def env_for(url: str) -> dict[str, str]:
    return {**os.environ, "REDIS_URL": url, "REDIS_KEY_PREFIX": PREFIX, "CELERY_CRON_QUEUE": "rtb_cron",
            "APP_ENV": "bench", "LOG_LEVEL": "WARNING"}  # fmt: skip


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def latencies(base: str, requests: int) -> dict[str, dict[str, float]]:
    targets = {
        "static file (baseline)": ("/static/console.css", {}),
        "jobs page": ("/jobs", {}),
        "jobs page, search": ("/jobs?q=job-0099", {}),
        "jobs page 100": ("/jobs?page=100", {}),
        "jobs table (htmx poll)": ("/jobs?page=1", {**HX, "HX-Target": "jobs-live"}),
        "api jobs": ("/api/v1/jobs?limit=50", {}),
        "api jobs, search": ("/api/v1/jobs?q=job-0099&limit=50", {}),
        "api jobs, search (many match)": ("/api/v1/jobs?q=job-00&limit=50", {}),
        "jobs page, outcome filter": ("/jobs?outcome=never", {}),
        "api jobs, outcome filter": ("/api/v1/jobs?outcome=never&limit=50", {}),
        "job page": ("/jobs/job-000042", {}),
        "overview": ("/", {}),
        "api status": ("/api/v1/status", {}),
        "timeline (1 h)": ("/timeline", {}),
    }
    found = {}
    # TCP_NODELAY: without it the client's delayed ACKs add ~40 ms to every response here.
    transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    with httpx.Client(base_url=base, timeout=60, transport=transport) as http:
        for name, (path, headers) in targets.items():
            for _ in range(3):
                http.get(path, headers=headers).raise_for_status()
            times = []
            for _ in range(requests if "timeline" not in name else max(5, requests // 6)):
                t = time.perf_counter()
                http.get(path, headers=headers).raise_for_status()
                times.append((time.perf_counter() - t) * 1000)
            found[name] = {"p50": round(percentile(times, 0.5), 1), "p95": round(percentile(times, 0.95), 1)}
            print(f"  {name:<34} p50 {found[name]['p50']:>8} ms   p95 {found[name]['p95']:>8} ms")
        # The worst case of the snapshot: every search follows a change of one job (made through
        # the API, so the console must re-read the job list: 10,000 entries, only one re-parsed).
        for name, path in (("api jobs, search after a change", "/api/v1/jobs?q=job-0099&limit=50"),
                           ("jobs page, search after a change", "/jobs?q=job-0099")):  # fmt: skip
            times = []
            for n in range(requests):
                note = {"changes": {"description": f"edit {n}"}}
                http.patch(f"/api/v1/jobs/job-{n % 1000:06d}", json=note).raise_for_status()
                t = time.perf_counter()
                http.get(path).raise_for_status()
                times.append((time.perf_counter() - t) * 1000)
            found[name] = {"p50": round(percentile(times, 0.5), 1), "p95": round(percentile(times, 0.95), 1)}
            print(f"  {name:<34} p50 {found[name]['p50']:>8} ms   p95 {found[name]['p95']:>8} ms")
    return found


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def poll(base: str, consoles: int, seconds: float) -> int:
    """``consoles`` open tabs polling as the pages do; returns the requests made."""
    count = 0
    plan = [
        (5, "/", {**HX, "HX-Target": "overview-live"}),
        (5, "/jobs/job-000042", {**HX, "HX-Target": "job-live"}),
        (10, "/jobs?page=1", {**HX, "HX-Target": "jobs-live"}),
        (15, "/timeline?minutes=60", {**HX, "HX-Target": "timeline-live"}),
    ]
    end = time.monotonic() + seconds

    async def tab(n: int, every: float, path: str, headers: dict[str, str]) -> None:
        nonlocal count
        etag = ""
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            await asyncio.sleep(min(every * n / consoles, seconds))  # tabs opened at different moments
            while time.monotonic() < end:
                began = time.monotonic()
                # As a browser revalidates its cached copy: If-None-Match with the last ETag.
                conditional = {**headers, **({"If-None-Match": etag} if etag else {})}
                try:
                    response = await http.get(path, headers=conditional)
                except httpx.TransportError:  # a kept-alive connection closed under it: a browser retries
                    response = await http.get(path, headers=conditional)
                etag = response.headers.get("etag", etag)
                count += 1
                await asyncio.sleep(max(0.0, min(every - (time.monotonic() - began), end - time.monotonic())))

    await asyncio.gather(*(tab(n, every, path, h) for n in range(consoles) for every, path, h in plan))
    return count


def fire_lags(url: str, since_ms: int, until_ms: int) -> list[float]:
    keys = RedisKeys(PREFIX)
    client = redis.Redis.from_url(url, decode_responses=True)
    lags = []
    for i in range(FAST_JOBS):
        job = f"fast-{i:02d}"
        for stamp in client.lrange(keys.history(job), 0, -1):
            fire = client.hgetall(keys.fire(job, stamp))
            nominal_ms = int(datetime.fromisoformat(stamp).timestamp() * 1000)
            if "decided_ms" in fire and since_ms <= nominal_ms < until_ms:
                lags.append(int(fire["decided_ms"]) - nominal_ms)
    client.close()
    return lags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--consoles", type=int, default=20)
    parser.add_argument("--phase-s", type=float, default=40)
    parser.add_argument("--windows", type=int, default=3, help="polling windows, each between two quiet ones")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "console.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        url, server = start_redis(tmp)
        processes: list[subprocess.Popen[bytes]] = []
        try:
            rate = asyncio.run(create_jobs(url, args.jobs))
            print(f"created {args.jobs} API jobs: {rate:.0f}/s")
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            processes.append(
                start(
                    [sys.executable, "-m", "scheduler.cli", "web", "--port", str(port)], env_for(url), tmp / "web.log"
                )
            )
            wait_until(lambda: _answers(base), 60, "the console")
            print(f"latency with {args.jobs} jobs, {args.requests} requests each, one at a time:")
            latency = latencies(base, args.requests)

            jobs_file = tmp / "fast.yaml"
            jobs_file.write_text(
                "jobs:\n"
                + "".join(f"  - {{id: fast-{i:02d}, task: demo.sleep, interval: 1}}\n" for i in range(FAST_JOBS))
            )
            scheduler_log = tmp / "scheduler.log"
            processes.append(
                start(
                    [sys.executable, str(ROOT / "run_scheduler.py"), "--jobs", str(jobs_file), "--no-worker"],
                    {**env_for(url), "LOG_LEVEL": "INFO"},
                    scheduler_log,
                )
            )
            wait_until(lambda: " jobs as " in scheduler_log.read_text(errors="replace"), 300, "the scheduler")
            time.sleep(5)
            phases = []
            console_pid = processes[0].pid
            windows = [("quiet", 0), ("polling", args.consoles)] * args.windows + [("quiet", 0)]
            for name, consoles in windows:
                since = int(time.time() * 1000) + 1000
                cpu_before, began = cpu_s(console_pid), time.monotonic()
                requests = asyncio.run(poll(base, consoles, args.phase_s)) if consoles else 0
                if not consoles:
                    time.sleep(args.phase_s)
                console_cpu = (cpu_s(console_pid) - cpu_before) / (time.monotonic() - began)
                until = int(time.time() * 1000) - 2000
                time.sleep(3)
                lags = fire_lags(url, since, until)
                phase = {"phase": name, "consoles": consoles, "requests": requests, "fires": len(lags),
                         "lag_p50_ms": percentile(lags, 0.5), "lag_p99_ms": percentile(lags, 0.99),
                         "console_cpu_per_s": round(console_cpu, 4), "lags": lags}  # fmt: skip
                phases.append(phase)
                print(f"  {name:<8} {consoles:>2} consoles, {requests:>5} requests: {len(lags)} fires, "
                      f"lag p50 {phase['lag_p50_ms']} ms, p99 {phase['lag_p99_ms']} ms, "
                      f"console CPU {console_cpu * 100:.1f}%")  # fmt: skip
            summary = {}
            for name in ("quiet", "polling"):
                chosen = [p for p in phases if p["phase"] == name]
                pooled = [lag for p in chosen for lag in p.pop("lags")]
                summary[name] = {
                    "windows": len(chosen),
                    "lag_p50_ms": percentile(pooled, 0.5),
                    "lag_p99_ms": percentile(pooled, 0.99),
                    "median_window_p99_ms": statistics.median(p["lag_p99_ms"] for p in chosen),
                    "console_cpu_per_s": round(statistics.median(p["console_cpu_per_s"] for p in chosen), 4),
                }
            quiet, polling = summary["quiet"], summary["polling"]
            ratio = round(polling["lag_p99_ms"] / quiet["lag_p99_ms"], 3) if quiet["lag_p99_ms"] else None
            window_ratio = (round(polling["median_window_p99_ms"] / quiet["median_window_p99_ms"], 3)
                            if quiet["median_window_p99_ms"] else None)  # fmt: skip
            print(f"fire lag with {args.consoles} polling consoles vs none: p50 {polling['lag_p50_ms']} vs "
                  f"{quiet['lag_p50_ms']} ms, p99 {polling['lag_p99_ms']} vs {quiet['lag_p99_ms']} ms "
                  f"(ratio {ratio}; median of per-window p99s: {window_ratio})")  # fmt: skip
            result = {"jobs": args.jobs, "requests": args.requests, "latency_ms": latency, "fire_lag": phases,
                      "fire_lag_summary": summary, "lag_p99_ratio_polling_to_quiet": ratio,
                      "median_window_p99_ratio": window_ratio, "phase_s": args.phase_s}  # fmt: skip
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")
            print(f"wrote {args.out}")
        except BaseException:
            for log in ("web.log", "scheduler.log"):
                if (tmp / log).exists():
                    print(f"--- {log} (last 3,000 characters)\n{(tmp / log).read_text(errors='replace')[-3000:]}")
            raise
        finally:
            for process in reversed(processes):
                stop(process)
            server.terminate()
            server.wait(10)


def _answers(base: str) -> bool:
    try:
        return httpx.get(f"{base}/static/console.css", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
