"""The worker heartbeat: what ``chronoq status`` reads to list the workers it has seen."""

from __future__ import annotations

import json
import os
import threading
import time

import redis
from loguru import logger

from shared.redis import create_redis
from shared.settings import AppSettings

HEARTBEAT_INTERVAL_S = 2.0


class Heartbeat:
    """``HSET workers hostname {last_seen_ms, pid, queues, tasks}`` every few seconds from a
    daemon thread of the worker's main process (never on Celery's event loop); ``HDEL`` at stop.
    ``tasks`` are the task names the worker has registered, so ``chronoq status`` can name the
    jobs whose task no live worker runs."""

    def __init__(self, settings: AppSettings, key: str, hostname: str, queues: list[str], tasks: list[str]) -> None:
        self.hostname = hostname
        self.queues = queues
        self.tasks = tasks
        self.key = key
        self.client = create_redis(settings.redis)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chronoq-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(HEARTBEAT_INTERVAL_S + 1)
        try:
            self.client.hdel(self.key, self.hostname)
        except redis.RedisError as exc:
            logger.error("worker heartbeat not removed hostname={}: {}", self.hostname, exc)
        self.client.close()

    def _run(self) -> None:
        failing = False
        while True:
            beat = {
                "last_seen_ms": int(time.time() * 1000),
                "pid": os.getpid(),
                "queues": self.queues,
                "tasks": self.tasks,
            }
            try:
                self.client.hset(self.key, self.hostname, json.dumps(beat))
                failing = False
            except redis.RedisError as exc:
                if not failing:  # one line per outage, not one per beat
                    logger.error("worker heartbeat failed hostname={}: {}", self.hostname, exc)
                failing = True
            if self._stop.wait(HEARTBEAT_INTERVAL_S):
                return
