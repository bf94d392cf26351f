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

Times are Redis's own clock (``TIME``), so hosts with skewed clocks still agree. The scripts
name keys outside ``KEYS`` only for a buffered fire's hash, built from the prefix: chronoq's
state and the broker lists must live on one Redis server and database (not a Redis Cluster).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis
import redis.asyncio

from shared.names import RedisKeys


class Outcome(StrEnum):
    """How a fire ended. The scheduler decides the first four; workers add the rest."""

    DISPATCHED = "dispatched"
    COALESCED = "coalesced"
    SKIPPED = "skipped"
    MISSED = "missed"
    BUFFERED = "buffered"  # waiting for a slot; becomes dispatched or missed
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RETRIED = "retried"
    EXPIRED = "expired"


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


# Shared Lua: dispatch the job's buffered fire if a slot is free (or record it missed if it
# waited past its grace). Expects locals: prefix, job_id, inflight, buffer, buffered, counters,
# job_counters, last_fire, now_ms, fire_ttl.
_RELEASE_BUFFER = """
local function release_buffer(prefix, job_id, inflight, buffer, buffered, counters, job_counters, last_fire, now_ms, fire_ttl)
  redis.call('ZREMRANGEBYSCORE', inflight, '-inf', now_ms)
  if redis.call('EXISTS', buffer) == 0 then
    redis.call('SREM', buffered, job_id)
    return 0
  end
  local b = redis.call('HGETALL', buffer)
  local f = {}
  for i = 1, #b, 2 do f[b[i]] = b[i + 1] end
  local fire = prefix .. 'fire:' .. job_id .. ':' .. f['scheduled_at']
  local deadline = tonumber(f['deadline_ms'])
  if deadline > 0 and now_ms > deadline then
    redis.call('DEL', buffer)
    redis.call('SREM', buffered, job_id)
    redis.call('HSET', fire, 'outcome', 'missed', 'reason', 'waited past its grace for a free slot', 'decided_ms', now_ms)
    redis.call('HINCRBY', counters, 'missed', 1)
    redis.call('HINCRBY', job_counters, 'missed', 1)
    return -1
  end
  if redis.call('ZCARD', inflight) >= tonumber(f['max_instances']) then return 0 end
  redis.call('DEL', buffer)
  redis.call('SREM', buffered, job_id)
  redis.call('ZADD', inflight, now_ms + tonumber(f['slot_lapse_ms']), f['task_id'])
  redis.call('LPUSH', f['list_key'], f['payload'])
  redis.call('HSET', fire, 'outcome', 'dispatched', 'reason', 'buffered until a slot freed', 'dispatched_ms', now_ms)
  redis.call('EXPIRE', fire, fire_ttl)
  redis.call('HSET', last_fire, job_id, cjson.encode({scheduled_at = f['scheduled_at'], dispatched_ms = now_ms, task_id = f['task_id']}))
  redis.call('HINCRBY', counters, 'dispatched', 1)
  redis.call('HINCRBY', job_counters, 'dispatched', 1)
  return 1
end
"""

_NOW = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: counters, last_fire, buffered. ARGV: prefix, history_limit, fire_ttl_s, owner, then per
# fire two values: its fields joined by \x1f (see FireLedger.decide) and its payload. The
# per-fire keys are built here from the prefix, as RedisKeys builds them: two arguments per fire
# instead of seventeen, which is most of what a 500-fire call costs the client to send.
_DECIDE = (
    _NOW
    + """
local function fields(s)
  local t, start = {}, 1
  while true do
    local stop = string.find(s, '\\31', start, true)
    if not stop then t[#t + 1] = string.sub(s, start); return t end
    t[#t + 1] = string.sub(s, start, stop - 1)
    start = stop + 1
  end
end
local prefix, limit, fire_ttl, owner = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local counters, last_fire, buffered = KEYS[1], KEYS[2], KEYS[3]
local out, last, totals = {}, {}, {}
local n = (#ARGV - 4) / 2
for i = 0, n - 1 do
  local f = fields(ARGV[5 + 2*i])
  local payload = ARGV[6 + 2*i]
  local scheduled_at, job_id, task_id, outcome, reason = f[1], f[2], f[3], f[4], f[5]
  local trigger, max_instances, overlap = f[6], tonumber(f[7]), f[8]
  local lapse, deadline, list_key = tonumber(f[9]), f[10], f[11]
  local fire = prefix .. 'fire:' .. job_id .. ':' .. scheduled_at
  local history, job_counters = prefix .. 'history:' .. job_id, prefix .. 'counters:job:' .. job_id
  local inflight, buffer = prefix .. 'inflight:' .. job_id, prefix .. 'buffer:' .. job_id
  if redis.call('EXISTS', fire) == 1 then
    out[i + 1] = 'decided'
  else
    if outcome == 'dispatched' then
      redis.call('ZREMRANGEBYSCORE', inflight, '-inf', now_ms)
      if overlap ~= 'allow' and redis.call('ZCARD', inflight) >= max_instances then
        if overlap == 'buffer_one' and redis.call('EXISTS', buffer) == 0 then
          redis.call('HSET', buffer, 'task_id', task_id, 'scheduled_at', scheduled_at, 'list_key', list_key,
                     'payload', payload, 'slot_lapse_ms', lapse, 'deadline_ms', deadline, 'max_instances', max_instances)
          redis.call('SADD', buffered, job_id)
          outcome, reason = 'buffered', 'waiting for one of ' .. max_instances .. ' slots'
        else
          outcome = 'skipped'
          reason = 'overlap: ' .. max_instances .. ' already queued or running'
          if overlap == 'buffer_one' then reason = reason .. ', one already waiting' end
        end
      end
    end
    if outcome == 'dispatched' then
      redis.call('ZADD', inflight, now_ms + lapse, task_id)
      redis.call('LPUSH', list_key, payload)
      last[#last + 1] = job_id
      last[#last + 1] = '{"scheduled_at":"' .. scheduled_at .. '","dispatched_ms":' .. now_ms .. ',"task_id":"' .. task_id .. '"}'
      redis.call('HSET', fire, 'outcome', outcome, 'reason', reason, 'task_id', task_id, 'scheduled_at', scheduled_at,
                 'job_id', job_id, 'decided_ms', now_ms, 'owner', owner, 'trigger', trigger, 'dispatched_ms', now_ms)
    else
      redis.call('HSET', fire, 'outcome', outcome, 'reason', reason, 'task_id', task_id, 'scheduled_at', scheduled_at,
                 'job_id', job_id, 'decided_ms', now_ms, 'owner', owner, 'trigger', trigger)
    end
    redis.call('EXPIRE', fire, fire_ttl)
    if redis.call('LPUSH', history, scheduled_at) > limit then
      redis.call('LTRIM', history, 0, limit - 1)
    end
    if outcome ~= 'buffered' then
      totals[outcome] = (totals[outcome] or 0) + 1
      redis.call('HINCRBY', job_counters, outcome, 1)
    end
    out[i + 1] = outcome
  end
end
-- In slices: unpack() is bounded by Lua's C stack. A job fired twice in a batch keeps its
-- later fire, as with one HSET per fire.
for first = 1, #last, 1000 do
  redis.call('HSET', last_fire, unpack(last, first, math.min(first + 999, #last)))
end
for outcome, count in pairs(totals) do
  redis.call('HINCRBY', counters, outcome, count)
end
return out
"""
)

# KEYS: counters, last_fire, buffered, then per job: inflight, buffer, job_counters. ARGV: prefix,
# fire_ttl_s, then the job ids.
_RELEASE = (
    _RELEASE_BUFFER
    + _NOW
    + """
local out = {}
for i = 1, #ARGV - 2 do
  local job_id = ARGV[i + 2]
  out[i] = release_buffer(ARGV[1], job_id, KEYS[3 + 3*(i-1) + 1], KEYS[3 + 3*(i-1) + 2], KEYS[3], KEYS[1],
                          KEYS[3 + 3*(i-1) + 3], KEYS[2], now_ms, tonumber(ARGV[2]))
end
return out
"""
)

# KEYS: fire, inflight. ARGV: task_id, runner (host:pid), lease_ms, force (1 = take over),
# fire_ttl_s, retries (the delivery's retry count).
# Returns {'run', '', 0, attempt}, {'done', '', 0, 0} or {'busy', holder, lease_left_ms, 0}.
# A delivery with more retries than the running attempt is the retry that attempt just
# published (Celery publishes it before the attempt reports 'retried'): it takes over.
_START = (
    _NOW
    + """
local fire, inflight = KEYS[1], KEYS[2]
local f = redis.call('HMGET', fire, 'run', 'run_lease_ms', 'runner', 'run_retries')
if f[1] == 'succeeded' then return {'done', '', 0, 0} end
local lease = tonumber(f[2] or '0')
local held_retries = tonumber(f[4] or '')
local retry_of_holder = held_retries ~= nil and tonumber(ARGV[6]) > held_retries
if f[1] == 'running' and lease > now_ms and ARGV[4] ~= '1' and not retry_of_holder then
  return {'busy', f[3] or '', lease - now_ms, 0}
end
redis.call('HSET', fire, 'run', 'running', 'runner', ARGV[2], 'started_ms', now_ms,
           'run_lease_ms', now_ms + tonumber(ARGV[3]), 'run_retries', ARGV[6])
local attempt = redis.call('HINCRBY', fire, 'attempts', 1)
redis.call('EXPIRE', fire, tonumber(ARGV[5]))
redis.call('ZADD', inflight, now_ms + tonumber(ARGV[3]), ARGV[1])
return {'run', '', 0, attempt}
"""
)

# KEYS: fire, inflight, buffer, buffered, counters, job_counters, last_fire.
# ARGV: task_id, outcome, error, worker, prefix, job_id, fire_ttl_s, runner, attempt,
# retry_lapse_ms. Returns {'applied', ''} or {'stale', '<run> by <runner>'}.
#
# A report from an attempt (runner set) applies only while that attempt holds the fire: run is
# 'running', runner is its own and, if attempt > 0, so is the attempt number. A late report of
# an attempt whose lease lapsed and was taken over must neither overwrite the newer attempt's
# outcome nor free the slot it holds. A report about a message that never started (runner '':
# revoked or expired before it ran) applies only if no attempt ran yet, the last one asked
# for a retry, or the running one's lease lapsed; it records no duration (duration_ms stays
# the last attempt that ran, if any).
_FINISH = (
    _RELEASE_BUFFER
    + _NOW
    + """
local fire, inflight = KEYS[1], KEYS[2]
local outcome, runner, attempt = ARGV[2], ARGV[8], tonumber(ARGV[9])
local f = redis.call('HMGET', fire, 'run', 'runner', 'attempts', 'run_lease_ms', 'started_ms')
local run = f[1]
local current = (run or 'not started') .. ' by ' .. (f[2] or '-')
if runner == '' then
  local lapsed = run == 'running' and tonumber(f[4] or '0') <= now_ms
  if run and run ~= 'retried' and not lapsed then return {'stale', current} end
elseif run ~= 'running' or f[2] ~= runner or (attempt > 0 and tonumber(f[3] or '0') ~= attempt) then
  return {'stale', current}
end
redis.call('HSET', fire, 'run', outcome, 'finished_ms', now_ms, 'error', ARGV[3])
if runner ~= '' and f[5] then redis.call('HSET', fire, 'duration_ms', now_ms - tonumber(f[5])) end
if ARGV[4] ~= '' then redis.call('HSET', fire, 'worker', ARGV[4]) end
redis.call('HDEL', fire, 'run_lease_ms')
redis.call('EXPIRE', fire, tonumber(ARGV[7]))
redis.call('HINCRBY', KEYS[5], outcome, 1)
redis.call('HINCRBY', KEYS[6], outcome, 1)
if outcome == 'retried' then
  -- The retry keeps the slot: until it is due and has run, then it lapses on its own.
  if tonumber(ARGV[10]) > 0 then redis.call('ZADD', inflight, now_ms + tonumber(ARGV[10]), ARGV[1]) end
else
  redis.call('ZREM', inflight, ARGV[1])
  release_buffer(ARGV[5], ARGV[6], inflight, KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], now_ms, tonumber(ARGV[7]))
end
return {'applied', ''}
"""
)


# KEYS: fire, inflight. ARGV: task_id, runner, attempt, lease_ms. Returns 1 if the attempt still
# holds the fire (its run lease and its slot now end lease_ms from now), else 0 (nothing written).
_RENEW = (
    _NOW
    + """
local f = redis.call('HMGET', KEYS[1], 'run', 'runner', 'attempts')
if f[1] ~= 'running' or f[2] ~= ARGV[2] or tonumber(f[3] or '0') ~= tonumber(ARGV[3]) then return 0 end
local until_ms = now_ms + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'run_lease_ms', until_ms)
redis.call('ZADD', KEYS[2], until_ms, ARGV[1])
return 1
"""
)


# KEYS: fire hashes. Returns 1 for each that exists (the fire is decided), else 0.
_DECIDED = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('EXISTS', key) end
return out
"""


class FireLedger:
    """The scripts above, bound to one key prefix. ``client`` may be sync or asyncio redis;
    each method returns what the client returns (a value or an awaitable)."""

    def __init__(
        self,
        client: redis.Redis | redis.asyncio.Redis,
        keys: RedisKeys,
        *,
        fire_ttl_s: int = 7 * 86400,
        history_limit: int = 100,
    ) -> None:
        self.keys = keys
        self.fire_ttl_s = fire_ttl_s
        self.history_limit = history_limit
        self._decide = client.register_script(_DECIDE)
        self._release = client.register_script(_RELEASE)
        self._start = client.register_script(_START)
        self._finish = client.register_script(_FINISH)
        self._decided = client.register_script(_DECIDED)
        self._renew = client.register_script(_RENEW)

    def decide(self, fires: Sequence[FireIntent], owner: str) -> Any:
        """Decide each fire once, fleet-wide; returns, per fire, the outcome this call decided
        (dispatched, coalesced, skipped, missed, buffered) or ``decided`` if another call had."""
        k = self.keys
        args: list[str | int] = [k.prefix, self.history_limit, self.fire_ttl_s, owner]
        for f in fires:
            args.append(
                f"{f.scheduled_at}\x1f{f.job_id}\x1f{f.task_id}\x1f{f.outcome.value}\x1f{f.reason}\x1f{f.trigger}"
                f"\x1f{f.max_instances}\x1f{f.overlap.value}\x1f{f.slot_lapse_ms}\x1f{f.deadline_ms}\x1f{f.list_key}"
            )
            args.append(f.payload)
        keys = [k.counters, k.last_fire, k.buffered]
        return self._decide(keys=keys, args=args)

    def decided(self, fires: Sequence[tuple[str, str]]) -> Any:
        """For each (job id, scheduled_at): 1 if the fire is decided already, else 0."""
        return self._decided(keys=[self.keys.fire(job_id, at) for job_id, at in fires])

    def release(self, job_ids: Sequence[str]) -> Any:
        """Free lapsed slots and dispatch waiting fires where a slot is free."""
        k = self.keys
        keys = [k.counters, k.last_fire, k.buffered]
        for job_id in job_ids:
            keys += [k.inflight(job_id), k.buffer(job_id), k.job_counters(job_id)]
        return self._release(keys=keys, args=[k.prefix, self.fire_ttl_s, *job_ids])

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
    ) -> Any:
        """Take the run lease of a fire for ``lease_ms``; ``retries`` is the delivery's retry count.

        Returns ``['run', '', 0, attempt]`` (the lease is this delivery's; ``attempt`` numbers it
        for :meth:`finish`), ``['done', '', 0, 0]`` (the fire succeeded already) or
        ``['busy', holder, lease_left_ms, 0]`` (another attempt holds a live lease). ``force``
        takes a live lease over. Refreshes the fire hash's TTL.
        """
        return self._start(
            keys=[self.keys.fire(job_id, scheduled_at), self.keys.inflight(job_id)],
            args=[task_id, runner, lease_ms, "1" if force else "0", self.fire_ttl_s, retries],
        )

    def renew(self, job_id: str, scheduled_at: str, task_id: str, runner: str, attempt: int, lease_ms: int) -> Any:
        """Extend a running attempt's run lease and its slot to ``lease_ms`` from now, while
        ``runner``'s ``attempt`` (as :meth:`start` numbered it) still holds the fire. Returns
        1, or 0 if it no longer does (finished, taken over): then nothing is written."""
        keys = [self.keys.fire(job_id, scheduled_at), self.keys.inflight(job_id)]
        return self._renew(keys=keys, args=[task_id, runner, attempt, lease_ms])

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
        ``['stale', '<run> by <runner>']`` (nothing was written). Refreshes the fire's TTL.
        """
        k = self.keys
        keys = [
            k.fire(job_id, scheduled_at),
            k.inflight(job_id),
            k.buffer(job_id),
            k.buffered,
            k.counters,
            k.job_counters(job_id),
            k.last_fire,
        ]
        args = [task_id, outcome.value, error[:500], worker, k.prefix, job_id, self.fire_ttl_s]
        return self._finish(keys=keys, args=[*args, runner, attempt, retry_lapse_ms])


def fire_view(raw: dict[str, str]) -> dict[str, Any]:
    """A fire hash as shown to operators: the final outcome first, times as epoch ms."""
    view: dict[str, Any] = dict(raw)
    view["final"] = raw.get("run") if raw.get("run") not in (None, "running") else raw.get("outcome")
    if raw.get("run") == "running":
        view["final"] = "running"
    for key in ("decided_ms", "dispatched_ms", "started_ms", "finished_ms", "duration_ms", "attempts"):
        if key in view:
            view[key] = int(view[key])
    return view
