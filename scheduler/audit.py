"""The dispatch audit: the leader checks that every fire it published was consumed.

Nothing in Celery or kombu checks that a published message was ever taken, and a message can be
lost between them (a reply lost in a Redis restart, an ``unacked`` entry whose index entry is
gone so kombu's sweep never sees it, a consumer that is not a chronoq worker). chronoq knows
every fire it dispatched: the decide script (and a released buffer) adds each to
``RedisKeys.dispatched`` and the run's start takes it out. So
the fires to check are the index's oldest, read a bounded batch at a time, off the dispatch path.

Every ``SCHEDULER_AUDIT_INTERVAL_S`` the leader reads at most ``SCHEDULER_AUDIT_BATCH_SIZE``
fires whose look is due, still not started: the visibility timeout plus
``SCHEDULER_AUDIT_MARGIN_S`` after their dispatch, or their message's expiry plus the margin if
that comes first (a message past its expiry can no longer run; if it is nowhere then, the fire
is lost whatever the visibility timeout; :func:`scheduler.planner.next_audit`). The index is
scored with that time. Each message is looked up in one atomic script
(``shared/lua/audit.lua``):

- still **queued** (the queue is slow, or has no consumer): counted once and left;
- **unacked**, with its index entry: a worker holds it or kombu's sweep puts it back: left;
- in ``unacked`` without its index entry: **reindexed**, so kombu's next sweep restores it;
- **nowhere**: published again with its task id and headers (**republished**; workers run a
  fire once, however many copies arrive), or, past its message's expiry or after
  :data:`scheduler.planner.AUDIT_REPUBLISH_MAX` copies, recorded **lost**, which frees its slot
  so its record retires under the normal limits. The rule is :func:`scheduler.planner.plan_audit`.

Each fire found unacked, reindexed, queued or republished is looked at again one deadline later.
Finding a message in its queue list costs a read of the list from its oldest end, at most
``SCHEDULER_AUDIT_SCAN_MAX`` entries per list per call, and only for fires past the deadline:
messages are pushed at the list's head and taken from its tail (kombu restores to the tail), so
an overdue fire's message sits among the oldest entries, and a list with more than that many
entries ahead of it is a backlog (the fire is taken as still queued). ``LPOS``
cannot be used: it matches whole entries, and the message's bytes are not kept. ``unacked`` is
probed by delivery tag, which is the fire's task id (:mod:`scheduler.encoder`), without a scan.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import redis
import redis.asyncio
from loguru import logger

from scheduler.encoder import republish_tag
from scheduler.fires import Fire, Limits
from scheduler.planner import message_expiry, next_audit, plan_audit
from shared.clock import SYSTEM_CLOCK, Clock
from shared.fleet import AuditCheck, FireLedger
from shared.names import fire_task_id_of
from shared.redis import raise_if_cancelling

if TYPE_CHECKING:
    from scheduler.encoder import MessageEncoder
    from scheduler.specs import JobSpec
    from shared.settings import AppSettings

FULL_BATCH_PAUSE_S = 0.05
"""After a full batch the next one follows this soon (other clients get Redis in between)."""

_MESSAGES = {
    "queued": "dispatched fire still queued {age:.0f}s after its dispatch: left (its queue is slow or unserved)",
    "unacked": "dispatched fire held unacknowledged {age:.0f}s after its dispatch: left to kombu's sweep",
    "reindexed": "dispatched fire's message was in unacked without its index entry: put back in the index",
    "republished": "dispatched fire's message was nowhere {age:.0f}s after its dispatch: published again (copy {copies})",
    "lost": "fire lost: {reason}",
}


@dataclass
class AuditReport:
    """One audit call: how many fires it looked at and what it found (states of audit.lua)."""

    looked: int = 0
    states: Counter[str] = field(default_factory=Counter)


class DispatchAudit:
    """The leader's audit loop (:meth:`run`), one batch per :meth:`cycle`. ``jobs`` gives the
    spec of a job id (None: not known here; its fires are only looked for in ``unacked``)."""

    def __init__(
        self,
        ledger: FireLedger,
        client: redis.asyncio.Redis,
        encoder: MessageEncoder,
        limits: Limits,
        settings: AppSettings,
        jobs: Callable[[str], JobSpec | None],
        *,
        is_leader: Callable[[], bool] = lambda: True,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        sched = settings.scheduler
        self.ledger, self.client, self.encoder, self.limits, self.jobs = ledger, client, encoder, limits, jobs
        self.is_leader, self.clock = is_leader, clock
        self.interval_s = sched.audit_interval_s
        self.margin_s = sched.audit_margin_s
        self.deadline_s = settings.celery.visibility_timeout_s + sched.audit_margin_s
        self.batch_size = sched.audit_batch_size
        self.scan_max = sched.audit_scan_max
        self.unacked = encoder.unacked_keys()
        self.totals: Counter[str] = Counter()
        """What this replica's audit found, by state, since it started (logged states only)."""

    async def run(self) -> None:
        """Audit while this replica leads; a Redis error is logged and the next cycle retries."""
        while True:
            raise_if_cancelling()
            full = False
            if self.is_leader():
                try:
                    full = (await self.cycle()).looked >= self.batch_size
                except (redis.RedisError, OSError) as exc:
                    raise_if_cancelling()
                    logger.warning("dispatch audit failed, retrying in {}s: {}", self.interval_s, exc)
            await asyncio.sleep(FULL_BATCH_PAUSE_S if full else self.interval_s)

    async def cycle(self) -> AuditReport:
        """Look up one batch of overdue fires and act on those whose message is nowhere."""
        cutoff_ms = int(self.clock.time() * 1000)  # the index is scored with each fire's look time
        members = await self.client.zrangebyscore(
            self.ledger.keys.dispatched, "-inf", cutoff_ms, start=0, num=self.batch_size
        )
        report = AuditReport(looked=len(members))
        if not members:
            return report
        lists: dict[str, int] = {}
        checks: list[AuditCheck] = []
        specs: list[JobSpec | None] = []
        for member in members:
            job_id, _, scheduled_at = str(member).partition("\x1f")
            job = self.jobs(job_id)
            index = 0
            if job is not None:
                index = lists.setdefault(self.encoder.list_key(job.queue, job.priority), len(lists) + 1)
            checks.append(AuditCheck(job_id, scheduled_at, index))
            specs.append(job)
        found = await self.ledger.audit(checks, list(lists), self.unacked, self.scan_max)
        now = self.clock.now()
        acts: list[AuditCheck] = []
        for check, job, (state, new, copies, dispatched_ms) in zip(checks, specs, found, strict=True):
            state = str(state)
            if state == "nowhere" and job is not None:
                acts.append(self._act(check, job, int(copies), int(dispatched_ms), now))
            else:
                self._note(check, state, int(new), int(copies), int(dispatched_ms), now, "")
                report.states[state] += 1
        if acts:
            done = await self.ledger.audit(acts, list(lists), self.unacked, self.scan_max)
            for check, (state, new, copies, dispatched_ms) in zip(acts, done, strict=True):
                state = str(state)
                self._note(check, state, int(new), int(copies), int(dispatched_ms), now, check.data)
                report.states[state] += 1
        return report

    def _act(self, check: AuditCheck, job: JobSpec, copies: int, dispatched_ms: int, now: datetime) -> AuditCheck:
        scheduled_at = datetime.fromisoformat(check.scheduled_at)
        dispatched_at = datetime.fromtimestamp(dispatched_ms / 1000, UTC)
        verdict = plan_audit(job, scheduled_at, dispatched_at, copies, now)
        if verdict.action != "republish":
            return replace(check, action=verdict.action, data=verdict.reason)
        fire = Fire(job, scheduled_at)
        message = fire.message(now, self.limits)
        message = replace(message, delivery_tag=republish_tag(message.task_id, verdict.copy))
        [(_, payload)] = self.encoder.encode([message])
        lapse_ms = fire.intent(now, self.limits).slot_lapse_ms
        expiry = message_expiry(job, scheduled_at, dispatched_at)
        next_ms = int(next_audit(now, expiry, self.deadline_s, self.margin_s).timestamp() * 1000)
        return replace(
            check, action="republish", copy=verdict.copy, slot_lapse_ms=lapse_ms, next_ms=next_ms, data=payload
        )

    def _note(
        self, check: AuditCheck, state: str, new: int, copies: int, dispatched_ms: int, now: datetime, data: str
    ) -> None:
        if not new or state not in _MESSAGES:
            return
        self.totals[state] += 1
        age = now.timestamp() - dispatched_ms / 1000
        log = logger.bind(
            job_id=check.job_id,
            scheduled_at=check.scheduled_at,
            task_id=fire_task_id_of(check.job_id, check.scheduled_at),
        )
        level = {"queued": "INFO", "unacked": "INFO", "lost": "ERROR"}.get(state, "WARNING")
        reason = data if state == "lost" else ""
        log.log(level, _MESSAGES[state].format(age=age, copies=copies, reason=reason))
