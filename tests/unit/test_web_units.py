"""Pure units of the web console: who may bind where, the CSRF token's signature, basic-auth
parsing, the timeline's buckets and the charts' escaping."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import SecretStr

from scheduler.web.charts import runs_chart, timeline_chart
from scheduler.web.console import error_status, histogram
from scheduler.web.pages import _rates
from scheduler.web.security import Guard, _basic, bind_problem, is_loopback
from shared.errors import (
    BackfillLimitError,
    JobSpecError,
    OwnershipError,
    RedisUnavailableError,
    UnknownJobError,
    VersionConflictError,
)
from shared.settings import WebSettings

OPEN = WebSettings()
TOKEN = WebSettings(token=SecretStr("t0ken"))
BASIC = WebSettings(username="ops", password=SecretStr("pw"))
HALF = WebSettings(username="ops")


@pytest.mark.parametrize(
    ("host", "web", "refused"),
    [
        ("127.0.0.1", OPEN, False),
        ("::1", OPEN, False),
        ("localhost", OPEN, False),
        ("127.0.0.2", OPEN, False),
        ("0.0.0.0", OPEN, True),
        ("::", OPEN, True),
        ("10.1.2.3", OPEN, True),
        ("example.org", OPEN, True),
        ("0.0.0.0", HALF, True),
        ("0.0.0.0", TOKEN, False),
        ("0.0.0.0", BASIC, False),
    ],
)
def test_bind_needs_auth_off_loopback(host: str, web: WebSettings, refused: bool) -> None:
    problem = bind_problem(host, web)
    assert (problem is not None) == refused
    if problem:
        assert problem.startswith("WEB_HOST:") and host in problem


def test_loopback() -> None:
    assert is_loopback("[::1]") and not is_loopback("192.168.0.1")


def test_csrf_tokens_are_signed_by_the_console() -> None:
    guard, other = Guard(BASIC), Guard(WebSettings(username="ops", password=SecretStr("other")))
    token = guard.new_token()
    assert guard.token_valid(token) and token != guard.new_token()
    assert not other.token_valid(token), "another secret, another key"
    nonce, _, signature = token.partition(".")
    assert not guard.token_valid(f"{nonce}x.{signature}") and not guard.token_valid(nonce)
    assert not guard.token_valid("")
    assert Guard(BASIC).token_valid(token), "copies with the same credentials accept each other's tokens"
    assert not Guard(OPEN).token_valid(Guard(OPEN).new_token().split(".")[0] + ".00"), "random key without secrets"


def test_basic_parsing() -> None:
    assert _basic(base64.b64encode(b"ops:p:w").decode()) == ("ops", "p:w")
    assert _basic("not base64!") == (None, "")
    assert _basic(base64.b64encode(b"no-colon").decode()) == (None, "")


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (JobSpecError(["job 'x': cron: bad", "job 'x': queue: bad"]), 422),
        (UnknownJobError("x"), 404),
        (VersionConflictError("x", 1, 2), 409),
        (OwnershipError("x", "owned by a.yaml"), 409),
        (BackfillLimitError("job 'x': backfill: too many"), 422),
        (RedisUnavailableError("redis://:secret@h:1 down"), 503),
        (ConnectionRefusedError("refused"), 503),
        (ValueError("a bug"), None),
    ],
)
def test_error_statuses(error: Exception, status: int | None) -> None:
    found = error_status(error)
    assert (found[0] if found else None) == status
    if isinstance(error, JobSpecError):
        assert found is not None and found[1] == error.problems, "one line per problem, as the CLI prints them"


def test_histogram_buckets_the_next_minutes() -> None:
    now = datetime(2026, 12, 1, 1, 59, tzinfo=UTC)
    stamps = [(now + timedelta(seconds=s)).timestamp() for s in sorted((0, 59, 60, 3599, 3600, -1, 59.5))]
    counts = histogram(stamps, now, 60)
    assert (len(counts), counts[0], counts[1], counts[59], sum(counts)) == (60, 3, 1, 1, 5)
    assert histogram([], now, 60) == [0] * 60


def test_charts_escape_text() -> None:
    chart = runs_chart([{"scheduled_at": "t", "final": "failed", "error": "<script>alert(1)</script>"}])
    assert "<script>" not in chart and "&lt;script&gt;" in chart and 'class="o-bad"' in chart
    assert "No fires" in runs_chart([])
    assert "peak 3 fires" in timeline_chart([0, 3, 1], datetime(2026, 12, 1, tzinfo=UTC), 3)


def test_outcome_rates_from_the_counters_the_page_carried() -> None:
    prev = json.dumps({"at_ms": 0, "counters": {"succeeded": 10, "failed": 1}})
    assert _rates(prev, 30_000, {"succeeded": 40, "failed": 1, "missed": 2}) == {
        "succeeded": 60.0,
        "failed": 0.0,
        "missed": 4.0,
    }
    assert _rates("", 30_000, {"succeeded": 1}) == {}, "first load: no rate yet"
    assert _rates(prev, 30_000, {"succeeded": 3}) == {}, "counters went back (data loss): no rate"
    assert _rates("{not json", 30_000, {}) == {} and _rates('{"at_ms": "x"}', 1, {}) == {}
    assert _rates(prev, 3_600_000, {"succeeded": 99}) == {}, "too old to mean 'now'"
