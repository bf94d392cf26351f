"""The import graph of the product code, read with ``ast``: no cycle anywhere (module-level,
``TYPE_CHECKING`` and in-function imports all count), and imports flow one way: entry points
(the ``chronoq`` command's package and the checkout shims), then ``scheduler``/``workers``,
then ``shared``; the scheduler never imports ``workers``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("chronoq", "shared", "scheduler", "workers")
ENTRY_POINTS = ("run_scheduler", "run_worker")
ENTRY_PACKAGE = "chronoq"


def _modules() -> dict[str, Path]:
    found = {name: ROOT / f"{name}.py" for name in ENTRY_POINTS}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports, anywhere in it."""
    targets: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            candidates = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in modules:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state and (found := visit(target)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_no_import_cycle() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize(
    ("importer", "forbidden"),
    [
        ("shared", ("scheduler", "workers", ENTRY_PACKAGE, *ENTRY_POINTS)),
        ("scheduler", ("workers", ENTRY_PACKAGE, *ENTRY_POINTS)),
        ("workers", ("scheduler", ENTRY_PACKAGE, *ENTRY_POINTS)),
        (ENTRY_PACKAGE, ENTRY_POINTS),
    ],
)
def test_imports_flow_one_way(importer: str, forbidden: tuple[str, ...]) -> None:
    wrong = sorted(
        f"{module} -> {target}"
        for module, targets in _graph().items()
        if module.split(".")[0] == importer
        for target in targets
        if target.split(".")[0] in forbidden
    )
    assert wrong == []


def _third_party_imports(modules: dict[str, Path]) -> list[str]:
    """The modules outside the project and the standard library that the project imports."""
    found: set[str] = set()
    for path in modules.values():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                found.add(node.module)
    ours = (*PACKAGES, *ENTRY_POINTS)
    return sorted(n for n in found if n.split(".")[0] not in (*ours, *sys.stdlib_module_names, "__future__"))


# One fresh interpreter imports the third-party modules once, then forks a child per project
# module, which imports that module first. A cycle among the project's own modules bites the same
# whatever third-party modules are loaded; a fresh interpreter per module cost 26 s of CPU.
IMPORT_EACH_FIRST = """
import importlib, os, sys
for name in sys.argv[2].split():
    try:
        importlib.import_module(name)
    except ImportError:
        pass  # a child that needs it reports it
failed = []
for name in sys.argv[1].split():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(name)
            code = 0
        except BaseException as exc:
            os.write(write, f"{name}: {type(exc).__name__}: {exc}".encode())
            code = 1
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        message = pipe.read().decode()
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(message or f"{name}: the child died")
print(chr(10).join(failed))
sys.exit(1 if failed else 0)
"""


def _import_each_first(names: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    third_party = " ".join(_third_party_imports(_modules()))
    return subprocess.run(
        [sys.executable, "-c", IMPORT_EACH_FIRST, " ".join(names), third_party],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_module_imports_first_in_a_fresh_interpreter() -> None:
    """Each module imported first, on its own: a cycle that only bites in one order shows here."""
    names = [name for name in _modules() if name not in ENTRY_POINTS and name != "workers.app"]
    result = _import_each_first(names)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_fresh_import_check_finds_a_cycle_that_bites_in_one_order(tmp_path: Path) -> None:
    """Two modules that import a name from each other: importing either first fails; a module
    without a cycle passes."""
    package = tmp_path / "cyclic"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from cyclic.b import B\nA = 1\n")
    (package / "b.py").write_text("from cyclic.a import A\nB = 2\n")
    (package / "fine.py").write_text("import json\n")
    result = _import_each_first(["cyclic.a", "cyclic.fine", "cyclic.b"], cwd=tmp_path)
    assert result.returncode == 1
    assert [line.split(":")[0:2] for line in result.stdout.splitlines()] == [
        ["cyclic.a", " ImportError"],
        ["cyclic.b", " ImportError"],
    ], result.stdout
