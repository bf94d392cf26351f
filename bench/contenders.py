"""The four contenders: how each is started on a workload, when it is ready, where its grid starts.

- ``chronoq``: ``run_scheduler.py --no-worker`` with generated job files (JSON, at most 4,000
  jobs per file: chronoq refuses files over 1 MiB), ``overlap: allow`` (nothing acknowledges the
  messages, so the fleet-wide ``max_instances`` guard would skip every fire after the first),
  and ``REDIS_URL``, ``CELERY_CRON_QUEUE``, ``CELERY_DEFAULT_QUEUE``, ``LOG_LEVEL=WARNING`` in
  its environment. Ready: its replica heartbeat in Redis reports every job registered.
- ``beat``: ``celery -A bench.beat_app beat`` with the default PersistentScheduler and a shelve
  file in the run's directory (see ``bench/beat_app.py``). Ready: ``beat_init``.
- ``redbeat``: the same app with ``beat_scheduler = "redbeat.RedBeatScheduler"``.
- ``apscheduler``: ``python -m bench.aps_app`` (see ``bench/aps_app.py``). Ready: after
  ``scheduler.start()``.

Every contender runs from the repository root with the harness's interpreter, its output going
to a log file in the run's directory.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import numpy as np
import redis

from bench.analysis import FloatArray
from bench.workloads import JobDef, WorkloadSpec, jobs_of

ROOT = Path(__file__).resolve().parent.parent
CONTENDERS = ("chronoq", "beat", "redbeat", "apscheduler")
JOBS_PER_FILE = 4_000
CHRONOQ_PREFIX = "chronoq:"


def launch(name: str, spec: WorkloadSpec, workdir: Path, log: IO[bytes]) -> subprocess.Popen[bytes]:
    """Start contender ``name`` on ``spec`` (files go to ``workdir``); it runs in its own session."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HTTP_PORT": "0"}
    spec_path = spec.write(workdir / "spec.json")
    if name == "chronoq":
        files = write_chronoq_jobs(jobs_of(spec), workdir)
        env |= {
            "REDIS_URL": spec.redis_url,
            "CELERY_CRON_QUEUE": spec.queue,
            "CELERY_DEFAULT_QUEUE": f"{spec.queue}_adhoc",
            "REDIS_KEY_PREFIX": CHRONOQ_PREFIX,
            "LOG_LEVEL": "WARNING",
            "APP_ENV": "bench",
        }
        jobs_args = [arg for path in files for arg in ("--jobs", str(path))]
        command = [sys.executable, str(ROOT / "run_scheduler.py"), "--no-worker", *jobs_args]
    elif name in ("beat", "redbeat"):
        env["BENCH_SPEC"] = str(spec_path)
        command = [
            *(sys.executable, "-m", "celery", "-A", "bench.beat_app", "beat", "--loglevel", "WARNING"),
            *("--schedule", str(workdir / "celerybeat-schedule"), "--pidfile", str(workdir / "beat.pid")),
        ]
    elif name == "apscheduler":
        command = [sys.executable, "-m", "bench.aps_app", str(spec_path)]
    else:
        raise ValueError(f"unknown contender {name!r} (one of {', '.join(CONTENDERS)})")
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def write_chronoq_jobs(jobs: list[JobDef], workdir: Path) -> list[Path]:
    """chronoq job files for ``jobs``, at most 4,000 jobs per file, written as JSON (which is
    YAML), as docs/job-files.md advises for generated job files: read with the json module. As YAML
    flow style, 100,000 jobs take about 19 s more to parse."""
    paths = []
    for number, first in enumerate(range(0, len(jobs), JOBS_PER_FILE)):
        entries = []
        for job in jobs[first : first + JOBS_PER_FILE]:
            entry: dict[str, object] = {"id": job.name, "task": "bench.tick"}
            if job.cron is not None:
                entry["cron"] = job.cron
            else:
                entry["interval"] = job.period_s
                if job.start_us is not None:
                    entry["start_date"] = _iso(job.start_us)
            entry["args"] = [job.index]
            entries.append(json.dumps(entry))
        path = workdir / f"jobs-{number}.yaml"
        path.write_text('{"defaults": {"overlap": "allow"}, "jobs": [\n' + ",\n".join(entries) + "\n]}\n")
        paths.append(path)
    return paths


def _iso(epoch_us: int) -> str:
    seconds, micros = divmod(epoch_us, 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{micros:06d}+00:00"


def ready_at(name: str, spec: WorkloadSpec, client: redis.Redis) -> float | None:
    """When contender ``name`` reported itself ready (epoch s), or None if it has not yet."""
    if name == "chronoq":
        expected = len(jobs_of(spec)) if spec.kind == "startup" else spec.jobs
        for raw in client.hvals(CHRONOQ_PREFIX + "replicas"):
            beat = json.loads(raw)
            if beat.get("jobs", 0) >= expected:
                return float(beat["heartbeat_ms"]) / 1000.0
        return None
    marker = _read_marker(spec)
    return None if marker is None else float(marker["ready"])


def grid_bases(name: str, spec: WorkloadSpec) -> FloatArray:
    """interval: each job's grid origin (epoch s, NaN if unknown), indexed by job."""
    if name in ("beat", "redbeat"):
        anchors = (_read_marker(spec) or {}).get("anchors", {})
        return np.array([anchors.get(f"job-{i}", math.nan) for i in range(spec.jobs)], dtype=np.float64)
    return np.array([spec.start_us(i) / 1_000_000 for i in range(spec.jobs)], dtype=np.float64)


def _read_marker(spec: WorkloadSpec) -> dict[str, Any] | None:
    try:
        return dict(json.loads(Path(spec.marker).read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def stop(process: subprocess.Popen[bytes], timeout_s: float = 20.0) -> tuple[int | None, float]:
    """SIGTERM, then SIGKILL to its session after ``timeout_s``; returns (exit code, seconds to exit)."""
    started = time.monotonic()
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
    return process.returncode, time.monotonic() - started
