"""A STARTED state the result backend cannot take never fails the task before its body runs."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery.exceptions import BackendStoreError

from workers.runtime import ChronoqTask


class RefusingBackend:
    def __init__(self, error: Exception) -> None:
        self.error = error
        self.calls = 0

    def store_result(self, *args: Any, **kwargs: Any) -> None:
        self.calls += 1
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        # Celery's retries ran out: seen in a clean-clone run when a SIGKILLed master's writes
        # were not confirmed by a replica (WAIT); the admitted fire was recorded failed unrun.
        BackendStoreError("failed to store result on the backend", state="STARTED", task_id="t"),
        redis.ConnectionError("restarting"),
    ],
    ids=["retries-ran-out", "connection"],
)
def test_a_started_state_the_backend_refuses_is_logged_not_raised(error: Exception) -> None:
    task = ChronoqTask()
    backend = RefusingBackend(error)
    task.backend = backend
    task._store_started(SimpleNamespace(id="t", hostname="w@test"))  # must not raise
    assert backend.calls == 1
