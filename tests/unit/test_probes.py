"""The probes' answers as pure units: liveness against the heartbeat, readiness's reasons."""

from __future__ import annotations

import time

import pytest
import redis

from scheduler.probes import Probes, ReplicaView, _is_loopback


def test_liveness_follows_the_heartbeat() -> None:
    probes = Probes(liveness_timeout_s=2)
    probes.beat = time.monotonic()
    assert probes.liveness()[0] is True
    probes.beat = time.monotonic() - 3
    alive, body = probes.liveness()
    assert alive is False and body["loop_silent_s"] >= 3


def test_readiness_says_why_not() -> None:
    answers: list[Exception | None] = [None]

    def ping() -> bool:
        if answers[0] is not None:
            raise answers[0]
        return True

    probes = Probes(liveness_timeout_s=2, ping=ping)
    assert probes.readiness() == (False, {"ready": False, "reason": "starting: jobs not loaded yet"})
    probes.replica = ReplicaView(role=lambda: "follower", jobs=lambda: 3, owner="h:1:x")
    assert probes.readiness() == (True, {"ready": True, "role": "follower", "jobs": 3, "replica": "h:1:x"})
    answers[0] = redis.ConnectionError("Connection refused")
    probes._pinged = (-float("inf"), None)  # past the ping cache
    ready, body = probes.readiness()
    assert not ready and body["reason"] == "redis: Connection refused"
    probes.stopping = True
    assert probes.readiness() == (False, {"ready": False, "reason": "shutting down"})


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("10.0.0.5", False),
        ("::", False),
        ("example.org", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert _is_loopback(host) is loopback
