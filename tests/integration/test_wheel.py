"""The built wheel, installed as a user installs it: a fresh venv outside the checkout with only
the wheel and its dependencies, run from a directory outside the checkout. ``chronoq scheduler
--demo --web`` runs the demo with embedded Redis, a local worker (``chronoq worker``) and the
console; a demo job's task runs and its result is logged; a task module in the working
directory (``TASK_MODULES``) is imported by both daemons, as ``python -m run_worker`` did; the
console serves its pages and htmx; Ctrl-C stops everything with exit 0. Nothing is read from the
checkout."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import distributions
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, wait_for

pytestmark = pytest.mark.timeout(240)

BUILD_INPUTS = ("pyproject.toml", "README.md", "chronoq", "shared", "scheduler", "workers", "run_scheduler.py", "run_worker.py")  # fmt: skip
PACKAGE_DATA = ("shared/lua/*.lua", "workers/lua/*.lua", "scheduler/web/templates/*", "scheduler/web/static/*", "scheduler/demo_jobs.yaml")  # fmt: skip

PROBE = (
    "import json, sys, chronoq.cli, scheduler, scheduler.command, shared, workers, workers.command, run_worker\n"
    "from importlib.resources import files\n"
    f"data = {{p: sorted(str(f) for f in files(p.split('/')[0]).joinpath(*p.split('/')[1:-1]).iterdir() "
    f"if f.name != '__pycache__' and __import__('fnmatch').fnmatch(f.name, p.split('/')[-1])) for p in {PACKAGE_DATA!r}}}\n"
    "mods = [m.__file__ for m in (chronoq.cli, scheduler, scheduler.command, shared, workers, workers.command, run_worker)]\n"
    "from importlib.metadata import distributions\n"
    "dists = sorted(d.metadata['Name'].lower() for d in distributions())\n"
    "print(json.dumps({'modules': mods, 'path': sys.path, 'data': data, 'prefix': sys.prefix, 'dists': dists}))\n"
)  # fmt: skip
"""Run by the venv's python: where the modules and the package data are, and ``sys.path``."""


def _run(argv: list[str | Path], cwd: Path, env: dict[str, str], timeout_s: float) -> str:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, f"{argv}: exit {done.returncode}\n{done.stdout}{done.stderr}"
    return done.stdout


def _user_env(tmp_path: Path) -> dict[str, str]:
    """A user's environment: no chronoq settings, no PYTHONPATH, nothing of this test's venv."""
    prefixes = ("REDIS_", "CELERY_", "WORKER_", "SCHEDULER_", "HTTP_", "WEB_", "LOG_", "TASK_MODULES", "APP_ENV")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    for name in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSAFEPATH"):
        env.pop(name, None)
    return env | {"PYTHONUNBUFFERED": "1", "HOME": str(tmp_path / "home")}


def build_and_install(tmp_path: Path) -> tuple[Path, dict[str, float]]:
    """Build the wheel from a copy of the build inputs and install it into a new venv; the venv's
    ``bin`` directory and the seconds each step took. Dependencies are held to the versions of
    the venv running this test (pip's cache makes that fast; the package still declares ranges)."""
    took: dict[str, float] = {}
    started = time.monotonic()
    source = tmp_path / "source"
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    env = _user_env(tmp_path) | {"HOME": os.environ.get("HOME", str(tmp_path))}  # pip's cache
    _run([*pip, "wheel", "--quiet", "--no-deps", "--wheel-dir", tmp_path / "dist", source], tmp_path, env, 180)
    (wheel,) = (tmp_path / "dist").glob("chronoq-*.whl")
    took["build"] = time.monotonic() - started

    started = time.monotonic()
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, env, 60)
    constraints = tmp_path / "constraints.txt"
    pins = sorted({f"{d.metadata['Name']}=={d.version}" for d in distributions() if d.metadata["Name"] != "chronoq"})
    constraints.write_text("\n".join(pins) + "\n")
    _run([*pip, "--python", venv / "bin" / "python", "install", "--quiet", "--no-compile", "--constraint", constraints, wheel],
         tmp_path, env, 300)  # fmt: skip
    took["install"] = time.monotonic() - started
    return venv / "bin", took


def test_the_wheel_runs_the_demo_from_a_fresh_venv_outside_the_checkout(tmp_path: Path) -> None:
    bin_dir, took = build_and_install(tmp_path)
    home = tmp_path / "home"  # the user's working directory: outside the checkout, no configs/
    home.mkdir()
    env = _user_env(tmp_path)
    chronoq = bin_dir / "chronoq"

    # The demo, as `make run` shows it: embedded Redis, the demo jobs, a local worker, the console.
    (home / "acme_tasks.py").write_text(
        "from celery import shared_task\n"
        "from shared.schedules import schedule\n\n\n"
        "@schedule(id='acme-answer', cron='0 3 * * *', args=[6, 7])\n"
        "@shared_task(name='acme.answer')\n"
        "def answer(a: int, b: int) -> int:\n"
        "    return a * b\n"
    )
    demo_env = env | {
        "REDIS_EMBEDDED_DIR": str(home / "redis"),
        "HTTP_PORT": "0",
        "WEB_PORT": "0",
        "TASK_MODULES": "acme_tasks",
    }
    log = tmp_path / "demo.log"
    started = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen([chronoq, "scheduler", "--demo", "--web"], cwd=home, env=demo_env, stdout=out,
                                   stderr=subprocess.STDOUT)  # fmt: skip
    try:
        # While the demo starts: every module comes from the venv, and so does the package data;
        # the checkout is not on the path; both daemons' --help work (three processes at once).
        with ThreadPoolExecutor(3) as pool:
            helps = {c: pool.submit(_run, [chronoq, c, "--help"], home, env, 60) for c in ("scheduler", "worker")}
            found = json.loads(_run([bin_dir / "python", "-c", PROBE], home, env, 60))
            for command, options in (("scheduler", ("--jobs", "--demo", "--no-worker", "--check")), ("worker", ("--queues", "--pool", "--no-supervise"))):  # fmt: skip
                usage = helps[command].result()
                assert usage.startswith(f"usage: chronoq {command} ") and all(o in usage for o in options), usage
        venv = (bin_dir.parent).resolve()
        assert Path(found["prefix"]).resolve() == venv
        assert "chronoq" in found["dists"] and not {"pip", "pytest", "ruff", "mypy"} & set(found["dists"]), found[
            "dists"
        ]
        for module in found["modules"]:
            assert Path(module).resolve().is_relative_to(venv), module
        assert not [p for p in found["path"] if p and Path(p).resolve().is_relative_to(ROOT)], found["path"]
        for pattern, installed in found["data"].items():
            shipped = sorted(p.name for p in ROOT.glob(pattern) if p.is_file())
            assert shipped and [Path(p).name for p in installed] == shipped, pattern
            assert all(Path(p).resolve().is_relative_to(venv) for p in installed), pattern

        wait_for(lambda: " jobs as " in log.read_text() or process.poll() is not None, 60, "the scheduler to start")
        assert process.poll() is None, log.read_text()
        # The console (templates, static htmx) and its API fire a demo job now, rather than wait
        # for its schedule; the operator command from the venv fires the task module's job. Both
        # forced: a scheduled fire of the job may be in flight (max_instances 1 would skip).
        url = wait_for(lambda: re.search(r"chronoq web: console at (http://\S+/)", log.read_text()), 30, "the console")
        with httpx.Client(base_url=url[1], timeout=10) as console:
            assert "demo-sum-every-15s" in console.get("/jobs").raise_for_status().text
            htmx = console.get("/static/htmx.min.js").raise_for_status().content
            assert htmx == (ROOT / "scheduler" / "web" / "static" / "htmx.min.js").read_bytes()
            fired = (
                console.post("/api/v1/jobs/demo-sum-every-15s/trigger", json={"force": True}).raise_for_status().json()
            )
        assert fired["outcome"] == "dispatched", fired
        trigger = json.loads(_run([chronoq, "jobs", "trigger", "acme-answer", "--force", "--json"], home, demo_env, 60))
        assert trigger["outcome"] == "dispatched", trigger
        results = [
            rf"Task demo\.number_sum\[{re.escape(fired['task_id'])}\] succeeded in [\d.]+s: 3\b",
            rf"Task acme\.answer\[{re.escape(trigger['task_id'])}\] succeeded in [\d.]+s: 42\b",
        ]
        wait_for(lambda: all(re.search(r, log.read_text()) for r in results), 60, "both results in the log")
        took["demo"] = time.monotonic() - started
        process.send_signal(signal.SIGINT)
        assert process.wait(20) == 0, log.read_text()
    finally:
        if process.poll() is None:  # a failure above: stop the demo's processes as Ctrl-C does
            process.send_signal(signal.SIGINT)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
    text = log.read_text()
    assert "Traceback" not in text, text
    assert "embedded redis started" in text and "started a local worker" in text and "embedded redis stopped" in text
    assert "scheduler started with 6 jobs" in text  # the 5 demo jobs, from the venv, and acme-answer
    assert not (home / "redis" / "server.json").exists()
    print(f"wheel test: build {took['build']:.1f} s, venv+install {took['install']:.1f} s, demo {took['demo']:.1f} s")
