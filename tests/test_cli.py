"""The command line: CliRunner for status and error messages, subprocesses for the rest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

import redisengines
from redisengines import launcher, registry, runfile
from redisengines.cli import app
from redisengines.keys import Keys
from redisengines.server import free_port

from .helpers import wait_until

SCRIPT = str(Path(sys.executable).with_name("redisengines"))
runner = CliRunner()  # stdout and stderr are captured apart: result.stdout, result.stderr


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty REDISENGINES_HOME, for this process and the subprocesses it starts."""
    monkeypatch.setenv("REDISENGINES_HOME", str(tmp_path))
    return tmp_path


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ----------------------------------------------------------------------------- status
def test_status_json_lists_engines_and_queue_depth(cluster: redisengines.Cluster,
                                                   client: redisengines.Client, gates,
                                                   server_url: str, cluster_name: str) -> None:
    gate = gates()
    busy = gate.hold(client, 0)
    queued = client.execute("b = 1", targets=0, block=False)
    data = wait_until(lambda: (lambda d: d if d["engines"][0]["queued"] == 1 else None)(
        json.loads(runner.invoke(app, ["status", "--url", server_url, "--cluster",
                                       cluster_name, "--json"]).stdout)),
        what="one command queued behind the running one")
    assert data["cluster"] == cluster_name and data["url"] == server_url
    engines = {e["id"]: e for e in data["engines"]}
    assert sorted(engines) == [0, 1]
    assert {e["pid"] for e in engines.values()} == {p.pid for p in cluster.processes.values()}
    # queued: accepted, not started (as queue_status says); inbox: XLEN, running included
    assert (engines[0]["queued"], engines[0]["inbox"], engines[0]["pending"]) == (1, 2, 1)
    assert engines[1]["queued"] == 0
    assert all(e["state"] in ("idle", "busy") and e["host"] and e["alive"]
               for e in engines.values())
    gate.open()
    client.barrier(busy, queued, timeout=30)


def test_status_table(cluster: redisengines.Cluster, server_url: str, cluster_name: str) -> None:
    result = runner.invoke(app, ["status", "--cluster", cluster_name],
                           env={"REDISENGINES_REDIS_URL": server_url})
    assert result.exit_code == 0, result.output
    assert cluster_name in result.stdout and "idle" in result.stdout
    assert "queued" in result.stdout


def test_status_of_an_empty_cluster(server_url: str, cluster_name: str) -> None:
    result = runner.invoke(app, ["status", "--url", server_url, "--cluster", cluster_name])
    assert result.exit_code == 0
    assert "No engines registered" in result.stdout
    result = runner.invoke(app, ["status", "--url", server_url, "--cluster", cluster_name,
                                 "--json"])
    assert json.loads(result.stdout)["engines"] == []


@pytest.mark.parametrize("command", ["status", "engine"])
def test_no_url_says_how_to_get_one(home: Path, command: str) -> None:
    result = runner.invoke(app, [command])
    assert result.exit_code == 1
    assert "no server URL for cluster 'default'" in result.stderr
    assert "redisengines start" in result.stderr


def test_status_of_an_unreachable_server(home: Path) -> None:
    result = runner.invoke(app, ["status", "--url", f"redis://127.0.0.1:{free_port()}/0"])
    assert result.exit_code == 1
    assert "cannot read cluster 'default'" in result.stderr


def test_invalid_cluster_name(home: Path) -> None:
    result = runner.invoke(app, ["status", "--url", "redis://x", "--cluster", "a:b"])
    assert result.exit_code == 1
    assert "invalid cluster name" in result.stderr


def test_stop_when_nothing_runs(home: Path) -> None:
    result = runner.invoke(app, ["stop", "--cluster", "nothing"])
    assert result.exit_code == 1
    assert "cluster 'nothing' is not running" in result.stderr


def test_a_stale_connection_file_is_ignored_and_removed(home: Path) -> None:
    stale = {"url": "redis://127.0.0.1:1/0", "cluster": "old", "pid": dead_pid(), "started": 0}
    (home / "old.json").write_text(json.dumps(stale))
    assert runfile.read("old") is not None and runfile.live("old") is None
    with pytest.raises(ValueError, match="no server URL"):
        redisengines.connect(cluster="old")
    result = runner.invoke(app, ["stop", "--cluster", "old"])
    assert result.exit_code == 1 and "not running" in result.stderr
    assert not (home / "old.json").exists()


def test_cli_module_does_not_import_rich() -> None:
    code = "import sys, redisengines.cli; sys.exit('rich' in sys.modules)"
    assert run(sys.executable, "-c", code).returncode == 0


# ------------------------------------------------------------------------ subprocesses
def test_demo_runs_on_a_fresh_embedded_cluster() -> None:
    done = run(sys.executable, "-m", "redisengines", "demo")
    assert done.returncode == 0, done.stderr
    for line in ("c.pull('y', targets=0) -> 42", "total 4950",
                 "except ZeroDivisionError as err: [engine 0] ZeroDivisionError",
                 "PendingResult done=False", "-> TimeoutError", "f.stdout='slept\\n'", "Done in"):
        assert line in done.stdout


def test_start_connect_stop(home: Path, cluster_name: str) -> None:
    started = run(SCRIPT, "start", "-n", "2", "--cluster", cluster_name)
    info = runfile.read(cluster_name)
    try:
        assert started.returncode == 0, started.stderr
        assert info is not None and runfile.is_running(info.pid)
        assert info.url in started.stdout and str(runfile.path(cluster_name)) in started.stdout
        assert runfile.path(cluster_name).stat().st_mode & 0o777 == 0o600

        again = run(SCRIPT, "start", "-n", "1", "--cluster", cluster_name)
        assert again.returncode == 1 and "already running" in again.stderr

        with redisengines.connect(cluster=cluster_name) as client:  # URL from the file
            assert client.url == info.url and client.ids == [0, 1]
            assert client.execute("a = 6 * 7") == {0: None, 1: None}
            assert client.pull("a", targets=1) == 42
            engine_pids = [e["pid"] for e in
                           registry.engines(client.r, Keys(cluster_name)).values()]

        stopped = run(SCRIPT, "stop", "--cluster", cluster_name)
        assert stopped.returncode == 0, stopped.stderr
        assert f"Cluster {cluster_name!r} stopped" in stopped.stdout
        assert not runfile.is_running(info.pid)
        assert not any(runfile.is_running(pid) for pid in engine_pids)
        assert not runfile.path(cluster_name).exists()
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(info.url, socket_connect_timeout=2).ping()
    finally:
        if info is not None and runfile.is_running(info.pid):
            os.kill(info.pid, signal.SIGKILL)  # the engines and server follow it


def test_start_reports_why_the_supervisor_failed(home: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDISENGINES_SERVER_BIN", str(home / "no-such-server"))
    done = run(SCRIPT, "start", "-n", "1")
    assert done.returncode == 1
    assert "did not start: ServerStartError" in done.stderr and "no-such-server" in done.stderr
    assert runfile.read("default") is None


def test_engine_command_joins_an_existing_cluster(cluster: redisengines.Cluster,
                                                  client: redisengines.Client,
                                                  r: redis.Redis, server_url: str,
                                                  cluster_name: str) -> None:
    keys = Keys(cluster_name)
    since = registry.last_event_id(r, keys)
    proc = subprocess.Popen([SCRIPT, "engine", "--url", server_url, "--cluster", cluster_name])
    try:
        (eid,) = launcher.wait_registered(r, keys, [proc], since, timeout=30)
        assert client.ids == [0, 1, eid]
        assert client.execute("import os; pid = os.getpid()", targets=eid) is None
        assert client.pull("pid", targets=eid) == proc.pid
        client.kill(targets=eid)
        assert proc.wait(timeout=15) == 0
        assert client.ids == [0, 1]
    finally:
        launcher.stop_processes([proc])


def test_python_dash_m_is_the_same_cli() -> None:
    started = time.monotonic()
    done = run(sys.executable, "-m", "redisengines", "engine", "--help")
    assert done.returncode == 0
    assert "Usage: redisengines engine" in done.stdout and "--cluster" in done.stdout
    assert time.monotonic() - started < 10
