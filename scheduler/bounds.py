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
    4,300 digits cannot be turned into text (Python >= 3.11), it is described instead."""
    if isinstance(value, int) and value.bit_length() > 1000:
        return f"<an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits>"
    try:
        text = repr(value)
    except ValueError:  # a container holding such an integer
        return f"<a {type(value).__name__} holding a huge integer>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
