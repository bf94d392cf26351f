"""The pure rules of ``WAIT``-based durability (shared/durability.py) and its settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from shared.durability import Durability, connected_replicas, degraded_target, names_this_master, writes
from shared.settings import AppSettings

HOST, PORT = "10.0.0.5", 6379
MASTER = {"ip": HOST, "port": PORT, "flags": "master"}


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("EVALSHA", True),
        ("SET", True),
        ("HSET", True),
        ("LPUSH", True),
        ("XADD", True),
        ("DEL", True),
        (b"PEXPIRE", True),
        ("GET", False),
        ("hgetall", False),
        ("LRANGE", False),
        ("EVALSHA_RO", False),
        ("PUBLISH", False),
        ("SENTINEL MASTER", False),
        ("SCRIPT LOAD", False),
        ("WAIT", False),
    ],
)
def test_which_commands_wait(command: Any, expected: bool) -> None:
    assert writes(command) is expected


@pytest.mark.parametrize(
    ("role", "expected"),
    [
        (["master", 100, []], 0),
        (["master", 100, [["10.0.0.6", "6379", "100"]]], 1),
        ([b"master", 100, [["a", "1", "1"], ["b", "2", "2"]]], 2),
        (["slave", "10.0.0.6", 6379, "connected", 100], None),
        ([], None),
        ("master", None),
    ],
)
def test_connected_replicas_from_role(role: Any, expected: int | None) -> None:
    assert connected_replicas(role) == expected


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (MASTER, True),
        ({**MASTER, "port": str(PORT)}, True),
        ({**MASTER, "flags": {"master"}}, True),
        ({**MASTER, "flags": "master,failover_in_progress"}, False),
        ({**MASTER, "flags": "master,failover_in_progress,promoted"}, False),
        ({**MASTER, "flags": "s_down,master"}, False),
        ({**MASTER, "flags": "o_down,s_down,master"}, False),
        ({**MASTER, "ip": "10.0.0.6"}, False),
        ({**MASTER, "port": 6380}, False),
        ({"flags": "master"}, False),
        (None, False),
        (True, False),
    ],
)
def test_a_sentinel_names_this_master(state: Any, expected: bool) -> None:
    assert names_this_master(state, HOST, PORT) is expected


@pytest.mark.parametrize(
    ("replicas", "connected", "states", "expected", "why"),
    [
        (1, 0, [MASTER] * 3, 0, "the only replica is gone and every Sentinel names this master"),
        (2, 1, [MASTER] * 3, 1, "one of two replicas gone: wait for the one left"),
        (1, 1, [MASTER] * 3, None, "the replica is there but slow: retry"),
        (2, 2, [MASTER] * 3, None, "every replica connected: a shortfall is lag"),
        (1, None, [MASTER] * 3, None, "the server is no master"),
        (1, 0, [], None, "no Sentinel: nobody can rule out a failover"),
        (1, 0, [MASTER, MASTER, None], None, "a Sentinel did not answer (it may be leading a failover)"),
        (
            1,
            0,
            [MASTER, {**MASTER, "flags": "master,failover_in_progress"}, MASTER],
            None,
            "the leading Sentinel is failing the master over (the old master, after the promotion)",
        ),
        (1, 0, [MASTER, {**MASTER, "ip": "10.0.0.6"}, MASTER], None, "one Sentinel names the new master already"),
        (1, 0, [{**MASTER, "flags": "s_down,master"}] * 3, None, "the Sentinels think it is down (a partition)"),
    ],
)
def test_when_fewer_replicas_may_confirm_a_write(
    replicas: int, connected: int | None, states: list[Any], expected: int | None, why: str
) -> None:
    assert degraded_target(replicas, connected, states, HOST, PORT) == expected, why


@dataclass
class Conn:
    host: str = HOST
    port: int = PORT


def test_a_verdict_holds_for_its_server_until_it_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("shared.durability.time.monotonic", lambda: now[0])
    durability = Durability(replicas=1, timeout_ms=250, check_s=0.5)
    assert durability.planned(Conn()) == 1
    assert durability.judge(Conn(), 0, [MASTER] * 3) == 0
    assert durability.planned(Conn()) == 0
    assert durability.planned(Conn(host="10.0.0.6")) == 1  # another server: the full count
    now[0] += 0.6
    assert durability.planned(Conn()) is None  # expired: ask again before the next write
    assert durability.judge(Conn(), 1, [MASTER] * 3) is None  # the replica is back
    assert durability.planned(Conn()) == 1


def test_a_shortfall_is_confirmed_or_refused() -> None:
    durability = Durability(replicas=2, timeout_ms=250, check_s=0.5)
    assert durability.confirmed(Conn(), 2, 2)
    assert durability.confirmed(Conn(), 1, 1)
    assert not durability.confirmed(Conn(), 1, 2)
    error = durability.refuse(Conn(), 1, 2)
    assert str(error) == f"write confirmed by 1 of 2 replicas within 250 ms on {HOST}:{PORT}"
    assert "ERR WAIT cannot be used with replica instances" in str(
        durability.refuse(Conn(), Exception("ERR WAIT cannot be used with replica instances"), 2)
    )


def test_settings_bound_the_wait_timeout_by_the_socket_timeout() -> None:
    settings = AppSettings(_env_file=None, redis={"wait_replicas": 1, "wait_timeout_ms": 300})
    assert (settings.redis.wait_replicas, settings.redis.wait_timeout_ms) == (1, 300)
    with pytest.raises(
        ValueError, match=r"REDIS_WAIT_TIMEOUT_MS \(5000\) must be below REDIS_SOCKET_TIMEOUT_S \(5 s\)"
    ):
        AppSettings(_env_file=None, redis={"wait_replicas": 1, "wait_timeout_ms": 5000})
    # Off, the timeout is not checked.
    assert AppSettings(_env_file=None, redis={"wait_timeout_ms": 5000}).redis.wait_replicas == 0
