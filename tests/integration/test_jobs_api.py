"""The operations on API jobs against a real redis-server, through the Python client and the
``chronoq jobs`` commands (each its own process): validation, versions, ownership, export and
apply, and bad input that must store nothing. No scheduler runs here: what replicas do with the
stored jobs is tests/integration/test_runtime_jobs.py.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scheduler.api import AsyncClient, Client
from shared.errors import BackfillLimitError, JobSpecError, OwnershipError, RedisUnavailableError, VersionConflictError
from shared.names import RedisKeys
from shared.settings import AppSettings
from tests.conftest import chronoq, free_port, make_settings

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def client(settings: AppSettings) -> Iterator[Client]:
    with Client(settings, by="test") as api:
        yield api


def snapshot(settings: AppSettings) -> dict[str, Any]:
    """What a refused change must leave as it was: every API record, the registry, the feed."""
    import redis

    r = redis.Redis.from_url(settings.redis.connection_url(), decode_responses=True)
    keys = RedisKeys(settings.redis.key_prefix)
    state = {"api": r.hgetall(keys.api_jobs), "jobs": r.hgetall(keys.jobs), "feed": r.xlen(keys.changes)}
    r.close()
    return state


def test_create_update_get_list_delete_with_versions(client: Client, settings: AppSettings) -> None:
    created = client.create({"id": "r1", "task": "reports.build", "cron": "0 2 * * *", "args": [7]}, note="new")
    assert (created.version, created.source, created.spec["cron"], created.note) == (1, "api", "0 2 * * *", "new")
    updated = client.update("r1", {"interval": {"minutes": 5}}, expected_version=1)
    assert updated.version == 2
    assert updated.spec["interval"] == 300.0 and "cron" not in updated.spec, "a new trigger replaces the old one"
    assert client.get("r1") == updated
    for i in range(5):
        client.create({"id": f"batch-{i}", "task": "demo.sleep", "interval": 60})
    page = client.list(prefix="batch-", offset=1, limit=2)
    assert ([r.id for r in page.items], page.total) == (["batch-1", "batch-2"], 5)
    assert client.pause("batch-0", note="why").paused
    assert [r.id for r in client.list(paused=True).items] == ["batch-0"]
    deleted = client.delete("r1", expected_version=2)
    assert deleted.id == "r1"
    with pytest.raises(KeyError, match="r1"):
        client.get("r1")


def test_bad_input_is_one_line_per_problem_and_stores_nothing(client: Client, settings: AppSettings) -> None:
    client.create({"id": "keep", "task": "demo.sleep", "interval": 10})
    before = snapshot(settings)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"id": "x", "task": "demo.sleep", "cron": "61 * * * *"}, "job 'x': cron '61 * * * *': minute must be 0-59"),
        ({"id": "x", "task": "demo.sleep", "interval": 5, "crn": "x"}, "job 'x': unknown key 'crn'"),
        ({"id": "x", "task": "demo.sleep", "interval": 5, "args": ["a" * 70_000]}, "the limit is 65536"),
        ({"id": "x", "task": "demo.sleep"}, "job 'x': needs exactly one of cron, interval or date, got none"),
        ({"id": "x", "task": "demo.sleep", "interval": 5, "source": "file"}, "job 'x': unknown key 'source'"),
        ({"id": "keep", "task": "demo.sleep", "interval": 5}, "already exists"),
    ]
    for spec, message in cases:
        with pytest.raises((JobSpecError, OwnershipError)) as caught:
            client.create(spec)
        assert message in str(caught.value)
    with pytest.raises(JobSpecError, match="job 'keep': interval: must be positive"):
        client.update("keep", {"interval": -1})
    with pytest.raises(JobSpecError, match="job 'keep': id: cannot be changed"):
        client.update("keep", {"id": "other"})
    assert snapshot(settings) == before, "a refused change stored something"


def test_concurrent_edits_get_a_version_conflict_and_lose_nothing(client: Client, settings: AppSettings) -> None:
    client.create({"id": "hot", "task": "demo.sleep", "interval": 10, "args": [0]})
    version = client.get("hot").version
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def edit(n: int) -> None:
        with Client(settings, by=f"editor-{n}") as mine:
            barrier.wait()
            try:
                mine.update("hot", {"args": [n]}, expected_version=version)
                outcomes.append(f"ok {n}")
            except VersionConflictError as exc:
                outcomes.append("conflict" if (exc.expected, exc.current) == (version, version + 1) else str(exc))

    threads = [threading.Thread(target=edit, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    winners = [o for o in outcomes if o.startswith("ok")]
    assert (len(winners), outcomes.count("conflict")) == (1, 5)
    stored = client.get("hot")
    assert (stored.version, stored.spec["args"]) == (version + 1, [int(winners[0].split()[1])])
    # Without expected_version an update re-reads and applies on top: none is lost.
    for n in range(3):
        client.update("hot", {"description": f"edit {n}"})
    assert client.get("hot").version == version + 4


def test_file_and_code_jobs_are_refused_naming_their_owner(client: Client, settings: AppSettings) -> None:
    import redis

    r = redis.Redis.from_url(settings.redis.connection_url(), decode_responses=True)
    keys = RedisKeys(settings.redis.key_prefix)
    for job_id, source in (("from-file", "configs/jobs.yaml"), ("from-code", "code")):
        spec = {"id": job_id, "task": "demo.sleep", "interval": 10.0, "source": source}
        r.hset(keys.jobs, job_id, json.dumps({"spec": spec, "source_hash": "x"}))  # as a replica publishes it
    r.close()
    with pytest.raises(OwnershipError, match=r"'from-file': belongs to job file configs/jobs\.yaml; update it in that"):
        client.update("from-file", {"args": [1]})
    with pytest.raises(OwnershipError, match=r"'from-code': is declared in code \(TASK_MODULES\); delete it there"):
        client.delete("from-code")
    with pytest.raises(OwnershipError, match=r"id is already used by a job declared in job file configs/jobs\.yaml"):
        client.create({"id": "from-file", "task": "demo.sleep", "interval": 5})
    assert client.pause("from-file").paused, "pause is allowed on a file job"
    assert client.get("from-code").source == "code"


def test_backfill_past_the_limit_is_refused_and_dispatches_nothing(settings: AppSettings) -> None:
    small = make_settings(
        settings.redis.connection_url(), settings.redis.key_prefix[1:-1], scheduler={"backfill_max_fires": 5}
    )
    from datetime import UTC, datetime, timedelta

    with Client(small) as api:
        api.create({"id": "bf", "task": "demo.sleep", "interval": 1})
        end = datetime.now(UTC) - timedelta(seconds=1)
        with pytest.raises(BackfillLimitError, match=r"more than 5 fires \(SCHEDULER_BACKFILL_MAX_FIRES\)"):
            api.backfill("bf", end - timedelta(seconds=10), end)
        with pytest.raises(BackfillLimitError, match="in the future"):
            api.backfill("bf", end, end + timedelta(hours=1))
    import redis

    r = redis.Redis.from_url(settings.redis.connection_url(), decode_responses=True)
    assert r.llen(small.celery.cron_queue) == 0
    r.close()


def test_redis_down_during_a_write_is_a_clear_error(settings: AppSettings) -> None:
    import asyncio

    down = make_settings(f"redis://127.0.0.1:{free_port()}/0", "down", redis={"socket_connect_timeout_s": 1})

    async def attempt() -> None:
        async with AsyncClient(down) as api:
            await api.create({"id": "x", "task": "demo.sleep", "interval": 5})

    with pytest.raises(RedisUnavailableError, match="job 'x': create not stored: redis unavailable"):
        asyncio.run(attempt())
    result = chronoq(down, "jobs", "add", "--id", "x", "--task", "demo.sleep", "--interval", "5", check=False)
    assert result.returncode == 69
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_cli_add_edit_delete_and_errors(settings: AppSettings) -> None:
    added = chronoq(settings, "jobs", "add", "--id", "c1", "--task", "demo.sleep", "--interval", "10", "--json")
    assert json.loads(added.stdout)["version"] == 1
    snippet = json.dumps({"id": "c2", "task": "demo.sleep", "cron": "*/5 * * * *", "kwargs": {"seconds": 1}})
    chronoq(settings, "jobs", "add", "--spec", snippet)
    edited = chronoq(settings, "jobs", "edit", "c1", "--set", "args=[1, 2]", "--set", "priority=3", "--json")
    record = json.loads(edited.stdout)
    assert (record["version"], record["spec"]["args"], record["spec"]["priority"]) == (2, [1, 2], 3)
    before = snapshot(settings)
    bad = chronoq(settings, "jobs", "edit", "c1", "--set", "cron=61 * * * *", check=False)
    assert bad.returncode == 78
    assert bad.stderr.strip() == "chronoq: job 'c1': cron '61 * * * *': minute must be 0-59"
    stale = chronoq(
        settings, "jobs", "edit", "c1", "--set", "args=[]", "--expected-version", "1", "--json", check=False
    )
    assert stale.returncode == 1 and "version conflict" in json.loads(stale.stdout)["error"][0]
    unknown = chronoq(settings, "jobs", "add", "--id", "c3", "--task", "demo.sleep", "--set", "crn=x", check=False)
    assert unknown.returncode == 78 and "unknown key 'crn'" in unknown.stderr
    assert snapshot(settings) == before
    assert chronoq(settings, "jobs", "remove", "c1", check=False).returncode == 1, "remove is for file jobs"
    chronoq(settings, "jobs", "delete", "c1", "--expected-version", "2")
    gone = chronoq(settings, "jobs", "delete", "c1", check=False)
    assert gone.returncode == 1 and "no job 'c1'" in gone.stderr


def test_apply_prune_round_trips_with_export(settings: AppSettings, tmp_path: Path, client: Client) -> None:
    for i in range(3):
        client.create({"id": f"a{i}", "task": "demo.sleep", "interval": 10 + i, "kwargs": {"seconds": i}})
    exported = tmp_path / "jobs.json"
    chronoq(settings, "jobs", "export", "--output", str(exported))
    original = exported.read_text()
    assert [j["id"] for j in json.loads(original)["jobs"]] == ["a0", "a1", "a2"]
    # Drift: one edited, one deleted, one added.
    client.update("a0", {"interval": 99})
    client.delete("a1")
    client.create({"id": "extra", "task": "demo.sleep", "interval": 5})
    before = snapshot(settings)
    dry = chronoq(settings, "jobs", "apply", str(exported), "--prune", "--dry-run")
    assert dry.stdout.splitlines() == [
        "~ a0: interval: 99.0 -> 10.0",
        "+ a1",
        "- extra",
        "dry run: create 1, update 1, delete 1, unchanged 1",
    ]
    assert snapshot(settings) == before, "a dry run changed something"
    applied = json.loads(chronoq(settings, "jobs", "apply", str(exported), "--prune", "--json").stdout)
    assert (applied["create"], applied["update"], applied["delete"], applied["applied"]) == (
        ["a1"],
        ["a0"],
        ["extra"],
        True,
    )
    again = tmp_path / "again.json"
    chronoq(settings, "jobs", "export", "--output", str(again))
    assert again.read_text() == original
    noop = chronoq(settings, "jobs", "apply", str(exported), "--prune")
    assert noop.stdout.strip() == "applied: create 0, update 0, delete 0, unchanged 3"
    # An invalid file changes nothing and names the file, job and field.
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"jobs": [{"id": "a0", "task": "demo.sleep", "interval": 0}]}))
    before = snapshot(settings)
    refused = chronoq(settings, "jobs", "apply", str(broken), "--prune", check=False)
    assert refused.returncode == 78
    assert f"{broken}: jobs[0] (a0): interval: must be positive" in refused.stderr
    assert snapshot(settings) == before


def test_a_success_resets_the_failure_count(client: Client, settings: AppSettings) -> None:
    from shared.fleet import FireLedger, Outcome
    from shared.redis import create_redis

    client.create({"id": "flaky", "task": "demo.sleep", "interval": 60, "pause_after_failures": 2})
    sync = create_redis(settings.redis)
    ledger = FireLedger(sync, RedisKeys(settings.redis.key_prefix))
    at = "2026-12-01T00:0{}:00+00:00"
    assert ledger.streak("flaky", at.format(0), Outcome.FAILED, "ValueError: x", by="w") == [1, 0]
    assert ledger.streak("flaky", at.format(1), Outcome.SUCCEEDED, by="w") == [0, 0]
    assert ledger.streak("flaky", at.format(2), Outcome.FAILED, "ValueError: y", by="w") == [1, 0]
    assert not client.get("flaky").paused
    assert ledger.streak("flaky", at.format(3), Outcome.FAILED, "KeyError: z", by="w") == [2, 1]
    paused = client.get("flaky")
    assert paused.paused
    assert paused.paused_note == (
        "2 consecutive failures (pause_after_failures: 2); last: fire 2026-12-01T00:03:00+00:00: KeyError: z"
    )
    # A job without the option is never paused by failures.
    client.create({"id": "sturdy", "task": "demo.sleep", "interval": 60})
    for n in range(5):
        assert ledger.streak("sturdy", at.format(n), Outcome.FAILED, "e", by="w") == [n + 1, 0]
    sync.close()


def test_apply_leaves_matching_file_jobs_alone_and_refuses_changing_them(client: Client, settings: AppSettings) -> None:
    import redis

    r = redis.Redis.from_url(settings.redis.connection_url(), decode_responses=True)
    file_spec = {"id": "owned", "task": "demo.sleep", "interval": 10.0, "source": "configs/jobs.yaml"}
    r.hset(RedisKeys(settings.redis.key_prefix).jobs, "owned", json.dumps({"spec": file_spec, "source_hash": "x"}))
    r.close()
    exported = client.export()
    assert [j["id"] for j in exported["jobs"]] == ["owned"]
    plan = client.apply(exported, prune=True)
    assert (plan.unchanged, plan.create, plan.delete) == (["owned"], [], [])
    changed = {"jobs": [{**exported["jobs"][0], "interval": 20}, {"id": "new", "task": "demo.sleep", "interval": 5}]}
    before = snapshot(settings)
    with pytest.raises(OwnershipError, match=r"'owned': belongs to job file configs/jobs\.yaml; update it in that"):
        client.apply(changed)
    assert snapshot(settings) == before, "a refused apply created 'new' all the same"


def test_the_async_client_for_asyncio_apps(settings: AppSettings) -> None:
    import asyncio

    async def app() -> list[int]:
        async with AsyncClient(settings, by="fastapi") as jobs:
            created = await jobs.create({"id": "async-1", "task": "demo.sleep", "interval": 30})
            updated = await jobs.update("async-1", {"kwargs": {"seconds": 1}}, expected_version=created.version)
            page = await jobs.list(source="api")
            await jobs.delete("async-1", expected_version=updated.version)
            return [created.version, updated.version, page.total, (await jobs.list()).total]

    assert asyncio.run(app()) == [1, 2, 1, 0]
