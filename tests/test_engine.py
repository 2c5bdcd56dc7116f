"""The engine process under faults: death, kill, shutdown, garbage in its stream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import redis

import redisengines
from redisengines import EngineShutdownError, ProtocolError

from .helpers import default_sigint, wait_until

LONG = "import time; time.sleep(60)"


def running(client: redisengines.Client, eid: int) -> bool:
    return client.queue_status(targets=eid)["running"] == 1


def test_dead_engine_marked_dead_in_registry(cluster, client, r, cluster_name) -> None:
    os.kill(cluster.processes[1].pid, signal.SIGKILL)
    wait_until(lambda: client.ids == [0], what="engine 1 reaped")
    info = json.loads(r.hget(f"re:{cluster_name}:engines", "1"))
    assert info["state"] == "dead"
    assert not r.exists(f"re:{cluster_name}:{{e1}}:inbox")


def test_kill_while_busy(client) -> None:
    busy = client.execute(LONG, targets=0, block=False)
    queued = client.execute("x = 1", targets=0, block=False)
    wait_until(lambda: running(client, 0), what="engine 0 busy")
    assert client.kill(targets=0, timeout=5) is None
    with pytest.raises(EngineShutdownError) as err:
        busy.result(timeout=5)
    assert err.value.started is True and "was killed" in str(err.value)
    with pytest.raises(EngineShutdownError):
        queued.result(timeout=5)
    assert client.ids == [1]


def test_kill_dead_engine_returns_once_reaped(cluster, client) -> None:
    os.kill(cluster.processes[0].pid, signal.SIGKILL)
    assert client.kill(targets=0, timeout=10) is None


def _xadd_raw(r: redis.Redis, cluster_name: str, fields: dict) -> None:
    r.xadd(f"re:{cluster_name}:{{e0}}:inbox", fields)


def test_garbage_entry_is_skipped_and_engine_keeps_serving(client, r, cluster_name) -> None:
    _xadd_raw(r, cluster_name, {"foo": "bar"})
    _xadd_raw(r, cluster_name, {"op": "execute"})
    _xadd_raw(r, cluster_name, {"op": b"\xff\xfe", "id": b"\x00"})
    assert client.execute("a = 1", targets=0) is None
    assert client.pull("a", targets=0) == 1
    assert client.queue_status(targets=0) == {"queued": 0, "running": 0, "completed": 5}


def test_unknown_op_fails_the_senders_future(client, r, cluster_name) -> None:
    """A malformed command that names its client fails that client's future, never hangs it."""
    f = client.execute("b = 1", targets=0, block=False)  # learn our client id from the routing
    f.result(timeout=5)
    cmd_id = f"{client.client_id}-bogus"
    pending = redisengines.PendingResult("bogus", {0: cmd_id}, single=True)
    client._listener.expect(cmd_id, pending, 0)
    inbox = f"re:{cluster_name}:{{e0}}:inbox"  # signed: it gets past the signature check
    r.xadd(inbox, client._signed({"op": "frobnicate", "id": cmd_id, "client": client.client_id},
                                 inbox))
    with pytest.raises(ProtocolError, match="unknown op 'frobnicate'"):
        pending.result(timeout=5)
    assert client.pull("b", targets=0) == 1


def test_user_code_exit_does_not_stop_the_engine(client) -> None:
    """SystemExit/KeyboardInterrupt on an engine come back as plain RemoteErrors: re-raising
    them as such on the client would exit the client or look like the user's own Ctrl-C."""
    with pytest.raises(redisengines.RemoteError) as err:
        client.execute("raise SystemExit(3)", targets=0)
    assert err.value.remote_type == "SystemExit" and not isinstance(err.value, SystemExit)
    with pytest.raises(redisengines.RemoteError) as err:
        client.execute("raise KeyboardInterrupt", targets=0)
    assert err.value.remote_type == "KeyboardInterrupt"
    assert client.execute("ok = 1", targets=0) is None
    assert client.ids == [0, 1]


def test_engines_exit_when_the_owning_process_is_killed(tmp_path) -> None:
    """A script that started a Cluster is SIGKILLed: its engines and server must not linger."""
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent("""
        import json, os, sys, time
        import redisengines
        cluster = redisengines.Cluster(n=2).start()
        pids = [p.pid for p in cluster.processes.values()] + [cluster.server.proc.pid]
        print(json.dumps(pids), flush=True)
        time.sleep(60)
    """))
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(owner.stdout.readline())
        owner.kill()
        owner.wait(5)

        def all_gone() -> bool:
            return not any(_alive(pid) for pid in pids)
        wait_until(all_gone, timeout=15, what="engines and server to exit")
    finally:
        owner.kill()
        owner.stdout.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_engines_started_later_join_all(cluster, client) -> None:
    assert cluster.start_engines(1) == [2]
    assert client.execute("a = 1") == {0: None, 1: None, 2: None}
    client.kill(targets=2)
    assert client.execute("a = 2") == {0: None, 1: None}


def test_ctrl_c_in_the_owning_script_stops_everything(tmp_path) -> None:
    """SIGINT (Ctrl-C) in a script inside `with Cluster(...)`: engines and server are stopped."""
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent("""
        import json, time
        import redisengines
        with redisengines.Cluster(n=2) as cluster:
            pids = [p.pid for p in cluster.processes.values()] + [cluster.server.proc.pid]
            print(json.dumps(pids), flush=True)
            time.sleep(60)
    """))
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    try:
        pids = json.loads(owner.stdout.readline())
        owner.send_signal(signal.SIGINT)
        _, err = owner.communicate(timeout=15)
        assert "KeyboardInterrupt" in err
        assert not any(_alive(pid) for pid in pids)
    finally:
        owner.kill()


def test_pace_overlaps_round_trips_only_behind_commands_that_wait() -> None:
    from redisengines.actor import _Pace
    pace = _Pace()
    assert not pace.waits()  # nothing known yet
    for _ in range(5):
        pace.ran(0.01, 0.0002)  # slept
    assert pace.waits()
    for _ in range(5):
        pace.ran(0.01, 0.0098)  # computed
    assert not pace.waits()
    short = _Pace()
    for _ in range(50):
        short.ran(0.0002, 0.0)  # waited, but too briefly to hide a round trip
    assert not short.waits()


def test_faultpoint_spec_is_checked() -> None:
    from redisengines.actor import parse_faultpoints
    assert parse_faultpoints("after_read:kill, before_ack:hang") == {
        "after_read": "kill", "before_ack": "hang"}
    assert parse_faultpoints("") == {}
    with pytest.raises(ValueError, match="REDISENGINES_FAULTPOINT"):
        parse_faultpoints("sometime:kill")
