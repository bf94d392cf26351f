"""What the operations of :mod:`scheduler.jobops` return (the CLI, the client and the web
console show these)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from scheduler.jobstore import JobRecord


class JobPage(BaseModel):
    items: list[JobRecord]
    total: int
    offset: int
    limit: int


class TriggerResult(BaseModel):
    job: str
    outcome: str
    task_id: str
    scheduled_at: str
    reason: str = ""
    forced: bool = False
    dispatched: bool = False


class BackfillResult(BaseModel):
    job: str
    overlap: Literal["allow", "sequential"]
    dispatched: list[str]
    """scheduled_at of the fires dispatched by this request."""
    already_decided: list[str]
    """Nominal fires of the range the ledger had decided (ran, skipped...): left alone."""
    queued: list[str]
    """``sequential``: fires dispatched later, each once the previous one finished."""
    dry_run: bool = False
    """A preview: ``dispatched`` and ``queued`` are what the request would send; nothing sent."""


class ApplyPlan(BaseModel):
    create: list[str] = []
    update: list[str] = []
    delete: list[str] = []
    unchanged: list[str] = []
    diff: list[str] = []
    applied: bool = False
