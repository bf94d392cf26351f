"""The fire planner: every rule that gives a nominal fire its outcome and its release time.

Pure: no I/O, no asyncio, no clock of its own (``now`` is passed in). The dispatcher (intake,
decide, retry after Redis came back, takeover and promotion), the manager's restart catch-up
and the operator's manual trigger all call it, so each rule exists once.

=====================  =================================================  ==========================  ============================
Rule                   When                                               Outcome                     Released (decided) at
=====================  =================================================  ==========================  ============================
gone                   at decide: the job was removed or changed since    none (dropped; the          -
                       its fire was handed over                           current job's fires stand)
paused                 at hand-over or at decide: the job is paused       skipped ``paused``          due (+ takeover as follower)
resumed                at decide: a fire handed over paused, job active   dispatched                  at once
misfire grace          now > nominal + ``misfire_grace_time``: at         missed (``late`` or         at once
                       hand-over, at decide, on a retry after Redis       ``Redis unavailable...``)
                       came back
catch-up               restart: fires since the job's last recorded fire  missed (at most              at once
                       that are past grace (the rest are handed over)     MAX_CATCH_UP_RECORDS, then
                                                                          the grid resumes at the
                                                                          grace horizon)
coalesce               ``coalesce: true`` and more than one fire of the   the newest dispatched,      at once
                       job overdue (nominal <= now) together: at          the others coalesced
                       hand-over, or when decided (look-ahead,            ``coalesced into <newest>``
                       retry, takeover, catch-up, after a stall)
overdue at the last    ``coalesce: true``, and the fire was due (+ its    coalesced into that         at once
catch-up               jitter) already when this replica decided the      catch-up
                       job's last catch-up (a dispatch others coalesced
                       into, or one decided once Redis came back): it
                       came late, e.g. a backup promoted as Redis came
                       back
jitter                 ``jitter`` > 0                                     -                           + 0..jitter s, derived from
                                                                                                      (job, nominal): every replica
                                                                                                      waits the same
backup                 this replica follows                               checked first: decided by   + ``takeover_s``
                                                                          the leader already?
promote                a follower becomes the leader                      -                           min(held release, due + jitter)
manual                 operator ``trigger`` (``--force``: overlap allow)  dispatched, trigger manual  now
backfill               ``backfill`` of [from, to]: each nominal fire      dispatched, trigger         now (``allow``), or each when
                       not decided yet; overlap allow; even when paused   backfill                    the previous one finished
release grid           every release                                      -                           rounded up to 5 ms
audit                  dispatched, not started after the visibility       its message in neither its  at the audit (leader, every
                       timeout + ``SCHEDULER_AUDIT_MARGIN_S``, or its     queue nor unacked: before   ``SCHEDULER_AUDIT_INTERVAL_S``)
                       message's expiry + the margin if sooner            its expiry published again
                       (:func:`next_audit`), its message nowhere          (same task id), at most
                                                                          AUDIT_REPUBLISH_MAX times;
                                                                          then ``lost``
=====================  =================================================  ==========================  ============================

Rules apply in the table's order: a fire past its grace is missed and never coalesced; only
fires still to be dispatched coalesce. Whatever path a fire took, a job's fires are decided in
the order of their nominal times.

Jobs changed at runtime (:func:`edit_kind`, :func:`refusal`, :func:`id_conflicts`):

=========================  ==============================================================
Change                     Effect
=========================  ==============================================================
edit, same trigger         ``values``: the grid stays; the next fire carries the new values
edit of the trigger        ``trigger``: the new grid starts at its first fire after the
(cron/interval/date, zone, edit; no catch-up of the old schedule
start/end, enabled)
create, start in the past  first fire after now; nothing replayed
delete, then create        a new job: no catch-up from the deleted one's last fire
resume                     no catch-up: the paused fires were recorded skipped
API edit/delete of a file  refused, naming the file (or ``code``); pause, resume, trigger
or code job                and backfill are allowed
one id in a file and API   the file's job is refused (logged, naming both); the API job runs
=========================  ==============================================================
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from scheduler.fires import BACKFILL, MANUAL, SCHEDULE, Fire
from shared.fleet import Outcome

if TYPE_CHECKING:
    from scheduler.specs import JobSpec

RELEASE_TICK_S = 0.005
"""Fires are released on a 5 ms grid (rounded up, never early): at 1,000 fires a second spread
over the second, one decide call and one timer per 5 fires instead of per fire."""
MAX_CATCH_UP_RECORDS = 1000
"""A per-second job down for a day has 86,400 missed fires; past this many the first are
recorded one by one and the grid resumes at the grace horizon."""
PAUSED = "paused"
MISSED_WHILE_DOWN = "due while no scheduler was running, past its misfire grace"
REDIS_CAME_BACK_LATE = "Redis unavailable until past its grace"

_COALESCING = (Outcome.DISPATCHED, Outcome.COALESCED)
JobState = Callable[["JobSpec"], str]
"""``active``, ``paused`` or ``gone`` for a job as it was handed over (see
:meth:`scheduler.manager.SchedulerManager.job_state`)."""


def release_tick(release_ts: float) -> float:
    """``release_ts`` rounded up to the release grid."""
    return math.ceil(release_ts / RELEASE_TICK_S) * RELEASE_TICK_S


def deadline_of(job: JobSpec, scheduled_at: datetime) -> datetime | None:
    """After this a fire is too late to run (None: no limit)."""
    grace = job.misfire_grace_time
    return None if grace is None else scheduled_at + timedelta(seconds=grace)


AUDIT_REPUBLISH_MAX = 3
"""Copies of one fire the dispatch audit publishes again; a fire whose message is still nowhere
after that (eaten each time by a consumer that never reports, e.g. not a chronoq worker) is
recorded lost, as one past its expiry is."""


@dataclass(frozen=True, slots=True)
class AuditVerdict:
    """What becomes of a dispatched fire whose message the audit found nowhere: ``republish``
    (its ``copy``-th copy) or ``lost`` (with ``reason``)."""

    action: str
    reason: str = ""
    copy: int = 0


def message_expiry(job: JobSpec, scheduled_at: datetime, dispatched_at: datetime) -> datetime | None:
    """When the message of a fire dispatched at ``dispatched_at`` expires (a worker revokes it
    unrun after this): the job's ``expires``, else its misfire grace, from the nominal time, and
    at least a second after its dispatch (as :meth:`scheduler.fires.Fire.expires_s`). None: never."""
    expires = job.expires if job.expires is not None else job.misfire_grace_time
    if expires is None:
        return None
    return max(scheduled_at + timedelta(seconds=expires), dispatched_at + timedelta(seconds=1))


def next_audit(now: datetime, expiry: datetime | None, after_s: float, margin_s: float) -> datetime:
    """When the dispatch audit looks at a fire (again) published ``now``: ``after_s`` later (the
    visibility timeout plus its margin), or at its message's expiry (at least a second away) plus
    ``margin_s`` if that comes first (``audit_due`` in ``shared/lua/common.lua``, for a dispatch)."""
    due = now + timedelta(seconds=after_s)
    if expiry is None:
        return due
    return min(due, max(expiry, now + timedelta(seconds=1)) + timedelta(seconds=margin_s))


def plan_audit(
    job: JobSpec, scheduled_at: datetime, dispatched_at: datetime, copies: int, now: datetime
) -> AuditVerdict:
    """A dispatched fire whose run has not started and whose message is in neither its queue nor
    kombu's unacked hash (``copies``: copies published again already). Before its message's
    expiry, and fewer than :data:`AUDIT_REPUBLISH_MAX` copies so far, it is published again
    (workers run a fire once whatever the copies); otherwise it is lost: a copy would be revoked
    as expired, or would be eaten like the others."""
    expiry = message_expiry(job, scheduled_at, dispatched_at)
    if expiry is not None and now >= expiry:
        late = (now - expiry).total_seconds()
        return AuditVerdict("lost", f"its message was in neither its queue nor unacked, {late:.0f}s past its expiry")
    if copies >= AUDIT_REPUBLISH_MAX:
        return AuditVerdict("lost", f"its message was in neither its queue nor unacked after {copies} copies")
    return AuditVerdict("republish", copy=copies + 1)


def jitter_of(job: JobSpec, scheduled_at: datetime) -> float:
    """The fire's dispatch delay in 0..jitter s: pseudo-random per fire, the same on every replica."""
    if not job.jitter:
        return 0.0
    digest = hashlib.blake2b(f"{job.id}|{scheduled_at.isoformat()}".encode(), digest_size=8).digest()
    return job.jitter * int.from_bytes(digest) / 2**64


def _late(job: JobSpec, at_ts: float, now_ts: float) -> str:
    return f"{now_ts - at_ts:.1f}s late, grace {job.misfire_grace_time}s"


def _coalesced_into(newest: Fire) -> str:
    return f"coalesced into {newest.stamp}"


def plan_due(
    job: JobSpec,
    run_times: Sequence[datetime],
    now: datetime,
    *,
    leader: bool = True,
    takeover_s: float = 0.0,
    paused: bool = False,
) -> list[Fire]:
    """Fires of ``job`` handed over (due, or due within the look-ahead), each with its outcome
    so far and its release time. ``run_times`` are nominal times in order."""
    now_ts = now.timestamp()
    backup = not leader
    delay_s = takeover_s if backup else 0.0
    if paused:
        return [
            Fire(job, at, Outcome.SKIPPED, PAUSED, backup=backup, release_ts=release_tick(at.timestamp() + delay_s))
            for at in run_times
        ]
    fires: list[Fire] = []
    grace = job.misfire_grace_time
    due: list[datetime] = []
    for at in run_times:
        at_ts = at.timestamp()
        if grace is not None and now_ts > at_ts + grace:
            fires.append(Fire(job, at, Outcome.MISSED, _late(job, at_ts, now_ts), release_ts=now_ts))
        else:
            due.append(at)
    # Only fires already due coalesce: one handed over ahead of its time is not late.
    overdue = [at for at in due if at <= now]
    catch_up = None
    if job.coalesce and len(overdue) > 1:
        catch_up = overdue[-1]
        into = _coalesced_into(Fire(job, catch_up))
        for at in overdue[:-1]:
            fires.append(Fire(job, at, Outcome.COALESCED, into, release_ts=now_ts))
        due = due[len(overdue) - 1 :]
    for at in due:
        release_ts = release_tick(at.timestamp() + jitter_of(job, at) + delay_s)
        fires.append(Fire(job, at, backup=backup, release_ts=release_ts, catch_up=at == catch_up))
    return fires


def plan_missed(job: JobSpec, times: Sequence[datetime], reason: str, now: datetime) -> list[Fire]:
    """Fires recorded missed at once (a restart's catch-up past the grace)."""
    now_ts = now.timestamp()
    return [Fire(job, at, Outcome.MISSED, reason, release_ts=now_ts) for at in times]


def plan_manual(job: JobSpec, now: datetime, *, force: bool = False) -> Fire:
    """An operator's ``trigger``: one fire now, dispatched unless the overlap policy says no
    (``force``: it ignores the policy)."""
    return Fire(job, now, trigger=MANUAL, force=force, release_ts=now.timestamp())


def plan_backfill(
    job: JobSpec, times: Sequence[datetime], decided: Sequence[bool], now: datetime, *, sequential: bool
) -> tuple[list[Fire], list[Fire]]:
    """A backfill's fires: those of ``times`` not ``decided`` yet (the ledger's answer, one per
    time), in nominal order, as (to dispatch now, to dispatch one after another later). Every
    fire ignores the overlap policy (overlap ``allow``) and the pause."""
    fires = [
        Fire(job, at, trigger=BACKFILL, force=True, release_ts=now.timestamp())
        for at, done in zip(times, decided, strict=True)
        if not done
    ]
    return (fires[:1], fires[1:]) if sequential else (fires, [])


def backfill_problem(count: int, start: datetime, end: datetime, now: datetime, limit: int) -> str | None:
    """Why a backfill of ``count`` nominal fires in [start, end] is refused, or None."""
    if end < start:
        return f"--to {end.isoformat()} is before --from {start.isoformat()}"
    if end > now:
        return f"--to {end.isoformat()} is in the future; a backfill covers past fires only"
    if count > limit:
        return (
            f"the range holds more than {limit} fires (SCHEDULER_BACKFILL_MAX_FIRES); "
            "split it into smaller ranges, nothing was dispatched"
        )
    return None


TRIGGER_FIELDS = ("cron", "interval_s", "date", "timezone", "start_date", "end_date", "enabled")
"""The spec fields that make a job's grid; any other change keeps it."""


def edit_kind(old: JobSpec, new: JobSpec) -> str:
    """``unchanged``, ``values`` (the grid stays) or ``trigger`` (a new grid, no catch-up)."""
    if old == new:
        return "unchanged"
    same_grid = all(getattr(old, name) == getattr(new, name) for name in TRIGGER_FIELDS)
    return "values" if same_grid else "trigger"


OWNER_ACTIONS = frozenset({"pause", "resume", "trigger", "backfill"})
"""What the API may do to a job owned by a job file or code."""


def refusal(action: str, source: str) -> str | None:
    """Why ``action`` through the API on a job of ``source`` (``JobSpec.source``: a path,
    ``code`` or ``api``) is refused, naming the owner; None when allowed."""
    if source == "api" or action in OWNER_ACTIONS:
        return None
    if source == "code":
        return f"is declared in code (TASK_MODULES); {action} it there, not through the API"
    return f"belongs to job file {source}; {action} it in that file, not through the API"


def id_conflicts(specs: Sequence[JobSpec], api_jobs: dict[str, str]) -> tuple[list[JobSpec], list[str]]:
    """File and code jobs whose id an API job (id -> who created it) already uses are refused:
    (the specs kept, one line per refused job naming both sources)."""
    kept, problems = [], []
    for spec in specs:
        if spec.source != "api" and spec.id in api_jobs:
            problems.append(
                f"{spec.source}: job {spec.id!r}: id is already used by an API job ({api_jobs[spec.id]}); "
                "rename one of them (the API job keeps running)"
            )
        else:
            kept.append(spec)
    return kept, problems


def promoted_release(fire: Fire, held_release_ts: float) -> float:
    """When a fire held as a backup is decided once this replica leads: its own due time (still
    checked first, in case the old leader decided it before it left)."""
    return min(release_tick(fire.scheduled_at.timestamp() + jitter_of(fire.job, fire.scheduled_at)), held_release_ts)


@dataclass(frozen=True, slots=True)
class CatchUp:
    missed: list[datetime]
    """Fires past their grace while no scheduler ran, recorded missed."""
    first: datetime | None
    """The first fire to hand APScheduler (None: the job has no fire left)."""
    truncated: bool
    """More than MAX_CATCH_UP_RECORDS were missed; the grid resumed at the grace horizon."""


def plan_catch_up(
    job: JobSpec,
    last: datetime,
    now: datetime,
    next_fire: Callable[[datetime | None, datetime], datetime | None],
) -> CatchUp:
    """A job re-registered at start resumes its grid after ``last`` (its last recorded fire):
    ``next_fire`` is the trigger's ``get_next_fire_time``. Fires within the grace are left to
    the hand-over (and coalesce there); older ones are missed."""
    grace = job.misfire_grace_time
    horizon = None if grace is None else now - timedelta(seconds=grace)
    missed: list[datetime] = []
    fire = next_fire(last, now)
    while fire is not None and horizon is not None and fire < horizon and len(missed) < MAX_CATCH_UP_RECORDS:
        missed.append(fire)
        fire = next_fire(fire, now)
    if fire is not None and horizon is not None and fire < horizon:
        return CatchUp(missed, next_fire(None, horizon), truncated=True)  # resume at the grace horizon
    return CatchUp(missed, fire, truncated=False)


@dataclass(frozen=True, slots=True)
class LastDispatch:
    """A job's newest catch-up this replica dispatched (``Fire.catch_up``), and when it decided it."""

    scheduled_at: datetime
    decided_ts: float
    stamp: str


def replan(
    fires: list[Fire],
    now: datetime,
    job_state: JobState | None = None,
    *,
    late_reason: str | None = None,
    dispatched: Mapping[str, LastDispatch] | None = None,
) -> list[Fire]:
    """The fires about to be decided, as they stand ``now``: the job's current state (gone,
    paused, resumed), the misfire grace, and coalescing of a job's fires that are overdue
    together (after a stall, a Redis outage, a takeover), or that were overdue already when
    the job's last catch-up (``dispatched``, by job id) was decided. Returns the fires to
    decide, each job's in nominal order; changed fires are changed in place, and each fire
    that others coalesced into, or (``late_reason`` given: a retry once Redis came back) that
    is still to be dispatched, is marked ``catch_up``. ``late_reason`` names why a fire is
    past its grace (default: how late it is)."""
    now_ts = now.timestamp()
    kept: list[Fire] = []
    seen: set[str] = set()
    repeated = False
    for fire in fires:
        if job_state is not None and fire.trigger == SCHEDULE:
            state = _with_state(fire, job_state)
            if state is None:
                continue
        if fire.outcome in _COALESCING:  # undecided: past its grace it is missed, coalesced or not
            grace = fire.job.misfire_grace_time
            if grace is not None:
                at_ts = fire.scheduled_at.timestamp()
                if now_ts > at_ts + grace:
                    fire.becomes(Outcome.MISSED, late_reason or _late(fire.job, at_ts, now_ts))
        if late_reason is not None and fire.outcome is Outcome.DISPATCHED:
            fire.catch_up = True
        job_id = fire.job.id
        if job_id in seen:
            repeated = True
        else:
            seen.add(job_id)
        kept.append(fire)
    planned = _coalesce(kept, now) if repeated else kept
    return _into_last_dispatch(planned, dispatched) if dispatched else planned


def _into_last_dispatch(fires: list[Fire], dispatched: Mapping[str, LastDispatch]) -> list[Fire]:
    """A coalescing job's fire still to be dispatched that was due before its last catch-up was
    decided is coalesced into that catch-up, with every fire coalesced into it here: the
    backlog it belongs to has run once already."""
    moved: dict[str, str] = {}
    for fire in fires:
        last, at = dispatched.get(fire.job.id), fire.scheduled_at
        if last is None or fire.outcome is not Outcome.DISPATCHED or fire.trigger != SCHEDULE:
            continue
        if fire.job.coalesce and last.scheduled_at < at and at.timestamp() + jitter_of(fire.job, at) <= last.decided_ts:
            moved[_coalesced_into(fire)] = reason = f"coalesced into {last.stamp}"
            fire.becomes(Outcome.COALESCED, reason)
    for fire in fires if moved else ():
        if fire.outcome is Outcome.COALESCED and fire.reason in moved:
            fire.becomes(Outcome.COALESCED, moved[fire.reason])
    return fires


def _with_state(fire: Fire, job_state: JobState) -> Fire | None:
    paused_skip = fire.outcome is Outcome.SKIPPED and fire.reason == PAUSED
    if fire.outcome is not Outcome.DISPATCHED and not paused_skip:
        return fire
    state = job_state(fire.job)
    if state == "gone":
        return None
    if state == "paused" and not paused_skip:
        fire.becomes(Outcome.SKIPPED, PAUSED)
    elif state == "active" and paused_skip:
        fire.becomes(Outcome.DISPATCHED, "")
    return fire


def _coalesce(fires: list[Fire], now: datetime) -> list[Fire]:
    """Of each coalescing job's fires still to be dispatched and overdue, only the newest is;
    the older ones are coalesced into it, including fires an earlier plan coalesced into a fire
    that is not decided yet either (a retry's). Each job's fires end up in nominal order."""
    first_seen: dict[str, int] = {}
    overdue: dict[str, list[Fire]] = {}
    for index, fire in enumerate(fires):
        job = fire.job
        first_seen.setdefault(job.id, index)
        if job.coalesce and fire.outcome in _COALESCING and fire.trigger == SCHEDULE and fire.scheduled_at <= now:
            overdue.setdefault(job.id, []).append(fire)
    for group in overdue.values():
        newest = max((f for f in group if f.outcome is Outcome.DISPATCHED), key=_nominal, default=None)
        if newest is None or len(group) == 1:
            continue
        newest.catch_up = True
        reason = _coalesced_into(newest)
        for fire in group:
            if fire.scheduled_at < newest.scheduled_at and (
                fire.outcome is not Outcome.COALESCED or fire.reason != reason
            ):
                fire.becomes(Outcome.COALESCED, reason)
    return sorted(fires, key=lambda fire: (first_seen[fire.job.id], fire.scheduled_at))


def _nominal(fire: Fire) -> datetime:
    return fire.scheduled_at
