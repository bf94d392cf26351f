"""The workers' steps of the fire ledger (start / finish), on crafted fire states in a real Redis.

Fast and exact where the process tests in ``test_worker_fleet.py`` cannot choose the timing:
which attempt may report an outcome, TTLs, durations, and how long a retried fire keeps its
slot, in the ledger itself and through the worker hook that reports a retry.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery.exceptions import Retry

from shared.fleet import FireIntent, FireLedger, Outcome
from shared.names import RedisKeys
from shared.redis import create_redis
from shared.settings import AppSettings
from tests.conftest import make_settings, wait_for
from workers.lease import WorkerFleet

pytestmark = pytest.mark.timeout(30)

AT = "2026-03-01T12:00:00+00:00"
FIRE_TTL_S = 600


class Ledger:
    """A FireLedger on the test's prefix, and what the tests read back."""

    def __init__(self, settings: AppSettings) -> None:
        self.keys = RedisKeys(settings.redis.key_prefix)
        self.redis: redis.Redis = create_redis(settings.redis)
        self.ledger = FireLedger(self.redis, self.keys, fire_ttl_s=FIRE_TTL_S)

    def dispatch(self, job_id: str, task_id: str = "t1", slot_lapse_ms: int = 60_000) -> None:
        intent = FireIntent(
            job_id,
            AT,
            task_id,
            Outcome.DISPATCHED,
            slot_lapse_ms=slot_lapse_ms,
            list_key=self.keys.key("queue"),
            payload="{}",
        )
        assert self.ledger.decide([intent], owner="test") == ["dispatched"]

    def start(self, job_id: str, runner: str, lease_ms: int = 60_000, retries: int = 0, task_id: str = "t1") -> Any:
        return self.ledger.start(job_id, AT, task_id, runner, lease_ms, retries=retries)

    def finish(self, job_id: str, outcome: Outcome, runner: str, attempt: int = 0, **kw: Any) -> Any:
        return self.ledger.finish(job_id, AT, "t1", outcome, "", "w", runner=runner, attempt=attempt, **kw)

    def state(self, job_id: str) -> dict[str, str]:
        return {str(k): str(v) for k, v in self.redis.hgetall(self.keys.fire(job_id, AT)).items()}

    def slot_ms(self, job_id: str, task_id: str = "t1") -> float | None:
        score = self.redis.zscore(self.keys.inflight(job_id), task_id)
        return None if score is None else float(score)

    def now_ms(self) -> int:
        seconds, micros = self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def take_over_after_lapse(self, job_id: str, runner: str) -> int:
        """Start as ``runner`` once the running attempt's (short) lease lapsed; the attempt number."""
        verdict, _, _, attempt = wait_for(
            lambda: (result := self.start(job_id, runner))[0] == "run" and result, 5, "the lease to lapse"
        )
        assert verdict == "run"
        return int(attempt)


@pytest.fixture
def ledger(settings: AppSettings) -> Iterator[Ledger]:
    ledger = Ledger(settings)
    yield ledger
    ledger.redis.close()


def test_late_finish_of_a_taken_over_attempt_does_not_overwrite_its_success(ledger: Ledger) -> None:
    ledger.dispatch("late")
    assert ledger.start("late", "a:1", lease_ms=50) == ["run", "", 0, 1]
    assert ledger.take_over_after_lapse("late", "b:2") == 2
    assert ledger.finish("late", Outcome.SUCCEEDED, "b:2", 2) == ["applied", ""]

    assert ledger.finish("late", Outcome.FAILED, "a:1", 1) == ["stale", "succeeded by b:2"]
    state = ledger.state("late")
    assert (state["run"], state["error"], state["runner"]) == ("succeeded", "", "b:2")
    counters = ledger.redis.hgetall(ledger.keys.job_counters("late"))
    assert (counters.get("succeeded"), counters.get("failed")) == ("1", None)


def test_late_finish_of_a_taken_over_attempt_keeps_the_live_attempts_slot(ledger: Ledger) -> None:
    ledger.dispatch("slot")
    ledger.start("slot", "a:1", lease_ms=50)
    ledger.take_over_after_lapse("slot", "b:2")
    held_ms = ledger.slot_ms("slot")

    assert ledger.finish("slot", Outcome.SUCCEEDED, "a:1", 1)[0] == "stale"
    assert ledger.slot_ms("slot") == held_ms
    assert ledger.state("slot")["run"] == "running"
    # The same process (a thread pool) taking the lapsed lease over is a different attempt.
    ledger.redis.hset(ledger.keys.fire("slot", AT), "run_lease_ms", 0)
    assert ledger.take_over_after_lapse("slot", "b:2") == 3
    assert ledger.finish("slot", Outcome.FAILED, "b:2", 2)[0] == "stale"
    assert ledger.finish("slot", Outcome.SUCCEEDED, "b:2", 3) == ["applied", ""]
    assert ledger.slot_ms("slot") is None


def test_a_report_about_a_message_that_never_started_applies_only_when_no_attempt_holds_the_fire(
    ledger: Ledger,
) -> None:
    ledger.dispatch("queued")
    assert ledger.finish("queued", Outcome.EXPIRED, "") == ["applied", ""]
    assert ledger.state("queued")["run"] == "expired"
    assert ledger.slot_ms("queued") is None

    ledger.dispatch("live")
    ledger.start("live", "a:1")
    assert ledger.finish("live", Outcome.EXPIRED, "") == ["stale", "running by a:1"]
    assert ledger.state("live")["run"] == "running"
    assert ledger.finish("live", Outcome.SUCCEEDED, "a:1", 1)[0] == "applied"
    assert ledger.finish("live", Outcome.FAILED, "")[0] == "stale"  # a revoked duplicate
    assert ledger.state("live")["run"] == "succeeded"

    ledger.dispatch("retrying")
    ledger.start("retrying", "a:1")
    ledger.finish("retrying", Outcome.RETRIED, "a:1", 1, retry_lapse_ms=60_000)
    assert ledger.finish("retrying", Outcome.EXPIRED, "") == ["applied", ""]  # the retry expired
    assert ledger.slot_ms("retrying") is None


def test_start_and_finish_give_the_fire_hash_a_ttl(ledger: Ledger) -> None:
    # Fires published by someone else have no hash yet; an expired hash is written anew.
    fire = ledger.keys.fire("stray", AT)
    assert ledger.start("stray", "a:1")[0] == "run"
    assert 0 < ledger.redis.ttl(fire) <= FIRE_TTL_S
    ledger.redis.persist(fire)
    assert ledger.finish("stray", Outcome.SUCCEEDED, "a:1", 1)[0] == "applied"
    assert 0 < ledger.redis.ttl(fire) <= FIRE_TTL_S

    never = ledger.keys.fire("never", AT)
    assert ledger.finish("never", Outcome.EXPIRED, "")[0] == "applied"
    assert 0 < ledger.redis.ttl(never) <= FIRE_TTL_S


def test_a_message_that_never_started_records_no_duration(ledger: Ledger) -> None:
    ledger.dispatch("expired")
    ledger.finish("expired", Outcome.EXPIRED, "")
    state = ledger.state("expired")
    assert state["run"] == "expired"
    assert "duration_ms" not in state

    # After a retried attempt, the expired retry keeps that attempt's duration, not "since it started".
    ledger.dispatch("retried")
    ledger.start("retried", "a:1")
    fire = ledger.keys.fire("retried", AT)
    ledger.redis.hset(fire, "started_ms", ledger.now_ms() - 60_000)
    ledger.finish("retried", Outcome.RETRIED, "a:1", 1)
    ran_ms = int(ledger.state("retried")["duration_ms"])
    assert 60_000 <= ran_ms < 70_000
    ledger.redis.hset(fire, "started_ms", ledger.now_ms() - 3_600_000)
    ledger.finish("retried", Outcome.EXPIRED, "")
    assert int(ledger.state("retried")["duration_ms"]) == ran_ms


def test_a_retried_attempt_keeps_its_slot_until_the_retry_has_run(ledger: Ledger) -> None:
    ledger.dispatch("backoff", slot_lapse_ms=5_000)
    ledger.start("backoff", "a:1", lease_ms=5_000)
    before_ms = ledger.now_ms()
    assert ledger.finish("backoff", Outcome.RETRIED, "a:1", 1, retry_lapse_ms=600_000)[0] == "applied"
    lapse_ms = ledger.slot_ms("backoff")
    assert lapse_ms is not None
    assert before_ms + 600_000 <= lapse_ms <= ledger.now_ms() + 600_000
    assert ledger.state("backoff")["run"] == "retried"


def test_the_retry_a_running_attempt_published_takes_over_its_lease(ledger: Ledger) -> None:
    # Celery publishes a retry before the attempt that asked for it reports 'retried'.
    ledger.dispatch("eager")
    ledger.start("eager", "a:1", retries=0)
    assert ledger.start("eager", "b:2", retries=0)[:2] == ["busy", "a:1"]  # a duplicate
    assert ledger.start("eager", "b:2", retries=1) == ["run", "", 0, 2]
    assert ledger.start("eager", "c:3", retries=1)[:2] == ["busy", "b:2"]  # a duplicate of the retry
    assert ledger.finish("eager", Outcome.RETRIED, "a:1", 1)[0] == "stale"
    assert ledger.state("eager")["run"] == "running"


def test_the_retry_hook_extends_the_slot_by_countdown_time_limit_and_margin(redis_server: Any, namespace: str) -> None:
    settings = make_settings(redis_server.url, namespace, scheduler={"slot_margin_s": 30})
    ledger = Ledger(settings)
    fleet = WorkerFleet(settings)
    task = SimpleNamespace(time_limit=None, app=SimpleNamespace(conf=SimpleNamespace(task_time_limit=None)))
    try:
        for job_id, when in (("countdown", 600), ("eta", datetime.now(UTC) + timedelta(seconds=600))):
            ledger.dispatch(job_id, task_id=f"{job_id}-1", slot_lapse_ms=5_000)
            request = SimpleNamespace(
                id=f"{job_id}-1", headers={"job_id": job_id, "scheduled_at": AT}, timelimit=(20, None), retries=0
            )
            fleet.admit(task, request)  # type: ignore[arg-type]
            before_ms = ledger.now_ms()
            fleet.on_retry(sender=task, request=request, reason=Retry(exc=ValueError("flaky"), when=when))

            state = ledger.state(job_id)
            assert (state["run"], state["error"]) == ("retried", "ValueError: flaky")
            lapse_ms = ledger.slot_ms(job_id, f"{job_id}-1")
            assert lapse_ms is not None
            expected_ms = (600 + 20 + 30) * 1000  # countdown + time limit + margin
            assert before_ms + expected_ms - 1_000 <= lapse_ms <= ledger.now_ms() + expected_ms
    finally:
        fleet.on_worker_shutdown()
        ledger.redis.close()
