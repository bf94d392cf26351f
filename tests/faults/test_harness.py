"""The fault harness itself: a restart keeps an AOF's data, a crash without one loses it, a cut
proxy refuses and a restored one forwards again, a black hole makes callers time out."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis

from tests.faults.harness import RedisProcess, TcpProxy


def test_restart_keeps_aof_data_and_a_crash_without_aof_loses_it(redis_process: Callable[..., RedisProcess]) -> None:
    durable = redis_process(appendonly=True)
    volatile = redis_process(appendonly=False)
    for server in (durable, volatile):
        with server.client() as client:
            client.set("k", "v")
    durable.restart(kill=True)
    volatile.restart(kill=True)
    with durable.client() as client:
        assert client.get("k") == "v"
    with volatile.client() as client:
        assert client.get("k") is None


def test_proxy_cut_blackhole_and_restore(
    redis_process: Callable[..., RedisProcess], tcp_proxy: Callable[[int], TcpProxy]
) -> None:
    server = redis_process(appendonly=False)
    proxy = tcp_proxy(server.port)
    client = redis.Redis.from_url(proxy.url(), socket_timeout=0.5, socket_connect_timeout=0.5)
    assert client.ping()
    proxy.cut()
    with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
        client.ping()
    proxy.restore()
    assert client.ping()
    proxy.blackhole()
    with pytest.raises(redis.TimeoutError):
        client.ping()
    proxy.restore()
    client.connection_pool.disconnect()
    assert client.ping()
    client.close()
