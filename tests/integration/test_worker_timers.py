"""A prefork worker drops the time-limit timers of finished tasks (``workers/timers.py``)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import pytest

from shared.client import Client
from shared.settings import AppSettings
from tests.conftest import WorkerProcess, result_of, wait_for
from workers.timers import COMPACT_EVERY_S

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def client(settings: AppSettings) -> Iterator[Client]:
    with Client(settings) as client:
        yield client


def test_finished_tasks_leave_no_timer_in_the_prefork_workers_heap(
    settings: AppSettings, client: Client, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker(settings, "--pool", "prefork", "-c", "2", extra_env={"LOG_LEVEL": "DEBUG"})
    ids = [client.submit("demo.sleep", [0]) for _ in range(40)]
    for task_id in ids:
        result_of(client, task_id, 30, worker)

    def removed() -> int:
        return sum(int(n) for n in re.findall(r"timer heap compacted: (\d+) cancelled", worker.log()))

    # Each task set a hard-time-limit timer (30 minutes) and cancelled it when it ended.
    wait_for(lambda: removed() >= len(ids), COMPACT_EVERY_S * 3, "the cancelled timers to be removed")
