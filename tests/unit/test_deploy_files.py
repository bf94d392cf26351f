"""The deployment files in ``deploy/`` (#15) are checked here, since most cannot run on this
machine (no Docker daemon, no systemd as PID 1, no Kubernetes): every file parses; every
command line in them is one the package installs (the daemons are ``chronoq scheduler`` and
``chronoq worker``) and its arguments parse with the real argument parser; the image copies
everything the package build needs; every environment variable they give chronoq is a real setting; probe paths and ports
match the HTTP settings; stop timeouts exceed chronoq's own bounds; the systemd units pass
``systemd-analyze verify``; job files shipped in them pass ``chronoq scheduler --check``.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from chronoq.cli import parser as chronoq_parser
from scheduler.localworker import SHUTDOWN_BUDGET_S
from scheduler.web.security import bind_problem
from scheduler.web.serve import SHUTDOWN_GRACE_S
from shared.settings import AppSettings, CelerySettings, HttpSettings, WebSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
HTTP_PORT_DEFAULT = HttpSettings().port
WEB_PORT_DEFAULT = WebSettings().port
"""The #12 contract: ``HTTP_PORT`` defaults to 9808, ``HTTP_HOST`` to 127.0.0.1."""
NOT_CHRONOQ = {"PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PATH"}
WORKER_STOP_MIN_S = CelerySettings().task_time_limit_s or 0
UNITS = ("chronoq-scheduler.service", "chronoq-worker.service", "chronoq-web.service")
SANDBOX = ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
           "RestrictAddressFamilies", "CapabilityBoundingSet", "ReadWritePaths", "UMask")  # fmt: skip


def chronoq_settings() -> set[str]:
    names = set()
    for name, field in AppSettings.model_fields.items():
        group = field.annotation
        if isinstance(group, type) and hasattr(group, "model_fields"):
            names |= {f"{name}_{sub}".upper() for sub in group.model_fields}
        else:
            names.add(name.upper())
    return names


def known_setting(name: str) -> bool:
    return name in chronoq_settings()


def yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def check_command(argv: list[str], where: str) -> None:
    """``argv`` is the ``chronoq`` command the package installs (``chronoq scheduler``, ``chronoq
    worker``, ``chronoq web``; not ``python -m run_scheduler``), with arguments its parser accepts."""
    assert Path(argv[0]).name == "chronoq", f"{where}: {shlex.join(argv)}: not the chronoq command"
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["chronoq"] == "chronoq.cli:main"
    try:
        chronoq_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{where}: {shlex.join(argv)}: the arguments do not parse")


def containers() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in (DEPLOY / "kubernetes").glob("*.yaml"):
        for doc in load_all(path):
            if doc["kind"] == "Deployment":
                for container in doc["spec"]["template"]["spec"]["containers"]:
                    yield f"{path.name}:{doc['metadata']['name']}", container


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return document


def chronoq_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose()["services"].items() if s.get("image") == "chronoq:latest"}


def seconds(value: str | int) -> float:
    match = re.fullmatch(r"(\d+)(s|m)?", str(value))
    assert match, value
    return int(match[1]) * (60 if match[2] == "m" else 1)


def unit(name: str) -> dict[str, str]:
    """The ``Key=Value`` lines of a systemd unit (later lines win)."""
    lines = (DEPLOY / "systemd" / name).read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


# --- every file parses ----------------------------------------------------------------------


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    assert load_all(path), f"{path} is empty"


def test_json_parses() -> None:
    for path in DEPLOY.rglob("*.json"):
        json.loads(path.read_text())


def test_shell_scripts_parse() -> None:
    for path in DEPLOY.rglob("*.sh"):
        subprocess.run(["sh", "-n", str(path)], check=True)


# --- commands -------------------------------------------------------------------------------


def test_every_command_line_exists_in_the_package() -> None:
    commands: list[tuple[list[str], str]] = []
    for name, service in chronoq_services().items():
        commands.append((service["command"], f"compose {name}"))
    for where, container in containers():
        commands.append((container["command"] + container.get("args", []), where))
    for name in UNITS:
        commands.append((shlex.split(unit(name)["ExecStart"]), name))
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile, re.M)
    assert cmd, "the Dockerfile has no exec-form CMD"
    commands.append((json.loads(cmd[1]), "Dockerfile CMD"))
    assert len(commands) >= 12
    for argv, where in commands:
        check_command(argv, where)
    daemons = sorted(argv[1] for argv, _ in commands if argv[1] in ("scheduler", "worker"))
    assert daemons == ["scheduler"] * 5 + ["worker"] * 4, "compose x2, Kubernetes, systemd; and the image CMD"


def test_the_image_copies_what_the_package_build_needs() -> None:
    """``pip install .`` in the image builds every package and module pyproject.toml names."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    copied = {
        part.rstrip("/")
        for line in (DEPLOY / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ") and "--from" not in line
        for part in line.split()[1:-1]
    }
    packages = {name.rstrip("*") for name in project["packages"]["find"]["include"]}
    modules = {f"{name}.py" for name in project["py-modules"]}
    assert packages | modules | {"pyproject.toml", "README.md"} <= copied
    assert packages == {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench"}


def test_files_the_commands_read_are_shipped(tmp_path: Path) -> None:
    """The image copies configs/jobs.yaml; the Kubernetes job file is a valid job file."""
    assert "COPY configs/jobs.yaml /etc/chronoq/jobs.yaml" in (DEPLOY / "Dockerfile").read_text()
    jobs = next(
        doc for doc in load_all(DEPLOY / "kubernetes" / "config.yaml") if doc["metadata"]["name"] == "chronoq-jobs"
    )
    path = tmp_path / "jobs.yaml"
    path.write_text(jobs["data"]["jobs.yaml"])
    result = subprocess.run(
        [sys.executable, "-m", "chronoq", "scheduler", "--check", "--jobs", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "APP_ENV": "test"},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


# --- settings -------------------------------------------------------------------------------


def test_every_variable_given_to_chronoq_is_a_setting() -> None:
    given: list[tuple[str, str]] = []
    for name, service in chronoq_services().items():
        given += [(var, f"compose {name}") for var in service.get("environment", {})]
    for doc in load_all(DEPLOY / "kubernetes" / "config.yaml"):
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "chronoq":
            given += [(var, "ConfigMap chronoq") for var in doc["data"]]
        if doc["kind"] == "Secret":
            given += [(var, "Secret") for var in doc["stringData"]]
    for where, container in containers():
        given += [(env["name"], where) for env in container.get("env", [])]
    for name in UNITS:
        given += [(line.split("=", 2)[1], name) for line in unit_lines(name) if line.startswith("Environment=")]
    for match in re.finditer(r"^\s*(?:ENV\s+)?([A-Z_]+)=\S+(?: \\)?$", (DEPLOY / "Dockerfile").read_text(), re.M):
        given.append((match[1], "Dockerfile ENV"))
    assert len(given) >= 10
    wrong = [(var, where) for var, where in given if var not in NOT_CHRONOQ and not known_setting(var)]
    assert wrong == [], "not chronoq settings (see configs/.env.example)"


def unit_lines(name: str) -> list[str]:
    return (DEPLOY / "systemd" / name).read_text().splitlines()


def test_the_settings_are_documented() -> None:
    example = (ROOT / "configs" / ".env.example").read_text()
    for name in ("REDIS_SENTINELS", "REDIS_SENTINEL_MASTER", "REDIS_SENTINEL_PASSWORD", "REDIS_SENTINEL_CHECK_S"):
        assert name in example


# --- probes, ports, stop timeouts -----------------------------------------------------------


def test_kubernetes_probes_match_the_http_settings() -> None:
    schedulers = [(w, c) for w, c in containers() if c["name"] == "scheduler"]
    assert len(schedulers) == 1
    _, container = schedulers[0]
    env = {e["name"]: e["value"] for e in container["env"]}
    port = int(env.get("HTTP_PORT", HTTP_PORT_DEFAULT))
    assert env["HTTP_HOST"] != "127.0.0.1", "the kubelet cannot reach a loopback listener"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
    assert [p["containerPort"] for p in container["ports"]] == [port]


def test_kubernetes_scheduler_deployment_and_disruption_budget() -> None:
    docs = load_all(DEPLOY / "kubernetes" / "scheduler.yaml")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    budget = next(d for d in docs if d["kind"] == "PodDisruptionBudget")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > SHUTDOWN_BUDGET_S
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    labels = pod["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["minAvailable"] == 1
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(HTTP_PORT_DEFAULT)
    worker = next(d for d in load_all(DEPLOY / "kubernetes" / "worker.yaml") if d["kind"] == "Deployment")
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > WORKER_STOP_MIN_S


def test_dockerfile_is_slim_non_root_with_a_healthz_check() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.\d+-slim$", text, re.M)
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1] not in ("root", "0")
    health = re.search(r"^HEALTHCHECK .*?CMD (.*)$", text, re.M | re.S)
    assert health and "/healthz" in health[1] and f"'HTTP_PORT', '{HTTP_PORT_DEFAULT}'" in health[1]
    assert "curl" not in health[1] and "urllib.request" in health[1]
    assert f"EXPOSE {HTTP_PORT_DEFAULT}" in text


def test_compose_services() -> None:
    services = compose()["services"]
    redis_command = " ".join(services["redis"]["command"])
    for option in ("--appendonly yes", "--maxmemory-policy noeviction", "--requirepass"):
        assert option in redis_command
    chronoq = chronoq_services()
    schedulers = [s for s in chronoq.values() if s["command"][:2] == ["chronoq", "scheduler"]]
    workers = [s for s in chronoq.values() if s["command"][:2] == ["chronoq", "worker"]]
    assert len(schedulers) == 2 and len(workers) == 2
    for service in schedulers:
        assert seconds(service["stop_grace_period"]) > SHUTDOWN_BUDGET_S
        assert service["environment"]["HTTP_HOST"] == "0.0.0.0"
    for service in workers:
        assert seconds(service["stop_grace_period"]) > WORKER_STOP_MIN_S
    prometheus = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    ports = {int(schedulers[0]["environment"]["HTTP_PORT"])}
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert {t.split(":")[0] for t in targets} == {n for n, s in chronoq.items() if s in schedulers}
    assert {int(t.split(":")[1]) for t in targets} == ports
    assert "/etc/prometheus/alerts.yml" in prometheus["rule_files"]
    mounts = [m.split(":")[0] for s in services.values() for m in s.get("volumes", []) if m.startswith(".")]
    assert "./prometheus/alerts.yml" in mounts and "./grafana" in mounts
    for mount in mounts:
        path = (DEPLOY / mount).resolve()
        assert path.exists(), f"compose mounts {mount}, which does not exist"


# --- systemd --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "stop_above_s"),
    [
        ("chronoq-scheduler.service", SHUTDOWN_BUDGET_S),
        ("chronoq-worker.service", WORKER_STOP_MIN_S),
        ("chronoq-web.service", SHUTDOWN_GRACE_S),
    ],
)
def test_systemd_unit(name: str, stop_above_s: float, tmp_path: Path) -> None:
    options = unit(name)
    assert options["User"] not in ("root", "0")
    assert float(options["TimeoutStopSec"]) > stop_above_s
    assert options["Restart"] == "on-failure"
    assert options["EnvironmentFile"] == "/etc/chronoq/chronoq.env"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
    }.items():
        assert options[key] == value, key
    assert options["ReadWritePaths"] == "/var/lib/chronoq" == f"/var/lib/{options['StateDirectory']}"
    verify = shutil.which("systemd-analyze") or "systemd-analyze"  # Debian's systemd: scripts/test-tools.txt
    # verify insists that ExecStart's binary exists: point it at this interpreter.
    copy = tmp_path / name
    text = (DEPLOY / "systemd" / name).read_text()
    copy.write_text(text.replace("/opt/chronoq/venv/bin/chronoq", str(Path(sys.executable).parent / "chronoq")))
    result = subprocess.run([verify, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


# --- the web console ------------------------------------------------------------------------


def web_settings(env: dict[str, str]) -> WebSettings:
    """The console's settings from the ``WEB_*`` variables a deploy file gives it."""
    fields = {k.removeprefix("WEB_").lower(): v for k, v in env.items() if k.startswith("WEB_")}
    return WebSettings.model_validate(fields)


def test_web_unit_is_sandboxed_like_the_scheduler_and_binds_loopback() -> None:
    web, scheduler = unit("chronoq-web.service"), unit("chronoq-scheduler.service")
    assert {k: web[k] for k in SANDBOX} == {k: scheduler[k] for k in SANDBOX}
    assert shlex.split(web["ExecStart"])[1:] == ["web"], "WEB_HOST and WEB_PORT come from the env file"
    assert WebSettings().host == "127.0.0.1", "the unit relies on a loopback default (docs/production.md)"
    assert web["RestartPreventExitStatus"] == "78"


def test_compose_web_service() -> None:
    service = chronoq_services()["web"]
    argv = service["command"]
    host, port = argv[argv.index("--host") + 1], int(argv[argv.index("--port") + 1])
    env = {k: str(v) for k, v in service["environment"].items()}
    assert bind_problem(host, web_settings({**env, "WEB_TOKEN": "set-by-the-operator"})) is None
    assert env["WEB_TOKEN"].startswith("${CHRONOQ_WEB_TOKEN:?"), "the token comes from the operator, never a default"
    assert int(env["WEB_PORT"]) == port
    assert service["ports"] == [f"127.0.0.1:{port}:{port}"]
    check = " ".join(service["healthcheck"]["test"])
    assert "/healthz" in check and f"'WEB_PORT', '{WEB_PORT_DEFAULT}'" in check and "curl" not in check
    assert seconds(service["stop_grace_period"]) > SHUTDOWN_GRACE_S


def test_kubernetes_web_deployment_probes_and_service() -> None:
    docs = load_all(DEPLOY / "kubernetes" / "web.yaml")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    service = next(d for d in docs if d["kind"] == "Service")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    port = int(env.get("WEB_PORT", WEB_PORT_DEFAULT))
    secrets = {
        d["metadata"]["name"]: d for d in load_all(DEPLOY / "kubernetes" / "config.yaml") if d["kind"] == "Secret"
    }
    refs = [ref["secretRef"]["name"] for ref in container["envFrom"] if "secretRef" in ref]
    from_secrets = {k: v for name in refs for k, v in secrets[name]["stringData"].items()}
    assert "WEB_TOKEN" in from_secrets
    assert bind_problem(env["WEB_HOST"], web_settings({**env, **from_secrets})) is None
    assert env["WEB_HOST"] != "127.0.0.1", "the kubelet and the Service cannot reach a loopback listener"
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": port}
    assert [p["containerPort"] for p in container["ports"]] == [port]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert [named[p["targetPort"]] for p in service["spec"]["ports"]] == [port]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert pod["spec"]["terminationGracePeriodSeconds"] > SHUTDOWN_GRACE_S
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    check_command(container["command"], "web.yaml")
