"""The ad-hoc client against real workers on a real redis-server."""

from __future__ import annotations

import gc
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator

import psutil
import pytest
from celery import Celery
from celery.exceptions import TaskRevokedError
from celery.exceptions import TimeoutError as ResultTimeoutError
from celery.result import AsyncResult

from shared.client import Client
from shared.settings import AppSettings
from tests.conftest import RedisServer, WorkerProcess, result_of, wait_for

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def client(settings: AppSettings) -> Iterator[Client]:
    with Client(settings) as client:
        yield client


def worker_of(client: Client, task_id: str) -> str:
    return str(AsyncResult(task_id, app=client.app).worker)


def test_submit_returns_result_and_composes(
    settings: AppSettings, client: Client, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker(settings, "--pool", "threads", "--concurrency", "4")
    assert client.result(client.submit("demo.number_sum", [2, 3]), timeout=10) == 5

    add = client.signature
    chained = client.chain(add("demo.number_sum", [1, 2]), add("demo.number_sum", [], {"y": 4}))
    assert client.result(chained, timeout=10) == 7
    grouped = client.group(add("demo.number_sum", [1, 2]), add("demo.number_sum", [3, 4]))
    assert client.result(grouped, timeout=10) == [3, 7]
    # number_sum as the chord callback: it receives the list of header results as x.
    chorded = client.chord(
        [add("demo.number_sum", [1, 2]), add("demo.number_sum", [3, 4])], add("demo.number_sum", [], {"y": 10})
    )
    assert client.result(chorded, timeout=10) == 20


def test_retry_with_backoff_then_success(
    settings: AppSettings, client: Client, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker(settings, "--pool", "threads", "--concurrency", "2")
    started = time.monotonic()
    task_id = client.submit("demo.number_sum", [2, 3], {"fail_times": 2})
    assert client.result(task_id, timeout=20) == 5
    # Backoff 1 s then 2 s: the two retries alone take at least 3 s.
    assert time.monotonic() - started >= 3.0
    assert AsyncResult(task_id, app=client.app).retries == 2


def test_status_transitions(settings: AppSettings, client: Client, start_worker: Callable[..., WorkerProcess]) -> None:
    task_id = client.submit("demo.sleep", [1.5])
    assert client.status(task_id) == "PENDING"  # queued, no worker yet
    start_worker(settings, "--pool", "threads", "--concurrency", "1")
    seen: list[str] = []

    def reaches_success() -> bool:
        state = client.status(task_id)
        if not seen or seen[-1] != state:
            seen.append(state)
        return state == "SUCCESS"

    wait_for(reaches_success, 20, "the task to succeed", interval_s=0.02)
    assert seen[0] in ("PENDING", "STARTED")
    assert "STARTED" in seen
    assert seen[-1] == "SUCCESS"
    assert seen.index("STARTED") < seen.index("SUCCESS")


def test_revoke_queued_and_terminate_running(
    settings: AppSettings, client: Client, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker(settings, "--pool", "prefork", "--concurrency", "1")
    running = client.submit("demo.sleep", [30])
    wait_for(lambda: client.status(running) == "STARTED", 15, "the long task to start")
    queued = client.submit("demo.number_sum", [1, 1])
    client.revoke(queued)
    client.revoke(running, terminate=True)
    wait_for(lambda: client.status(running) == "REVOKED", 15, "the running task to be terminated")
    wait_for(lambda: client.status(queued) == "REVOKED", 15, "the queued task to be revoked")
    with pytest.raises(TaskRevokedError):
        client.result(queued, timeout=5)
    # The worker is free again and still works.
    assert client.result(client.submit("demo.number_sum", [4, 4]), timeout=10) == 8


def test_async_task_runs_on_one_long_lived_loop_per_process(
    settings: AppSettings, client: Client, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker(settings, "--pool", "prefork", "--concurrency", "1")
    first = result_of(client, client.submit("demo.async_sleep", [0.05]), 10, worker)
    second = result_of(client, client.submit("demo.async_sleep", [0.05], trace_id="trace-abc-123"), 10, worker)
    assert first["slept"] == 0.05
    assert (first["pid"], first["loop_id"]) == (second["pid"], second["loop_id"])
    # self.request works inside the async body, and the trace id reaches its log lines.
    assert second["task_id"] != first["task_id"]
    wait_for(lambda: "async_sleep slept 0.05s" in worker.log(), 5, "the async task's log line")
    assert any("async_sleep slept" in line and "trace_id=trace-abc-123" in line for line in worker.log().splitlines())


def test_queue_separation(settings: AppSettings, client: Client, start_worker: Callable[..., WorkerProcess]) -> None:
    adhoc = start_worker(settings, "-Q", settings.celery.default_queue, "--pool", "threads", "-c", "2", name="adhoc")
    cron = start_worker(settings, "-Q", settings.celery.cron_queue, "--pool", "threads", "-c", "2", name="cron")
    adhoc_ids = [client.submit("demo.number_sum", [i, 1]) for i in range(6)]
    cron_ids = [client.submit("demo.number_sum", [i, 2], queue=settings.celery.cron_queue) for i in range(6)]
    assert [client.result(t, timeout=10) for t in adhoc_ids] == [i + 1 for i in range(6)]
    assert [client.result(t, timeout=10) for t in cron_ids] == [i + 2 for i in range(6)]
    assert {worker_of(client, t) for t in adhoc_ids} == {adhoc.hostname}
    assert {worker_of(client, t) for t in cron_ids} == {cron.hostname}


def test_two_workers_share_one_queue(
    settings: AppSettings, client: Client, start_worker: Callable[..., WorkerProcess]
) -> None:
    first = start_worker(settings, "--pool", "threads", "-c", "1", name="a")
    second = start_worker(settings, "--pool", "threads", "-c", "1", name="b")
    ids = [client.submit("demo.sleep", [0.3]) for _ in range(8)]
    for task_id in ids:
        client.result(task_id, timeout=20)
    assert {worker_of(client, t) for t in ids} == {first.hostname, second.hostname}


def test_plain_celery_client_can_submit(settings: AppSettings, start_worker: Callable[..., WorkerProcess]) -> None:
    start_worker(settings, "--pool", "threads", "-c", "1")
    url = settings.redis.connection_url()
    plain = Celery("someone-elses-app", broker=url, backend=url)  # Celery's defaults, not ours
    try:
        result = plain.send_task("demo.number_sum", args=[20, 22], queue=settings.celery.default_queue)
        assert result.get(timeout=10) == 42
    finally:
        plain.close()


def test_health(settings: AppSettings, client: Client) -> None:
    health = client.health()
    assert health.ok
    assert health.latency_ms is not None
    down = Client(settings.with_redis_url("redis://127.0.0.1:1/0"))
    assert not down.health().ok
    down.close()


def test_close_releases_result_subscriptions_for_good(
    settings: AppSettings, redis_server: RedisServer, namespace: str
) -> None:
    """A closed client holds no result subscription, and a result object of it collected later
    opens no connection (Celery unsubscribes in ``AsyncResult.__del__``: left to the garbage
    collector, that reconnected a subscription the collector had closed, leaking its socket)."""
    client = Client(settings)
    # No worker consumes this queue: the result stays pending and subscribed.
    waiting = AsyncResult(client.submit("demo.number_sum", [1, 2], queue=f"nobody_{namespace}"), app=client.app)
    with pytest.raises(ResultTimeoutError):
        waiting.get(timeout=0.2)

    def connections() -> set[int]:  # this process's connections to the server, by local port
        mine = psutil.Process().net_connections(kind="tcp")
        return {
            c.laddr.port for c in mine if c.raddr and c.raddr.port == redis_server.port and c.status == "ESTABLISHED"
        }

    with redis_server.client() as r:
        channels = f"*{waiting.id}*"
        assert len(r.pubsub_channels(channels)) == 1, "the pending result is subscribed"
        before = connections()
        client.close()
        # The server drops the subscription once it has read the closed connection.
        wait_for(lambda: r.pubsub_channels(channels) == [], 10, "close() to end the subscription")
        del waiting
        gc.collect()
        assert r.pubsub_channels(channels) == []
        after = connections()
        assert after < before, "the subscription's connection is closed, and none is opened again"


def running_in(thread: threading.Thread, function: str) -> bool:
    """Whether ``thread`` is inside a call of a function named ``function`` now."""
    frame = sys._current_frames().get(thread.ident or 0)
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


def test_result_arrives_even_when_its_notification_was_missed(
    settings: AppSettings, client: Client, redis_server: RedisServer, namespace: str
) -> None:
    """A result stored while the waiting client's subscription was not yet in place (SUBSCRIBE
    goes unconfirmed on its own connection, and Redis may run the worker's store and publish
    before it) is still returned: the wait reads the stored result again every second.
    Simulated by storing a result with no notification at all."""
    task_id = client.submit("demo.number_sum", [1, 2], queue=f"nobody_{namespace}")
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(client.result(task_id, timeout=20)), daemon=True)
    waiter.start()
    # Past its one read of the stored result: waiting for the notification.
    wait_for(lambda: running_in(waiter, "drain_events"), 10, "the client to wait for the notification")
    with redis_server.client() as r:
        meta = {"status": "SUCCESS", "result": 3, "traceback": None, "children": [], "task_id": task_id}
        r.set(client.app.backend.get_key_for_task(task_id), json.dumps(meta))  # stored, never published
    waiter.join(20)
    assert got == [3]
