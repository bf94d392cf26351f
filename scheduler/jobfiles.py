"""Reading job files safely: a job file is data, never code.

YAML (and JSON) goes through a safe loader (no Python tags; libyaml's parser when available),
files over ``SCHEDULER_JOB_FILE_MAX_BYTES`` are refused unread, YAML nested absurdly deep is
refused before the parser sees it, and
YAML whose aliases expand too far ("billion laughs") is refused before anything is constructed.
TOML goes through ``tomllib``. Validation of the content is :mod:`scheduler.specs`.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import yaml

from scheduler.bounds import MAX_DOCUMENT_BYTES, MAX_DOCUMENT_DEPTH, MAX_DOCUMENT_NODES, depth_problem
from shared.errors import JobSpecError

MAX_FILE_BYTES = 8 * 1024 * 1024  # the default of SCHEDULER_JOB_FILE_MAX_BYTES
MAX_YAML_INDENT = 200
MAX_YAML_FLOW_DEPTH = 64
MAX_YAML_ALIASES = 100
MAX_YAML_NODES = 1_000_000  # with aliases expanded; a 1 MiB file without aliases holds ~500k


class _Refused(Exception):
    """A YAML document refused for its shape (aliases, expansion)."""


MAX_INT_DIGITS = 100


class HugeNumber:
    """An integer literal of more than MAX_INT_DIGITS digits, kept as its size: Python refuses to
    read one of over 4,300 digits (and reading one takes quadratic time), so the file loads and
    validation names the job and the field that holds it."""

    def __init__(self, digits: int) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<a number of {self.digits} digits>"


def _int_or_huge(text: str) -> int | HugeNumber:
    digits = sum(c.isdigit() for c in text)
    return HugeNumber(digits) if digits > MAX_INT_DIGITS else int(text)


# libyaml's parser when PyYAML was built with it (its wheels are): a 10,000-job file parses in
# a tenth of the pure-Python time. Only the parser is C; construction stays SafeConstructor.
_BaseSafeLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _SafeLoader(_BaseSafeLoader):  # type: ignore[valid-type,misc]
    """The safe loader, refusing duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # PyYAML keeps the last of two equal keys; a second `cron:` would silently win.
        seen: set[tuple[str, str]] = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if (key.tag, key.value) in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key.value!r}", key.start_mark)
                seen.add((key.tag, key.value))
        mapping: dict[Any, Any] = super().construct_mapping(node, deep)
        return mapping

    def construct_yaml_int(self, node: yaml.ScalarNode) -> Any:
        value = self.construct_scalar(node)
        if sum(c.isdigit() for c in str(value)) > MAX_INT_DIGITS:
            return HugeNumber(sum(c.isdigit() for c in str(value)))
        return super().construct_yaml_int(node)


_SafeLoader.add_constructor("tag:yaml.org,2002:int", _SafeLoader.construct_yaml_int)


def _expanded_size(node: yaml.Node, sizes: dict[int, int], aliases: list[int], limit: int = MAX_YAML_NODES) -> int:
    """Values in ``node`` with every alias expanded; raises _Refused past ``limit`` values
    or MAX_YAML_ALIASES aliases.

    Memoised per node, so a billion-laughs document is measured in a few hundred steps. The
    composer gives an alias the very node it names, so a node reached twice is an alias.
    """
    if (known := sizes.get(id(node))) is not None:
        if known < 0:
            raise _Refused("an alias refers to the node that contains it")
        aliases[0] += 1
        if aliases[0] > MAX_YAML_ALIASES:
            raise _Refused(f"more than {MAX_YAML_ALIASES} aliases (*name); write the values out")
        return known
    sizes[id(node)] = -1  # in progress
    children: list[yaml.Node] = []
    if isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    total = 1
    for child in children:
        total += _expanded_size(child, sizes, aliases, limit)
        if total > limit:
            raise _Refused(f"aliases expand to more than {limit} values (a 'billion laughs' file?)")
    sizes[id(node)] = total
    return total


_INDENT = re.compile(r"^[ \t]*", re.MULTILINE)
_BRACKETS = re.compile(r"[\[\]{}]")


def _check_nesting(text: str) -> None:
    """Refuse absurd nesting before the parser sees it: libyaml recurses in C and crashes the
    process (a segfault, not an exception) somewhere past 10,000 levels."""
    if max((len(m) for m in _INDENT.findall(text)), default=0) > MAX_YAML_INDENT:
        raise _Refused(f"nested too deeply (indented more than {MAX_YAML_INDENT} columns)")
    depth = 0
    for match in _BRACKETS.finditer(text):
        depth += 1 if match.group() in "[{" else -1
        if depth > MAX_YAML_FLOW_DEPTH:
            raise _Refused(f"nested too deeply (more than {MAX_YAML_FLOW_DEPTH} levels of [ or {{)")


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    mapping = dict(pairs)
    if len(mapping) != len(pairs):
        seen: set[str] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))  # type: ignore[func-returns-value]
        raise _Refused(f"duplicate key {duplicate!r}")
    return mapping


def _load_yaml(text: str, max_nodes: int = MAX_YAML_NODES) -> Any:
    if text.lstrip().startswith("{"):
        # JSON is YAML, and generated job files often are JSON: read it with the json module,
        # fifty times faster than a YAML parser. Anything json rejects goes to the YAML path.
        try:
            return json.loads(text, object_pairs_hook=_json_object, parse_int=_int_or_huge)
        except (json.JSONDecodeError, RecursionError):
            pass
    _check_nesting(text)
    loader = _SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        _expanded_size(root, {}, [0], max_nodes)
        return loader.construct_document(root)
    finally:
        loader.dispose()


def _yaml_problem(exc: yaml.MarkedYAMLError) -> tuple[str, str | None]:
    """Where a YAML syntax error is (``line N: `` or nothing) and what it is, for one line."""
    mark = exc.problem_mark or exc.context_mark
    return (f"line {mark.line + 1}: " if mark is not None else ""), exc.problem or exc.context


def parse_job_file(path: Path, max_bytes: int = MAX_FILE_BYTES) -> dict[str, Any]:
    """Read and safely parse one job file; does not validate its content.

    The type comes from the suffix (``.yaml``, ``.yml``, ``.json``, ``.toml``; JSON is YAML).
    Returns the top-level mapping ({} for an empty file). Raises JobSpecError with one problem
    naming the file (and the line of a syntax error) when the file is missing, unreadable, over
    ``max_bytes`` (``SCHEDULER_JOB_FILE_MAX_BYTES``), not UTF-8,
    of another type, malformed, tagged beyond plain data (``!!python/...``) or too aliased.
    """
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json", ".toml"):
        raise JobSpecError(f"{path}: unknown file type {suffix or '(no suffix)'!r}: use .yaml, .yml, .json or .toml")
    try:
        with path.open("rb") as stream:
            raw = stream.read(max_bytes + 1)  # never read a huge file whole
    except FileNotFoundError:
        raise JobSpecError(f"{path}: no such job file") from None
    except OSError as exc:
        raise JobSpecError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > max_bytes:
        raise JobSpecError(
            f"{path}: larger than {max_bytes} bytes (SCHEDULER_JOB_FILE_MAX_BYTES); split it or raise the setting"
        )
    try:
        text = raw.decode("utf-8")
        document = tomllib.loads(text) if suffix == ".toml" else _load_yaml(text)
    except UnicodeDecodeError as exc:
        raise JobSpecError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise JobSpecError(f"{path}: TOML syntax error: {exc}") from None
    except yaml.MarkedYAMLError as exc:
        where, problem = _yaml_problem(exc)
        raise JobSpecError(f"{path}: {where}YAML error: {problem}") from None
    except (yaml.YAMLError, _Refused) as exc:
        raise JobSpecError(f"{path}: YAML refused: {exc}") from None
    except RecursionError:
        raise JobSpecError(f"{path}: nested too deeply") from None
    except ValueError as exc:  # tomllib: an integer of over 4,300 digits
        raise JobSpecError(f"{path}: a value cannot be read: {exc}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise JobSpecError(f"{path}: the top level must be a mapping with 'defaults' and 'jobs'")
    return document


def parse_document(text: str, what: str, max_bytes: int = MAX_DOCUMENT_BYTES) -> Any:
    """One document typed or posted by a user (a spec, a console form field, ``--spec``), as
    YAML or JSON, safely: refused before parsing when over ``max_bytes`` (UTF-8), nested deeper
    than the job files' limits, or holding more than MAX_DOCUMENT_NODES values (counted from
    its separators first, so a huge list costs a scan, not a parse); then parsed like a job
    file (no tags, no duplicate keys, aliases bounded) and refused past MAX_DOCUMENT_DEPTH.

    CPU-bound (up to a few hundred ms at the limits): async code runs it in a worker thread.
    Raises JobSpecError with one line starting with ``what``.
    """
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise JobSpecError(f"{what}: {size} bytes; the limit is {max_bytes}")
    # Every value after the first follows a newline, a comma, a bracket, a colon or a dash:
    # a cheap upper bound of the values, before a parser builds them.
    separators = text.count("\n") + text.count(",")
    if separators > MAX_DOCUMENT_NODES:
        raise JobSpecError(f"{what}: {separators} lines and commas; the limit is {MAX_DOCUMENT_NODES} values")
    try:
        document = _load_yaml(text, MAX_DOCUMENT_NODES)
    except yaml.MarkedYAMLError as exc:
        where, problem = _yaml_problem(exc)
        raise JobSpecError(f"{what}: not YAML or JSON: {where}{problem}") from None
    except (yaml.YAMLError, _Refused) as exc:
        raise JobSpecError(f"{what}: refused: {exc}") from None
    except RecursionError:
        raise JobSpecError(f"{what}: nested more than {MAX_DOCUMENT_DEPTH} levels deep") from None
    except ValueError as exc:  # an integer of over 4,300 digits in JSON
        raise JobSpecError(f"{what}: a value cannot be read: {exc}") from None
    if (problem := depth_problem(document)) is not None:
        raise JobSpecError(f"{what}: {problem}")
    return document


def parse_json_document(data: bytes | str, what: str, max_bytes: int = MAX_DOCUMENT_BYTES) -> Any:
    """A JSON document (an API body, a form's args), safely: over ``max_bytes`` or nested past
    MAX_DOCUMENT_DEPTH is refused (json itself stops at ~1,000 levels with a RecursionError,
    which is refused the same way). Raises JobSpecError with one line starting with ``what``."""
    if len(data) > max_bytes:
        raise JobSpecError(f"{what}: {len(data)} bytes; the limit is {max_bytes}")
    try:
        document = json.loads(data, parse_int=_int_or_huge)
    except json.JSONDecodeError as exc:
        raise JobSpecError(f"{what}: not JSON: {exc.msg} (line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise JobSpecError(f"{what}: nested more than {MAX_DOCUMENT_DEPTH} levels deep") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise JobSpecError(f"{what}: not JSON: {exc}") from None
    if (problem := depth_problem(document)) is not None:
        raise JobSpecError(f"{what}: {problem}")
    return document
