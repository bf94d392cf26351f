"""``chronoq web``: the web console and the JSON API (``/api/v1``) over the operations layer.

>>> app = create_app(settings)                    # serve it: uvicorn, or `chronoq web`
>>> my_app.mount("/chronoq", create_app(settings))  # or mount it into a FastAPI/Starlette app

Stateless: it reads and writes Redis like the CLI, so any number of copies may run.
"""

from __future__ import annotations

from scheduler.web.app import create_app

__all__ = ["create_app"]
