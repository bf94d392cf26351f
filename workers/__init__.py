"""The worker fleet: Celery workers for chronoq's queues, started by ``chronoq worker`` (:mod:`workers.command`)."""

from __future__ import annotations

from workers.main import main

__all__ = ["main"]
