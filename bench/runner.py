"""One measured run of one contender on one workload, and the publish ceiling.

Every run starts from an empty Redis (``FLUSHALL``), starts the queue probe, launches the
contender, and stops it with SIGTERM at the end (SIGKILL after 20 s). The contender's CPU and
the peak RSS of its process tree are sampled throughout; Redis's CPU over the same window is
reported next to it, because chronoq and RedBeat do part of their work inside Redis.
"""

from __future__ import annotations

import math
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import redis
from celery import Celery

from bench import contenders
from bench.analysis import analyze_burst, analyze_interval, median
from bench.probe import QueueProbe, TreeSampler
from bench.workloads import PROBE_INDEX, WorkloadSpec

QUEUE = "bench_queue"


class RunFailed(Exception):
    """A contender died or was not ready in time; the message ends with its log's tail."""


@dataclass(frozen=True)
class Timing:
    """Durations of the runs, seconds."""

    w1_warm_s: float = 6.0
    """Ready to the start of a W1 window: steady state, after chronoq's look-ahead ramp (over its
    first 5 s it hands over fires up to twice as fast as they come due)."""
    w1_min_window_s: float = 6.0
    w1_min_tail_s: float = 2.0
    w1_startup_timeout_s: float = 120.0
    w2_drain_timeout_s: float = 30.0
    w2_tail_s: float = 1.0
    w3_timeout_s: float = 90.0
    w3_settle_s: float = 3.0

    def w1_window_s(self, period_s: float) -> float:
        """The measured window of an interval run: at least one period."""
        return max(self.w1_min_window_s, period_s)

    def w1_tail_s(self, period_s: float) -> float:
        """How long after the window arrivals are still collected (at least half a period): a fire
        of the window's last slot later than this counts as missed."""
        return max(self.w1_min_tail_s, period_s / 2)


@dataclass
class BenchRedis:
    """The throwaway Redis every run uses."""

    url: str
    pid: int
    workdir: Path

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=30)

    def cpu_s(self) -> float:
        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)


class Running:
    """A contender on a workload, with the probe and the sampler, for a ``with`` block."""

    def __init__(self, env: BenchRedis, contender: str, spec: WorkloadSpec, workdir: Path) -> None:
        self.env, self.contender, self.spec, self.workdir = env, contender, spec, workdir
        self.client = env.client()

    def __enter__(self) -> Running:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.client.flushall()
        self.log = (self.workdir / "contender.log").open("wb")
        self.probe = QueueProbe(self.env.url, self.spec.queue).start()
        self.launched = time.time()
        self.process = contenders.launch(self.contender, self.spec, self.workdir, self.log)
        self.sampler = TreeSampler(self.process.pid).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.exit_code, self.stop_s = contenders.stop(self.process)
        self.sampler.stop()
        self.probe.stop()
        self.log.close()
        self.client.close()

    def wait_ready(self, deadline: float) -> float:
        """The contender's ready time (epoch s); RunFailed if it exits or is not ready by ``deadline``."""
        while True:
            ready = contenders.ready_at(self.contender, self.spec, self.client)
            if ready is not None:
                return ready
            self.check_alive()
            if time.time() > deadline:
                raise RunFailed(f"not ready after {time.time() - self.launched:.0f}s{self.log_tail()}")
            time.sleep(0.02)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RunFailed(f"exited with {self.process.returncode}{self.log_tail()}")

    def log_tail(self) -> str:
        if not self.log.closed:
            self.log.flush()
        lines = (self.workdir / "contender.log").read_text(errors="replace").splitlines()
        return "".join(f"\n    {line}" for line in lines[-8:])

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        probe = self.probe
        return (
            np.frombuffer(probe.times, dtype=np.float64).copy(),
            np.frombuffer(probe.indexes, dtype=np.int64).copy(),
            np.frombuffer(probe.scheduled, dtype=np.float64).copy(),
        )

    def base_result(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "peak_rss_mb": round(self.sampler.peak_rss_bytes / 1e6, 1),
            "stop_s": round(self.stop_s, 2),
            "exit_code": self.exit_code,
            "foreign_messages": self.probe.foreign,
        }
        if self.exit_code not in (0, None):
            result["log_tail"] = self.log_tail()
        return result


def sleep_until(when: float) -> None:
    while (left := when - time.time()) > 0:
        time.sleep(min(left, 0.5))


def run_interval(env: BenchRedis, contender: str, jobs: int, period_s: float, timing: Timing) -> dict[str, Any]:
    """W1: ``jobs`` interval jobs every ``period_s``, measured over a window after start-up."""
    base_us = (int(time.time()) - 2 * math.ceil(period_s)) * 1_000_000
    workdir = _workdir(env, contender)
    spec = _spec(env, contender, workdir, kind="interval", jobs=jobs, period_s=period_s, base_us=base_us)
    window_s = timing.w1_window_s(period_s)
    with Running(env, contender, spec, workdir) as run:
        ready = run.wait_ready(time.time() + timing.w1_startup_timeout_s)
        start = ready + timing.w1_warm_s
        end = start + window_s
        sleep_until(start)
        cpu0, redis0 = run.sampler.cpu_s(), env.cpu_s()
        sleep_until(end)
        cpu1, redis1 = run.sampler.cpu_s(), env.cpu_s()
        sleep_until(end + timing.w1_tail_s(period_s))
        run.check_alive()
    times, indexes, scheduled = run.arrays()
    bases = contenders.grid_bases(contender, spec)
    result = analyze_interval(times, indexes, scheduled, bases, period_s, (start, end))
    fired = int(np.count_nonzero((times >= start) & (times < end)))
    return {
        **result,
        **run.base_result(),
        "startup_s": round(ready - run.launched, 3),
        "window_s": window_s,
        "fires_in_window": fired,
        "cpu_ms_per_fire": _per_fire(cpu1 - cpu0, fired),
        "redis_cpu_ms_per_fire": _per_fire(redis1 - redis0, fired),
    }


def run_burst(env: BenchRedis, contender: str, jobs: int, boundary: float, timing: Timing) -> dict[str, Any]:
    """W2: ``jobs`` crons all due at ``boundary`` (a minute boundary, epoch s); launch now, before it."""
    at = datetime.fromtimestamp(boundary, UTC)
    workdir = _workdir(env, contender)
    spec = _spec(env, contender, workdir, kind="cron_burst", jobs=jobs, cron=f"{at.minute} {at.hour} * * *")
    with Running(env, contender, spec, workdir) as run:
        ready = run.wait_ready(boundary + timing.w2_drain_timeout_s)
        sleep_until(boundary - 1.0)
        cpu0, redis0 = run.sampler.cpu_s(), env.cpu_s()
        deadline = boundary + timing.w2_drain_timeout_s
        while time.time() < deadline:
            if len(set(run.probe.indexes[:])) >= jobs:
                break
            run.check_alive()
            time.sleep(0.05)
        cpu1, redis1 = run.sampler.cpu_s(), env.cpu_s()
        time.sleep(timing.w2_tail_s)
    times, indexes, _ = run.arrays()
    result = analyze_burst(times, indexes, jobs, boundary)
    drain_s = result["drain_s"]
    return {
        **result,
        "drain_rate": round(result["arrived"] / drain_s, 1) if drain_s and drain_s > 0 else None,
        **run.base_result(),
        "startup_s": round(ready - run.launched, 3),
        "lead_s": round(boundary - run.launched, 1),
        "ready_before_boundary": ready < boundary,
        "drain_timeout_s": timing.w2_drain_timeout_s,
        "cpu_ms_per_fire": _per_fire(cpu1 - cpu0, result["arrived"]),
        "redis_cpu_ms_per_fire": _per_fire(redis1 - redis0, result["arrived"]),
    }


def run_startup(env: BenchRedis, contender: str, jobs: int, timing: Timing) -> dict[str, Any]:
    """W3: ``jobs`` crons not due during the run plus a probe every second: start-up and memory.

    A contender that has not dispatched the probe after ``w3_timeout_s`` is stopped and reported
    as timed out, with what was measured until then.
    """
    workdir = _workdir(env, contender)
    hour = datetime.now(UTC).hour
    spec = _spec(env, contender, workdir, kind="startup", jobs=jobs, startup_hour=hour)
    with Running(env, contender, spec, workdir) as run:
        deadline = run.launched + timing.w3_timeout_s
        ready: float | None = None
        while (first := run.probe.first_time(PROBE_INDEX)) is None and time.time() < deadline:
            ready = ready or contenders.ready_at(contender, spec, run.client)
            run.check_alive()
            time.sleep(0.02)
        settled = time.time() + (timing.w3_settle_s if first is not None else 0.0)
        while True:  # chronoq may dispatch before its heartbeat reports every job registered
            ready = ready or contenders.ready_at(contender, spec, run.client)
            if time.time() >= settled:
                break
            time.sleep(0.05)
        cpu = run.sampler.cpu_s()
    return {
        **run.base_result(),
        "jobs": jobs,
        "timed_out": first is None,
        "timeout_s": timing.w3_timeout_s,
        "ready_s": None if ready is None else round(ready - run.launched, 3),
        "first_dispatch_s": None if first is None else round(first - run.launched, 3),
        "startup_cpu_s": round(cpu, 2),
    }


def _spec(env: BenchRedis, contender: str, workdir: Path, **fields: Any) -> WorkloadSpec:
    scheduler = {"beat": "persistent", "redbeat": "redbeat"}.get(contender, "")
    marker = str(workdir / "ready.json")
    return WorkloadSpec(redis_url=env.url, queue=QUEUE, marker=marker, scheduler=scheduler, **fields)


def _workdir(env: BenchRedis, contender: str) -> Path:
    path = env.workdir / f"{contender}-{uuid.uuid4().hex[:8]}"
    shutil.rmtree(path, ignore_errors=True)
    return path


def _per_fire(cpu_s: float, fires: int) -> float | None:
    return round(cpu_s * 1000 / fires, 4) if fires and not math.isnan(cpu_s) else None


def measure_ceiling(url: str, count: int, rounds: int) -> dict[str, list[float]]:
    """Messages per second, ``rounds`` interleaved rounds of ``count``, for the three publish paths
    of ``bench/publish_ceiling.py`` (a ``send_task`` loop with chronoq's Celery config, chronoq's
    ``BatchPublisher``, raw ``LPUSH`` pipelines of one pre-encoded payload: the machine's ceiling)
    and a ``send_task`` loop on a Celery app with the defaults, as beat and the APScheduler script
    use it."""
    from bench import publish_ceiling as pc
    from scheduler.publishing import DEFAULT_BATCH_SIZE, BatchPublisher
    from shared.celery_app import create_celery_app
    from shared.settings import AppSettings

    settings = AppSettings(
        _env_file=None, redis={"url": url}, celery={"cron_queue": "bench_cron", "default_queue": "bench_adhoc"}
    )
    app = create_celery_app(settings, name="chronoq-bench")
    plain = Celery("bench-plain", broker=url)
    client = redis.Redis.from_url(url)
    queue = f"bench_{uuid.uuid4().hex[:8]}"
    rates: dict[str, list[float]] = {
        "send_task": [],
        "send_task (plain app)": [],
        "BatchPublisher": [],
        "raw LPUSH": [],
    }
    try:
        with BatchPublisher(app, url, batch_size=DEFAULT_BATCH_SIZE) as publisher:
            publisher.publish(pc.messages(queue, 1))
            payload = client.rpop(queue)
            assert isinstance(payload, bytes)
            app.send_task(pc.TASK, [0, 1], queue=queue)
            plain.send_task(pc.TASK, [0, 1], queue=queue)
            client.delete(queue)
            for _ in range(rounds):
                batch = pc.messages(queue, count)
                runs = {
                    "send_task": partial(pc.run_send_task, app, batch),
                    "send_task (plain app)": partial(pc.run_send_task, plain, batch),
                    "BatchPublisher": partial(publisher.publish, batch),
                    "raw LPUSH": partial(pc.run_raw, client, queue, payload.decode(), count, DEFAULT_BATCH_SIZE),
                }
                for name, run in runs.items():
                    rates[name].append(pc.timed(run, client, queue, count))
    finally:
        client.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
        client.close()
        app.close()
        plain.close()
    return rates


def ceiling_medians(rates: dict[str, list[float]]) -> dict[str, float | None]:
    return {name: median(list(values)) for name, values in rates.items()}
