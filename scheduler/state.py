"""Reading what outlives a scheduler process: last fires, run history, outcome counters.

Everything here is written by :class:`shared.fleet.FireLedger` (scheduler replicas and workers);
this module only reads it, for restart catch-up and for operators.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import redis.asyncio

from scheduler.views import fire_view
from shared.names import RedisKeys


class StateStore:
    """Async reads of chronoq's state under one key prefix."""

    def __init__(self, client: redis.asyncio.Redis, keys: RedisKeys) -> None:
        self.client = client
        self.keys = keys

    async def load_last_fires(self) -> dict[str, datetime]:
        """The nominal time of each job's last dispatched fire."""
        raw = await self.client.hgetall(self.keys.last_fire)
        return {str(job_id): datetime.fromisoformat(json.loads(value)["scheduled_at"]) for job_id, value in raw.items()}

    async def history(self, job_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """The job's recorded fires, newest first: each fire's hash (see ``RedisKeys.fire``)
        plus ``final``, the outcome that matters to an operator."""
        stamps = await self.client.lrange(self.keys.history(job_id), 0, limit - 1)
        if not stamps:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for stamp in stamps:
                pipe.hgetall(self.keys.fire(job_id, str(stamp)))
            fires = await pipe.execute()
        return [fire_view(fire) for fire in fires if fire]

    async def counters(self, job_id: str | None = None) -> dict[str, int]:
        """Counts per outcome, for one job or overall (a job's ``last_success_ms`` stamp is not a count)."""
        key = self.keys.job_counters(job_id) if job_id else self.keys.counters
        raw = await self.client.hgetall(key)
        return {str(outcome): int(count) for outcome, count in raw.items() if not str(outcome).endswith("_ms")}
