#!/usr/bin/env python3
"""How fast can a burst of task messages get onto Redis? ``python bench/publish_ceiling.py [--redis-url URL]``.

Measures messages per second, against one Redis in one run, for:

(a) ``send_task``: a tight ``app.send_task`` loop with chronoq's Celery config (one publish and
    its extras per message: several round trips);
(b) ``BatchPublisher``: ``scheduler.publishing`` encoding every message like Celery and pushing
    ``--batch-size`` of them per pipeline;
(c) ``raw ceiling``: the same pipelines with one pre-encoded payload, no encoding at all: what
    this machine and this Redis allow for the same commands.

The three run interleaved ``--rounds`` times (so drift in machine load hits all of them) and the
medians and the ratios (b)/(c) and (a)/(c) are printed. Without ``--redis-url`` a throwaway
redis-server (no persistence) is started on a free port and stopped at the end. Only the bench's
own keys are touched (the list ``bench_<random>`` and kombu's binding sets for it) and deleted.

A benchmark, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import redis
from celery import Celery

from scheduler.message import TaskMessage
from scheduler.publishing import DEFAULT_BATCH_SIZE, BatchPublisher
from shared.celery_app import create_celery_app
from shared.embedded import find_redis_server_binary
from shared.names import HEADER_JOB_ID, HEADER_SCHEDULED_AT
from shared.settings import AppSettings

TASK = "demo.number_sum"
SCHEDULED_AT = "2030-01-01T00:00:00+00:00"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", help="Redis to use (default: a throwaway redis-server)")
    parser.add_argument("--count", type=int, default=10_000, help="messages per run (default 10000)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="messages per pipeline")
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def throwaway_redis() -> Iterator[str]:
    """A redis-server without persistence on a free port for the ``with`` block; yields its URL."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as workdir:
        args = [str(find_redis_server_binary(None)), "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        process = subprocess.Popen([*args, "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        try:
            client = redis.Redis.from_url(url)
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise SystemExit(f"redis-server on port {port} did not start") from None
                    time.sleep(0.05)
            client.close()
            yield url
        finally:
            process.terminate()
            process.wait(10)


def messages(queue: str, count: int) -> list[TaskMessage]:
    return [
        TaskMessage(
            TASK,
            [i, 1],
            {},
            queue,
            str(uuid.uuid4()),
            {HEADER_JOB_ID: f"job-{i % 500}", HEADER_SCHEDULED_AT: SCHEDULED_AT},
        )
        for i in range(count)
    ]


def run_send_task(app: Celery, batch: list[TaskMessage]) -> None:
    for m in batch:
        app.send_task(m.task_name, m.args, m.kwargs, queue=m.queue, task_id=m.task_id, headers=m.headers)


def run_raw(client: redis.Redis, key: str, payload: str, count: int, batch_size: int) -> None:
    for start in range(0, count, batch_size):
        with client.pipeline(transaction=False) as pipe:
            pipe.lpush(key, *([payload] * min(batch_size, count - start)))
            pipe.execute()


def timed(run: Callable[[], None], client: redis.Redis, queue: str, count: int) -> float:
    """Messages per second of ``run``; checks they all landed, then empties the queue."""
    started = time.perf_counter()
    run()
    elapsed_s = time.perf_counter() - started
    landed = client.llen(queue)
    client.delete(queue)
    if landed != count:
        raise SystemExit(f"{queue}: {landed} of {count} messages landed")
    return count / elapsed_s


def bench(url: str, count: int, rounds: int, batch_size: int) -> None:
    settings = AppSettings(
        _env_file=None, redis={"url": url}, celery={"cron_queue": "bench_cron", "default_queue": "bench_adhoc"}
    )
    app = create_celery_app(settings, name="chronoq-bench")
    client = redis.Redis.from_url(url)
    queue = f"bench_{uuid.uuid4().hex[:8]}"
    rates: dict[str, list[float]] = {"send_task": [], "BatchPublisher": [], "raw ceiling": []}
    try:
        with BatchPublisher(app, url, batch_size=batch_size) as publisher:
            publisher.publish(messages(queue, 1))  # warm up connections and routes, and take a payload
            payload = client.rpop(queue)
            assert isinstance(payload, bytes)
            app.send_task(TASK, [0, 1], queue=queue)
            client.delete(queue)
            raw = payload.decode()
            for n in range(1, rounds + 1):
                batch = messages(queue, count)
                runs: dict[str, Callable[[], None]] = {
                    "send_task": partial(run_send_task, app, batch),
                    "BatchPublisher": partial(publisher.publish, batch),
                    "raw ceiling": partial(run_raw, client, queue, raw, count, batch_size),
                }
                for name, run in runs.items():
                    rates[name].append(timed(run, client, queue, count))
                print(f"round {n}: " + "  ".join(f"{name} {r[-1]:>9,.0f}/s" for name, r in rates.items()), flush=True)
    finally:
        # send_task also declares the queue: kombu's binding sets for it.
        client.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
        client.close()
        app.close()
    medians = {name: statistics.median(r) for name, r in rates.items()}
    ceiling = medians["raw ceiling"]
    print(f"\nmedians over {rounds} rounds of {count:,} messages (batch {batch_size}):")
    for name, rate in medians.items():
        print(f"  {name:<15} {rate:>10,.0f} msg/s  {count / rate:7.3f} s per {count:,}")
    print(
        f"ratios: BatchPublisher/raw = {medians['BatchPublisher'] / ceiling:.3f}, send_task/raw = {medians['send_task'] / ceiling:.4f}"
    )


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.redis_url:
        print(f"redis: {args.redis_url.split('@')[-1]}")
        bench(args.redis_url, args.count, args.rounds, args.batch_size)
        return 0
    with throwaway_redis() as url:
        print(f"redis: throwaway redis-server at {url}")
        bench(url, args.count, args.rounds, args.batch_size)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
