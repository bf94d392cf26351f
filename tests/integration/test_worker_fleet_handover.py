"""A fire whose running attempt's worker dies is run again by another worker: not concurrently,
not lost when its message had been handed out again meanwhile, and without waiting minutes
after the visibility timeout.

Real workers on a real redis-server, with short limits (visibility timeout 10 s, time limit
7 s, slot margin 1 s: a run lease of 8 s); fires are published as the scheduler publishes them
(the ``Fleet`` helper of ``test_worker_fleet.py``).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import RedisServer, WorkerProcess, make_settings, wait_for
from tests.integration.test_worker_fleet import Fleet, Published, logged, never

pytestmark = pytest.mark.timeout(90)

VISIBILITY_TIMEOUT_S, TIME_LIMIT_S, SLOT_MARGIN_S = 10, 7, 1
RUN_S = 5


@dataclass
class Pair:
    """Two one-process workers, and the fleet helper on the same settings."""

    fleet: Fleet
    workers: dict[str, WorkerProcess]

    def run_first(self, job_id: str) -> tuple[Published, dict[str, int | str], WorkerProcess, WorkerProcess]:
        """Publish a fire that runs ``RUN_S``; once it runs: it, its run, its worker, the other."""
        fire = self.fleet.fire(job_id, kwargs={"seconds": RUN_S})
        [first] = wait_for(self.fleet.executions, 15, "the first run to start")
        holder = self.workers[first["worker"]]
        [other] = [w for name, w in self.workers.items() if name != holder.hostname]
        return fire, first, holder, other

    def kill(self, worker: WorkerProcess) -> None:
        os.killpg(worker.process.pid, signal.SIGKILL)  # the whole worker: nobody reports back
        worker.process.wait(10)


@pytest.fixture
def pair(redis_server: RedisServer, namespace: str, start_worker: Callable[..., WorkerProcess]) -> Iterator[Pair]:
    settings = make_settings(
        redis_server.url,
        namespace,
        celery={"visibility_timeout_s": VISIBILITY_TIMEOUT_S, "task_time_limit_s": TIME_LIMIT_S},
        scheduler={"slot_margin_s": SLOT_MARGIN_S},
    )
    env = {
        "CELERY_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S),
        "CELERY_TASK_TIME_LIMIT_S": str(TIME_LIMIT_S),
        "SCHEDULER_SLOT_MARGIN_S": str(SLOT_MARGIN_S),
    }
    fleet = Fleet(settings)
    # One task at a time each (prefetch 1, acks late): whichever runs a fire cannot take
    # another message, so the other worker gets it.
    first_up = start_worker(settings, "-P", "prefork", "-c", "1", name="a", extra_env=env, wait_ready=False)
    second_up = start_worker(settings, "-P", "prefork", "-c", "1", name="b", extra_env=env)
    wait_for(lambda: logged(first_up, text="worker ready"), 30, "both workers to be ready")
    yield Pair(fleet, {w.hostname: w for w in (first_up, second_up)})
    fleet.close()


def test_duplicate_of_a_running_fire_is_deferred_and_takes_over_when_the_holder_dies(pair: Pair) -> None:
    fleet = pair.fleet
    fire, first, holder, other = pair.run_first("handover")
    # The visibility timeout hands the message out again while the first run holds the lease
    # (a message that waited in a worker's memory before it ran): do what kombu's sweep does.
    # The first delivery no longer has an unacked entry, so if its worker dies, the copy is
    # all there is.
    tag = json.loads(fire.payload)["properties"]["delivery_tag"]
    with fleet.redis.pipeline() as pipe:
        pipe.zrem("unacked_index", tag)
        pipe.hdel("unacked", tag)
        pipe.lpush(fire.list_key, fire.payload)
        pipe.execute()
    deferred = f"duplicate delivery deferred job_id=handover holder={holder.hostname}:{first['pid']}"
    wait_for(lambda: logged(other, text=deferred), 10, "the copy to be deferred, not dropped")

    pair.kill(holder)
    killed = fleet.run_of(fire)
    assert killed["run"] == "running", "the first run ended before its worker was killed: too slow a machine?"
    assert len(fleet.executions()) == 1
    lease_ends_ms = int(killed["run_lease_ms"])  # started + time limit + slot margin

    wait_for(lambda: len(fleet.executions()) == 2, 20, "the deferred copy to take over")
    second = fleet.executions()[1]
    assert (second["worker"], second["task_id"]) == (other.hostname, fire.task_id)
    assert second["started_ms"] >= lease_ends_ms  # never while the first held the fire
    state = wait_for(lambda: fleet.run_is(fire, "succeeded"), 15, "the taken-over run to succeed")
    assert (state["attempts"], state["worker"]) == ("2", other.hostname)
    assert fleet.slots("handover") == 0
    never(lambda: len(fleet.executions()) > 2, 1.0)


def test_a_dead_workers_fire_runs_again_soon_after_the_visibility_timeout(pair: Pair) -> None:
    fleet = pair.fleet
    fire, first, holder, other = pair.run_first("restored")
    pair.kill(holder)

    # The surviving worker's consumer sweeps every second here (kombu's default: every ~100 s).
    wait_for(lambda: len(fleet.executions()) == 2, VISIBILITY_TIMEOUT_S + 8, "the message to be handed out again")
    second = fleet.executions()[1]
    assert (second["worker"], second["task_id"]) == (other.hostname, fire.task_id)
    assert second["started_ms"] - int(first["started_ms"]) >= VISIBILITY_TIMEOUT_S * 1000 - 500
    wait_for(lambda: fleet.run_is(fire, "succeeded"), 15, "the second run to succeed")
