"""A module-level Celery app, only so that ``celery -A workers.app ...`` works (Flower, inspect,
``celery -A workers.app worker``). No chronoq code or test imports this module.

It needs ``REDIS_URL`` (it cannot own an embedded server's lifetime); ``chronoq worker`` is the
supported way to start workers.
"""

from __future__ import annotations

from shared.settings import AppSettings
from workers.hooks import install_worker_hooks
from workers.main import create_worker_app

_settings = AppSettings.load()
if _settings.redis.url is None:
    raise SystemExit("workers.app needs REDIS_URL; or start workers with chronoq worker, which can embed Redis")
install_worker_hooks(_settings)
app = create_worker_app(_settings)
