"""FAULTS #1-#5, #7-#11, #13, #14, #21, #39, #42-#45: the engine process under faults.

One test per scenario of ``/work/shared/FAULTS.md``. Each asserts the exact error the user
gets and the invariant at the top of that file: every submitted command reaches exactly one
terminal state (its result or a named error) before its deadline; nothing acknowledged is
lost; no command runs twice. Whether (and how often) a command ran is checked through a side
effect it has outside the engine: it appends to a Redis list of its own (``ran``).

Engines run as real subprocesses. Most tests use ``make_cluster``; where an engine needs its
own environment (a fault point, a memory limit) it is started by :func:`spawn`, which
registers the process with the cluster so that teardown stops it too. Leases are short
(0.25 s renewal, 1.5 s TTL): a dead engine is noticed within :data:`DEADLINE`.

Where the library departs from FAULTS.md on purpose (no ``EngineRestartedError``: a restarted
engine gets a new id; an entry delivered to an engine that died before running it is
reported with ``started=True``), the tests pin what the library documents.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis

import redisengines
from redisengines import (
    EngineDiedError,
    EngineShutdownError,
    InvalidTargetError,
    PoisonCommandError,
    RemoteError,
)
from redisengines.keys import ENGINE_GROUP, Keys
from redisengines.launcher import wait_registered
from redisengines.serialization import unpack

from ..conftest import FAST
from ..helpers import WAIT, interactive, wait_until

# From a fault to the error the user gets: the 1.5 s lease, one lease check (0.25 s), and
# slack for a loaded two-core machine.
DEADLINE = 6.0


# --------------------------------------------------------------------------- helpers
def _new_key(what: str = "ran") -> str:
    return f"test:{what}:{uuid.uuid4().hex}"


def mark(url: str, key: str, value: str = "ran") -> str:
    """Code that appends ``value`` to the list ``key``: the side effect counting runs."""
    return f"__import__('redis').Redis.from_url({url!r}).rpush({key!r}, {value!r})\n"


def result_hash(r: redis.Redis, cluster_name: str, cmd_id: str) -> dict[bytes, bytes]:
    return r.hgetall(f"re:{cluster_name}:{{r{cmd_id}}}")


def inbox(cluster_name: str, eid: int) -> str:
    return f"re:{cluster_name}:{{e{eid}}}:inbox"


def cmd_id_of(f: redisengines.PendingResult) -> str:
    (cmd,) = f.cmd_ids.values()
    return cmd


def engine_by_pid(r: redis.Redis, cluster_name: str, pid: int,
                  exclude: tuple[int, ...] = ()) -> int | None:
    """The id under which process ``pid`` is registered and alive (not in ``exclude``)."""
    for field, raw in r.hgetall(f"re:{cluster_name}:engines").items():
        info = json.loads(raw)
        eid = int(field)
        if info.get("pid") == pid and info.get("state") != "dead" and eid not in exclude:
            return eid
    return None


def spawn(cluster: redisengines.Cluster, envs: list[dict[str, str]],
          preexec_fn: Callable[[], None] | None = None) -> list[tuple[int, subprocess.Popen]]:
    """Start one engine per ``envs`` item (extra environment), all at once, exactly as
    ``python -m redisengines.actor`` is run by hand; returns ``(engine id, process)`` in
    the order of ``envs``. The processes join ``cluster.processes`` (stopped at teardown)."""
    settings = cluster.settings.replace(redis_url=cluster.local_url)
    base = {**os.environ, **settings.to_env()}
    args = [sys.executable, "-m", "redisengines.actor", "--url", cluster.local_url,
            "--cluster", cluster.name, "--parent-pid", str(os.getpid())]
    r = redis.Redis.from_url(cluster.local_url)
    keys = Keys(cluster.name)
    last = r.xrevrange(keys.events, count=1)
    since = last[0][0].decode() if last else "0-0"
    procs = [subprocess.Popen(args, env={**base, **extra}, stdin=subprocess.DEVNULL,
                              start_new_session=True, preexec_fn=preexec_fn)
             for extra in envs]
    try:
        found = wait_registered(r, keys, procs, since, timeout=30)
    except BaseException:
        for p in procs:
            p.kill()
            p.wait()
        raise
    finally:
        r.close()
    by_pid = {pid: eid for eid, pid in found.items()}
    out = [(by_pid[p.pid], p) for p in procs]
    for eid, p in out:
        cluster.processes[eid] = p
    return out


def fault_env(spec: str) -> dict[str, str]:
    return {"REDISENGINES_FAULTPOINT": spec}


def no_core_dumps() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


# --------------------------------------------------------------------- remote code
def _mark_fn(url, key):
    """Load-balanced side effect: our pid on ``key``; returns it."""
    import os

    import redis
    redis.Redis.from_url(url).rpush(key, os.getpid())
    return os.getpid()


def _poison(url, key):
    """Records its delivery, then takes its engine down."""
    import os

    import redis
    redis.Redis.from_url(url).rpush(key, os.getpid())
    os._exit(3)


def _first_run_blocks(url, key, gate):
    """Records each run (our pid on ``key``); the first one waits for ``gate``; our pid."""
    import os

    import redis
    r = redis.Redis.from_url(url, socket_timeout=None)
    if r.rpush(key, os.getpid()) == 1:
        r.rpush(key + ":started", 1)
        r.blpop([gate], 30)
    return os.getpid()


def _nap_mark(url, key, i):
    """Waits 5 ms, then records that it ran: ``i`` on ``key``; returns ``i``."""
    import time

    import redis
    time.sleep(0.005)
    redis.Redis.from_url(url).rpush(key, i)
    return i


mark_fn = redisengines.remote(interactive(_mark_fn))
nap_mark = redisengines.remote(interactive(_nap_mark))
poison = redisengines.remote(interactive(_poison))
first_run_blocks = redisengines.remote(interactive(_first_run_blocks))


# ---------------------------------------------------------------------------- #1
def test_fault_01_sigkill_mid_execute(cluster, client, r, server_url, cluster_name,
                                      gates) -> None:
    """Running command: EngineDiedError(started=True) within the lease; queued one:
    started=False and never run; the reaper clears the PEL; engine 1 is unaffected."""
    g0, g1 = gates(), gates()
    other = g1.hold(client, 1)
    busy = g0.hold(client, 0)
    ran0, ran1 = _new_key(), _new_key()
    queued = client.execute(mark(server_url, ran0), targets=0, block=False)
    behind_other = client.execute(mark(server_url, ran1) + "y = 2", targets=1, block=False)
    t0 = time.monotonic()
    os.kill(cluster.processes[0].pid, signal.SIGKILL)

    with pytest.raises(EngineDiedError) as died:
        busy.result(timeout=DEADLINE)
    assert time.monotonic() - t0 < DEADLINE
    assert type(died.value) is EngineDiedError  # a death, not a shutdown
    assert died.value.engine_id == 0 and died.value.started is True
    assert "engine 0 died" in str(died.value)
    with pytest.raises(EngineDiedError) as not_started:
        queued.result(timeout=1)
    assert not_started.value.engine_id == 0 and not_started.value.started is False
    assert r.llen(ran0) == 0  # the queued command never ran
    for f in (busy, queued):
        assert result_hash(r, cluster_name, cmd_id_of(f))[b"status"] == b"error"
    assert not r.exists(inbox(cluster_name, 0))  # its PEL and queue are settled
    assert client.ids == [1]
    with pytest.raises(InvalidTargetError):
        client.execute("z = 1", targets=0)
    # engine 1 was not disturbed: still running its command, then the one behind it
    assert not other.done() and not behind_other.done()
    g1.open()
    assert other.result(timeout=WAIT) is None
    assert behind_other.result(timeout=WAIT) is None
    assert r.llen(ran1) == 1
    assert client.pull("y", targets=1) == 2


# ---------------------------------------------------------------------------- #2
def test_fault_02_killed_after_read_never_runs(make_cluster, r, server_url, gates) -> None:
    """Killed holding a delivered entry it never started. A direct command fails with
    EngineDiedError and never ran (the library reports started=True for any delivered
    entry: it cannot tell without a write per command). A load-balanced call with retries
    left is re-queued and runs once, on a healthy engine."""
    cluster = make_cluster(0, **FAST)
    client = cluster.client()
    (bad0, p0), (bad1, p1), (good, _) = spawn(
        cluster, [fault_env("after_read:kill"), fault_env("after_read:kill"), {}])
    gate = gates()
    held = gate.hold(client, good)  # so that the load-balanced call goes to bad1

    ran = _new_key()
    direct = client.execute(mark(server_url, ran), targets=bad0, block=False)
    assert p0.wait(WAIT) == -signal.SIGKILL  # the fault point fired
    lb_ran = _new_key()
    lb = mark_fn.options(client=client, max_retries=1).remote(server_url, lb_ran)
    assert p1.wait(WAIT) == -signal.SIGKILL

    with pytest.raises(EngineDiedError) as died:
        direct.result(timeout=DEADLINE)
    assert type(died.value) is EngineDiedError
    assert died.value.engine_id == bad0 and died.value.started is True
    assert r.llen(ran) == 0
    assert not lb.done()  # re-queued, not failed: it had a retry left
    gate.open()
    assert held.result(timeout=WAIT) is None
    good_pid = cluster.processes[good].pid
    assert lb.result(timeout=DEADLINE) == good_pid
    assert lb.engine_id == good
    assert [int(x) for x in r.lrange(lb_ran, 0, -1)] == [good_pid]  # ran once, there
    assert sorted(client.ids) == [good]


# ---------------------------------------------------------------------------- #3
def test_fault_03_killed_before_ack_ran_once(make_cluster, r, server_url,
                                             cluster_name) -> None:
    """Killed after running, before storing the result: the outcome is unknown
    (EngineDiedError, started=True), the command ran exactly once, nothing is stored."""
    cluster = make_cluster(1, **FAST)
    client = cluster.client()
    ((bad, proc),) = spawn(cluster, [fault_env("before_ack:kill")])
    ran = _new_key()
    f = client.execute(mark(server_url, ran) + "x = 1", targets=bad, block=False)
    assert proc.wait(WAIT) == -signal.SIGKILL
    assert r.llen(ran) == 1  # it did run
    with pytest.raises(EngineDiedError) as died:
        f.result(timeout=DEADLINE)
    assert type(died.value) is EngineDiedError
    assert died.value.engine_id == bad and died.value.started is True
    stored = result_hash(r, cluster_name, cmd_id_of(f))
    assert stored[b"status"] == b"error" and b"value" not in stored
    assert not r.exists(inbox(cluster_name, bad))
    assert r.xlen(f"re:{cluster_name}:tasks") == 0  # not re-queued anywhere
    assert client.execute("y = 1", targets=0) is None  # the other engine serves on
    assert r.llen(ran) == 1  # and it was never run again


# ---------------------------------------------------------------------------- #4
def _state(r: redis.Redis, cluster_name: str, f: redisengines.PendingResult,
           eid: int) -> tuple[bytes | None, bool, int]:
    """(result status, entry still in the stream, pending entries), read atomically."""
    fields = result_hash(r, cluster_name, cmd_id_of(f))
    entry = fields[b"entry"].decode()
    pipe = r.pipeline(transaction=True)
    pipe.hget(f"re:{cluster_name}:{{r{cmd_id_of(f)}}}", "status")
    pipe.xrange(inbox(cluster_name, eid), entry, entry)
    pipe.exists(inbox(cluster_name, eid))
    status, found, exists = pipe.execute()
    pending = r.xpending(inbox(cluster_name, eid), ENGINE_GROUP)["pending"] if exists else 0
    return status, bool(found), pending


def _assert_result_iff_acked(state: tuple[bytes | None, bool, int]) -> None:
    status, in_stream, _pending = state
    assert (status in (b"ok", b"error")) == (not in_stream), state


def test_fault_04_result_write_and_ack_are_atomic(make_cluster, r, server_url,
                                                  cluster_name) -> None:
    """No state with a result but the entry un-acked, or the reverse: after a kill before
    the ack and after a kill right after running, and (MONITOR) in a normal completion,
    whose result, notice, XACK and XDEL are one script."""
    cluster = make_cluster(0, **FAST)
    client = cluster.client()
    (before_ack, pa), (after_exec, pb), (healthy, _) = spawn(
        cluster, [fault_env("before_ack:kill"), fault_env("after_exec:kill"), {}])
    ran = _new_key()
    fa = client.execute(mark(server_url, ran), targets=before_ack, block=False)
    fb = client.execute(mark(server_url, ran), targets=after_exec, block=False)
    assert pa.wait(WAIT) == -signal.SIGKILL and pb.wait(WAIT) == -signal.SIGKILL
    assert r.llen(ran) == 2
    # killed between running and completing: no result, entry delivered and un-acked
    # (or, if the reaper was quicker than this read, both settled)
    for f, eid in ((fa, before_ack), (fb, after_exec)):
        state = _state(r, cluster_name, f, eid)
        assert state in ((b"queued", True, 1), (b"error", False, 0)), state
        _assert_result_iff_acked(state)
    for f, eid in ((fa, before_ack), (fb, after_exec)):
        with pytest.raises(EngineDiedError) as died:
            f.result(timeout=DEADLINE)
        assert died.value.engine_id == eid and died.value.started is True
        # settled by the reaper: an error result, and the entry gone with the inbox
        assert _state(r, cluster_name, f, eid) == (b"error", False, 0)

    # a normal completion, watched with MONITOR: one script stores the result and acks
    mon_conn = redis.Redis.from_url(server_url, socket_timeout=WAIT)
    seen: list[dict[str, Any]] = []
    with mon_conn.monitor() as monitor:
        f = client.execute("z = 3", targets=healthy, block=False)
        cmd = cmd_id_of(f)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            line = monitor.next_command()
            seen.append(line)
            if line["command"].startswith("XDEL " + inbox(cluster_name, healthy)):
                break
    mon_conn.close()
    assert f.result(timeout=WAIT) is None
    # the block of script commands holding the XACK also holds the result's HSET
    end = len(seen) - 1
    assert seen[end]["command"].startswith("XDEL"), "no XDEL of the entry seen"
    start = end
    while start > 0 and seen[start - 1]["client_type"] == "lua":
        start -= 1
    block = [c["command"] for c in seen[start:end + 1]]
    assert all(c["client_type"] == "lua" for c in seen[start:end + 1])
    result_key = f"re:{cluster_name}:{{r{cmd}}}"
    assert any(c.startswith(f"HSET {result_key} status ok") for c in block), block
    assert any(c.startswith(f"XACK {inbox(cluster_name, healthy)}") for c in block), block
    assert _state(r, cluster_name, f, healthy) == (b"ok", False, 0)


# ---------------------------------------------------------------------------- #5
def test_fault_05_restarted_engine_gets_a_new_id(cluster, client, r, server_url,
                                                 cluster_name, gates) -> None:
    """A new engine process after a SIGKILL (a supervisor's restart) is a new engine: a
    fresh id from P:next_id, an empty namespace; the old id's commands fail with
    EngineDiedError and never run; the old id stays dead and is never reused."""
    client.execute("a = 1", targets=0)
    gate = gates()
    busy = gate.hold(client, 0)
    ran = _new_key()
    queued = client.execute(mark(server_url, ran), targets=0, block=False)
    next_id = int(r.get(f"re:{cluster_name}:next_id"))
    proc = cluster.processes[0]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(WAIT)

    (new,) = cluster.start_engines(1)  # restarted at once, before the death is noticed
    assert new == next_id and new not in (0, 1)
    with pytest.raises(EngineDiedError) as died:
        busy.result(timeout=DEADLINE)
    assert died.value.engine_id == 0 and died.value.started is True
    with pytest.raises(EngineDiedError) as not_started:
        queued.result(timeout=1)
    assert not_started.value.engine_id == 0 and not_started.value.started is False
    assert client.ids == [1, new]
    with pytest.raises(KeyError):  # the namespace did not come back with the process
        client.pull("a", targets=new)
    assert client.execute(mark(server_url, ran), targets=new) is None
    assert r.llen(ran) == 1  # the new engine ran only what was sent to it
    assert json.loads(r.hget(f"re:{cluster_name}:engines", "0"))["state"] == "dead"
    with pytest.raises(InvalidTargetError):
        client.execute("b = 1", targets=0)
    assert cluster.start_engines(1) == [new + 1]  # ids only go up


# ---------------------------------------------------------------------------- #7
def test_fault_07_sigterm_with_queued_work(cluster, client, r, server_url, cluster_name,
                                           gates) -> None:
    """SIGTERM while busy: the running command finishes — its lease is kept meanwhile, even
    past the TTL — queued ones fail with EngineShutdownError(started=False) and never run,
    the registry entry is removed, the process exits 0."""
    gate = gates()
    ran, queued_ran = _new_key(), _new_key()
    busy = client.execute(gate.code + mark(server_url, ran), targets=0, block=False)
    gate.wait_started()
    queued = [client.execute(mark(server_url, queued_ran), targets=0, block=False)
              for _ in range(3)]
    proc = cluster.processes[0]
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    # The current command outlives the lease: the engine must not be taken for dead.
    settings = cluster.settings
    while time.monotonic() - t0 < settings.heartbeat_ttl + 3 * settings.heartbeat_interval:
        assert not busy.done(), f"the running command was failed: {busy.exception()!r}"
        assert 0 in client.get_ids(), "engine 0 lost its lease while finishing its command"
        time.sleep(settings.heartbeat_interval / 2)
    gate.open()
    assert busy.result(timeout=WAIT) is None
    assert r.llen(ran) == 1
    for f in queued:
        with pytest.raises(EngineShutdownError) as err:
            f.result(timeout=WAIT)
        assert err.value.engine_id == 0 and err.value.started is False
        assert "shut down" in str(err.value)
    assert r.llen(queued_ran) == 0
    assert proc.wait(WAIT) == 0
    assert not r.hexists(f"re:{cluster_name}:engines", "0")
    assert client.ids == [1]


# ---------------------------------------------------------------------------- #8
def test_fault_08_task_exhausts_engine_memory(make_cluster, r, cluster_name) -> None:
    """An engine under RLIMIT_AS: a task that runs out of memory (at once, or little by
    little) fails with a remote error that is a MemoryError; the engine survives and serves
    on. (Checked in that order: what the engine stored, that it lives, what the user gets.)"""
    cluster = make_cluster(0, **FAST)
    client = cluster.client()
    limit = 512 * 1024 * 1024

    def limit_memory() -> None:
        no_core_dumps()
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    ((eid, proc),) = spawn(cluster, [{}], preexec_fn=limit_memory)
    client.execute("kept = 41", targets=eid)
    grow = textwrap.dedent("""
        def grow():
            chunks = []
            while True:
                chunks.append(bytearray(2**20))
    """)
    at_once = client.execute("x = bytearray(10**10)", targets=eid, block=False)
    growing = client.execute(grow + "grow()", targets=eid, block=False)
    after = client.execute("kept += 1", targets=eid, block=False)
    assert after.result(timeout=WAIT) is None  # the engine survived both
    assert proc.poll() is None
    assert client.pull("kept", targets=eid) == 42
    assert client.ids == [eid]
    for f in (at_once, growing):
        stored = result_hash(r, cluster_name, cmd_id_of(f))
        assert stored[b"status"] == b"error"
        assert json.loads(stored[b"error"])["type"] == "MemoryError"
    for f in (at_once, growing):
        # Their notices came before the one of `after`: no need to wait. (Today the client
        # cannot rebuild a remote MemoryError, drops the notice, and this times out.)
        with pytest.raises(MemoryError) as err:
            f.result(timeout=1)
        assert isinstance(err.value, RemoteError) and err.value.remote_type == "MemoryError"
        assert err.value.engine_id == eid


# ---------------------------------------------------------------------------- #9
def test_fault_09_task_segfaults_or_exits(make_cluster, r, server_url, gates) -> None:
    """A task that segfaults or calls os._exit: as #1, EngineDiedError(started=True); the
    queued command never runs; the third engine is unaffected. The message cannot name the
    signal or exit code: nobody but the parent process sees how the engine ended."""
    cluster = make_cluster(0, **FAST)
    client = cluster.client()
    (segv, ps), (exits, pe), (healthy, _) = spawn(cluster, [{}, {}, {}],
                                                 preexec_fn=no_core_dumps)
    gate = gates()
    held = gate.hold(client, healthy)
    started, ran = _new_key(), _new_key()
    crash = client.execute(mark(server_url, started) + "import ctypes; ctypes.string_at(0)",
                           targets=segv, block=False)
    leave = client.execute(mark(server_url, started) + "import os; os._exit(3)",
                           targets=exits, block=False)
    behind = [client.execute(mark(server_url, ran), targets=eid, block=False)
              for eid in (segv, exits)]
    assert ps.wait(WAIT) == -signal.SIGSEGV and pe.wait(WAIT) == 3
    assert r.llen(started) == 2
    for f, eid in ((crash, segv), (leave, exits)):
        with pytest.raises(EngineDiedError) as died:
            f.result(timeout=DEADLINE)
        assert type(died.value) is EngineDiedError
        assert died.value.engine_id == eid and died.value.started is True
        assert f"engine {eid} died (its heartbeat lease expired) while running" \
            in str(died.value)
    for f in behind:
        with pytest.raises(EngineDiedError) as died:
            f.result(timeout=1)
        assert died.value.started is False
    assert r.llen(ran) == 0
    assert not held.done()
    gate.open()
    assert held.result(timeout=WAIT) is None
    assert client.ids == [healthy]


# --------------------------------------------------------------------------- #10
def test_fault_10_task_holds_the_gil_past_the_lease(cluster, client, r, server_url,
                                                    cluster_name) -> None:
    """A C call that keeps the GIL (libc sleep through ctypes.PyDLL) for 2x the lease: the
    heartbeat thread cannot run, so the engine is declared dead while still in the call and
    its futures fail (EngineDiedError); when it wakes, its late result is refused, the
    queued command never runs, and the process joins again under a new id."""
    ran, queued_ran = _new_key(), _new_key()
    settings = cluster.settings
    hold = 2 * settings.heartbeat_ttl
    code = mark(server_url, ran) + f"import ctypes; ctypes.PyDLL(None).sleep({int(hold + 1)})\n"
    pid = cluster.processes[0].pid
    t0 = time.monotonic()
    f = client.execute(code, targets=0, block=False)
    queued = client.execute(mark(server_url, queued_ran), targets=0, block=False)
    outcomes: list[Any] = []
    f.add_done_callback(outcomes.append)
    with pytest.raises(EngineDiedError) as died:
        f.result(timeout=DEADLINE)
    assert time.monotonic() - t0 < hold + 1  # declared dead while the GIL was still held
    assert died.value.engine_id == 0 and died.value.started is True
    with pytest.raises(EngineDiedError) as not_started:
        queued.result(timeout=1)
    assert not_started.value.started is False
    stored = result_hash(r, cluster_name, cmd_id_of(f))
    # it wakes, is refused, and comes back as a new engine (same process)
    new = wait_until(lambda: engine_by_pid(r, cluster_name, pid, exclude=(0,)),
                     timeout=hold + 10, what="the engine to join again under a new id")
    assert new not in (0, 1)
    assert client.apply(os.getpid, targets=new) == pid
    assert result_hash(r, cluster_name, cmd_id_of(f)) == stored  # no late result
    assert stored[b"status"] == b"error"
    assert len(outcomes) == 1 and isinstance(f.exception(), EngineDiedError)
    assert r.llen(ran) == 1 and r.llen(queued_ran) == 0
    assert json.loads(r.hget(f"re:{cluster_name}:engines", "0"))["state"] == "dead"
    assert client.ids == [1, new]


# --------------------------------------------------------------------------- #11
CHILD = textwrap.dedent("""
    import json, sys, time
    import redisengines
    url, cluster, gate_code = sys.argv[1:4]
    c = redisengines.connect(url, cluster=cluster)   # settings from REDISENGINES_*
    fs = [c.execute("print('hello')", targets=0, block=False),
          c.apply(pow, 2, 10, targets=0, block=False),
          c.apply(bytes, 300_000, targets=0, block=False),   # a paged (large) result
          c.execute(gate_code, targets=1, block=False)]      # still running when we die
    print(json.dumps([[eid, cmd] for f in fs for eid, cmd in f.cmd_ids.items()]), flush=True)
    time.sleep(60)
""")


def test_fault_11_client_killed_with_results_pending(make_cluster, r, cluster_name,
                                                     gates) -> None:
    """A client is SIGKILLed with commands queued and running: they complete, another
    client reads every result by command id before the result TTL, and afterwards all
    the keys they made expire (the cluster's keys are back to what they were)."""
    cluster = make_cluster(2, result_ttl=2.5, **FAST)
    client = cluster.client()
    # every engine has its history and output streams: part of the baseline
    client.execute("print('baseline')")
    prefix = f"re:{cluster_name}:"
    wait_until(lambda: r.exists(*(f"{prefix}{{e{e}}}:out" for e in (0, 1))) == 2,
               what="the engines' output streams")

    def keys() -> set[bytes]:
        return set(r.scan_iter(match=prefix + "*", count=1000))

    baseline = keys()
    gate = gates()
    env = {**os.environ, **cluster.settings.replace(redis_url=cluster.local_url).to_env()}
    child = subprocess.Popen([sys.executable, "-c", CHILD, cluster.local_url, cluster.name,
                              gate.code], stdout=subprocess.PIPE, env=env, text=True)
    try:
        sent = json.loads(child.stdout.readline())
        gate.wait_started()
        child.kill()
        assert child.wait(WAIT) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    gate.open()  # the last one completes after its client is gone

    def all_done() -> list[dict[bytes, bytes]] | None:
        found = [result_hash(r, cluster_name, cmd) for _, cmd in sent]
        return found if all(h.get(b"status") == b"ok" for h in found) else None
    stored = wait_until(all_done, timeout=WAIT, what="the dead client's commands")
    assert [int(h[b"engine"]) for h in stored] == [eid for eid, _ in sent]
    values = [unpack(h[b"value"]) if b"value" in h else client.store.get(h[b"obj"].decode())
              for h in stored]
    assert values == [None, 1024, bytes(300_000), None]
    assert stored[0][b"stdout"] == b"hello\n"
    assert b"obj" in stored[2]  # the large one was paged: its pages must expire too

    wait_until(lambda: keys() <= baseline, timeout=cluster.settings.result_ttl + 5,
               what="the dead client's results and replies to expire")
    assert len(keys()) <= len(baseline)


# --------------------------------------------------------------------------- #13
def test_fault_13_get_timeout_then_a_later_get_succeeds(client, r, server_url,
                                                        gates) -> None:
    """A wait that times out raises the builtin TimeoutError and changes nothing: the
    command keeps running and a later wait gets its result (multiengine API and get())."""
    gate = gates()
    ran = _new_key()
    f = client.execute(gate.code + mark(server_url, ran) + "r13 = 13", targets=0,
                       block=False)
    gate.wait_started()
    lb = mark_fn.options(client=client).remote(server_url, ran)  # runs on engine 1
    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as err:
        f.result(timeout=0.3)
    assert 0.25 <= time.monotonic() - t0 < 2
    assert type(err.value) is TimeoutError
    with pytest.raises(TimeoutError):
        redisengines.get([lb, f], timeout=0.3)
    with pytest.raises(TimeoutError):
        client.barrier(f, timeout=0.2)
    assert not f.done()
    assert client.queue_status(targets=0)["running"] == 1  # still running
    gate.open()
    assert f.result(timeout=WAIT) is None
    assert redisengines.get(lb, timeout=WAIT) == cluster_pid(client, 1)
    assert r.llen(ran) == 2
    assert client.pull("r13", targets=0) == 13


def cluster_pid(client: redisengines.Client, eid: int) -> int:
    return client.apply(os.getpid, targets=eid)


# --------------------------------------------------------------------------- #14
def test_fault_14_barrier_fails_fast_when_an_engine_dies(cluster, client, gates) -> None:
    """A barrier over both engines raises the dead one's EngineDiedError within the lease,
    not after its own timeout; the survivor's command is untouched and completes."""
    g0, g1 = gates(), gates()
    fs = [g0.hold(client, 0), g1.hold(client, 1)]
    os.kill(cluster.processes[1].pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(EngineDiedError) as died:
        client.barrier(fs, timeout=30)
    assert time.monotonic() - t0 < DEADLINE
    assert died.value.engine_id == 1 and died.value.started is True
    assert not fs[0].done()
    g0.open()
    client.barrier(fs[0], timeout=WAIT)
    assert fs[0].result() is None


# --------------------------------------------------------------------------- #21
def test_fault_21_engine_connection_killed(cluster, client, r, server_url, cluster_name,
                                           gates) -> None:
    """CLIENT KILL of the engine's blocked read: it reconnects and re-reads its own PEL
    from 0, so an entry delivered to it whose reply was lost (here: read as its consumer
    by the test, as a lost reply would leave it) still runs, once."""
    gate = gates()
    held = gate.hold(client, 0)  # not reading its inbox now
    ran = _new_key()
    f = client.execute(mark(server_url, ran) + "after = 1", targets=0, block=False)
    # The delivery whose reply the engine never sees: into its PEL, not to the engine.
    got = r.xreadgroup(ENGINE_GROUP, "e0", {inbox(cluster_name, 0): ">"}, count=1)
    assert got and got[0][1][0][1][b"id"].decode() == cmd_id_of(f)
    gate.open()
    assert held.result(timeout=WAIT) is None  # the engine is back in its blocking read
    name = f"re:{cluster_name}:e0:loop"
    conns = wait_until(lambda: [c for c in r.client_list() if c["name"] == name],
                       what="engine 0 loop connection")
    assert len(conns) == 1
    r.execute_command("CLIENT", "KILL", "ID", conns[0]["id"])
    assert f.result(timeout=WAIT) is None
    assert r.llen(ran) == 1
    assert client.pull("after", targets=0, timeout=WAIT) == 1
    assert client.queue_status(targets=0)["running"] == 0
    assert client.ids == [0, 1]


def test_fault_21_connection_killed_while_commands_that_wait_run(cluster, client, r,
                                                                 server_url,
                                                                 cluster_name) -> None:
    """Behind commands that wait, an engine's round trips (completing one, reading the next)
    go out on a helper thread while the next one runs. CLIENT KILL of the engines'
    connections, again and again during a run of them, loses nothing: every call returns
    its value, and ran once."""
    threads = "import threading\nnames = [t.name for t in threading.enumerate()]"
    client.execute(threads, targets=[0, 1])
    assert not any("re-courier" in client.pull("names", targets=e) for e in (0, 1))
    ran, n = _new_key(), 300
    f = nap_mark.options(client=client)
    calls = [f.remote(server_url, ran, i) for i in range(n)]
    loops = {f"re:{cluster_name}:e{e}:loop" for e in (0, 1)}
    kills = 0
    while kills < 8 and not calls[-1].done():
        for c in r.client_list():
            if c["name"] in loops:
                r.execute_command("CLIENT", "KILL", "ID", c["id"])
                kills += 1
        time.sleep(0.05)
    assert kills >= 2
    assert redisengines.get(calls, timeout=WAIT) == list(range(n))
    assert sorted(int(i) for i in r.lrange(ran, 0, -1)) == list(range(n))  # each ran once
    client.execute(threads, targets=[0, 1])
    assert all("re-courier" in client.pull("names", targets=e) for e in (0, 1))


# --------------------------------------------------------------------------- #39
def test_fault_39_poison_call_stops_after_its_retries(make_cluster, r, server_url,
                                                      cluster_name) -> None:
    """A load-balanced call that takes down every engine it reaches, with max_retries=2:
    delivered 3 times (to 3 different engines), then PoisonCommandError (an EngineDiedError)
    and a dead letter in P:dead; it is not delivered again although a fourth engine is
    alive, and that engine serves on."""
    cluster = make_cluster(4, **FAST)
    client = cluster.client()
    deliveries = _new_key()
    t0 = time.monotonic()
    f = poison.options(client=client, max_retries=2).remote(server_url, deliveries)
    with pytest.raises(PoisonCommandError) as died:
        f.result(timeout=3 * DEADLINE)
    assert time.monotonic() - t0 < 3 * DEADLINE
    assert isinstance(died.value, EngineDiedError) and died.value.started is True
    assert "the 3 engines it was delivered to all died" in str(died.value)
    ((_, letter),) = r.xrange(f"re:{cluster_name}:dead")
    assert (letter[b"id"].decode(), letter[b"died"], letter[b"fn"]) == (
        died.value.cmd_id, b"3", b"_poison")
    pids = [int(p) for p in r.lrange(deliveries, 0, -1)]
    assert len(pids) == 3 and len(set(pids)) == 3
    by_pid = {p.pid: eid for eid, p in cluster.processes.items()}
    assert died.value.engine_id == by_pid[pids[-1]]  # the last engine it reached
    (survivor,) = set(cluster.processes) - {by_pid[p] for p in pids}
    assert client.ids == [survivor]
    tasks = f"re:{cluster_name}:tasks"
    assert r.xlen(tasks) == 0 and r.xpending(tasks, ENGINE_GROUP)["pending"] == 0
    assert mark_fn.options(client=client).remote(server_url, _new_key()).result(
        timeout=WAIT) == cluster.processes[survivor].pid
    assert r.llen(deliveries) == 3


# --------------------------------------------------------------------------- #42
def test_fault_42_sigint_interrupts_the_running_command(cluster, client, r, server_url,
                                                        gates) -> None:
    """SIGINT to a busy engine interrupts its command, which fails with a RemoteError whose
    remote_type is KeyboardInterrupt (not a KeyboardInterrupt in the client); the engine
    survives: the command queued behind runs once, and so do later ones."""
    gate = gates()
    after, queued_ran = _new_key(), _new_key()
    f = client.execute(gate.code + mark(server_url, after), targets=0, block=False)
    gate.wait_started()
    queued = client.execute(mark(server_url, queued_ran) + "q = 1", targets=0, block=False)
    pid = cluster.processes[0].pid
    os.kill(pid, signal.SIGINT)
    with pytest.raises(RemoteError) as err:
        f.result(timeout=WAIT)
    assert err.value.remote_type == "KeyboardInterrupt"
    assert not isinstance(err.value, KeyboardInterrupt)
    assert err.value.engine_id == 0
    assert queued.result(timeout=WAIT) is None
    gate.open()
    assert r.llen(after) == 0  # interrupted before the rest of its code
    assert r.llen(queued_ran) == 1
    assert cluster.processes[0].poll() is None
    assert client.apply(os.getpid, targets=0) == pid
    assert client.ids == [0, 1]


# --------------------------------------------------------------------------- #43
def test_fault_43_slow_consumer_fast_producer(cluster, client, r, server_url,
                                              cluster_name, gates) -> None:
    """200 commands queue up on a slow engine for longer than its lease: no false death or
    timeout, each runs once and in order, queue_status adds up at every moment, and a
    command's queued time is told apart from its run time; the other engine answers fast
    all along."""
    n = 200
    done_key = _new_key()
    client.execute(f"import time, redis; _r = redis.Redis.from_url({server_url!r})",
                   targets=0)
    before = client.queue_status(targets=0)["completed"]
    gate = gates()
    held = gate.hold(client, 0)
    fs = [client.execute(f"time.sleep(0.01); _r.rpush({done_key!r}, {i})", targets=0,
                         block=False) for i in range(n)]
    assert client.queue_status(targets=0) == {"queued": n, "running": 1,
                                              "completed": before}
    gate.open()
    t0 = time.monotonic()
    last_completed = before
    samples = 0
    while not all(f.done() for f in fs):
        status = client.queue_status(targets=0)
        assert status["queued"] + status["running"] + status["completed"] == before + n + 1, \
            status
        assert status["running"] <= 1 and status["completed"] >= last_completed
        last_completed = status["completed"]
        assert client.execute("pong = 1", targets=1, timeout=2) is None  # fast producer
        samples += 1
        assert time.monotonic() - t0 < 30
    drained = time.monotonic() - t0
    assert drained > cluster.settings.heartbeat_ttl  # queued for longer than the lease
    assert samples > 3
    assert held.result(timeout=0) is None
    assert [f.result(timeout=0) for f in fs] == [None] * n
    assert [int(x) for x in r.lrange(done_key, 0, -1)] == list(range(n))
    assert client.queue_status(targets=0) == {"queued": 0, "running": 0,
                                              "completed": before + n + 1}
    last = result_hash(r, cluster_name, cmd_id_of(fs[-1]))
    queued_at = int(last[b"entry"].split(b"-")[0]) / 1000
    started, finished = float(last[b"started"]), float(last[b"finished"])
    assert finished - started < 0.5  # its own run time
    assert started - queued_at > cluster.settings.heartbeat_ttl  # its wait in the queue
    assert client.ids == [0, 1]


# --------------------------------------------------------------------------- #44
def test_fault_44_engines_started_together_never_share_an_id(make_cluster, r,
                                                             cluster_name) -> None:
    """Four engine processes started at the same moment get four ids, allocated in order
    by INCR, and each inbox has exactly one consumer: the engine of that id."""
    cluster = make_cluster(0, **FAST)
    client = cluster.client()
    next_id = int(r.get(f"re:{cluster_name}:next_id") or 0)
    started = spawn(cluster, [{}] * 4)
    client.get_ids()
    ids = sorted(eid for eid, _ in started)
    assert ids == list(range(next_id, next_id + 4))
    pids = {eid: p.pid for eid, p in started}
    assert len(set(pids.values())) == 4
    assert client.apply(os.getpid) == pids  # each id is served by its own process
    for eid in ids:
        consumers = r.xinfo_consumers(inbox(cluster_name, eid), ENGINE_GROUP)
        assert [c["name"] for c in consumers] == [f"e{eid}".encode()]
    registry = {int(k): json.loads(v)["pid"]
                for k, v in r.hgetall(f"re:{cluster_name}:engines").items()}
    assert registry == pids
    assert int(r.get(f"re:{cluster_name}:next_id")) == next_id + 4


# --------------------------------------------------------------------------- #45
def test_fault_45_reaped_engine_cannot_write(cluster, client, r, server_url, cluster_name,
                                             gates) -> None:
    """A load-balanced call's engine is frozen (SIGSTOP) past its lease: it is reaped, the
    call is re-queued and runs on the other engine. Woken (SIGCONT), the reaped engine
    finishes its run, but its late result is refused: the stored result stays the other
    engine's, the future got exactly one outcome, and the process joins under a new id."""
    gate = gates()
    runs = _new_key()
    f = first_run_blocks.options(client=client).remote(server_url, runs, gate.open_key)
    outcomes: list[Any] = []
    f.add_done_callback(outcomes.append)
    assert r.blpop([runs + ":started"], WAIT) is not None
    zombie_pid = int(r.lindex(runs, 0))
    zombie = next(eid for eid, p in cluster.processes.items() if p.pid == zombie_pid)
    other = 1 - zombie
    os.kill(zombie_pid, signal.SIGSTOP)
    try:
        assert f.result(timeout=DEADLINE) == cluster.processes[other].pid
        assert f.engine_id == other
        stored = result_hash(r, cluster_name, cmd_id_of(f))
        assert stored[b"status"] == b"ok" and int(stored[b"engine"]) == other
        gate.open()  # its first run may now end
    finally:
        os.kill(zombie_pid, signal.SIGCONT)
    new = wait_until(lambda: engine_by_pid(r, cluster_name, zombie_pid, exclude=(zombie,)),
                     timeout=WAIT, what="the reaped engine to join again under a new id")
    assert new not in (0, 1)
    assert result_hash(r, cluster_name, cmd_id_of(f)) == stored  # the late write refused
    assert [int(x) for x in r.lrange(runs, 0, -1)] == [zombie_pid, cluster.processes[other].pid]
    assert len(outcomes) == 1 and f.result() == cluster.processes[other].pid
    assert r.exists(f"re:{cluster_name}:{{e{zombie}}}:fenced")
    assert json.loads(r.hget(f"re:{cluster_name}:engines", str(zombie)))["state"] == "dead"
    assert sorted(client.ids) == [other, new]
