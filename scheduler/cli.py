"""The ``chronoq`` operator commands (``chronoq scheduler`` and ``chronoq worker``, the daemons,
are added by :mod:`chronoq.cli`).

::

    chronoq health                         does the broker answer, and how fast
    chronoq task submit TASK [--args JSON] [--kwargs JSON] [--queue Q] [--wait S]
    chronoq task status TASK_ID            PENDING, STARTED, RETRY, SUCCESS, FAILURE, REVOKED
    chronoq task result TASK_ID [--timeout S]
    chronoq task revoke TASK_ID [--terminate]
    chronoq status                         replicas and roles, queue depths, workers seen, outcomes
    chronoq web [--host H] [--port P]      the web console and the JSON API (/api/v1)
    chronoq jobs list [--outcome O]        id, trigger, next fire, last outcome, paused
    chronoq jobs show ID                   spec, next 5 fires, history, counters, audit trail
    chronoq jobs pause ID [--note TEXT]    its fires are recorded as skipped on every replica
    chronoq jobs resume ID [--note TEXT]
    chronoq jobs trigger ID [--force]      run it now, once (--force ignores the overlap policy)
    chronoq jobs remove ID [--note TEXT]   until its job file (or declaration) changes
    chronoq jobs outcomes [--job ID]       fires per outcome (dispatched, coalesced, skipped, missed)
    chronoq jobs history ID [--limit N]    a job's last fires, newest first
    chronoq jobs add --spec YAML | --id ID --task T --cron C [--set KEY=VALUE]...   a job at runtime
    chronoq jobs edit ID --set KEY=VALUE... [--expected-version N]
    chronoq jobs delete ID [--expected-version N]
    chronoq jobs export [--output FILE]    every job as one job file (JSON)
    chronoq jobs apply FILE [--prune] [--dry-run]   make the API jobs equal FILE, print the diff
    chronoq jobs backfill ID --from T1 --to T2 [--overlap allow|sequential]

Every command takes ``--json``. Without ``REDIS_URL`` the embedded server is used (shared with
a running ``chronoq scheduler`` when there is one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from scheduler.cli_jobs import ACTIONS, add_commands
from scheduler.cli_jobs import run as run_api
from shared.errors import EX_UNAVAILABLE


def _parser(
    description: str | None = None, add_daemons: Callable[[Any], None] | None = None
) -> argparse.ArgumentParser:
    """The operator commands; ``add_daemons(subparsers)`` adds commands listed first (how
    :mod:`chronoq.cli` adds ``scheduler`` and ``worker``, which this package may not import)."""
    parser = argparse.ArgumentParser(
        prog="chronoq", description=description or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--env-file", type=Path, help="dotenv file (default configs/.env.$APP_ENV)")
    commands = parser.add_subparsers(dest="command", required=True)
    if add_daemons is not None:
        add_daemons(commands)

    def command(group: Any, name: str, help_text: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = group.add_parser(name, help=help_text)
        sub.add_argument("--json", action="store_true", help="print JSON")
        return sub

    command(commands, "health", "check that the broker answers")
    command(commands, "status", "replicas, queues, workers and outcome counters")
    web = commands.add_parser("web", help="serve the web console and the HTTP API (/api/v1)")
    web.add_argument("--host", help="address to listen on (default WEB_HOST, 127.0.0.1)")
    web.add_argument("--port", type=int, help="port (default WEB_PORT, 8765; 0 picks a free one)")
    task = commands.add_parser("task", help="ad-hoc tasks").add_subparsers(dest="action", required=True)
    submit = command(task, "submit", "send a task by name to the ad-hoc queue")
    submit.add_argument("name")
    submit.add_argument("--args", type=json.loads, default=[], help="JSON list")
    submit.add_argument("--kwargs", type=json.loads, default={}, help="JSON object")
    submit.add_argument("--queue")
    submit.add_argument("--priority", type=int)
    submit.add_argument("--countdown", type=float)
    submit.add_argument("--wait", type=float, metavar="SECONDS", help="wait for the result")
    for name, text in (
        ("status", "a task's state"),
        ("result", "wait for a task's result"),
        ("revoke", "tell workers not to run a task"),
    ):
        sub = command(task, name, text)
        sub.add_argument("task_id")
        if name == "result":
            sub.add_argument("--timeout", type=float, default=30.0)
        if name == "revoke":
            sub.add_argument("--terminate", action="store_true", help="also kill it if running")
    jobs = commands.add_parser("jobs", help="scheduled jobs").add_subparsers(dest="action", required=True)
    from scheduler.views import OUTCOMES

    listing = command(jobs, "list", "every registered job")
    listing.add_argument("--outcome", choices=OUTCOMES, help="only jobs whose last fire ended so (never: no fire yet)")
    show = command(jobs, "show", "one job in detail")
    show.add_argument("job_id")
    show.add_argument("--limit", type=int, default=10, help="history entries (default 10)")
    for name, text in (
        ("pause", "stop dispatching a job on every replica"),
        ("resume", "dispatch a paused job again"),
        ("trigger", "run a job now, once"),
        ("remove", "remove a job at runtime"),
    ):
        sub = command(jobs, name, text)
        sub.add_argument("job_id")
        sub.add_argument("--note", default="", help="recorded in the audit trail")
        if name == "trigger":
            sub.add_argument("--force", action="store_true", help="ignore max_instances and the overlap policy")
    outcomes = command(jobs, "outcomes", "fires per outcome")
    outcomes.add_argument("--job")
    history = command(jobs, "history", "a job's last fires")
    history.add_argument("job_id")
    history.add_argument("--limit", type=int, default=20)
    add_commands(jobs, command)
    return parser


def _emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    print(json.dumps(payload, default=str) if args.json else text)


def run(args: argparse.Namespace) -> int:
    from shared.cli_support import build_settings
    from shared.redis import check_redis, resolve_redis

    settings = build_settings(args.env_file, process="cli")
    if isinstance(settings, int):
        return settings
    if args.command == "web":
        from scheduler.web.serve import run_web

        return run_web(settings, args.host, args.port)
    with resolve_redis(settings) as settings:
        # Every command first: a wrong password, a TLS mistake or a closed port is one line and
        # 78 or 69 (raised here, reported by main()), whatever the command goes on to do.
        for url in dict.fromkeys((settings.redis.connection_url(), settings.broker_url())):
            check_redis(settings.redis, url)
        if args.command == "status":
            return asyncio.run(_status(args, settings))
        if args.command == "jobs" and args.action in ACTIONS:
            return asyncio.run(run_api(args, settings))
        if args.command == "jobs" and args.action in ("outcomes", "history"):
            return asyncio.run(_jobs(args, settings))
        if args.command == "jobs":
            return asyncio.run(_steer(args, settings))
        from shared.client import Client

        with Client(settings) as client:
            if args.command == "health":
                health = client.health()
                _emit(
                    args,
                    {"ok": health.ok, "latency_ms": health.latency_ms, "error": health.error},
                    f"broker ok ({health.latency_ms} ms)" if health.ok else f"broker DOWN: {health.error}",
                )
                return 0 if health.ok else EX_UNAVAILABLE
            if args.action == "submit":
                task_id = client.submit(
                    args.name,
                    args.args,
                    args.kwargs,
                    queue=args.queue,
                    priority=args.priority,
                    countdown=args.countdown,
                )
                if args.wait is None:
                    _emit(args, {"task_id": task_id}, task_id)
                else:
                    result = client.result(task_id, timeout=args.wait)
                    _emit(args, {"task_id": task_id, "result": result}, f"{task_id} {json.dumps(result)}")
            elif args.action == "status":
                state = client.status(args.task_id)
                _emit(args, {"task_id": args.task_id, "state": state}, state)
            elif args.action == "result":
                result = client.result(args.task_id, timeout=args.timeout)
                _emit(args, {"task_id": args.task_id, "result": result}, json.dumps(result))
            elif args.action == "revoke":
                client.revoke(args.task_id, terminate=args.terminate)
                _emit(args, {"task_id": args.task_id, "revoked": True}, f"revoked {args.task_id}")
    return 0


async def _jobs(args: argparse.Namespace, settings: Any) -> int:
    from scheduler.state import StateStore
    from shared.names import RedisKeys
    from shared.redis import create_async_redis

    client = create_async_redis(settings.redis)
    try:
        state = StateStore(client, RedisKeys(settings.redis.key_prefix))
        if args.action == "outcomes":
            counters = await state.counters(args.job)
            _emit(args, counters, "\n".join(f"{k:<11} {v}" for k, v in sorted(counters.items())) or "no fires yet")
        else:
            entries = await state.history(args.job_id, args.limit)
            lines = [
                f"{e.get('scheduled_at', '?')}  {e.get('final') or '?':<10} {e.get('task_id') or ''} {e.get('reason') or ''}".rstrip()
                for e in entries
            ]
            _emit(args, entries, "\n".join(lines) or f"no fires recorded for {args.job_id}")
    finally:
        await client.aclose()
    return 0


async def _status(args: argparse.Namespace, settings: Any) -> int:
    from scheduler.operator import Operator, with_operator
    from scheduler.views import audit_line

    async def action(operator: Operator) -> dict[str, Any]:
        return await operator.status()

    status = await with_operator(settings, action)
    lines = [f"leader      {status['leader'] or 'none'}", "replicas"]
    for r in status["replicas"]:
        state = "" if r["alive"] else "  NOT SEEN"
        lines.append(f"  {r['id']:<40} {r['role']:<8} heartbeat {r['heartbeat_age_s']}s ago, {r['jobs']} jobs{state}")
    lines.append("queues")
    lines += [f"  {name:<30} {depth} waiting" for name, depth in status["queues"].items()]
    lines.append(f"  (delivered, not yet acked: {status['unacked']})")
    lines.append("workers")
    for w in status["workers"]:
        state = "" if w["seen"] else "  NOT SEEN"
        lines.append(f"  {w['hostname']:<40} {','.join(w['queues'])} seen {w['last_seen_age_s']}s ago{state}")
    lines.append(
        f"jobs        {status['jobs']} registered, {status['paused']} paused, {status['buffered']} waiting for a slot"
    )
    outcomes = {k: v for k, v in status["counters"].items() if not k.startswith("recovered_")}
    lines.append("outcomes    " + (", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())) or "none yet"))
    lines.append("audit       " + audit_line(status["audit"], status["awaiting_start"]))
    risk = "  EVICTS KEYS: set noeviction" if status["eviction_risk"] else ""
    lost = f" (last {status['last_data_loss']})" if status["last_data_loss"] else ""
    lines.append(
        f"redis       maxmemory-policy {status['maxmemory_policy'] or 'unknown'}{risk}; "
        f"data losses noticed {status['data_losses']}{lost}"
    )
    for job_id, entry in sorted(status["invalid_jobs"].items()):
        lines.append(f"INVALID     API job {job_id} (version {entry['version']}) not run: {entry['problem']}")
    for task, job_ids in status["unserved_tasks"].items():
        lines.append(f"WARNING     task {task} (jobs {', '.join(job_ids)}) is registered by no live worker")
    _emit(args, status, "\n".join(lines))
    healthy = any(r["alive"] for r in status["replicas"])
    return 0 if healthy else 1


async def _steer(args: argparse.Namespace, settings: Any) -> int:
    from scheduler.operator import Operator, with_operator
    from scheduler.views import last_outcome
    from shared.errors import OwnershipError, UnknownJobError

    async def action(operator: Operator) -> Any:
        if args.action == "list":
            rows = await operator.list_jobs()
            return [r for r in rows if args.outcome in (None, last_outcome(r["last_outcome"]))]
        if args.action == "show":
            return await operator.show(args.job_id, history=args.limit)
        if args.action == "trigger":
            return await operator.trigger(args.job_id, force=args.force, note=args.note)
        if args.action == "remove" and await operator.client.hexists(operator.keys.api_jobs, args.job_id):
            raise OwnershipError(args.job_id, "was created through the API: `chronoq jobs delete` deletes it for good")
        method = {"pause": operator.pause, "resume": operator.resume, "remove": operator.remove}[args.action]
        return await method(args.job_id, note=args.note)

    try:
        result = await with_operator(settings, action)
    except (UnknownJobError, OwnershipError) as exc:
        _emit(args, {"error": str(exc)}, f"chronoq: {exc}")
        return 1
    _emit(args, result, _describe_steer(args.action, result))
    if args.action == "trigger":
        return 0 if result["outcome"] in ("dispatched", "buffered") else 1
    return 0


def _describe_steer(action: str, result: Any) -> str:
    if action == "list":
        rows = [
            f"{r['id']:<30} {r['trigger']:<34} next {r['next_fire'] or '-':<32} "
            f"last {r['last_outcome'] or '-':<10}{'  PAUSED' if r['paused'] else ''}{'' if r['enabled'] else '  disabled'}"
            for r in result
        ]
        return "\n".join(rows) or "no jobs registered (is a scheduler running?)"
    if action == "show":
        lines = [
            f"{result['id']}: {result['task']} -> {result['queue']}, {result['trigger']}",
            f"paused: {'yes (' + result['paused_note'] + ')' if result['paused'] else 'no'}; "
            f"in flight: {result['inflight']}",
            "next fires: " + (", ".join(result["next_fires"]) or "none"),
            "outcomes: " + (", ".join(f"{k} {v}" for k, v in sorted(result["counters"].items())) or "none yet"),
            "history (newest first):",
        ]
        for e in result["history"]:
            took = f" {e['duration_ms']} ms" if "duration_ms" in e else ""
            host = f" on {e['worker']}" if e.get("worker") else ""
            error = f" {e['error']}" if e.get("error") else ""
            lines.append(f"  {e.get('scheduled_at', '?')}  {e.get('final') or '?':<10}{took}{host}{error}")
        lines.append("audit:")
        lines += [
            f"  {datetime.fromtimestamp(a['at_ms'] / 1000, UTC).isoformat(timespec='seconds')} {a['action']} "
            f"by {a['by']} {a['note']}".rstrip()
            for a in result["audit"]
        ]
        return "\n".join(lines)
    if action == "trigger":
        reason = f" ({result['reason']})" if result["reason"] and not result["dispatched"] else ""
        return f"{result['job']}: {result['outcome']}{reason} task {result['task_id']}"
    return f"{result['job']}: {action}d" + (f" ({result['note']})" if result.get("note") else "")


def main(argv: list[str] | None = None) -> int:
    return execute(_parser().parse_args(argv))


def execute(args: argparse.Namespace) -> int:
    """Run a parsed operator command: its exit code, every error one line on stderr."""
    from shared.cli_support import report_errors

    return report_errors("cli", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
