"""The planner's rules as tables with a fixed ``now``: no clock, no loop, no sleeping."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from scheduler.fires import MANUAL, Fire
from scheduler.planner import (
    AUDIT_REPUBLISH_MAX,
    MAX_CATCH_UP_RECORDS,
    PAUSED,
    REDIS_CAME_BACK_LATE,
    LastDispatch,
    jitter_of,
    message_expiry,
    next_audit,
    plan_audit,
    plan_catch_up,
    plan_due,
    plan_manual,
    plan_missed,
    promoted_release,
    release_tick,
    replan,
)
from scheduler.specs import JobSpec
from shared.fleet import Outcome

NOW = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
D, C, S, M = Outcome.DISPATCHED, Outcome.COALESCED, Outcome.SKIPPED, Outcome.MISSED


def job(**fields: Any) -> JobSpec:
    return JobSpec(**{"id": "job", "task": "demo.sleep", "interval": 1, "misfire_grace_time": 60, **fields})


def at(offset_s: float) -> datetime:
    return NOW + timedelta(seconds=offset_s)


def outcomes(fires: list[Fire]) -> list[tuple[float, Outcome]]:
    return [((f.scheduled_at - NOW).total_seconds(), f.outcome) for f in fires]


# -- intake: fires handed over (due, or due within the look-ahead) ------------------------------


@pytest.mark.parametrize(
    ("fields", "offsets", "expected"),
    [
        # in time, not coalescing: each dispatched
        ({"coalesce": False}, [-3, -2, -1], [(-3, D), (-2, D), (-1, D)]),
        # coalesce: of the overdue ones only the newest runs
        ({"coalesce": True}, [-3, -2, -1], [(-3, C), (-2, C), (-1, D)]),
        # a fire handed over ahead of its time is not late: it never coalesces
        ({"coalesce": True}, [-2, -1, 1, 2], [(-2, C), (-1, D), (1, D), (2, D)]),
        ({"coalesce": True}, [1, 2, 3], [(1, D), (2, D), (3, D)]),
        # past the grace: missed, and never coalesced
        ({"coalesce": True, "misfire_grace_time": 5}, [-10, -7, -4, -2], [(-10, M), (-7, M), (-4, C), (-2, D)]),
        ({"coalesce": False, "misfire_grace_time": 5}, [-10, -2], [(-10, M), (-2, D)]),
        # no grace at all: never missed
        ({"coalesce": False, "misfire_grace_time": None}, [-86400, 0], [(-86400, D), (0, D)]),
        # exactly now counts as overdue
        ({"coalesce": True}, [-1, 0], [(-1, C), (0, D)]),
    ],
)
def test_plan_due_outcomes(fields: dict[str, Any], offsets: list[float], expected: list[tuple[float, Outcome]]) -> None:
    fires = plan_due(job(**fields), [at(s) for s in offsets], NOW)
    assert sorted(outcomes(fires)) == sorted(expected)
    newest = max(
        (f for f in fires if f.outcome is D and f.scheduled_at <= NOW), key=lambda f: f.scheduled_at, default=None
    )
    for fire in fires:
        if fire.outcome is C:
            assert newest is not None
            assert fire.reason == f"coalesced into {newest.stamp}"
        if fire.outcome is M:
            assert "late, grace" in fire.reason


@pytest.mark.parametrize(
    ("leader", "jitter", "offset", "expected_release"),
    [
        (True, 0, 2.0, 2.0),
        (True, 0, 2.0012, 2.005),  # rounded up to the 5 ms grid, never early
        (False, 0, 2.0, 2.0 + 30),  # a follower waits takeover_s
        (True, 5, 2.0, None),  # jitter: 0..5 s, derived from the fire
        (False, 5, 2.0, None),
    ],
)
def test_plan_due_release_times(leader: bool, jitter: float, offset: float, expected_release: float | None) -> None:
    spec = job(jitter=jitter)
    (fire,) = plan_due(spec, [at(offset)], NOW, leader=leader, takeover_s=30)
    assert fire.backup is (not leader)
    if expected_release is None:
        expected_release = offset + jitter_of(spec, at(offset)) + (0 if leader else 30)
        assert 0 < jitter_of(spec, at(offset)) < jitter
    assert fire.release_ts == pytest.approx(release_tick(NOW.timestamp() + expected_release))
    assert fire.release_ts >= at(offset).timestamp()


def test_jitter_is_the_same_on_every_replica_and_differs_per_fire() -> None:
    spec = job(jitter=10)
    assert jitter_of(spec, at(0)) == jitter_of(job(jitter=10), at(0))
    assert len({jitter_of(spec, at(s)) for s in range(20)}) == 20
    assert jitter_of(job(jitter=0), at(0)) == 0


@pytest.mark.parametrize(("leader", "delay"), [(True, 0), (False, 30)])
def test_paused_fires_are_skipped_at_their_due_time(leader: bool, delay: float) -> None:
    fires = plan_due(
        job(jitter=5, coalesce=True), [at(-2), at(-1), at(3)], NOW, leader=leader, takeover_s=30, paused=True
    )
    assert [(f.outcome, f.reason) for f in fires] == [(S, PAUSED)] * 3
    assert [f.release_ts for f in fires] == [release_tick(at(s).timestamp() + delay) for s in (-2, -1, 3)]


def test_missed_and_manual() -> None:
    (missed,) = plan_missed(job(), [at(-500)], "down", NOW)
    assert (missed.outcome, missed.reason, missed.release_ts) == (M, "down", NOW.timestamp())
    manual = plan_manual(job(), NOW, force=True)
    assert (manual.outcome, manual.trigger, manual.force, manual.scheduled_at) == (D, MANUAL, True, NOW)
    assert manual.intent(NOW, _limits()).overlap == "allow"
    assert plan_manual(job(overlap="skip"), NOW).intent(NOW, _limits()).overlap == "skip"


def _limits() -> Any:
    from scheduler.fires import Limits

    return Limits(time_limit_s=60)


@pytest.mark.parametrize(
    ("jitter", "held", "expected"),
    [(0, 32.0, 2.0), (0, 1.0, 1.0), (5, 32.0, None)],
)
def test_a_promoted_backup_is_released_at_its_own_due_time(jitter: float, held: float, expected: float | None) -> None:
    spec = job(jitter=jitter)
    fire = Fire(spec, at(2), backup=True)
    release = promoted_release(fire, NOW.timestamp() + held)
    due = expected if expected is not None else 2 + jitter_of(spec, at(2))
    assert release == pytest.approx(min(release_tick(NOW.timestamp() + due), NOW.timestamp() + held))


# -- restart catch-up ------------------------------------------------------------------------


def _every_second(previous: datetime | None, now: datetime) -> datetime | None:
    if previous is None:  # the first whole second at or after now
        return now.replace(microsecond=0) + (timedelta(seconds=1) if now.microsecond else timedelta())
    return previous + timedelta(seconds=1)


@pytest.mark.parametrize(
    ("grace", "last_offset", "missed", "first_offset", "truncated"),
    [
        (60, -10, 0, -9, False),  # all within grace: handed over (coalesced there)
        (5, -10, 4, -5, False),  # -9..-6 past grace; -5 on handed over
        (None, -10, 0, -9, False),  # no grace: nothing missed
        (1, -(MAX_CATCH_UP_RECORDS + 100), MAX_CATCH_UP_RECORDS, -1, True),  # too many: resume at the horizon
    ],
)
def test_catch_up(grace: float | None, last_offset: float, missed: int, first_offset: float, truncated: bool) -> None:
    plan = plan_catch_up(job(misfire_grace_time=grace), at(last_offset), NOW, _every_second)
    assert len(plan.missed) == missed
    assert plan.first == at(first_offset)
    assert plan.truncated is truncated
    assert all(m < plan.first for m in plan.missed)


# -- decide time: the same rules again, for fires that waited ---------------------------------


def held(spec: JobSpec, offset: float, outcome: Outcome = D, reason: str = "", **fields: Any) -> Fire:
    return Fire(spec, at(offset), outcome, reason, **fields)


@pytest.mark.parametrize(
    ("fields", "offsets", "expected"),
    [
        # fires handed over ahead, due together after a stall: one dispatch, the newest
        ({"coalesce": True}, [-6, -5, -4, -3, -2, -1], [(-6, C), (-5, C), (-4, C), (-3, C), (-2, C), (-1, D)]),
        ({"coalesce": False}, [-3, -2, -1], [(-3, D), (-2, D), (-1, D)]),
        # past grace at decide time: missed, the rest coalesced
        ({"coalesce": True, "misfire_grace_time": 3}, [-5, -4, -2, -1], [(-5, M), (-4, M), (-2, C), (-1, D)]),
        # one fire: nothing to coalesce
        ({"coalesce": True}, [-1], [(-1, D)]),
        # not yet due (a shutdown drain never hands these, but if it did): not coalesced
        ({"coalesce": True}, [-1, 1], [(-1, D), (1, D)]),
    ],
)
def test_replan_coalesces_fires_overdue_together(
    fields: dict[str, Any], offsets: list[float], expected: list[tuple[float, Outcome]]
) -> None:
    spec = job(**fields)
    fires = [held(spec, s) for s in reversed(offsets)]  # arrival order need not be nominal order
    for fire in fires:
        fire.prepared = fire.intent(NOW, _limits(), ("q", "payload"))
    planned = replan(fires, NOW)
    assert outcomes(planned) == expected  # in nominal order
    for fire in planned:
        assert (fire.prepared is not None) is (fire.outcome is D)  # a changed fire is not sent as encoded


def test_replan_keeps_each_jobs_order_and_leaves_other_fires_alone() -> None:
    a, b, c = job(id="a", coalesce=True), job(id="b", coalesce=False), job(id="c", coalesce=True)
    fires = [
        held(a, -1),
        held(b, -1),
        held(a, -3),
        held(c, -2, S, PAUSED),
        held(b, -2),
        held(a, -2, M, "down"),
        held(c, -1, trigger=MANUAL),
        held(c, -3),
    ]
    planned = replan(fires, NOW)
    assert [(f.job.id, (f.scheduled_at - NOW).total_seconds(), f.outcome) for f in planned] == [
        ("a", -3, C),
        ("a", -2, M),  # already decided missed: stays
        ("a", -1, D),
        ("b", -2, D),
        ("b", -1, D),
        ("c", -3, D),  # the only scheduled fire of c still to dispatch
        ("c", -2, S),
        ("c", -1, D),  # manual: never coalesced
    ]


@pytest.mark.parametrize(
    ("state", "outcome", "reason", "expected"),
    [
        ("active", D, "", (D, "")),
        ("paused", D, "", (S, PAUSED)),
        ("gone", D, "", None),
        ("active", S, PAUSED, (D, "")),
        ("paused", S, PAUSED, (S, PAUSED)),
        ("gone", S, PAUSED, None),
        ("paused", C, "coalesced into x", (C, "coalesced into x")),
        ("gone", M, "late", (M, "late")),
    ],
)
def test_replan_applies_the_jobs_state_at_decide_time(
    state: str, outcome: Outcome, reason: str, expected: tuple[Outcome, str] | None
) -> None:
    fire = held(job(), -1, outcome, reason)
    planned = replan([fire], NOW, lambda _: state)
    assert [(f.outcome, f.reason) for f in planned] == ([expected] if expected else [])


def last_dispatch(offset_s: float, decided_offset_s: float) -> LastDispatch:
    fire = Fire(job(), at(offset_s))
    return LastDispatch(fire.scheduled_at, at(decided_offset_s).timestamp(), fire.stamp)


@pytest.mark.parametrize(
    ("fields", "last", "offsets", "expected"),
    [
        # due before the last catch-up (-10) was decided (-8): they came late, coalesced into it
        ({"coalesce": True}, (-10, -8), [-9, -8], [(-9, "-10"), (-8, "-10")]),
        # one due before, one after: the newer runs, the older coalesces into it (one batch)
        ({"coalesce": True}, (-10, -8), [-9, -7], [(-9, "-7"), (-7, "")]),
        # due after the last catch-up was decided: an ordinary fire
        ({"coalesce": True}, (-10, -8), [-7], [(-7, "")]),
        # not coalescing: every fire runs
        ({"coalesce": False}, (-10, -8), [-9, -8], [(-9, ""), (-8, "")]),
        # older than the last catch-up (decided out of order by jitter): not this rule's
        ({"coalesce": True}, (-5, -4), [-6], [(-6, "")]),
        # a jitter that put the fire after the decision: it was not due yet, so it runs
        ({"coalesce": True, "jitter": 30}, (-40, -39.5), [-39.9], [(-39.9, "")]),
    ],
)
def test_replan_coalesces_a_late_fire_into_the_jobs_last_catch_up(
    fields: dict[str, Any],
    last: tuple[float, float],
    offsets: list[float],
    expected: list[tuple[float, str]],
) -> None:
    spec = job(**fields)
    planned = replan([held(spec, s) for s in offsets], NOW, dispatched={"job": last_dispatch(*last)})
    into = {f"coalesced into {Fire(spec, at(s)).stamp}": str(s) for s in (last[0], *offsets)}
    got = [((f.scheduled_at - NOW).total_seconds(), into.get(f.reason, f.reason)) for f in planned]
    if fields.get("jitter"):  # the case needs a jitter that puts the fire past the decision
        assert all(jitter_of(spec, f.scheduled_at) > 0.4 for f in planned)
    assert got == expected
    for fire in planned:
        assert (fire.outcome is C) is bool(fire.reason)


def test_catch_ups_are_marked_where_a_backlog_is_dispatched() -> None:
    spec = job(coalesce=True)
    # at hand-over: the newest of the overdue fires
    assert [(f.outcome, f.catch_up) for f in plan_due(spec, [at(-3), at(-2), at(-1)], NOW)] == [
        (C, False),
        (C, False),
        (D, True),
    ]
    # at decide: the fire others were coalesced into; an ordinary fire is none
    planned = replan([held(spec, -2), held(spec, -1)], NOW)
    assert [(f.outcome, f.catch_up) for f in planned] == [(C, False), (D, True)]
    assert [f.catch_up for f in replan([held(spec, -1)], NOW)] == [False]
    # a retry once Redis came back: whatever is still to be dispatched
    retried = replan([held(job(coalesce=False), -1)], NOW, late_reason=REDIS_CAME_BACK_LATE)
    assert [(f.outcome, f.catch_up) for f in retried] == [(D, True)]


def test_replan_after_redis_came_back_names_the_cause() -> None:
    spec = job(coalesce=True, misfire_grace_time=5)
    planned = replan(
        [held(spec, -9), held(spec, -8), held(spec, -3), held(spec, -1)], NOW, late_reason=REDIS_CAME_BACK_LATE
    )
    assert [(f.outcome, f.reason) for f in planned] == [
        (M, REDIS_CAME_BACK_LATE),
        (M, REDIS_CAME_BACK_LATE),
        (C, f"coalesced into {planned[-1].stamp}"),
        (D, ""),
    ]


def test_a_followers_backups_coalesce_like_the_leaders_fires() -> None:
    spec = job(coalesce=True)
    planned = replan([held(spec, s, backup=True) for s in (-3, -2, -1)], NOW)
    assert [f.outcome for f in planned] == [C, C, D]
    assert all(f.backup for f in planned)  # still checked against the ledger first


def test_a_retry_coalesces_again_into_the_newest_fire() -> None:
    """Fires a failed attempt coalesced into a fire that is not decided either are coalesced
    into the newest fire of the retry; a fire coalesced into one decided before stays."""
    spec = job(coalesce=True)
    first = replan([held(spec, s) for s in (-9, -8, -7)], at(-6))
    assert [f.outcome for f in first] == [C, C, D]
    retry = replan([*first, *(held(spec, s) for s in (-6, -5, -4))], NOW)
    assert [f.outcome for f in retry] == [C, C, C, C, C, D]
    assert {f.reason for f in retry[:-1]} == {f"coalesced into {retry[-1].stamp}"}
    alone = replan([held(spec, -3, C, "coalesced into elsewhere"), held(spec, -9, M, "late")], NOW)
    assert [(f.outcome, f.reason) for f in alone] == [(M, "late"), (C, "coalesced into elsewhere")]


def test_a_fire_coalesced_by_an_earlier_attempt_is_missed_once_past_its_grace() -> None:
    spec = job(coalesce=True, misfire_grace_time=4)
    first = replan([held(spec, s) for s in (-9, -8, -7)], at(-6))
    retry = replan([*first, held(spec, -2), held(spec, -1)], NOW, late_reason=REDIS_CAME_BACK_LATE)
    assert outcomes(retry) == [(-9, M), (-8, M), (-7, M), (-2, C), (-1, D)]


# -- the dispatch audit: a dispatched fire whose message is nowhere ------------------------------


@pytest.mark.parametrize(
    ("fields", "nominal_s", "dispatched_s", "copies", "now_s", "action"),
    [
        # before its message's expiry (grace 60 s from the nominal time): published again
        ({}, -30, -30, 0, 0, "republish"),
        ({}, -59, -59, 2, 0, "republish"),
        # at or past it: a copy would be revoked as expired
        ({}, -60, -60, 0, 0, "lost"),
        ({}, -3600, -3600, 0, 0, "lost"),
        # the job's own expires wins over its grace
        ({"expires": 120}, -90, -90, 0, 0, "republish"),
        ({"expires": 10}, -30, -30, 0, 0, "lost"),
        # dispatched late (a catch-up): the message lives at least a second after its dispatch
        ({}, -100, -0.5, 0, 0, "republish"),
        ({}, -100, -1, 0, 0, "lost"),
        # no expiry at all: published again up to AUDIT_REPUBLISH_MAX copies, then lost
        ({"misfire_grace_time": None}, -86400, -86400, AUDIT_REPUBLISH_MAX - 1, 0, "republish"),
        ({"misfire_grace_time": None}, -86400, -86400, AUDIT_REPUBLISH_MAX, 0, "lost"),
        ({}, -10, -10, AUDIT_REPUBLISH_MAX, 0, "lost"),
    ],
)
def test_audit_republishes_a_fire_still_possible_to_run_else_records_it_lost(
    fields: dict[str, Any], nominal_s: float, dispatched_s: float, copies: int, now_s: float, action: str
) -> None:
    verdict = plan_audit(job(**fields), at(nominal_s), at(dispatched_s), copies, at(now_s))
    assert verdict.action == action
    if action == "republish":
        assert verdict.copy == copies + 1
    else:
        assert verdict.reason and verdict.copy == 0


def test_message_expiry_is_the_nominal_time_plus_expires_else_grace() -> None:
    assert message_expiry(job(), at(0), at(0)) == at(60)
    assert message_expiry(job(expires=5), at(0), at(0)) == at(5)
    assert message_expiry(job(misfire_grace_time=None), at(0), at(0)) is None
    assert message_expiry(job(), at(-600), at(0)) == at(1)


@pytest.mark.parametrize(
    ("expiry_s", "now_s", "expected_s"),
    [
        (None, 0, 3660),  # no expiry: the visibility timeout plus the margin
        (60, 0, 120),  # expires first: its expiry plus the margin
        (5000, 0, 3660),
        (-30, 0, 61),  # expired already: a second from now plus the margin
    ],
)
def test_the_audit_looks_at_a_fire_at_its_deadline_or_its_expiry_if_sooner(
    expiry_s: float | None, now_s: float, expected_s: float
) -> None:
    expiry = None if expiry_s is None else at(expiry_s)
    assert next_audit(at(now_s), expiry, 3660, 60) == at(expected_s)
