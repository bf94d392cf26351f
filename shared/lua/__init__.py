"""The Lua scripts of :class:`shared.fleet.FireLedger`, shipped as package data.

Each ``<name>.lua`` documents its KEYS and ARGV in its header. A line ``--#include
common.lua`` is replaced by that file (the helpers several scripts share): Redis runs each
script as one chunk, so the sharing happens here, once, when a ledger is built.
"""

from __future__ import annotations

import functools
from importlib import resources

SCRIPTS = ("decide", "decided", "release", "start", "renew", "finish", "audit", "jobwrite", "streak", "jobstats")
_INCLUDE = "--#include "


@functools.cache
def source(name: str) -> str:
    """The text of ``<name>.lua`` with its includes pasted in."""
    text = resources.files(__name__).joinpath(f"{name}.lua").read_text(encoding="utf-8")
    lines = []
    for line in text.splitlines():
        if line.startswith(_INCLUDE):
            lines.append(source(line.removeprefix(_INCLUDE).strip().removesuffix(".lua")))
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"
