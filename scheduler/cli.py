"""The ``chronoq`` operator command.

::

    chronoq health                         does the broker answer, and how fast
    chronoq task submit TASK [--args JSON] [--kwargs JSON] [--queue Q] [--wait S]
    chronoq task status TASK_ID            PENDING, STARTED, RETRY, SUCCESS, FAILURE, REVOKED
    chronoq task result TASK_ID [--timeout S]
    chronoq task revoke TASK_ID [--terminate]
    chronoq jobs outcomes [--job ID]       fires per outcome (dispatched, coalesced, skipped, missed)
    chronoq jobs history ID [--limit N]    a job's last fires, newest first

Every command takes ``--json``. Without ``REDIS_URL`` the embedded server is used (shared with
a running ``run_scheduler.py`` when there is one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from shared.errors import EX_UNAVAILABLE, ChronoqError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chronoq", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--env-file", type=Path, help="dotenv file (default configs/.env.$APP_ENV)")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(group: Any, name: str, help_text: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = group.add_parser(name, help=help_text)
        sub.add_argument("--json", action="store_true", help="print JSON")
        return sub

    command(commands, "health", "check that the broker answers")
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
    outcomes = command(jobs, "outcomes", "fires per outcome")
    outcomes.add_argument("--job")
    history = command(jobs, "history", "a job's last fires")
    history.add_argument("job_id")
    history.add_argument("--limit", type=int, default=20)
    return parser


def _emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    print(json.dumps(payload, default=str) if args.json else text)


def run(args: argparse.Namespace) -> int:
    from shared.cli_support import build_settings
    from shared.redis import resolve_redis

    settings = build_settings(args.env_file, process="cli")
    if isinstance(settings, int):
        return settings
    with resolve_redis(settings) as settings:
        if args.command == "jobs":
            return asyncio.run(_jobs(args, settings))
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except ChronoqError as exc:
        print(f"chronoq: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE


if __name__ == "__main__":
    sys.exit(main())
