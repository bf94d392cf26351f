"""What outlives a scheduler process, kept in Redis under the key prefix (JSON values only).

- the last dispatched fire of each job (restart catch-up starts from it);
- one claim per (job, nominal fire time), so a fire is published once even across a restart
  (and, later, across replicas): ``pending:<owner>`` while publishing, ``done:<task id>`` after;
- counters per outcome, overall and per job, and a bounded run history per job.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import redis.asyncio

from shared.names import RedisKeys, format_scheduled_at


class Outcome(StrEnum):
    """How one nominal fire ended. Every fire ends as exactly one of these."""

    DISPATCHED = "dispatched"
    COALESCED = "coalesced"
    SKIPPED = "skipped"
    MISSED = "missed"


class ClaimResult(StrEnum):
    CLAIMED = "claimed"
    DONE = "done"  # already published (by us before a restart, or by someone else)
    BUSY = "busy"  # another owner is publishing it right now


@dataclass(frozen=True, slots=True)
class FireRecord:
    """One fire's outcome, as kept in the history and the logs."""

    job_id: str
    scheduled_at: str
    outcome: Outcome
    recorded_at: str
    task_id: str | None = None
    reason: str | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "job_id": self.job_id,
                "scheduled_at": self.scheduled_at,
                "outcome": self.outcome.value,
                "recorded_at": self.recorded_at,
                "task_id": self.task_id,
                "reason": self.reason,
            },
            separators=(",", ":"),
        )


# Claim each fire in KEYS: 1 = claimed, 0 = already done, -1 = someone else is publishing it.
# One call per batch: the client cost of a Redis command dwarfs the server's, so a burst of
# 10,000 fires must not become 10,000 commands.
_CLAIM = """
local out = {}
for i, key in ipairs(KEYS) do
  local current = redis.call('GET', key)
  if not current then
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
    out[i] = 1
  elseif string.sub(current, 1, 5) == 'done:' then
    out[i] = 0
  elseif current == ARGV[1] then
    out[i] = 1
  else
    out[i] = -1
  end
end
return out
"""

# Drop our own pending claims after a failed publish so a retry (or another owner) can take them.
_RELEASE = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
return 0
"""

# Record a batch of outcomes. KEYS: last_fire hash, counters hash, then per record its claim,
# job-counters and history keys. ARGV: history limit, done TTL, then per record
# outcome, job id, task id, the last-fire JSON (dispatched only) and the history JSON.
_RECORD = """
local limit, done_ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
local n = (#KEYS - 2) / 3
for i = 0, n - 1 do
  local claim, job_counters, history = KEYS[3 + 3 * i], KEYS[4 + 3 * i], KEYS[5 + 3 * i]
  local outcome, job_id, task_id, last, entry = ARGV[3 + 5 * i], ARGV[4 + 5 * i], ARGV[5 + 5 * i], ARGV[6 + 5 * i], ARGV[7 + 5 * i]
  if outcome == 'dispatched' then
    redis.call('SET', claim, 'done:' .. task_id, 'EX', done_ttl)
    redis.call('HSET', KEYS[1], job_id, last)
  end
  redis.call('HINCRBY', KEYS[2], outcome, 1)
  redis.call('HINCRBY', job_counters, outcome, 1)
  redis.call('LPUSH', history, entry)
  redis.call('LTRIM', history, 0, limit - 1)
end
return n
"""


class StateStore:
    """Async access to chronoq's scheduler state. Every method is one Redis round trip.

    ``pending_ttl_ms`` bounds how long a crashed owner's pending claim blocks a fire;
    ``done_ttl_s`` how long a published fire is remembered (it must exceed every job's
    misfire grace, so a catch-up never re-publishes a fire it already sent).
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        keys: RedisKeys,
        owner: str,
        *,
        history_limit: int = 100,
        pending_ttl_ms: int = 15_000,
        done_ttl_s: int = 7 * 86400,
    ) -> None:
        self.client = client
        self.keys = keys
        self.owner = owner
        self.history_limit = history_limit
        self.pending_ttl_ms = pending_ttl_ms
        self.done_ttl_s = done_ttl_s
        self._claim = client.register_script(_CLAIM)
        self._release = client.register_script(_RELEASE)
        self._record = client.register_script(_RECORD)

    @property
    def _pending(self) -> str:
        return f"pending:{self.owner}"

    async def load_last_fires(self) -> dict[str, datetime]:
        """The nominal time of each job's last dispatched fire."""
        raw = await self.client.hgetall(self.keys.last_fire)
        return {str(job_id): datetime.fromisoformat(json.loads(value)["scheduled_at"]) for job_id, value in raw.items()}

    def _claim_keys(self, fires: Sequence[tuple[str, datetime]]) -> list[str]:
        return [self.keys.fire_claim(job_id, format_scheduled_at(at)) for job_id, at in fires]

    async def claim(self, fires: Sequence[tuple[str, datetime]]) -> list[ClaimResult]:
        """Try to claim each (job id, nominal time) for publishing. One round trip."""
        if not fires:
            return []
        results = await self._claim(keys=self._claim_keys(fires), args=[self._pending, self.pending_ttl_ms])
        mapping = {1: ClaimResult.CLAIMED, 0: ClaimResult.DONE, -1: ClaimResult.BUSY}
        return [mapping[int(r)] for r in results]

    async def release(self, fires: Sequence[tuple[str, datetime]]) -> None:
        """Give back our pending claims on fires that could not be published."""
        if fires:
            await self._release(keys=self._claim_keys(fires), args=[self._pending])

    async def record(self, records: Sequence[FireRecord]) -> None:
        """Store outcomes: claims marked done, last fire, counters, history. One round trip."""
        if not records:
            return
        keys = [self.keys.last_fire, self.keys.counters]
        args: list[str | int] = [self.history_limit, self.done_ttl_s]
        for record in records:
            keys += [
                self.keys.fire_claim(record.job_id, record.scheduled_at),
                self.keys.job_counters(record.job_id),
                self.keys.history(record.job_id),
            ]
            last = ""
            if record.outcome is Outcome.DISPATCHED:
                last = json.dumps(
                    {
                        "scheduled_at": record.scheduled_at,
                        "dispatched_at": record.recorded_at,
                        "task_id": record.task_id,
                    }
                )
            args += [record.outcome.value, record.job_id, record.task_id or "", last, record.to_json()]
        await self._record(keys=keys, args=args)

    async def history(self, job_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        """The job's recorded fires, newest first."""
        raw = await self.client.lrange(self.keys.history(job_id), 0, (limit or self.history_limit) - 1)
        return [json.loads(item) for item in raw]

    async def counters(self, job_id: str | None = None) -> dict[str, int]:
        """Counts per outcome, for one job or overall."""
        key = self.keys.job_counters(job_id) if job_id else self.keys.counters
        return {str(outcome): int(count) for outcome, count in (await self.client.hgetall(key)).items()}
