"""compose/: the Compose file and the engine image, checked without a Docker engine.

The file is parsed and its services checked against the library (settings, CLI, packaging);
the engine is run as the image would run it, configured by the service's environment alone.
`docker compose config` validates the file too where the Compose plugin is installed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

import redisengines
from redisengines.config import ENV_PREFIX, Settings

from .helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
DOCKERFILE = COMPOSE_DIR / "Dockerfile"
PROFILES = {"redis", "engines", "all"}
# Variables of the file that are not library settings: images, scale, where Redis is published.
DEPLOYMENT_VARS = {"REDIS_IMAGE", "ENGINES_IMAGE", "ENGINES", "REDIS_BIND", "REDIS_PORT"}
SETTING_VARS = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
# ${NAME}, ${NAME:-default}, ${NAME-default}; `$$` is a literal dollar.
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-|:\?)([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's interpolation, for the forms this file may use."""
    def one(m: re.Match[str]) -> str:
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        if op == ":?":  # required: Compose refuses to start without it
            if not env.get(name):
                raise ValueError(f"{name}: {default}")
            return env[name]
        if op == "-":
            return env.get(name, default)
        return env.get(name, "")
    return VAR.sub(one, value.replace("$$", "\0")).replace("\0", "$")


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the KEY=VALUE list form
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def exec_form(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def engine_argv(compose: dict[str, Any]) -> list[str]:
    """What the engines container runs: entrypoint + command, as Docker combines them."""
    service = compose["services"]["engines"]
    instr = dockerfile_instructions()
    entrypoint = service.get("entrypoint") or next(
        exec_form(a) for w, a in reversed(instr) if w == "ENTRYPOINT")
    command = service.get("command")
    if command is None:
        command = next((exec_form(a) for w, a in reversed(instr) if w == "CMD"), [])
    if isinstance(entrypoint, str):
        entrypoint = shlex.split(entrypoint)
    if isinstance(command, str):
        command = shlex.split(command)
    return [*entrypoint, *command]


def redisengines_script() -> str:
    found = Path(sys.executable).with_name("redisengines")
    return str(found) if found.exists() else shutil.which("redisengines") or "redisengines"


# --------------------------------------------------------------------------- the file
def test_profiles_redis_engines_all(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "engines"}
    assert {p for s in services.values() for p in s["profiles"]} == PROFILES
    assert set(services["redis"]["profiles"]) == {"redis", "all"}
    assert set(services["engines"]["profiles"]) == {"engines", "all"}


def test_services_are_configured_only_through_redisengines_variables(
        compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert "env_file" not in service, name
        for key in environment(service):
            assert key in SETTING_VARS, f"{name}: {key} is not a REDISENGINES_* setting"
    engines = environment(compose["services"]["engines"])
    assert interpolate(engines["REDISENGINES_REDIS_URL"], {}) == "redis://redis:6379/0"
    assert interpolate(engines["REDISENGINES_CLUSTER"], {}) == "default"
    # The key is required: Compose refuses to start the engines without it.
    with pytest.raises(ValueError, match="REDISENGINES_KEY"):
        interpolate(engines["REDISENGINES_KEY"], {})
    assert interpolate(engines["REDISENGINES_KEY"], {"REDISENGINES_KEY": "ab" * 32}) == "ab" * 32
    # Nothing set on the host: the other settings are empty, which means the library default.
    for key, value in engines.items():
        if key not in ("REDISENGINES_REDIS_URL", "REDISENGINES_CLUSTER", "REDISENGINES_KEY"):
            assert interpolate(value, {}) == "", key


def test_every_variable_has_a_default_and_is_documented(compose: dict[str, Any]) -> None:
    text = COMPOSE_FILE.read_text()
    readme = (COMPOSE_DIR / "README.md").read_text()
    found = list(VAR.finditer(text))
    assert found
    for m in found:
        name, op = m.group(1), m.group(2)
        # The signing key alone is required (${NAME:?message}): no default could be secret.
        assert op == ":-" or (op == ":?" and name == "REDISENGINES_KEY"), \
            f"{m.group(0)}: give a default with ${{{name}:-...}}"
        assert name in SETTING_VARS | DEPLOYMENT_VARS, f"{name} is not a documented variable"
        assert f"`{name}`" in readme, f"{name} is missing from compose/README.md"
    assert not re.search(r"\$[A-Za-z_{]", VAR.sub("", text.replace("$$", ""))), \
        "a variable that is not in the ${NAME:-default} form"


def test_images_are_variables_with_defaults(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["redis"]["image"] == "${REDIS_IMAGE:-valkey/valkey:8.1}"
    assert re.fullmatch(r"\$\{ENGINES_IMAGE:-[^}]+\}", services["engines"]["image"])
    from_line = [a for w, a in dockerfile_instructions() if w == "FROM"]
    args = dict(a.partition("=")[::2] for w, a in dockerfile_instructions() if w == "ARG")
    assert from_line == ["${PYTHON_IMAGE}"]
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"


def test_redis_keeps_nothing_on_disk_and_is_health_checked(compose: dict[str, Any]) -> None:
    redis_service = compose["services"]["redis"]
    command = redis_service["command"]
    assert command[command.index("--save") + 1] == ""
    assert command[command.index("--appendonly") + 1] == "no"
    check = redis_service["healthcheck"]
    assert check["test"][0] in ("CMD", "CMD-SHELL") and "ping" in " ".join(check["test"])
    # Published on the host's loopback unless told otherwise.
    assert interpolate(redis_service["ports"][0], {}) == "127.0.0.1:6379:6379"


def test_engines_wait_for_redis_and_scale(compose: dict[str, Any]) -> None:
    engines = compose["services"]["engines"]
    dependency = engines["depends_on"]["redis"]
    assert dependency["condition"] == "service_healthy"
    assert dependency.get("required") is False  # the `engines` profile joins a Redis elsewhere
    assert engines["deploy"]["replicas"] == "${ENGINES:-2}"
    assert interpolate(engines["deploy"]["replicas"], {}) == "2"
    assert interpolate(engines["deploy"]["replicas"], {"ENGINES": "5"}) == "5"
    build = engines["build"]
    assert (COMPOSE_DIR / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE


# -------------------------------------------------------------------- the image
def test_the_engine_command_is_redisengines_engine(compose: dict[str, Any]) -> None:
    argv = engine_argv(compose)
    assert argv[:2] == ["redisengines", "engine"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "redisengines" in scripts
    result = subprocess.run([redisengines_script(), "engine", "--help"], capture_output=True,
                            text=True, timeout=60,
                            env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1",
                                 "TERM": "dumb"})
    assert result.returncode == 0, result.stderr
    for flag in argv[2:]:
        if flag.startswith("-"):
            assert re.search(rf"(?<![\w-]){re.escape(flag.split('=')[0])}(?![\w-])",
                             result.stdout), f"`redisengines engine` has no {flag} option"
    for var in ("REDISENGINES_REDIS_URL", "REDISENGINES_CLUSTER"):
        assert var in result.stdout, f"`redisengines engine` does not read {var}"


def test_the_dockerfile_installs_the_package() -> None:
    instr = dockerfile_instructions()
    runs = " && ".join(a for w, a in instr if w == "RUN")
    assert re.search(r"\bpip install \.(\s|$)", runs), runs
    copied = [exec_form(a)[:-1] for w, a in instr if w == "COPY"]
    sources = {Path(src) for group in copied for src in group}
    for src in sources:  # the build context is the repository root
        assert (ROOT / src).exists(), f"COPY {src}: no such path in the repository"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {Path(project["project"]["readme"]), Path("pyproject.toml")}
    needed |= {Path(p) for p in project["tool"]["hatch"]["build"]["targets"]["wheel"]
               ["packages"]}
    assert needed <= sources, f"the build also needs {needed - sources}"
    assert [w for w, _ in instr].count("ENTRYPOINT") == 1
    assert any(w == "USER" and a not in ("root", "0") for w, a in instr), "engines run as root"


def test_an_engine_runs_from_the_service_environment_alone(compose: dict[str, Any],
                                                          server_url: str,
                                                          cluster_name: str) -> None:
    """As `docker compose up` would start it: the image's argv, the service's environment
    interpolated from the host's variables (here: another server URL and cluster name)."""
    host_env = {"REDISENGINES_REDIS_URL": server_url, "REDISENGINES_CLUSTER": cluster_name,
                "REDISENGINES_KEY": os.environ["REDISENGINES_KEY"],
                "REDISENGINES_HEARTBEAT_INTERVAL": "0.25", "REDISENGINES_HEARTBEAT_TTL": "1.5"}
    service_env = {k: interpolate(v, host_env)
                   for k, v in environment(compose["services"]["engines"]).items()}
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(service_env)
    argv = engine_argv(compose)
    proc = subprocess.Popen([redisengines_script(), *argv[1:]], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with redisengines.connect(server_url, cluster=cluster_name) as client:
            wait_until(lambda: client.ids or proc.poll() is not None, timeout=20,
                       what="the engine to register")
            assert proc.poll() is None, proc.communicate()[1].decode(errors="replace")
            assert client.ids == [0]
            client.execute("import os; pid = os.getpid()")
            assert client.pull("pid", targets=0) == proc.pid
            client.kill(targets=0)
            assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        _, stderr = proc.communicate(timeout=10)
    assert b"registered" in stderr  # --verbose from the service's command took effect


# ------------------------------------------------------------------ docker compose
def _compose_cli() -> list[str] | None:
    if shutil.which("docker") is None:
        return None
    version = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
    return ["docker", "compose"] if version.returncode == 0 else None


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_docker_compose_config_accepts_the_file(profile: str) -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("the Docker CLI with its Compose plugin is not installed")
    result = subprocess.run([*cli, "-f", str(COMPOSE_FILE), "--profile", profile, "config",
                             "-q"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
