"""The data-loss marker against a real Redis: two replicas, one loss, one count."""

from __future__ import annotations

import pytest
import redis.asyncio

from scheduler.epoch import DataEpoch, redis_facts
from shared.names import RedisKeys
from shared.settings import AppSettings


async def test_a_loss_is_counted_once_and_every_replica_rewrites(settings: AppSettings) -> None:
    client = redis.asyncio.Redis.from_url(settings.redis.connection_url(), decode_responses=True)
    keys = RedisKeys(settings.redis.key_prefix)
    rewrites: list[str] = []

    def replica(name: str) -> DataEpoch:
        async def rewrite() -> None:
            rewrites.append(name)

        return DataEpoch(client, keys, rewrite)

    try:
        first, second = replica("first"), replica("second")
        await first.claim()
        await second.claim()
        assert first.id == second.id
        assert not await first.check() and not await second.check()
        assert (await redis_facts(client, keys))["data_losses"] == 0

        await client.delete(keys.epoch)  # what a restart without persistence leaves
        assert await first.check()
        assert await second.check()  # sees the first one's new marker: a loss, not counted again
        assert not await first.check() and not await second.check()
        assert rewrites == ["first", "second"]
        assert first.id == second.id and first.losses == second.losses == 1
        assert (await redis_facts(client, keys))["data_losses"] == 1

        await client.delete(keys.epoch)  # the count outlives the loss that erased it
        assert await second.check()
        assert (await redis_facts(client, keys))["data_losses"] == 2
    finally:
        await client.delete(keys.epoch)
        await client.aclose()


async def test_a_failed_rewrite_is_retried_at_the_next_check(settings: AppSettings) -> None:
    client = redis.asyncio.Redis.from_url(settings.redis.connection_url(), decode_responses=True)
    keys = RedisKeys(settings.redis.key_prefix)
    calls = 0

    async def rewrite() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise redis.ConnectionError("redis went away again")

    epoch = DataEpoch(client, keys, rewrite)
    try:
        await epoch.claim()
        await client.delete(keys.epoch)
        with pytest.raises(redis.ConnectionError):
            await epoch.check()
        assert not await epoch.check()
        assert calls == 2
    finally:
        await client.delete(keys.epoch)
        await client.aclose()
