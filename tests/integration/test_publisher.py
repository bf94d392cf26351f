"""BatchPublisher on a real redis-server with real workers: its messages are the ones send_task
writes, workers run them with their headers, expiry holds, and failures surface at once."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
import redis
from celery import Celery
from celery.result import AsyncResult
from kombu.exceptions import EncodeError

from scheduler.message import TaskMessage
from scheduler.publishing import BatchPublisher
from shared.celery_app import create_celery_app
from shared.errors import DispatchError
from shared.names import HEADER_JOB_ID, HEADER_SCHEDULED_AT, HEADER_TRACE_ID
from shared.redis import create_redis
from shared.settings import AppSettings
from tests.conftest import RedisServer, WorkerProcess, free_port, wait_for

pytestmark = pytest.mark.timeout(120)

KOMBU_SEP = "\x06\x16"  # kombu's Redis transport: "<queue><sep><priority step>"


@pytest.fixture
def app(settings: AppSettings) -> Iterator[Celery]:
    app = create_celery_app(settings, name="chronoq-publisher-test")
    yield app
    app.close()


@pytest.fixture
def publisher(app: Celery) -> Iterator[BatchPublisher]:
    with BatchPublisher(app) as publisher:
        yield publisher


@pytest.fixture
def broker(redis_server: RedisServer, namespace: str) -> Iterator[redis.Redis]:
    """A client on the session Redis; deletes every key naming this test's namespace after it
    (queues, priority lists and result keys all do: task ids carry the namespace)."""
    client = redis_server.client()
    yield client
    keys = list(client.scan_iter(f"*{namespace}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def decoded(raw: str) -> dict[str, Any]:
    """A raw list entry as a dict, with the base64 body decoded to JSON."""
    message: dict[str, Any] = json.loads(raw)
    assert message["properties"]["body_encoding"] == "base64"
    message["body"] = json.loads(base64.b64decode(message["body"]))
    return message


@pytest.mark.parametrize(
    ("args", "kwargs", "priority", "expires_s", "time_limit_s", "list_suffix"),
    [
        ([1, 2], {"y": 3}, None, None, None, ""),
        # Nested args and no kwargs (the publisher's shortcut for an empty argsrepr/kwargsrepr).
        ([[1, 2.5, "x"], {"k": None}], {}, 5, 30.0, 10, f"{KOMBU_SEP}3"),
    ],
    ids=["default-priority", "priority-5-expires-limits"],
)
def test_messages_equal_what_send_task_writes(
    app: Celery,
    publisher: BatchPublisher,
    broker: redis.Redis,
    namespace: str,
    args: list[Any],
    kwargs: dict[str, Any],
    priority: int | None,
    expires_s: float | None,
    time_limit_s: int | None,
    list_suffix: str,
) -> None:
    queue = f"idle_{namespace}"  # no worker consumes it
    task_id = f"{namespace}-same-id"  # the same id for both, so ids need no special casing
    headers = {HEADER_JOB_ID: "nightly", HEADER_SCHEDULED_AT: "2030-01-01T00:00:00+00:00", HEADER_TRACE_ID: "t1"}
    soft_limit_s = time_limit_s // 2 if time_limit_s else None
    app.send_task(
        "demo.number_sum",
        args,
        kwargs,
        queue=queue,
        task_id=task_id,
        headers=headers,
        priority=priority,
        expires=expires_s,
        time_limit=time_limit_s,
        soft_time_limit=soft_limit_s,
    )

    def message(task_id: str, args: list[Any], kwargs: dict[str, Any], headers: dict[str, str]) -> TaskMessage:
        return TaskMessage(
            "demo.number_sum",
            args,
            kwargs,
            queue,
            task_id,
            headers,
            priority=priority,
            expires_s=expires_s,
            time_limit_s=time_limit_s,
            soft_time_limit_s=soft_limit_s,
        )

    # A first message of the same shape (other id, arguments and header values) becomes the
    # template; the compared one is built from it.
    first = message(f"{namespace}-first", ["other"], {"z": [1]}, {**headers, HEADER_JOB_ID: "other"})
    publisher.publish([first, message(task_id, args, kwargs, headers)])

    key = queue + list_suffix
    assert {k for k in broker.scan_iter(f"{queue}*")} == {key}  # the same list, kombu's priority naming
    # LPUSH: the newest entry is first.
    ours, template, celerys = (decoded(str(raw)) for raw in broker.lrange(key, 0, -1))
    assert template["headers"]["id"] == f"{namespace}-first"
    assert template["body"] == [["other"], {"z": [1]}, ours["body"][2]]
    for sent in (ours, celerys):
        sent["properties"].pop("delivery_tag")  # send_task: a fresh uuid; ours: the task id, by design
    if expires_s is None:
        assert ours["headers"]["expires"] is None
    else:
        # Absolute times computed a few milliseconds apart.
        gap_s = datetime.fromisoformat(ours["headers"].pop("expires")) - datetime.fromisoformat(
            celerys["headers"].pop("expires")
        )
        assert abs(gap_s.total_seconds()) < 5
    assert ours == celerys
    assert ours["headers"][HEADER_JOB_ID] == "nightly"  # top level, where task.request finds it
    assert ours["properties"]["delivery_info"] == {"exchange": "", "routing_key": queue}
    assert ours["properties"]["priority"] == (priority or 0)


def test_template_path_writes_what_the_first_path_writes(app: Celery) -> None:
    """A message built from its shape's string template is the JSON that Celery's own path
    (the first message of a shape) writes for it, for values that need escaping: '%' (the
    template is a %-format string), quotes, backslashes, non-ASCII."""
    awkward = ['50% "off"', "back\\slash", "caf\u00e9 \u2603", {"%(task_id)s": "%s"}]

    def message(task_id: str, args: list[Any], job_id: str) -> TaskMessage:
        headers = {HEADER_JOB_ID: job_id, HEADER_SCHEDULED_AT: "2030-01-01T00:00:00+00:00", HEADER_TRACE_ID: task_id}
        return TaskMessage("demo.100%_sum", args, {"k": "%%"}, "q%d", task_id, headers, expires_s=30.0)

    compared = message("id-%s-2", awkward, 'job "%(x)s" \u00e9')
    with BatchPublisher(app) as templated, BatchPublisher(app) as first:
        ((_, from_template),) = templated.encode([message("id-1", [1], "plain"), compared])[1:]
        ((_, built),) = first.encode([compared])
    ours, celerys = json.loads(from_template), json.loads(built)
    for payload in (ours, celerys):
        payload["properties"].pop("delivery_tag")
        expires_in = datetime.fromisoformat(payload["headers"].pop("expires")) - datetime.now().astimezone()
        assert 25 < expires_in.total_seconds() <= 30
        assert 29_000 <= int(payload["properties"].pop("expiration")) <= 30_000
    assert ours == celerys
    assert json.loads(base64.b64decode(ours["body"]))[0] == awkward


@pytest.mark.parametrize("delivery_tag", ["", "tid-7.r2"])
def test_the_delivery_tag_and_the_first_id_key_name_the_fire(app: Celery, delivery_tag: str) -> None:
    """What the dispatch audit (shared/lua/audit.lua) relies on: a message's delivery tag is its
    task id unless one is given, and the first '"id": "' of its JSON is the task id's, whatever the
    arguments hold; ``list_key`` names the list ``encode`` pushes to."""
    awkward = ['"id": "not-this"', {"id": "nor-this"}]
    with BatchPublisher(app) as publisher:
        for priority in (None, 5, 9):
            sent = [
                TaskMessage("demo.sleep", awkward, {"id": "x"}, "q", "tid-7", {HEADER_JOB_ID: "j"}, priority=priority,
                            delivery_tag=delivery_tag)
                for _ in range(2)  # the first path, then the template path
            ]  # fmt: skip
            for list_key, payload in publisher.encode(sent):
                assert json.loads(payload)["properties"]["delivery_tag"] == (delivery_tag or "tid-7")
                first = re.search(r'"id": "([^"]*)"', payload)
                assert first and first.group(1) == "tid-7"
                assert list_key == publisher.encoder.list_key("q", priority)


def test_worker_runs_a_batch_and_sees_its_headers(
    settings: AppSettings,
    app: Celery,
    publisher: BatchPublisher,
    broker: redis.Redis,
    namespace: str,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    worker = start_worker(settings, "--pool", "threads", "-c", "2")
    messages = [
        TaskMessage(
            "demo.number_sum",
            [i, 1000],
            {},
            settings.celery.cron_queue,
            f"{namespace}-sum-{i:03d}",
            {HEADER_JOB_ID: f"pubjob-{namespace}-{i:03d}", HEADER_SCHEDULED_AT: "2030-01-01T00:00:00+00:00"},
        )
        for i in range(50)
    ]
    publisher.publish(messages)

    for i, message in enumerate(messages):
        assert AsyncResult(message.task_id, app=app).get(timeout=30) == i + 1000
    # The worker binds the job_id header of task.request to its log lines (workers/hooks.py).
    wait_for(
        lambda: all(f"job_id={m.headers[HEADER_JOB_ID]}" in worker.log() for m in messages),
        10,
        "the worker to log every message's job_id header",
    )


def test_expired_message_is_not_run(
    settings: AppSettings,
    app: Celery,
    publisher: BatchPublisher,
    broker: redis.Redis,
    namespace: str,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    worker = start_worker(settings, "--pool", "threads", "-c", "1")
    queue = settings.celery.cron_queue
    expired = TaskMessage("demo.number_sum", [1, 1], {}, queue, f"{namespace}-expired", {}, expires_s=-5)
    fresh = TaskMessage("demo.number_sum", [2, 2], {}, queue, f"{namespace}-fresh", {}, expires_s=60)
    publisher.publish([expired, fresh])

    assert AsyncResult(fresh.task_id, app=app).get(timeout=30) == 4
    # The worker took the expired message first (same list, older entry) and revoked it.
    wait_for(lambda: AsyncResult(expired.task_id, app=app).state == "REVOKED", 10, "the expired task to be revoked")
    assert not re.search(r"number_sum 1 \+ 1 = 2", worker.log())


def test_ten_thousand_messages_all_land(
    settings: AppSettings, app: Celery, broker: redis.Redis, namespace: str
) -> None:
    queue = f"bulk_{namespace}"
    messages = [
        TaskMessage(
            "demo.number_sum",
            [i, 1],
            {},
            queue,
            f"{namespace}-bulk-{i}",
            {HEADER_JOB_ID: f"job-{i % 50}", HEADER_SCHEDULED_AT: "2030-01-01T00:00:00+00:00"},
        )
        for i in range(10_000)
    ]
    # A client factory this time (the other tests use the app's broker URL).
    with BatchPublisher(app, lambda: create_redis(settings.redis), batch_size=1000) as publisher:
        started = time.perf_counter()
        publisher.publish(messages)
        elapsed_s = time.perf_counter() - started
    print(f"\npublished {len(messages)} messages in {elapsed_s:.3f} s ({len(messages) / elapsed_s:,.0f} msg/s)")

    assert broker.llen(queue) == 10_000
    ids = {json.loads(raw)["headers"]["id"] for raw in broker.lrange(queue, 0, -1)}
    assert ids == {m.task_id for m in messages}
    # FIFO within a queue: the consumer pops from the tail, which holds the first message.
    assert json.loads(broker.lindex(queue, -1) or "{}")["headers"]["id"] == messages[0].task_id


def test_bad_message_publishes_nothing(publisher: BatchPublisher, broker: redis.Redis, namespace: str) -> None:
    queue = f"idle_{namespace}"
    good = TaskMessage("demo.number_sum", [1, 2], {}, queue, f"{namespace}-good", {})
    unencodable = TaskMessage("demo.number_sum", [object()], {}, queue, f"{namespace}-bad", {})
    clashing = TaskMessage("demo.number_sum", [1], {}, queue, f"{namespace}-clash", {"task": "other.task"})
    with pytest.raises(EncodeError):
        publisher.publish([good, unencodable])
    with pytest.raises(ValueError, match="overwrite Celery's own"):
        publisher.publish([good, clashing])
    with pytest.raises(ValueError, match="priority must be 0-9"):
        TaskMessage("demo.number_sum", [], {}, queue, f"{namespace}-p", {}, priority=10)
    assert broker.llen(queue) == 0


def test_unreachable_redis_raises_quickly(namespace: str) -> None:
    down = AppSettings(
        _env_file=None,
        redis={"url": f"redis://127.0.0.1:{free_port()}/0", "socket_timeout_s": 1, "socket_connect_timeout_s": 1},
        celery={"cron_queue": f"cron_{namespace}", "default_queue": f"celery_{namespace}"},
    )
    app = create_celery_app(down)
    message = TaskMessage("demo.number_sum", [1, 2], {}, down.celery.cron_queue, f"{namespace}-down", {})
    try:
        with BatchPublisher(app) as publisher:  # the app's broker URL and socket timeouts
            started = time.monotonic()
            with pytest.raises(DispatchError, match="Publish all 1 again") as raised:
                publisher.publish([message])
            # Not a performance figure: a bound that tells "failed fast" from "hung on a socket".
            assert time.monotonic() - started < 10
        assert isinstance(raised.value.__cause__, redis.ConnectionError)
    finally:
        app.close()
