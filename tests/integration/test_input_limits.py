"""The limits on a job's free-text fields and a change's note, enforced by the operations layer
for every entry point (the CLI and the Python client here, the API and the console in
tests/web/test_input.py), against a real redis-server; and a job at every limit round-trips
through ``chronoq jobs export`` and ``chronoq jobs apply``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scheduler.api import AsyncClient, Client
from scheduler.bounds import (
    MAX_CRON_CHARS,
    MAX_DESCRIPTION_CHARS,
    MAX_JSON_DEPTH,
    MAX_NAME_CHARS,
    MAX_NOTE_CHARS,
    MAX_PAYLOAD_BYTES,
)
from scheduler.jobstore import JobRecord, parse_record, spec_document
from scheduler.specs import STORED, JobSpec
from shared.errors import JobSpecError
from shared.settings import AppSettings
from tests.conftest import chronoq
from tests.integration.test_jobs_api import snapshot

pytestmark = pytest.mark.timeout(120)

SPEC = {"id": "limits", "task": "demo.sleep", "cron": "0 2 * * *"}
TEN_MB = 10 * 1024 * 1024


@pytest.fixture
def client(settings: AppSettings) -> Iterator[Client]:
    with Client(settings, by="test") as api:
        yield api


def at_every_limit() -> dict[str, Any]:
    """A job with every free-text field at its limit, in the costliest form for an export:
    characters JSON writes as 12 bytes, args nested as deep as allowed with one small value a
    line (``jobs export`` indents)."""
    cron = "0,1,2,3,4,5,6,7,8,9 2 * * *"
    kwargs = {"k": "\U0001f600" * 1000}
    args: Any = [0]  # its zeros at depth 64: args is 0, the deepest list 63
    for _ in range(MAX_JSON_DEPTH - 1):
        args = [args]
    spec = {
        "id": "L" * MAX_NAME_CHARS,
        "task": "t" * MAX_NAME_CHARS,
        "queue": "q" * MAX_NAME_CHARS,
        "description": "\U0001f600" * MAX_DESCRIPTION_CHARS,
        "timezone": "America/Argentina/ComodRivadavia",
        "cron": cron + " " * (MAX_CRON_CHARS - len(cron)),
        "kwargs": kwargs,
    }
    # Fill args up to MAX_PAYLOAD_BYTES: the deepest list holds as many zeros as fit (", 0" each).
    deepest = args
    for _ in range(MAX_JSON_DEPTH - 1):
        deepest = deepest[0]
    deepest += [0] * ((MAX_PAYLOAD_BYTES - len(json.dumps([args, kwargs]).encode())) // 3)
    spec["args"] = args
    return spec


def test_over_a_limit_is_refused_naming_job_and_field_and_stores_nothing(
    client: Client, settings: AppSettings, tmp_path: Path
) -> None:
    before = snapshot(settings)
    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps({**SPEC, "description": "d" * TEN_MB}))
    cli = chronoq(settings, "jobs", "add", "--spec", f"@{huge}", check=False)
    assert (cli.returncode, cli.stderr.strip()) == (
        78, f"chronoq: --spec {huge}: larger than 1048576 bytes, the limit of one job's spec"
    )  # fmt: skip
    long = json.dumps({**SPEC, "description": "d" * (MAX_DESCRIPTION_CHARS + 1)})
    cli = chronoq(settings, "jobs", "add", "--spec", long, "--note", "n" * (MAX_NOTE_CHARS + 1), check=False)
    assert cli.returncode == 78 and cli.stderr.strip() == (
        f"chronoq: job 'limits': description: {MAX_DESCRIPTION_CHARS + 1} characters; the limit is {MAX_DESCRIPTION_CHARS}"
    )  # fmt: skip
    with pytest.raises(JobSpecError) as note:
        client.create(SPEC, note="n" * TEN_MB)
    assert note.value.problems == [f"job 'limits': note: {TEN_MB} characters; the limit is {MAX_NOTE_CHARS}"]
    hostile = {**SPEC, "id": "i" * TEN_MB, "task": "t" * TEN_MB, "queue": "q" * TEN_MB, "timezone": "z" * TEN_MB,
               "cron": "*" * TEN_MB, "description": "d" * TEN_MB}  # fmt: skip
    with pytest.raises(JobSpecError) as fields:
        client.create(hostile)
    lines = fields.value.problems
    fields_named = [line.split(": ")[1].split(" ")[0] for line in lines]
    assert fields_named == ["timezone", "queue", "id", "task", "cron", "description"], fields_named
    assert all(line.startswith("job 'iii") and len(line) < 700 for line in lines), [len(line) for line in lines]
    assert snapshot(settings) == before
    created = client.create(SPEC, note="n" * MAX_NOTE_CHARS)
    assert created.note == "n" * MAX_NOTE_CHARS
    with pytest.raises(JobSpecError, match=f"job 'limits': note: {MAX_NOTE_CHARS + 1} characters"):
        client.pause("limits", note="n" * (MAX_NOTE_CHARS + 1))
    with pytest.raises(JobSpecError, match="job 'limits': note: "):
        client.update("limits", {"description": "x"}, note="n" * (MAX_NOTE_CHARS + 1))
    with Client(settings, by="b" * (MAX_NAME_CHARS + 1)) as stranger, pytest.raises(JobSpecError, match="by: 201"):
        stranger.delete("limits")
    assert client.get("limits").version == 1 and not client.get("limits").paused


def test_a_job_at_every_limit_round_trips_through_export_and_apply(
    client: Client, settings: AppSettings, tmp_path: Path
) -> None:
    spec = at_every_limit()
    created = client.create(spec, note="n" * MAX_NOTE_CHARS)
    assert len(json.dumps([created.spec["args"], created.spec["kwargs"]]).encode()) > MAX_PAYLOAD_BYTES - 8
    exported = tmp_path / "jobs.json"
    chronoq(settings, "jobs", "export", "--output", str(exported))
    size = exported.stat().st_size
    assert size < settings.scheduler.job_file_max_bytes // 4, size
    applied = chronoq(settings, "jobs", "apply", str(exported), "--json")
    plan = json.loads(applied.stdout)
    assert (plan["unchanged"], plan["create"], plan["update"], plan["applied"]) == ([spec["id"]], [], [], True)
    print(f"a job at every limit exports to {size} bytes")


async def test_a_job_stored_before_the_limits_keeps_loading(settings: AppSettings) -> None:
    """A job an earlier version stored with a description over today's limit is still read by
    every face and loaded by the replicas (parse_record); only new input is held to it."""
    long = {**SPEC, "description": "d" * (MAX_DESCRIPTION_CHARS + 1)}
    async with AsyncClient(settings, by="test") as api:
        ops = api.ops
        spec = JobSpec.model_validate({**ops.defaults.model_dump(), **long, "source": "api"}, context=STORED)
        record = JobRecord(id="limits", spec=spec_document(spec))
        await ops.store.write("create", "limits", record=record, spec=spec, audit=ops._audit("create", "limits", ""))
        assert (await api.get("limits")).spec["description"] == long["description"]
        assert [r.id for r in (await api.list()).items] == ["limits"]
        assert (await ops.operator.show("limits"))["spec"]["description"] == long["description"]
        _, loaded = parse_record(str(await ops.store.raw("limits")))
        assert loaded.description == long["description"]
        with pytest.raises(JobSpecError, match=f"job 'limits': description: {MAX_DESCRIPTION_CHARS + 1} characters"):
            await api.update("limits", {"args": [1]})
