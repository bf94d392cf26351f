"""The console's pages and forms over real HTTP against a real redis-server (no browser): edit
with the version read, a stale edit refused as a conflict, backfill preview, delete, the live
partials htmx asks for, the outcome rate carried by the overview, and the timeline."""

from __future__ import annotations

import html
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from shared.names import RedisKeys
from shared.settings import AppSettings
from tests.conftest import RedisServer, chronoq
from tests.web.conftest import ConsoleProcess

pytestmark = pytest.mark.timeout(120)

SPEC = {"id": "hourly-report", "task": "demo.sleep", "cron": "0 * * * *", "args": [1]}


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found
    return found.group(1)


def test_edit_conflict_backfill_preview_and_delete_through_the_forms(
    settings: AppSettings, redis_server: RedisServer, start_console: Any
) -> None:
    console: ConsoleProcess = start_console(settings)
    keys = RedisKeys(settings.redis.key_prefix)
    with console.http() as http:
        assert http.post("/api/v1/jobs", json={"spec": SPEC}).status_code == 201
        page = http.get("/jobs/hourly-report")
        token = csrf_of(page.text)
        assert "Edit (version 1)" in page.text and 'name="expected_version" value="1"' in page.text

        edited_spec = json.dumps({**SPEC, "args": [2]})
        edit = {"csrf": token, "spec": edited_spec, "expected_version": "1", "note": "two"}
        done = http.post("/jobs/hourly-report/edit", data=edit)
        assert done.status_code == 303 and "saved+hourly-report+%28version+2%29" in done.headers["location"]
        stale = http.post("/jobs/hourly-report/edit", data={**edit, "spec": json.dumps({**SPEC, "args": [3]})})
        assert stale.status_code == 409 and "version conflict" in stale.text
        assert '"args": [\n    3' in stale.text or "[3]" in stale.text, "the refused edit keeps what was typed"
        bad = http.post("/jobs/hourly-report/edit", data={**edit, "expected_version": "2", "spec": "cron: [x"})
        assert bad.status_code == 422 and "spec: not YAML or JSON" in bad.text
        with redis_server.client() as r:
            assert json.loads(r.hget(keys.api_jobs, "hourly-report") or "{}")["spec"]["args"] == [2]

        end = datetime.now(UTC).replace(second=30, microsecond=0) - timedelta(minutes=2)
        form = {"csrf": token, "start": (end - timedelta(hours=2)).isoformat(), "end": end.isoformat(), "preview": "1"}
        preview = http.post("/jobs/hourly-report/backfill", data=form)
        assert preview.status_code == 200 and "Nothing has been sent" in preview.text
        assert re.search(r"2 fires would be sent now", preview.text), preview.text[:2000]
        with redis_server.client() as r:
            assert r.llen(keys.history("hourly-report")) == 0
        bad_time = http.post("/jobs/hourly-report/backfill", data={**form, "start": "yesterday"})
        assert bad_time.status_code == 422 and "backfill start: not an ISO time" in bad_time.text

        gone = http.post("/jobs/hourly-report/delete", data={"csrf": token, "expected_version": "2", "note": "x"})
        assert gone.status_code == 303 and gone.headers["location"].startswith("/jobs?done=deleted")
        missing = http.get("/jobs/hourly-report")
        assert missing.status_code == 404 and "no job 'hourly-report'" in html.unescape(missing.text)


def test_live_partials_rates_and_timeline(settings: AppSettings, redis_server: RedisServer, start_console: Any) -> None:
    console: ConsoleProcess = start_console(settings)
    keys = RedisKeys(settings.redis.key_prefix)
    with console.http() as http:
        assert http.post("/api/v1/jobs", json={"spec": SPEC}).status_code == 201
        full = http.get("/")
        assert full.status_code == 200 and "<html" in full.text
        # A live region polls while the tab is visible: console.js cancels a hidden tab's polls.
        assert "data-live" in full.text and "/static/console.js" in full.text
        carried = re.search(r"hx-vals='([^']+)'", full.text)
        assert carried, "the overview carries its counters to the next refresh"
        prev = json.loads(carried.group(1))["prev"]
        with redis_server.client() as r:  # as if 30 fires succeeded since
            r.hincrby(keys.counters, "succeeded", 30)
        live = http.get("/", params={"prev": prev}, headers={"HX-Request": "true", "HX-Target": "overview-live"})
        assert live.status_code == 200 and "<html" not in live.text and 'id="overview-live"' in live.text
        rate = re.search(r"· ([\d.]+)/min", live.text)
        assert rate and float(rate.group(1)) > 0

        table = http.get("/jobs", params={"q": "hourly"}, headers={"HX-Request": "true", "HX-Target": "jobs-table"})
        assert "<html" not in table.text and "1 job," in table.text and "hourly-report" in table.text

        timeline = http.get("/timeline", params={"minutes": 180})
        assert timeline.status_code == 200 and "fires in the next 180 minutes" in timeline.text
        assert timeline.text.count('href="/jobs/hourly-report"') in (2, 3)
        assert "<svg" in timeline.text


def test_the_overview_and_status_show_what_the_dispatch_audit_found(
    settings: AppSettings, redis_server: RedisServer, start_console: Any
) -> None:
    keys = RedisKeys(settings.redis.key_prefix)
    with redis_server.client() as r:
        counts = {"recovered_republished": 2, "recovered_reindexed": 1, "recovered_queued": 3, "lost": 1}
        r.hset(keys.counters, mapping={**counts, "dispatched": 9})
        r.zadd(keys.dispatched, {"job\x1f2030-01-01T00:00:00+00:00": 1})
    console: ConsoleProcess = start_console(settings)
    with console.http() as http:
        page = html.unescape(http.get("/").text)
    assert "Dispatch audit" in page and "2 · 1 · 1" in page
    assert "3 still queued · 0 held unacked · 1 not started yet" in page
    assert "1 dispatched fire recorded lost" in page
    status = chronoq(settings, "status", check=False)
    assert (
        "audit       2 republished, 1 reindexed, 1 lost; 3 still queued and 0 held unacked at its look" in status.stdout
    )
    assert "1 dispatched, not started yet" in status.stdout and "recovered_" not in status.stdout
    shown = json.loads(chronoq(settings, "status", "--json", check=False).stdout)
    assert shown["audit"] == {"queued": 3, "unacked": 0, "reindexed": 1, "republished": 2, "lost": 1}
