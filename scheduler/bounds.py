"""Bounds on every number of a job file, so that arithmetic on a hostile value (a timedelta or
float overflow, int -> str of a 5,000-digit integer) is a validation problem naming the file,
the job and the field, never a crash."""

from __future__ import annotations

import math
from typing import Any

MAX_DURATION_S = 10 * 365 * 86400
"""Ten years: the longest interval, jitter, misfire grace, expiry or time limit."""
MAX_INSTANCES = 1_000_000
MAX_YEAR = 9000
"""date, start_date and end_date must be before this year (datetime ends at 9999)."""
JSON_INT_RANGE = (-(2**63), 2**64)
"""Integers in args and kwargs: 64 bits, what every JSON consumer (and Lua) can read."""


def safe_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, and never an error: an integer of more than
    4,300 digits cannot be turned into text (Python >= 3.11), it is described instead, and so
    is a list or mapping nested too deep for ``repr`` (a RecursionError)."""
    if isinstance(value, int) and value.bit_length() > 1000:
        return f"<an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits>"
    try:
        text = repr(value)
    except ValueError:  # a container holding such an integer
        return f"<a {type(value).__name__} holding a huge integer>"
    except RecursionError:
        return f"<a {type(value).__name__} nested too deep to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- text and documents ------------------------------------------------------------------------
# Every free-text field has a limit, checked by the operations layer (scheduler.specs for a
# job's fields, scheduler.jobops and scheduler.operator for notes and who), so the CLI, the
# Python client, the API and the console refuse the same things with the same message. A job
# at every limit exports (``chronoq jobs export``) to well under 1 MiB: apply takes it back.

MAX_NAME_CHARS = 200
"""A job's id, task and queue; who made a change (``by``)."""
MAX_DESCRIPTION_CHARS = 4000
MAX_NOTE_CHARS = 1000
"""A change's note (create, edit, delete, pause, resume, run now, backfill, remove)."""
MAX_TIMEZONE_CHARS = 64
"""IANA names are at most 32 characters."""
MAX_CRON_CHARS = 256
"""A crontab string, or each value of a cron mapping."""
MAX_PAYLOAD_BYTES = 64 * 1024
"""A job's args and kwargs together, as JSON."""
MAX_JSON_DEPTH = 64
"""Levels of nesting in a job's args or kwargs."""

MAX_DOCUMENT_BYTES = 1024 * 1024
"""A spec typed or posted as text: a console form field, ``jobs add --spec``, an API body."""
MAX_DOCUMENT_DEPTH = 100
"""Levels of nesting of such a document (args at their deepest need 66 in an API body)."""
MAX_DOCUMENT_NODES = 50_000
"""Values in such a document: args and kwargs within MAX_PAYLOAD_BYTES hold at most ~33,000."""
MAX_REQUEST_BYTES = 4 * MAX_DOCUMENT_BYTES
"""An HTTP request body of the console (a form field is URL-encoded: up to 3 bytes a byte)."""


def name_repr(value: Any) -> str:
    """A job id (or any name) for a message: whole when it is within MAX_NAME_CHARS, cut when
    a hostile one is not (a 10 MB id must not come back ten times in an error)."""
    return safe_repr(value, MAX_NAME_CHARS + 2)


def text_problem(value: str, limit: int) -> str | None:
    """``N characters; the limit is L``, or None when ``value`` fits."""
    if len(value) <= limit:
        return None
    return f"{len(value)} characters; the limit is {limit}"


def depth_problem(value: Any, limit: int = MAX_DOCUMENT_DEPTH) -> str | None:
    """``nested more than L levels deep`` when lists and mappings nest past ``limit`` (the
    value itself is level 1), else None. Iterative: never a RecursionError."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > limit:
            return f"nested more than {limit} levels deep"
        stack += [(child, depth + 1) for child in children]
    return None
