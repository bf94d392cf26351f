"""Fixtures of the fault suite: restartable Redis servers and TCP proxies, cleaned up after
each test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import RedisProcess, TcpProxy
from tests.faults.sentinel_harness import SentinelGroup


@pytest.fixture
def redis_process(tmp_path: Path) -> Iterator[Callable[..., RedisProcess]]:
    """``redis_process(appendonly=True, password=None, extra_args=())`` starts a restartable
    redis-server in its own directory; every one is stopped at teardown."""
    started: list[RedisProcess] = []

    def start(**options: Any) -> RedisProcess:
        server = RedisProcess(directory=tmp_path / f"redis-{len(started)}", **options)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.kill()


@pytest.fixture
def tcp_proxy() -> Iterator[Callable[[int], TcpProxy]]:
    """``tcp_proxy(target_port)`` forwards a fresh local port to ``target_port``."""
    proxies: list[TcpProxy] = []

    def start(target_port: int) -> TcpProxy:
        proxy = TcpProxy(target_port)
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        proxy.close()


@pytest.fixture
def sentinel_group(tmp_path: Path) -> Iterator[SentinelGroup]:
    """A master, a replica and three Sentinels (tests/faults/sentinel_harness.py), stopped at teardown."""
    group = SentinelGroup(tmp_path / "sentinel")
    try:
        yield group.start()
    finally:
        group.stop()
