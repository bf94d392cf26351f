"""The Lua scripts touch exactly the keys ``RedisKeys`` names, and their headers match Python.

The scripts run against a real redis-server under ``MONITOR``: every command a script runs is
read back with its arguments, ``COMMAND GETKEYS`` says which are keys, and each key must be one
``RedisKeys`` builds for the jobs and fires of the scenario (or a broker list it was given).
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from importlib import resources

import pytest
import redis
import redis.asyncio

from scheduler.jobstore import JobRecord, JobStore, spec_document
from scheduler.specs import JobSpec
from shared import lua
from shared.fleet import FIRE_FIELDS, KEY_TEMPLATES, AuditCheck, FireIntent, FireLedger, Outcome, Overlap
from shared.names import RedisKeys, fire_task_id_of
from shared.redis import create_redis
from shared.settings import AppSettings

pytestmark = pytest.mark.timeout(60)

STOP = "chronoq-test-monitor-stop"
JOB_SCRIPTS = ("jobwrite", "streak", "jobstats")
"""Scripts given every key as KEYS (no per-job key templates)."""

_ARG = re.compile(r'"((?:[^"\\]|\\.)*)"')


def _unescape(arg: str) -> str:
    """Undo redis's sdscatrepr quoting of one MONITOR argument (keys are ASCII)."""
    return re.sub(r"\\x([0-9a-f]{2})|\\(.)", lambda m: chr(int(m[1], 16)) if m[1] else m[2], arg)


class ScriptCommands:
    """Records the commands Lua scripts run (``[db lua]`` lines of MONITOR) until stopped."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.commands: list[list[str]] = []
        self._monitor = client.monitor()  # type: ignore[no-untyped-call]
        self._monitor.__enter__()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            line = str(self._monitor.connection.read_response())
            args = [_unescape(a) for a in _ARG.findall(line)]
            if args == ["ECHO", STOP]:
                return
            if " lua] " in line:
                self.commands.append(args)

    def stop(self) -> list[list[str]]:
        self.client.echo(STOP)
        self._thread.join(10)
        self._monitor.__exit__()
        return self.commands


@pytest.fixture
def client(settings: AppSettings) -> Iterator[redis.Redis]:
    client = create_redis(settings.redis)
    yield client
    client.close()


def run_every_script(ledger: FireLedger, keys: RedisKeys, queue: str, url: str) -> list[tuple[str, str]]:
    """Decide, buffer, release, start, finish, retire and fence; the (job, scheduled_at) used."""
    fires = [("buf", f"2020-01-01T00:00:0{i}+00:00") for i in range(3)]
    fires += [("many", f"2020-01-01T00:01:{i:02d}.250000+00:00") for i in range(6)]

    def intent(job_id: str, at: str, overlap: Overlap) -> FireIntent:
        return FireIntent(
            job_id,
            at,
            fire_task_id_of(job_id, at),
            Outcome.DISPATCHED,
            overlap=overlap,
            slot_lapse_ms=60_000,
            deadline_ms=0,
            list_key=queue,
            payload="{}",
        )

    def run(job_id: str, at: str) -> None:
        task_id = fire_task_id_of(job_id, at)
        _, _, _, attempt = ledger.start(job_id, at, task_id, "h:1", 60_000)
        assert ledger.renew(job_id, at, task_id, "h:1", int(attempt), 60_000) == 1
        ledger.finish(job_id, at, task_id, Outcome.SUCCEEDED, runner="h:1", attempt=int(attempt))

    buf = [intent(j, at, Overlap.BUFFER_ONE) for j, at in fires[:3]]
    assert ledger.decide(buf, owner="t") == ["dispatched", "buffered", "skipped"]
    undecided = ("buf", "2020-01-01T00:00:09+00:00")
    assert ledger.decided([fires[0], fires[1], undecided]) == [1, 1, 0]
    run(*fires[0])  # frees the slot: the buffered fire goes out from finish
    assert ledger.release(["buf"]) == [0]
    for job_id, at in fires[3:]:
        assert ledger.decide([intent(job_id, at, Overlap.ALLOW)], owner="t") == ["dispatched"]
        run(job_id, at)
    retired = fires[3]
    assert ledger.decided([retired]) == [1]
    assert ledger.decide([intent(*retired, Overlap.ALLOW)], owner="t") == ["decided"]
    task_id = fire_task_id_of(*retired)
    assert ledger.start(*retired, task_id, "h:2", 1000) == ["done", "retired", 0, 0]
    assert ledger.finish(*retired, task_id, Outcome.FAILED, runner="h:2") == ["stale", "retired"]
    run_audit(ledger, keys, queue, url)
    run_job_scripts(ledger, keys, url)
    stats = redis.Redis.from_url(url, decode_responses=True)
    jobstats = stats.register_script(lua.source("jobstats"))  # what a scrape reads of each job
    assert jobstats(keys=[key for job in ("buf", "many") for key in (keys.job_counters(job), keys.inflight(job))])
    stats.close()
    return [*fires, undecided, *AUDITED]


AUDITED = [("aud", "2020-01-01T00:02:00+00:00"), ("aud", "2020-01-01T00:02:01+00:00")]


def run_audit(ledger: FireLedger, keys: RedisKeys, queue: str, url: str) -> None:
    """audit: one fire whose message is nowhere (republished, then lost), one in unacked only."""
    unacked = (keys.key("unacked"), keys.key("unacked_index"))
    for job_id, at in AUDITED:
        intent = FireIntent(job_id, at, fire_task_id_of(job_id, at), Outcome.DISPATCHED, overlap=Overlap.ALLOW,
                            slot_lapse_ms=60_000, list_key=queue, payload="{}")  # fmt: skip
        assert ledger.decide([intent], owner="t") == ["dispatched"]
    stray = redis.Redis.from_url(url, decode_responses=True)
    stray.hset(unacked[0], fire_task_id_of(*AUDITED[1]), '[{}, "", "q"]')
    stray.close()
    looks = [AuditCheck(job_id, at, 1) for job_id, at in AUDITED]
    assert [r[0] for r in ledger.audit(looks, [queue], unacked, 100)] == ["nowhere", "reindexed"]
    republish = AuditCheck(*AUDITED[0], 1, "republish", copy=1, slot_lapse_ms=1000, data="{}")
    assert ledger.audit([republish], [queue], unacked, 100)[0][:3] == ["republished", 1, 1]
    lost = AuditCheck(*AUDITED[0], 1, "lost", data="gone")
    assert ledger.audit([lost], [queue], unacked, 100)[0][:2] == ["lost", 1]
    assert ledger.release(["aud"]) == [0]  # the lost fire's slot is free; nothing waits


def run_job_scripts(ledger: FireLedger, keys: RedisKeys, url: str) -> None:
    """jobwrite (create, update, delete of an API job) and streak (two failures pause it)."""

    async def writes() -> None:
        client = redis.asyncio.Redis.from_url(url, decode_responses=True)
        store = JobStore(client, keys)
        spec = JobSpec(id="api", task="demo.sleep", interval=5, source="api", pause_after_failures=2)
        record = JobRecord(id="api", spec=spec_document(spec))
        audit = {"action": "t", "job": "api", "note": "", "by": "t", "at_ms": 0}
        assert await store.write("create", "api", record=record, spec=spec, audit=audit) == (1, False)
        assert await store.write("update", "api", expected=1, record=record, spec=spec, audit=audit) == (2, False)
        assert ledger.streak("api", "2020-01-01T00:00:00+00:00", Outcome.FAILED, "boom") == [1, 0]
        assert ledger.streak("api", "2020-01-01T00:00:01+00:00", Outcome.FAILED, "boom") == [2, 1]
        assert ledger.streak("api", "2020-01-01T00:00:02+00:00", Outcome.SUCCEEDED) == [0, 0]
        assert await store.write("delete", "api", audit=audit) == (2, False)
        await client.aclose()

    asyncio.run(writes())


def test_scripts_touch_only_the_keys_redis_keys_names(client: redis.Redis, settings: AppSettings) -> None:
    keys = RedisKeys(settings.redis.key_prefix)
    queue = f"{settings.celery.cron_queue}"
    ledger = FireLedger(client, keys, history_limit=2, fence_window_s=0)
    monitor = ScriptCommands(client)
    try:
        fires = run_every_script(ledger, keys, queue, settings.redis.connection_url())
    finally:
        commands = monitor.stop()
    touched: set[str] = set()
    for command in commands:
        if command[0].upper() in ("TIME",):
            continue
        touched.update(str(k) for k in client.command_getkeys(*command))
    job_ids = {job_id for job_id, _ in fires}
    named = {keys.counters, keys.last_fire, keys.buffered, keys.fence, keys.dispatched, queue}
    named |= {keys.key("unacked"), keys.key("unacked_index")}  # kombu's, under the test's prefix
    named |= {keys.api_jobs, keys.changes, keys.audit, keys.jobs, keys.paused, keys.fail_streak, keys.history("api")}
    named.add(keys.invalid_jobs)
    named |= {keys.fire(job_id, at) for job_id, at in fires}
    for job_id in job_ids:
        named |= {keys.history(job_id), keys.job_counters(job_id), keys.inflight(job_id), keys.buffer(job_id)}
    assert touched - named == set(), "keys the scripts build that RedisKeys does not name"
    # The scenario reaches every key it could (so the check above covered each template).
    assert named - touched == set()


def test_decide_header_names_the_fire_fields_in_order() -> None:
    header = re.search(r"^-- Fire fields: (.+)$", lua.source("decide"), re.MULTILINE)
    assert header is not None
    assert tuple(header[1].split(", ")) == FIRE_FIELDS
    # The script's own unpacking reads them in that order, too: local name = f[i] (or tonumber(f[i])).
    read: dict[int, str] = {}
    for names, values in re.findall(r"^  local ([a-z_, ]+) = (.*f\[\d+\].*)$", lua.source("decide"), re.MULTILINE):
        for name, value in zip(names.split(", "), values.split(", "), strict=True):
            read[int(re.findall(r"f\[(\d+)\]", value)[0])] = name
    assert tuple(read[i] for i in sorted(read)) == FIRE_FIELDS


def test_common_header_names_the_key_templates_in_order() -> None:
    names = re.search(r"local names = \{([^}]*)\}", lua.source("common"))
    assert names is not None
    assert [n.strip().strip("'") for n in names[1].split(",")] == list(KEY_TEMPLATES)


def test_every_script_is_package_data_and_documents_its_keys_and_argv() -> None:
    shipped = {p.name for p in resources.files("shared.lua").iterdir() if p.name.endswith(".lua")}
    assert shipped == {f"{name}.lua" for name in lua.SCRIPTS} | {"common.lua"}
    for name in lua.SCRIPTS:
        text = resources.files("shared.lua").joinpath(f"{name}.lua").read_text()
        head = text.split("--#include", 1)[0]
        assert re.search(r"^-- KEYS\[1\] ", head, re.MULTILINE), name
        argv = r"^-- ARGV\[1\] " if name in JOB_SCRIPTS else r"^-- ARGV\[1\] key templates"
        assert re.search(argv, head, re.MULTILINE), name
        assert not re.search(r"^--#include", lua.source(name), re.MULTILINE), name
