#!/usr/bin/env python3
"""What the worker's atomic take (``workers/take.py``) costs against kombu's BRPOP, in one run.

    python -m bench.worker_take --baseline-root DIR [--count 5000] [--rounds 3] [--save FILE]

``DIR`` is a checkout of the commit before the take (e.g. ``git worktree add /tmp/old
c39e1a2``); it runs with this checkout's virtualenv. For each round and each tree (the order
rotated), against one throwaway redis-server: a ``run_worker.py`` of that tree (threads pool,
4 threads) waits on an empty queue; ``--count`` ad-hoc ``demo.sleep(0)`` messages are pushed at
once; then the time until the queue and kombu's unacked index are both empty (every message
taken and acknowledged), the worker's CPU (its process tree, user + system) and Redis' own
time in commands (``INFO commandstats``, summed) per message, and the commands per message.

A benchmark, not a test: the machine is shared and noisy, so compare within one run (medians
and ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.publish_ceiling import throwaway_redis  # noqa: E402
from scheduler.message import TaskMessage  # noqa: E402
from scheduler.publishing import BatchPublisher  # noqa: E402
from shared.celery_app import create_celery_app  # noqa: E402
from shared.settings import AppSettings  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-root", type=Path, required=True, help="checkout of the commit before the take")
    parser.add_argument("--count", type=int, default=5000, help="messages per run (default 5000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each tree once per round (default 3)")
    parser.add_argument("--save", type=Path, help="write the results as JSON")
    return parser.parse_args(argv)


def tree_cpu_s(process: psutil.Process) -> float:
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def redis_usec(client: redis.Redis) -> tuple[float, int]:
    stats = client.info("commandstats")
    return sum(v["usec"] for v in stats.values()), sum(v["calls"] for v in stats.values())


def run_once(root: Path, url: str, count: int) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    queue, prefix = f"take_{tag}", f"take{tag}:"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "CELERY_", "WORKER_"))},
        "REDIS_URL": url,
        "REDIS_KEY_PREFIX": prefix,
        "CELERY_CRON_QUEUE": queue,
        "CELERY_DEFAULT_QUEUE": f"{queue}_adhoc",
        "LOG_LEVEL": "WARNING",
    }
    worker = subprocess.Popen(
        [
            sys.executable,
            str(root / "run_worker.py"),
            "-Q",
            queue,
            "-P",
            "threads",
            "-c",
            "4",
            "-n",
            f"take-{tag}@bench",
        ],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis.from_url(url, decode_responses=True)
    settings = AppSettings(_env_file=None, redis={"url": url, "key_prefix": prefix}, celery={"cron_queue": queue})
    app = create_celery_app(settings)
    publisher = BatchPublisher(app, lambda: redis.Redis.from_url(url))
    try:
        deadline = time.monotonic() + 60
        while not client.hget(f"{prefix}workers", f"take-{tag}@bench"):  # its heartbeat: consuming
            if time.monotonic() > deadline or worker.poll() is not None:
                raise SystemExit(f"the worker of {root} did not start")
            time.sleep(0.1)
        time.sleep(1.0)  # let start-up work settle before the CPU baseline
        batch = [TaskMessage("demo.sleep", [0], {}, queue, str(uuid.uuid4()), {}) for _ in range(count)]
        encoded = publisher.encode(batch)
        tree = psutil.Process(worker.pid)
        client.config_resetstat()
        cpu0 = tree_cpu_s(tree)
        with client.pipeline(transaction=False) as pipe:
            for list_key, payload in encoded:
                pipe.lpush(list_key, payload)
            pipe.execute()
        started = time.monotonic()
        while client.llen(queue) or client.hlen("unacked"):
            if time.monotonic() - started > 300:
                raise SystemExit(f"{root}: not drained after 300 s")
            time.sleep(0.01)
        drain_s = time.monotonic() - started
        cpu_s = tree_cpu_s(tree) - cpu0
        usec, calls = redis_usec(client)
        return {
            "drain_s": round(drain_s, 3),
            "worker_cpu_ms_per_msg": round(cpu_s * 1000 / count, 4),
            "redis_us_per_msg": round(usec / count, 2),
            "redis_calls_per_msg": round(calls / count, 2),
        }
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        publisher.close()
        app.close()
        client.close()


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    trees = {"brpop": args.baseline_root.resolve(), "take": ROOT}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    with throwaway_redis() as url:
        for round_no in range(args.rounds):
            order = list(trees) if round_no % 2 == 0 else list(reversed(trees))
            for name in order:
                result = run_once(trees[name], url, args.count)
                runs[name].append(result)
                print(f"round {round_no + 1} {name}: {result}", flush=True)
    summary: dict[str, Any] = {}
    for field in ("drain_s", "worker_cpu_ms_per_msg", "redis_us_per_msg", "redis_calls_per_msg"):
        medians = {name: statistics.median(r[field] for r in runs[name]) for name in trees}
        summary[field] = {**medians, "take/brpop": round(medians["take"] / medians["brpop"], 3)}
        print(f"{field}: brpop {medians['brpop']}  take {medians['take']}  ratio {summary[field]['take/brpop']}")
    if args.save:
        report = {
            "what": "python -m bench.worker_take",
            "args": {**vars(args), "baseline_root": str(args.baseline_root)},
        }
        report |= {"ran_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": runs, "medians": summary}
        args.save.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
