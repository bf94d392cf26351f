"""The state of every fire, shared by scheduler replicas and workers: atomic steps in Redis.

Each step is one Lua script, so what it decides cannot be interleaved with another process:

- **decide** (scheduler replicas, one call per batch): for each fire, the first caller creates
  its ``fire`` hash and so decides its outcome. A fire to dispatch also takes a slot of the
  job's fleet-wide ``max_instances`` and pushes its pre-encoded message onto the broker list
  *in the same script*. That is the fence: a replica that stalled and comes back finds every
  fire it would publish already decided, and cannot publish it again, whatever the clocks say.
- **release** (scheduler sweep): frees lapsed slots and dispatches a waiting ``buffer_one``
  fire when a slot is free.
- **start** / **finish** (workers): a run lease on the fire, so a duplicate delivery of a fire
  that is running or has succeeded is not executed, and the slot and outcome bookkeeping. Only
  the attempt holding the lease records an outcome: a late report of one whose lease lapsed and
  was taken over changes nothing.

**Bounded memory.** A job keeps the records of its last ``history_limit`` fires. Older ones are
*retired* by decide (their hash deleted) once their nominal time is older than the fence window
and nothing still needs them (no live slot: queued, running or retried; not buffered); the
job's fence watermark (``RedisKeys.fence``) then rises to the newest retired fire, and every
fire at or before it counts as decided: it is never published again, and a worker reporting on
it writes nothing. So Redis holds per job ``history_limit`` records plus those of the fence
window, whatever the uptime.

The scripts live in ``shared/lua/*.lua`` (each documents its KEYS and ARGV). Per-job key names
reach them as templates built by :class:`RedisKeys` (``KEY_TEMPLATES``), so the layout is
written once. Times are Redis's own clock (``TIME``), so hosts with skewed clocks still agree.
The scripts build per-job keys themselves: chronoq's state and the broker lists must live on
one Redis server and database (not a Redis Cluster).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio

from shared import lua
from shared.names import RedisKeys

if TYPE_CHECKING:
    from shared.settings import AppSettings


class Outcome(StrEnum):
    """How a fire ended. The scheduler decides the first four (and, through the dispatch audit,
    lost); workers add the rest."""

    DISPATCHED = "dispatched"
    COALESCED = "coalesced"
    SKIPPED = "skipped"
    MISSED = "missed"
    BUFFERED = "buffered"  # waiting for a slot; becomes dispatched or missed
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RETRIED = "retried"
    EXPIRED = "expired"
    LOST = "lost"  # the dispatch audit found its message nowhere, past its expiry (scheduler.audit)


RECOVERY_REASONS = ("queued", "unacked", "reindexed", "republished")
"""What the dispatch audit (scheduler.audit) found of a dispatched fire not started in time, as
``shared/lua/audit.lua`` counts it in the ``counters`` hash (``recovered_<reason>``, once per
fire and reason). A fire it records lost counts as the outcome ``lost``."""


class Overlap(StrEnum):
    """What a fire does when its job already has ``max_instances`` in flight."""

    SKIP = "skip"
    BUFFER_ONE = "buffer_one"
    ALLOW = "allow"


@dataclass(frozen=True, slots=True)
class FireIntent:
    """One fire as a replica wants it decided. ``payload`` is the encoded broker message
    (empty unless ``outcome`` is dispatched)."""

    job_id: str
    scheduled_at: str
    task_id: str
    outcome: Outcome
    reason: str = ""
    trigger: str = "schedule"
    max_instances: int = 1
    overlap: Overlap = Overlap.SKIP
    slot_lapse_ms: int = 0
    """How long a slot is held if no worker reports back (queue wait + time limit + margin)."""
    deadline_ms: int = 0
    """Epoch ms after which a buffered fire is too late (0: no limit)."""
    list_key: str = ""
    payload: str = ""
    expiry_ms: int = 0
    """Epoch ms after which its message expires (a worker revokes it unrun); 0: never. The
    dispatch audit looks at a fire not started by then plus its margin, if that comes first."""


@dataclass(frozen=True, slots=True)
class AuditCheck:
    """One fire for :meth:`FireLedger.audit`: look where its message is (``action`` ""), or, if it
    is nowhere, ``republish`` copy number ``copy`` (``data`` its payload, its slot held
    ``slot_lapse_ms`` more) or record it ``lost`` (``data`` the reason). ``list``: 1-based index
    of its queue list in the call's lists (0: unknown, only unacked is looked at)."""

    job_id: str
    scheduled_at: str
    list: int
    action: str = ""
    copy: int = 0
    slot_lapse_ms: int = 0
    next_ms: int = 0
    """Republish: epoch ms of the audit's next look at the copy."""
    data: str = ""


FIRE_FIELDS = (
    "scheduled_at",
    "job_id",
    "task_id",
    "outcome",
    "reason",
    "trigger",
    "max_instances",
    "overlap",
    "slot_lapse_ms",
    "deadline_ms",
    "list_key",
    "expiry_ms",
)
"""The :class:`FireIntent` fields decide receives per fire, joined by ``\\x1f``, in this order
(``shared/lua/decide.lua`` names them in its header; the payload travels as its own argument)."""

_fire_fields = attrgetter(*FIRE_FIELDS)


def encode_fire(fire: FireIntent) -> str:
    """The fire's :data:`FIRE_FIELDS` as decide reads them."""
    return "\x1f".join(map(str, _fire_fields(fire)))


_JOB, _AT = "\x01", "\x02"
KEY_TEMPLATES: dict[str, Callable[[RedisKeys], str]] = {
    "fire": lambda k: k.fire(_JOB, _AT),
    "history": lambda k: k.history(_JOB),
    "job_counters": lambda k: k.job_counters(_JOB),
    "inflight": lambda k: k.inflight(_JOB),
    "buffer": lambda k: k.buffer(_JOB),
}
"""The per-job keys the scripts build, as ARGV[1] sends them (``shared/lua/common.lua``): each
the key :class:`RedisKeys` names for job id ``\\x01`` and scheduled_at ``\\x02``."""


def key_templates(keys: RedisKeys) -> str:
    """ARGV[1] of every script: :data:`KEY_TEMPLATES` under ``keys``' prefix, ``\\x1f``-joined."""
    return "\x1f".join(template(keys) for template in KEY_TEMPLATES.values())


class FireLedger:
    """The scripts of ``shared/lua``, bound to one key prefix. ``client`` may be sync or asyncio
    redis; each method returns what the client returns (a value or an awaitable).

    ``fence_window_s``: a record beyond the history limit is kept until its fire is this much
    older than now. Fires of one job are decided in order except for jitter and a follower's
    take-over delay, so the window must exceed those: a fire still undecided that long after
    its nominal time, once later fires of its job were retired, would count as decided.
    ``require_record``: a delivery of a fire without a record never runs (:meth:`start`).
    ``audit_after_s`` (the visibility timeout plus ``SCHEDULER_AUDIT_MARGIN_S``) and
    ``audit_margin_s``: when the dispatch audit first looks at a dispatched fire not started
    (``RedisKeys.dispatched``): this long after its dispatch, or its message's expiry plus the
    margin if that comes first.
    """

    def __init__(
        self,
        client: redis.Redis | redis.asyncio.Redis,
        keys: RedisKeys,
        *,
        fire_ttl_s: int = 7 * 86400,
        history_limit: int = 100,
        fence_window_s: float = 300,
        require_record: bool = False,
        audit_after_s: float = 3660,
        audit_margin_s: float = 60,
    ) -> None:
        self.keys = keys
        self.require_record = require_record
        self.fire_ttl_s = fire_ttl_s
        self.history_limit = history_limit
        self.fence_window_ms = int(fence_window_s * 1000)
        self.audit_after_ms, self.audit_margin_ms = int(audit_after_s * 1000), int(audit_margin_s * 1000)
        self._templates = key_templates(keys)
        self._decide = client.register_script(lua.source("decide"))
        self._release = client.register_script(lua.source("release"))
        self._start = client.register_script(lua.source("start"))
        self._finish = client.register_script(lua.source("finish"))
        self._decided = client.register_script(lua.source("decided"))
        self._renew = client.register_script(lua.source("renew"))
        self._streak = client.register_script(lua.source("streak"))
        self._audit = client.register_script(lua.source("audit"))

    def decide(self, fires: Sequence[FireIntent], owner: str) -> Any:
        """Decide each fire once, fleet-wide; returns, per fire, the outcome this call decided
        (dispatched, coalesced, skipped, missed, buffered) or ``decided`` if another call had
        (or the fire is at or before its job's fence watermark)."""
        k = self.keys
        args: list[str | int] = [self._templates, self.history_limit, self.fire_ttl_s, owner, self.fence_window_ms]
        args += [self.audit_after_ms, self.audit_margin_ms]
        for f in fires:
            args.append(encode_fire(f))
            args.append(f.payload)
        return self._decide(keys=[k.counters, k.last_fire, k.buffered, k.fence, k.dispatched], args=args)

    def decided(self, fires: Sequence[tuple[str, str]]) -> Any:
        """For each (job id, scheduled_at): 1 if the fire is decided already, else 0."""
        args = [self._templates]
        for job_id, scheduled_at in fires:
            args += [job_id, scheduled_at]
        return self._decided(keys=[self.keys.fence], args=args)

    def release(self, job_ids: Sequence[str]) -> Any:
        """Free lapsed slots and dispatch waiting fires where a slot is free."""
        k = self.keys
        keys = [k.counters, k.last_fire, k.buffered, k.dispatched]
        return self._release(keys=keys, args=[self._templates, self.fire_ttl_s, *job_ids])

    def start(
        self,
        job_id: str,
        scheduled_at: str,
        task_id: str,
        runner: str,
        lease_ms: int,
        *,
        retries: int = 0,
        force: bool = False,
        token: str = "",
    ) -> Any:
        """Take the run lease of a fire for ``lease_ms``; ``retries`` is the delivery's retry count.

        Returns ``['run', '', 0, attempt]`` (the lease is this delivery's; ``attempt`` numbers it
        for :meth:`finish`), ``['done', '', 0, 0]`` (the fire succeeded already, or its record
        was retired: at or before the job's fence watermark) or ``['busy', holder,
        lease_left_ms, 0]`` (another attempt holds a live lease). ``force`` takes a live lease
        over. ``token`` names this admission: the same call repeated (a lost reply, a write
        ``WAIT`` did not confirm) answers ``run`` with the same attempt. ``['done', outcome, 0, 0]``:
        the fire is recorded coalesced, skipped or missed (or has no record, ``'undecided'``, with
        ``require_record``): its message came from a decision a failover discarded, see start.lua.
        Refreshes the fire hash's TTL.
        """
        args: list[str | int] = [self._templates, job_id, scheduled_at, task_id, runner, lease_ms]
        return self._start(
            keys=[self.keys.fence, self.keys.dispatched],
            args=[*args, "1" if force else "0", self.fire_ttl_s, retries, token, int(self.require_record)],
        )

    def renew(self, job_id: str, scheduled_at: str, task_id: str, runner: str, attempt: int, lease_ms: int) -> Any:
        """Extend a running attempt's run lease and its slot to ``lease_ms`` from now, while
        ``runner``'s ``attempt`` (as :meth:`start` numbered it) still holds the fire. Returns
        1, or 0 if it no longer does (finished, taken over, retired): then nothing is written."""
        keys = [self.keys.fire(job_id, scheduled_at), self.keys.inflight(job_id)]
        return self._renew(keys=keys, args=[self._templates, task_id, runner, attempt, lease_ms])

    def finish(
        self,
        job_id: str,
        scheduled_at: str,
        task_id: str,
        outcome: Outcome,
        error: str = "",
        worker: str = "",
        *,
        runner: str,
        attempt: int = 0,
        retry_lapse_ms: int = 0,
    ) -> Any:
        """Record how an attempt ended; unless it will be retried, free its slot (and dispatch a
        waiting fire). A retried attempt's slot is kept ``retry_lapse_ms`` from now (0: as is).

        ``runner`` is the ``host:pid`` that took the lease (with ``attempt``, the number
        :meth:`start` returned, or 0 for any attempt of that runner); the outcome applies only
        while that attempt still holds the fire. ``runner=""`` reports a message that never
        started (revoked or expired before it ran): it applies only while no attempt is running
        (with a live lease) or has ended other than with a retry. Returns ``['applied', '']`` or
        ``['stale', '<run> by <runner>']`` (nothing was written; ``['stale', 'retired']`` for a
        retired fire). Refreshes the fire's TTL.
        """
        k = self.keys
        keys = [k.counters, k.last_fire, k.buffered, k.fence, k.dispatched]
        args = [self._templates, job_id, scheduled_at, task_id, outcome.value, error[:500], worker, self.fire_ttl_s]
        return self._finish(keys=keys, args=[*args, runner, attempt, retry_lapse_ms])

    def audit(self, checks: Sequence[AuditCheck], lists: Sequence[str], unacked: tuple[str, str], scan_max: int) -> Any:
        """Where each fire's message is, and the checks' actions applied to fires whose message is
        nowhere, in one atomic step (``shared/lua/audit.lua`` has the states). ``lists`` are the
        queue lists :attr:`AuditCheck.list` indexes (from 1); ``unacked`` is kombu's unacked hash
        and index (prefixed). Returns per check ``[state, new, copies, dispatched_ms]``."""
        k = self.keys
        args: list[str | int] = [self._templates, scan_max, self.audit_after_ms]
        for c in checks:
            args += [c.job_id, c.scheduled_at, c.list, c.action, c.copy, c.slot_lapse_ms, c.next_ms, c.data]
        return self._audit(keys=[k.dispatched, k.counters, *unacked, *lists], args=args)

    def streak(self, job_id: str, scheduled_at: str, outcome: Outcome, error: str = "", by: str = "") -> Any:
        """Count a finally failed fire towards the job's ``pause_after_failures`` (a success
        resets the count); past the threshold the job is paused fleet-wide with an audit note
        naming the last error and fire. Returns [count, 1 if this call paused it]."""
        k = self.keys
        args = [job_id, scheduled_at, outcome.value, error[:300], 1000, by]
        return self._streak(keys=[k.fail_streak, k.jobs, k.paused, k.audit], args=args)


def scheduler_ledger(client: redis.Redis | redis.asyncio.Redis, settings: AppSettings) -> FireLedger:
    """The ledger a scheduler replica (or an operator's trigger) decides fires with: history,
    fence window and the dispatch audit's timing from ``settings``."""
    sched = settings.scheduler
    return FireLedger(
        client,
        RedisKeys(settings.redis.key_prefix),
        history_limit=sched.history_limit,
        fence_window_s=sched.fence_window_s,
        audit_after_s=settings.celery.visibility_timeout_s + sched.audit_margin_s,
        audit_margin_s=sched.audit_margin_s,
    )
