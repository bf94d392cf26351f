"""The leader lease between two :class:`Leadership` instances on a real Redis."""

from __future__ import annotations

import asyncio
import contextlib

from scheduler.leadership import Leadership
from shared.names import RedisKeys
from shared.redis import create_async_redis
from shared.settings import AppSettings


async def test_a_follower_takes_a_lapsed_lease_without_waiting_for_its_next_try(settings: AppSettings) -> None:
    """The leader dies with 0.3 s left on its lease; the follower's next regular try is 10 s
    away (a third of a 30 s lease). It must lead well before then: it tries the instant the
    lease it saw runs out. (It used to try only every third of the TTL, which put up to a
    third of the TTL on top of the lease at every takeover.)"""
    client = create_async_redis(settings.redis)
    keys = RedisKeys(settings.redis.key_prefix)
    follower_task = None
    try:
        leader = Leadership(client, keys, "leader:1:a", lease_ms=30_000)
        follower = Leadership(client, keys, "follower:2:b", lease_ms=30_000)
        assert await leader.tick()
        assert not await follower.tick()
        await client.pexpire(keys.leader, 300)  # the leader is dead: its lease runs out, unrenewed
        follower_task = asyncio.get_running_loop().create_task(follower.run())
        async with asyncio.timeout(5):
            while not follower.is_leader():
                await asyncio.sleep(0.02)
        assert await client.get(keys.leader) == "follower:2:b"
    finally:
        if follower_task is not None:
            follower_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower_task
        await client.aclose()


def test_the_lease_lapses_with_room_to_take_it_within_takeover_s() -> None:
    from scheduler.leadership import lease_ms_for

    for takeover_s in (0.5, 2.0, 10.0):
        assert lease_ms_for(takeover_s) <= takeover_s * 1000 * 0.9
