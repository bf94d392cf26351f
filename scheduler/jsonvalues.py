"""Whether a job's args and kwargs are plain JSON, and how big they can be: the checks job-file
validation (:mod:`scheduler.specs`) runs on every job, cheap for the common flat shape."""

from __future__ import annotations

import math
from datetime import date, time
from typing import Any

from scheduler.bounds import JSON_INT_RANGE, MAX_JSON_DEPTH, safe_repr
from scheduler.jobfiles import HugeNumber

_LONGEST_NUMBER = 24
"""Characters of the longest JSON a finite float or an int of up to 64 bits is written as."""


def flat_json_size_bound(value: list[Any] | dict[str, Any]) -> int | None:
    """An upper bound of the size of ``value`` as JSON (ASCII-escaped, so bytes too) when it is
    a list or a mapping with string keys of plain scalars, the common shape of a job's args and
    kwargs; None for anything else (nested, or not plain JSON), which then takes the full check.
    About a tenth of the cost of walking it with :func:`json_problem` or encoding it."""
    items = value.values() if type(value) is dict else value if type(value) is list else None
    if items is None:
        return None
    size = 2
    if type(value) is dict:
        for key in value:
            if type(key) is not str:
                return None
            size += 6 * len(key) + 4  # "\uXXXX" at worst, quotes, ": "
    for item in items:
        kind = type(item)
        if kind is str:
            size += 6 * len(item) + 4  # quotes, ", "
        elif kind is int:
            if not -(2**63) <= item < 2**64:
                return None
            size += _LONGEST_NUMBER + 2
        elif kind is float:
            if not math.isfinite(item):
                return None
            size += _LONGEST_NUMBER + 2
        elif kind is bool or item is None:
            size += 7
        else:
            return None
    return size


def json_problem(value: Any, where: str, depth: int = 0) -> str | None:
    """Why ``value`` is not plain JSON, or None; ``where`` names the element (``[0]['when']``)."""
    if depth > MAX_JSON_DEPTH:
        return f"{where or 'value'} is nested more than {MAX_JSON_DEPTH} levels deep"
    if value is None or isinstance(value, str | bool):
        return None
    if isinstance(value, int):
        low, high = JSON_INT_RANGE
        if low <= value < high:
            return None
        return (
            f"{where or 'value'} is {safe_repr(value)}: integers must fit in 64 bits (pass a huge number as a string)"
        )
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{where or 'value'} is {value}, which JSON cannot carry"
    if isinstance(value, list | tuple):
        items: list[tuple[str, Any]] = [(f"{where}[{i}]", item) for i, item in enumerate(value)]
    elif isinstance(value, dict):
        if bad := [key for key in value if not isinstance(key, str)]:
            return f"{where or 'mapping'} has a key {safe_repr(bad[0])} that is not a string"
        items = [(f"{where}[{key!r}]", item) for key, item in value.items()]
    else:
        if isinstance(value, HugeNumber):
            return f"{where or 'value'} is {value!r}: integers must fit in 64 bits (pass a huge number as a string)"
        hint = " (quote it to pass a string)" if isinstance(value, date | time) else ""
        return f"{where or 'value'} is a {type(value).__name__}, not a JSON value{hint}"
    return next((p for place, item in items if (p := json_problem(item, place, depth + 1)) is not None), None)
