#!/usr/bin/env python3
"""What the dispatch audit costs per audited fire, as a ratio to the dispatch path.

    python bench/audit_cost.py [--jobs 10000] [--rounds 3] [--out bench/results/audit_cost.json]

On a throwaway redis-server, ``--jobs`` jobs each get one fire dispatched as the scheduler does
it (each message encoded by ``MessageEncoder``, decided and pushed by the decide script, 500 per
call), then the leader's audit (:class:`scheduler.audit.DispatchAudit`, 500 per batch, the default) runs over
all of them once (its clock set past their visibility timeout), in four cases:

- ``started``: every run started (the common case): the audit reads an empty index;
- ``queued``: every message still in its queue (no worker, 10,000 messages): each batch reads up
  to ``SCHEDULER_AUDIT_SCAN_MAX`` entries from the list's oldest end and leaves the fires;
- ``republished``: every message gone, before its expiry: looked up, encoded again, published
  (the copies are taken off the queue after each batch, as workers would);
- ``lost``: every message gone, past its expiry: looked up and recorded lost.

For the dispatch path and for each audit case: Redis commands (``INFO commandstats``, the
commands run inside scripts included), Redis CPU (``used_cpu_user`` + ``used_cpu_sys``) and the
scheduler's CPU (this process's ``process_time``: encoding, the client, the audit's Python),
each per fire; the audit's as a ratio to the dispatch path's. Also the dispatch path with the
decide script as it was before the audit's index (its ``ZADD`` removed), for the cost of the
index on the dispatch path. Medians over ``--rounds`` (a fresh namespace each round).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
import redis.asyncio
from loguru import logger

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.dispatch_lag import start_redis  # noqa: E402
from scheduler.audit import DispatchAudit  # noqa: E402
from scheduler.encoder import MessageEncoder  # noqa: E402
from scheduler.fires import Fire, Limits  # noqa: E402
from scheduler.specs import JobSpec  # noqa: E402
from shared import lua  # noqa: E402
from shared.celery_app import create_celery_app  # noqa: E402
from shared.clock import SystemClock  # noqa: E402
from shared.fleet import scheduler_ledger  # noqa: E402
from shared.settings import AppSettings  # noqa: E402

BATCH = 500
_INDEX_ZADD = """for first = 1, #sent, 1000 do
  redis.call('ZADD', KEYS[5], unpack(sent, first, math.min(first + 999, #sent)))
end
"""


_INDEX_MEMBER = """      sent[#sent + 1] = audit_due(expiry_ms, audit_after_ms, audit_margin_ms)
      sent[#sent + 1] = dispatched_member(job_id, scheduled_at)
"""


class Meter:
    """Redis commands and CPU, and this process's CPU, over a stretch of work."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def read(self) -> tuple[int, float, float]:
        stats = self.client.info("commandstats")
        calls = sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")
        cpu = self.client.info("cpu")
        return calls, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), time.process_time()

    async def measure(self, work: Callable[[], Awaitable[Any]], fires: int) -> dict[str, float]:
        before = self.read()
        await work()
        after = self.read()
        calls = after[0] - before[0] - 1  # the INFO cpu of the first read
        return {
            "redis_commands_per_fire": round(calls / fires, 3),
            "redis_cpu_us_per_fire": round((after[1] - before[1]) * 1e6 / fires, 2),
            "scheduler_cpu_us_per_fire": round((after[2] - before[2]) * 1e6 / fires, 2),
        }


AHEAD_S = 120.0
"""Fires are made overdue by moving their index scores this far back (as if dispatched two
minutes ago, past the 60 s visibility timeout; a fire looked at is scored with Redis's time, so
it is not due again); in the lost case the audit's clock also runs this far ahead, past expiry."""


class AheadClock(SystemClock):
    def now(self) -> datetime:
        return super().now() + timedelta(seconds=AHEAD_S)

    def time(self) -> float:
        return super().time() + AHEAD_S


def settings_for(url: str, prefix: str) -> AppSettings:
    return AppSettings(
        _env_file=None,
        redis={"url": url, "key_prefix": prefix},
        celery={"visibility_timeout_s": 60, "task_time_limit_s": 30, "cron_queue": f"cron_{prefix[:-1]}"},
        scheduler={"slot_margin_s": 0, "audit_margin_s": 0},
    )


async def one_round(url: str, jobs: int, case: str, sync: redis.Redis, round_no: int) -> dict[str, Any]:
    prefix = f"b{round_no}{case[:3]}:"
    settings = settings_for(url, prefix)
    client = redis.asyncio.Redis.from_url(url, decode_responses=True)
    ledger = scheduler_ledger(client, settings)
    if case == "before":  # the decide script without the audit's index
        source = lua.source("decide").replace(_INDEX_ZADD, "").replace(_INDEX_MEMBER, "")
        ledger._decide = client.register_script(source)
    app = create_celery_app(settings)
    encoder = MessageEncoder(app)
    limits = Limits.from_settings(settings)
    grace = 60 if case == "lost" else 3600  # past its expiry at the audit's time, or not
    specs = {
        f"job-{i}": JobSpec(
            id=f"job-{i}", task="demo.sleep", interval=60, misfire_grace_time=grace, queue=settings.celery.cron_queue
        )
        for i in range(jobs)
    }
    now = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)
    fires = [Fire(spec, now) for spec in specs.values()]
    meter = Meter(sync)

    async def dispatch() -> None:
        for start in range(0, len(fires), BATCH):
            chunk = fires[start : start + BATCH]
            stamp = datetime.now(UTC)
            encoded = encoder.encode([f.message(stamp, limits) for f in chunk])
            intents = [f.intent(stamp, limits, e) for f, e in zip(chunk, encoded, strict=True)]
            await ledger.decide(intents, owner="bench")

    result: dict[str, Any] = {"dispatch": await meter.measure(dispatch, jobs)}
    if case != "before":
        queue = encoder.list_key(settings.celery.cron_queue, None)
        if case == "started":
            sync.delete(prefix + "dispatched")  # as the runs' starts do, one ZREM each
        elif case in ("republished", "lost"):
            sync.delete(queue)
        index = prefix + "dispatched"
        aged = {member: score - AHEAD_S * 1000 for member, score in sync.zrange(index, 0, -1, withscores=True)}
        if aged:
            sync.zadd(index, aged)
        clock = AheadClock() if case == "lost" else SystemClock()
        audit = DispatchAudit(ledger, client, encoder, limits, settings, specs.get, clock=clock)
        states: dict[str, int] = {}

        async def run_audit() -> None:
            while True:
                report = await audit.cycle()
                for state, count in report.states.items():
                    states[state] = states.get(state, 0) + count
                if case == "republished":
                    await client.delete(queue)  # workers take the copies
                if report.looked < audit.batch_size:
                    return

        result["audit"] = await meter.measure(run_audit, jobs)
        result["states"] = states
        sync.delete(queue)
    for key in sync.scan_iter(prefix + "*", count=10_000):
        sync.delete(key)
    sync.delete("unacked", "unacked_index")
    app.close()
    await client.aclose()
    return result


def median_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in rounds), 3) for k in rounds[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "audit_cost.json")
    args = parser.parse_args()
    logger.remove()  # the audit logs each fire once: formatted, as a scheduler does, but not shown
    logger.add(open(os.devnull, "w"), format="{time} | {level} | {message} {extra}")  # noqa: SIM115
    tmp = Path(tempfile.mkdtemp(prefix="chronoq-audit-cost-"))
    url, server = start_redis(tmp)
    sync = redis.Redis.from_url(url, decode_responses=True)
    cases = ("before", "started", "queued", "republished", "lost")
    out: dict[str, Any] = {"jobs": args.jobs, "rounds": args.rounds, "machine": {"cpus": os.cpu_count()}}
    try:
        runs: dict[str, list[dict[str, Any]]] = {case: [] for case in cases}
        for round_no in range(args.rounds):
            for case in cases:
                runs[case].append(asyncio.run(one_round(url, args.jobs, case, sync, round_no)))
                print(case, json.dumps(runs[case][-1]), flush=True)
        dispatch = median_of([r["dispatch"] for case in cases[1:] for r in runs[case]])
        before = median_of([r["dispatch"] for r in runs["before"]])
        out["dispatch_path"] = dispatch
        out["dispatch_path_before_the_index"] = before
        out["index_cost_on_dispatch"] = {k: round(dispatch[k] / before[k], 3) if before[k] else None for k in dispatch}
        for case in cases[1:]:
            audit = median_of([r["audit"] for r in runs[case]])
            out[case] = {
                "audit": audit,
                "states": runs[case][-1]["states"],
                "ratio_to_dispatch": {k: round(audit[k] / dispatch[k], 3) if dispatch[k] else None for k in audit},
            }
        out["load_avg_end"] = os.getloadavg()
    finally:
        sync.close()
        server.terminate()
        server.wait(10)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
