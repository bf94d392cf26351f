"""chronoq against Celery beat, RedBeat and an APScheduler script, on the same workloads and Redis.

    python -m bench.compare [--quick] [--contenders chronoq,beat,redbeat,apscheduler] [--out-dir DIR]
    python -m bench.compare --report-only [bench/results/latest.json]

Runs, one after another against one throwaway redis-server, with the contender order rotated on
every repeat:

- W1: N interval jobs every P seconds (``--w1-sizes``, ``--w1-periods``): lag, missed and
  duplicated fires, CPU per fire, memory;
- W2: N crons due at one minute boundary (``--w2-sizes``): the burst's drain time and curve;
- W3: ``--w3-jobs`` crons not due during the run plus one every second: time to ready and to the
  first dispatch, peak RSS;
- the machine's publish ceiling (``bench/publish_ceiling.py``'s three paths and a ``send_task``
  loop on a default Celery app), half of the rounds at the start and half at the end.

A W2 run must start shortly before a minute boundary, so W1 runs that fit are run in the rest of
each minute. Writes ``docs/benchmarks.md``, charts in ``docs/img/`` and ``bench/results/latest.json``
(``--out-dir DIR``: ``DIR/benchmarks.md``, ``DIR/img/``, ``DIR/latest.json`` instead). With the
defaults the run takes about 25 minutes on two cores, ``--quick`` about 7 (``--plan`` prints the
runs and an estimate). A benchmark, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import redis

from bench import report
from bench.contenders import CONTENDERS, ROOT
from bench.publish_ceiling import throwaway_redis
from bench.runner import BenchRedis, RunFailed, Timing, measure_ceiling, run_burst, run_interval, run_startup

QUICK = {
    "w1_sizes": [1000],
    "w1_periods": [5.0, 1.0],
    "w1_min_window": 5.0,
    "w2_sizes": [1000],
    "w3_jobs": 10_000,
    "repeats": 1,
    "w2_repeats": 1,
    "ceiling_count": 2000,
    "ceiling_rounds": 2,
}


@dataclass(frozen=True)
class Run:
    """One contender on one workload size, in one repeat."""

    workload: str
    contender: str
    jobs: int
    repeat: int
    period_s: float | None = None

    def label(self) -> str:
        size = f"{self.jobs:,}" + (f" every {self.period_s:g}s" if self.period_s else "")
        return f"{self.workload} {size} {self.contender} (repeat {self.repeat + 1})"


def _ints(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item]


def _floats(text: str) -> list[float]:
    return [float(item) for item in text.split(",") if item]


def _names(text: str) -> list[str]:
    return [item.strip().lower() for item in text.split(",") if item.strip()]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--quick", action="store_true", help="small sizes, short windows, one repeat (about 7 minutes)")
    add("--contenders", type=_names, default=list(CONTENDERS), help="comma-separated (default all)")
    add("--workloads", type=_names, default=["w1", "w2", "w3"], help="default w1,w2,w3")
    add("--repeats", type=int, default=2, help="W1 repeats (default 2)")
    add("--w2-repeats", type=int, default=1, help="W2 repeats (default 1; each needs a minute boundary)")
    add("--w3-repeats", type=int, default=1, help="W3 repeats (default 1)")
    add("--w1-sizes", type=_ints, default=[1000, 10_000], help="W1 job counts (default 1000,10000)")
    add("--w1-periods", type=_floats, default=[10.0, 1.0], help="W1 periods, s (default 10,1)")
    add("--w1-min-window", type=float, default=6.0, help="W1 window, s: at least this and one period")
    add(
        "--w1-warm",
        type=float,
        default=6.0,
        help="W1: the window starts this long after the contender is ready, s (chronoq's look-ahead ramps up over 5 s)",
    )
    add("--w2-sizes", type=_ints, default=[1000, 10_000], help="W2 job counts (default 1000,10000)")
    add("--w2-lead", type=float, default=20.0, help="start W2 contenders this long before the boundary, s")
    add("--w2-drain-timeout", type=float, default=30.0, help="W2: stop waiting this long after the boundary, s")
    add("--w3-jobs", type=int, default=100_000, help="W3 job count (default 100000)")
    add("--w3-timeout", type=float, default=90.0, help="W3: give up on a contender after this long, s")
    add("--ceiling-count", type=int, default=5000, help="messages per publish-ceiling round")
    add("--ceiling-rounds", type=int, default=2, help="publish-ceiling rounds (half at the start, half at the end)")
    add("--out-dir", type=Path, help="write benchmarks.md, img/ and latest.json here instead of the repository")
    add("--plan", action="store_true", help="print the runs and the estimated duration, run nothing")
    add("--report-only", nargs="?", const=ROOT / "bench/results/latest.json", type=Path, metavar="JSON")
    args = parser.parse_args(argv)
    if args.quick:
        given = {arg.split("=", 1)[0] for arg in argv}
        explicit = {a.dest for a in parser._actions if given & set(a.option_strings)}
        for name, value in QUICK.items():
            if name not in explicit:
                setattr(args, name, value)
    if unknown := [c for c in args.contenders if c not in CONTENDERS]:
        parser.error(f"unknown contender {unknown[0]!r} (choose from {', '.join(CONTENDERS)})")
    return args


def outputs(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """(doc, image directory, results JSON)."""
    if args.out_dir:
        return args.out_dir / "benchmarks.md", args.out_dir / "img", args.out_dir / "latest.json"
    return ROOT / "docs/benchmarks.md", ROOT / "docs/img", ROOT / "bench/results/latest.json"


def build_plan(args: argparse.Namespace) -> tuple[list[tuple[list[Run], list[Run]]], list[Run]]:
    """Per repeat (W2 runs pinned to minute boundaries, W1 runs that fill the gaps), then W3 runs."""

    def order(r: int) -> list[str]:
        return [args.contenders[(i + r) % len(args.contenders)] for i in range(len(args.contenders))]

    rounds = []
    for r in range(max(args.repeats, args.w2_repeats)):
        pinned = [Run("W2", c, n, r) for n in args.w2_sizes for c in order(r)] if "w2" in args.workloads else []
        fillers: list[Run] = []
        if "w1" in args.workloads and r < args.repeats:
            fillers = [Run("W1", c, n, r, p) for n in args.w1_sizes for p in args.w1_periods for c in order(r)]
        rounds.append((pinned if r < args.w2_repeats else [], fillers))
    w3 = [Run("W3", c, args.w3_jobs, r) for r in range(args.w3_repeats) for c in order(r)]
    return rounds, (w3 if "w3" in args.workloads else [])


class Estimates:
    """Expected run durations, s, corrected by the start-up times observed so far."""

    def __init__(self, timing: Timing, lead_s: float) -> None:
        self.timing = timing
        self.lead_s = lead_s
        self.startup: dict[tuple[str, int], float] = {}

    def startup_s(self, contender: str, jobs: int) -> float:
        per_job_s = {"chronoq": 0.001, "redbeat": 0.0025, "beat": 0.0004}.get(contender, 0.0002)
        guess = 2.0 + jobs * per_job_s
        return self.startup.get((contender, jobs), guess)

    def lead(self, run: Run) -> float:
        """How long before its boundary a W2 run starts: twice the start-up not seen yet, to be safe."""
        seen = (run.contender, run.jobs) in self.startup
        return max(self.lead_s, self.startup_s(run.contender, run.jobs) * (1.0 if seen else 2.0) + 8.0)

    def duration(self, run: Run) -> float:
        t = self.timing
        startup = self.startup_s(run.contender, run.jobs)
        if run.workload == "W1":
            return startup + t.w1_warm_s + t.w1_window_s(run.period_s or 1.0) + t.w1_tail_s(run.period_s or 1.0) + 4.0
        if run.workload == "W2":
            return 60.0
        return min(startup * 1.5, t.w3_timeout_s) + 1.0 + t.w3_settle_s + 3.0

    def learn(self, run: Run, result: dict[str, Any]) -> None:
        if (startup := result.get("startup_s")) is not None:
            key = (run.contender, run.jobs)
            self.startup[key] = max(self.startup.get(key, 0.0), float(startup))


class Clock:
    """Wall-clock time; :class:`SimulatedClock` replaces it to estimate a plan's duration."""

    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class SimulatedClock(Clock):
    def __init__(self) -> None:
        self.t = time.time()

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += max(seconds, 0.0)


def estimate_s(rounds: list[tuple[list[Run], list[Run]]], w3: list[Run], estimates: Estimates) -> float:
    """How long the plan should take, from the estimated run durations and the W2 boundaries."""
    clock = SimulatedClock()
    started = clock.now()

    def pretend(run: Run, boundary: float | None) -> dict[str, Any]:
        if boundary is None:
            clock.sleep(estimates.duration(run))
        else:
            clock.sleep(boundary - clock.now() + min(run.jobs / 1000, estimates.timing.w2_drain_timeout_s) + 4.0)
        return {}

    execute(rounds, w3, pretend, estimates, clock)
    return clock.now() - started


def next_boundary(after: float) -> float:
    return math.ceil(after / 60.0) * 60.0


def execute(
    rounds: list[tuple[list[Run], list[Run]]],
    w3: list[Run],
    perform: Callable[[Run, float | None], dict[str, Any]],
    estimates: Estimates,
    clock: Clock | None = None,
) -> list[dict[str, Any]]:
    """Run the plan: each W2 run at the earliest boundary its lead allows, W1 runs in the gaps."""
    clock = clock or Clock()
    results: list[dict[str, Any]] = []

    def do(run: Run, boundary: float | None = None) -> None:
        result = perform(run, boundary)
        estimates.learn(run, result)
        results.append(result)

    for pinned, fillers in rounds:
        queue = list(fillers)
        for run in pinned:
            while True:
                lead = estimates.lead(run)
                boundary = next_boundary(clock.now() + lead + 1.0)
                room = boundary - lead - clock.now() - 2.0
                fit = next((f for f in queue if estimates.duration(f) <= room), None)
                if fit is None:
                    break
                queue.remove(fit)
                do(fit)
            clock.sleep(boundary - lead - clock.now())
            do(run, boundary)
        for run in queue:
            do(run)
    for run in w3:
        do(run)
    return results


def perform_with(env: BenchRedis, timing: Timing) -> Callable[[Run, float | None], dict[str, Any]]:
    def perform(run: Run, boundary: float | None) -> dict[str, Any]:
        started = time.time()
        record: dict[str, Any] = {
            "workload": run.workload,
            "contender": run.contender,
            "jobs": run.jobs,
            "period_s": run.period_s,
            "repeat": run.repeat,
        }
        try:
            if run.workload == "W1":
                record |= run_interval(env, run.contender, run.jobs, run.period_s or 1.0, timing)
            elif run.workload == "W2":
                record |= run_burst(env, run.contender, run.jobs, boundary or time.time() + 30, timing)
            else:
                record |= run_startup(env, run.contender, run.jobs, timing)
            record["ok"] = True
        except RunFailed as exc:
            record |= {"ok": False, "error": str(exc)}
        except Exception as exc:  # a harness bug in one run must not lose the others
            traceback.print_exc()
            record |= {"ok": False, "error": f"harness error: {exc!r}"}
        record["took_s"] = round(time.time() - started, 1)
        print(f"{datetime.now():%H:%M:%S} {run.label()}: {summary(record)}", flush=True)
        return record

    return perform


def summary(record: dict[str, Any]) -> str:
    if not record["ok"]:
        return f"FAILED {record['error']}"
    if record["workload"] == "W3" and record["timed_out"]:
        return f"no dispatch within {record['timeout_s']:.0f}s, peak RSS {record['peak_rss_mb']} MB"
    if record["workload"] == "W3":
        return f"ready {record['ready_s']}s, first dispatch {record['first_dispatch_s']}s, peak RSS {record['peak_rss_mb']} MB"
    text = f"{record['arrived']:,}/{record['expected']:,} arrived, {record['duplicates']} dup, lag p50 {record['lag_p50_ms']} ms p99 {record['lag_p99_ms']} ms"
    if record["workload"] == "W2":
        text += f", drain {record['drain_s']}s"
    return str(text + f", CPU {record['cpu_ms_per_fire']} ms/fire ({record['took_s']}s)")


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor() or "unknown CPU",
    )
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in line)
    import os

    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(mem_kb / 1024 / 1024, 1), "os": platform.platform()}


def versions(url: str) -> dict[str, str]:
    client = redis.Redis.from_url(url)
    server = str(client.info("server")["redis_version"])
    client.close()
    found = {"python": platform.python_version()}
    for label, dist in (
        ("celery", "celery"),
        ("kombu", "kombu"),
        ("redis-py", "redis"),
        ("apscheduler", "apscheduler"),
        ("redbeat", "celery-redbeat"),
    ):
        found[label] = version(dist)
    return found | {"redis-server": server, "chronoq": _git_revision()}


def _git_revision() -> str:
    import subprocess

    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev.stdout.strip() + ("+local changes" if dirty.stdout.strip() else "")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    doc, img, out_json = outputs(args)
    if args.report_only:
        results = json.loads(args.report_only.read_text())
        report.render(results, img, doc)
        print(f"wrote {doc} and charts in {img}")
        return 0
    timing = replace(
        Timing(),
        w1_min_window_s=args.w1_min_window,
        w1_warm_s=args.w1_warm,
        w2_drain_timeout_s=args.w2_drain_timeout,
        w3_timeout_s=args.w3_timeout,
    )
    estimates = Estimates(timing, args.w2_lead)
    rounds, w3 = build_plan(args)
    runs = [run for pinned, fillers in rounds for run in (*pinned, *fillers)] + w3
    expected_s = estimate_s(rounds, w3, estimates) + args.ceiling_rounds * args.ceiling_count / 250
    print(f"{len(runs)} runs, about {expected_s / 60:.0f} min (estimated)")
    if args.plan:
        for run in runs:
            print(f"  {run.label()}: ~{estimates.duration(run):.0f}s")
        return 0
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp, throwaway_redis() as url:
        client = redis.Redis.from_url(url)
        env = BenchRedis(url=url, pid=int(client.info("server")["process_id"]), workdir=Path(tmp))
        client.close()
        first_half = (args.ceiling_rounds + 1) // 2
        rates = measure_ceiling(url, args.ceiling_count, first_half)
        results_runs = execute(rounds, w3, perform_with(env, timing), estimates)
        for name, values in measure_ceiling(url, args.ceiling_count, args.ceiling_rounds - first_half).items():
            rates[name] += values
        from bench.runner import ceiling_medians

        results = {
            "meta": {
                "command": "python -m bench.compare" + "".join(f" {a}" for a in argv),
                "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "duration_s": round(time.time() - started, 1),
                "machine": machine(),
                "versions": versions(url),
                "contenders": args.contenders,
                "w1_warm_s": timing.w1_warm_s,
            },
            "ceiling": {"count": args.ceiling_count, "rates": rates, "medians": ceiling_medians(rates)},
            "runs": results_runs,
        }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=1) + "\n")
    report.render(results, img, doc)
    print(f"wrote {doc}, charts in {img}, results in {out_json} ({(time.time() - started) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
