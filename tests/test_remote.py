"""The Ray-style layer with real engines: remote functions, actors, futures as arguments,
get/wait/put/kill/cancel/get_actor, init/shutdown, and engine death under both.

Remote code is defined here and marked :func:`interactive` so that cloudpickle sends it by
value. Bodies import what they use: a global of this module would be pickled by reference,
which an engine cannot import. Calls that must stay running block on a Redis list (a
:class:`Gate` of the ``gates`` fixture), never on a sleep.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import os
import signal
import threading
import time
from concurrent.futures import CancelledError, as_completed

import numpy as np
import pytest
import redis

import redisengines
from redisengines import (
    ActorDiedError,
    ActorHandle,
    EngineDiedError,
    PendingResult,
    RemoteError,
    api,
)

from .helpers import WAIT, delay_sender, interactive, wait_until


# --------------------------------------------------------------------- remote code
def _square(x):
    return x * x


def _add(a, b):
    return a + b


def _inc(x):
    return x + 1


def _pid():
    import os
    return os.getpid()


def _pid_square(x):
    import os
    return os.getpid(), x * x


def _boom():
    return 1 / 0


def _mark(url, key, *args):
    """Side effect: push to ``key`` (so a test can see whether the call ever ran)."""
    import redis
    redis.Redis.from_url(url).rpush(key, "ran")
    return args


def _block(url, started, gate, value=None):
    """Announce the start (our pid on ``started``), then wait until ``gate`` is opened."""
    import os

    import redis
    r = redis.Redis.from_url(url)
    r.rpush(started, os.getpid())
    r.blpop([gate], 30)
    return value


def _block_first_run(url, started, gate):
    """Block on the first run only (a re-run after engine death returns at once); our pid."""
    import os

    import redis
    r = redis.Redis.from_url(url)
    if r.incr(started + ":runs") == 1:
        r.rpush(started, os.getpid())
        r.blpop([gate], 30)
    return os.getpid()


def _total(arr, extra=0):
    return float(arr.sum()) + extra


def _make_big(n):
    import numpy as np
    return np.arange(n, dtype=np.float64)


def _call_actor(handle, k):
    """Runs on an engine: uses an actor handle through the engine's own default client."""
    import redisengines
    return redisengines.get(handle.incr.remote(k), timeout=20)


def _call_actor_within(handle, k, seconds):
    import redisengines
    return redisengines.get(handle.incr.remote(k), timeout=seconds)


def _call_remote(fn, *args):
    """Runs on an engine: calls another remote function and waits for it."""
    import redisengines
    return redisengines.get(fn.remote(*args), timeout=20)


class _Counter:
    def __init__(self, start=0):
        self.n = start
        self.log = []

    def incr(self, k=1):
        self.n += k
        return self.n

    def record(self, item):
        self.log.append(item)
        return len(self.log)

    def get_log(self):
        return self.log

    def pid(self):
        import os
        return os.getpid()

    def boom(self):
        return 1 / 0

    def block(self, url, started, gate):
        import os

        import redis
        r = redis.Redis.from_url(url)
        r.rpush(started, os.getpid())
        r.blpop([gate], 30)
        return self.n


class _Broken:
    def __init__(self):
        raise ValueError("bad start")

    def m(self):
        return 1


square = redisengines.remote(interactive(_square))
add = redisengines.remote(interactive(_add))
inc = redisengines.remote(interactive(_inc))
pid = redisengines.remote(interactive(_pid))
pid_square = redisengines.remote(interactive(_pid_square))
boom = redisengines.remote(interactive(_boom))
mark = redisengines.remote(interactive(_mark))
block = redisengines.remote(interactive(_block))
block_first_run = redisengines.remote(interactive(_block_first_run))
total = redisengines.remote(interactive(_total))
make_big = redisengines.remote(interactive(_make_big))
call_actor = redisengines.remote(interactive(_call_actor))
call_actor_within = redisengines.remote(interactive(_call_actor_within))
call_remote = redisengines.remote(interactive(_call_remote))
Counter = redisengines.remote(interactive(_Counter))
Broken = redisengines.remote(interactive(_Broken))


# -------------------------------------------------------------------------- fixtures
@pytest.fixture
def rc(client: redisengines.Client, monkeypatch: pytest.MonkeyPatch) -> redisengines.Client:
    """``client`` as the default client of the module-level calls, for this test only."""
    monkeypatch.setattr(api, "_client", client)
    return client


def engine_of(cluster: redisengines.Cluster, engine_pid: int | bytes) -> int:
    by_pid = {p.pid: eid for eid, p in cluster.processes.items()}
    return by_pid[int(engine_pid)]


def alive(p: int) -> bool:
    try:
        os.kill(p, 0)
    except ProcessLookupError:
        return False
    return True


def tasks_key(cluster_name: str) -> str:
    return f"re:{cluster_name}:tasks"


def inbox_key(cluster_name: str, eid: int) -> str:
    return f"re:{cluster_name}:{{e{eid}}}:inbox"


def entry_of(r: redis.Redis, stream: str, future: PendingResult) -> dict[bytes, bytes] | None:
    """The stream entry carrying ``future``'s call, if it is in ``stream``."""
    cmd_id = next(iter(future.cmd_ids.values())).encode()
    for _, fields in r.xrange(stream):
        if fields.get(b"id") == cmd_id:
            return fields
    return None


def barrier_on(client: redisengines.Client, eid: int) -> None:
    """Return once engine ``eid`` has run everything queued in its inbox before now."""
    client.execute("pass", targets=eid, timeout=WAIT)


# ----------------------------------------------------------------- remote functions
def test_remote_returns_a_future_at_once(rc, gates, server_url) -> None:
    g = gates()
    f = block.remote(server_url, g.started_key, g.open_key, "v")
    assert isinstance(f, PendingResult) and isinstance(f, concurrent.futures.Future)
    g.wait_started()
    assert not f.done()  # .remote() returned while the call was still running
    g.open()
    assert redisengines.get(f, timeout=WAIT) == "v"


def test_get_single_and_list_keep_order(rc) -> None:
    fs = [square.remote(i) for i in range(30)]
    assert redisengines.get(fs[7], timeout=WAIT) == 49
    assert redisengines.get(fs, timeout=WAIT) == [i * i for i in range(30)]
    backwards = redisengines.get(list(reversed(fs)), timeout=WAIT)
    assert backwards == [i * i for i in reversed(range(30))]
    assert redisengines.get([], timeout=WAIT) == []


def test_keyword_arguments_and_options_client(client) -> None:
    f = add.options(client=client).remote(a=2, b=40)
    assert f.result(timeout=WAIT) == 42


def test_options_engine_runs_there(rc, cluster) -> None:
    for eid in (0, 1):
        fs = [pid.options(engine=eid).remote() for _ in range(5)]
        assert redisengines.get(fs, timeout=WAIT) == [cluster.processes[eid].pid] * 5
    with pytest.raises(redisengines.InvalidTargetError):
        pid.options(engine=7).remote()


def test_options_do_not_change_the_original(rc, cluster, gates) -> None:
    pinned = pid.options(engine=1)
    assert pinned.remote().result(timeout=WAIT) == cluster.processes[1].pid
    # the decorated function itself stays load-balanced: with engine 1 held, it runs on 0
    g = gates()
    held = g.hold(rc, 1)
    assert redisengines.get([pid.remote() for _ in range(3)], timeout=WAIT) == \
        [cluster.processes[0].pid] * 3
    g.open()
    held.result(timeout=WAIT)


def test_queue_status_and_clear_queue_see_the_calls_made_before(
        rc, gates, monkeypatch) -> None:
    """A ``.remote()`` call that does not come alone returns before it is in Redis (a sender
    thread sends batches): the client's next ``queue_status`` and ``clear_queue`` must
    still see it."""
    g = gates()
    held = g.hold(rc, 0)
    delay_sender(rc, monkeypatch, 0.3)
    fs = [square.options(engine=0).remote(i) for i in range(3)]
    status = rc.queue_status(targets=0)
    assert (status["queued"], status["running"]) == (3, 1)
    more = square.options(engine=0).remote(9)
    assert rc.clear_queue(targets=0) == 4
    for f in [*fs, more]:
        with pytest.raises(concurrent.futures.CancelledError):
            f.result(timeout=WAIT)
    g.open()
    assert held.result(timeout=WAIT) is None


def test_a_direct_command_runs_after_the_remote_calls_made_before(
        rc, gates, monkeypatch, r, server_url) -> None:
    """One client's commands to one engine run in the order they were made, whether they
    went through the sender thread (.remote()) or were sent at once (execute, apply...)."""
    key = f"test:order:{os.getpid()}:{time.monotonic_ns()}"
    g = gates()
    held = block.options(engine=0).remote(server_url, g.started_key, g.open_key)
    g.wait_started()
    delay_sender(rc, monkeypatch, 0.3)
    first = mark.options(engine=0).remote(server_url, key)  # (not alone: the sender's)
    second = rc.execute(f"__import__('redis').Redis.from_url({server_url!r})"
                        f".rpush({key!r}, 'execute')", targets=0, block=False)
    g.open()
    assert first.result(timeout=WAIT) == () and second.result(timeout=WAIT) is None
    assert held.result(timeout=WAIT) is None
    assert r.lrange(key, 0, -1) == [b"ran", b"execute"]
    r.delete(key)


def test_a_lone_call_is_in_redis_when_remote_returns(rc, gates, monkeypatch, r) -> None:
    """A call made while no other call of the client is unsettled is sent by its caller:
    once ``.remote()`` returns it is queued, whatever the sender thread is doing. One made
    while another is unsettled is left to the sender (batched with the rest of a burst)."""
    g = gates()
    held = g.hold(rc, 0)  # (an execute: not a call of the dispatcher)
    delay_sender(rc, monkeypatch, 2.0)
    inbox = rc.schema.inbox(0)
    queued = r.xlen(inbox)  # (the held command's entry stays until it is done)
    first = square.options(engine=0).remote(3)
    assert r.xlen(inbox) == queued + 1
    second = square.options(engine=0).remote(4)
    assert r.xlen(inbox) == queued + 1  # still with the (delayed) sender
    g.open()
    assert redisengines.get([first, second], timeout=WAIT) == [9, 16]
    assert held.result(timeout=WAIT) is None
    assert square.options(engine=0).remote(5).result(timeout=WAIT) == 25  # alone again


def test_remote_exception_keeps_its_class(rc, cluster) -> None:
    f = boom.remote()
    try:
        f.result(timeout=WAIT)
    except ZeroDivisionError as exc:
        err = exc
    else:
        pytest.fail("no ZeroDivisionError")
    assert isinstance(err, RemoteError) and isinstance(err, redisengines.RedisEnginesError)
    assert "division by zero" in str(err)
    assert "in _boom" in err.traceback and "line " in err.traceback
    # the engine that ran it (load-balanced: not known before), found by its pid
    assert err.engine_id in (0, 1)
    # pinned: the engine id is that engine's
    with pytest.raises(ZeroDivisionError) as pinned:
        redisengines.get(boom.options(engine=1).remote(), timeout=WAIT)
    assert pinned.value.engine_id == 1
    # get(list) raises the failure too
    with pytest.raises(ZeroDivisionError):
        redisengines.get([square.remote(2), boom.remote()], timeout=WAIT)


def test_remote_exception_engine_id_is_the_engine_that_ran_it(rc, cluster) -> None:
    def fails_with_pid():
        import os
        raise KeyError(os.getpid())
    f = redisengines.remote(interactive(fails_with_pid))
    for _ in range(4):
        with pytest.raises(KeyError) as err:
            f.remote().result(timeout=WAIT)
        assert err.value.engine_id == engine_of(cluster, err.value.args[0])


def test_calling_a_remote_function_directly_is_a_type_error(rc) -> None:
    with pytest.raises(TypeError, match=r"\.remote"):
        square(3)
    with pytest.raises(TypeError):
        redisengines.remote(42)


def test_unpicklable_argument_raises_before_sending(rc, r, cluster_name) -> None:
    with pytest.raises(redisengines.SerializationError):
        square.remote(threading.Lock())
    assert r.xlen(tasks_key(cluster_name)) == 0


# -------------------------------------------------------------------- load balancing
def test_calls_go_to_the_free_engine_no_greedy_prefetch(rc, cluster, gates, r,
                                                        cluster_name) -> None:
    g = gates()
    held = g.hold(rc, 0)  # engine 0 is busy until the gate opens
    fs = [pid_square.remote(i) for i in range(40)]
    out = redisengines.get(fs, timeout=WAIT)  # returns while engine 0 is still held
    assert not held.done()
    assert [v for _, v in out] == [i * i for i in range(40)]
    assert {p for p, _ in out} == {cluster.processes[1].pid}
    assert r.xlen(tasks_key(cluster_name)) == 0  # nothing left queued (nor hoarded)
    g.open()
    held.result(timeout=WAIT)


def test_an_engine_takes_one_call_at_a_time_from_a_full_stream(rc, cluster, gates, r,
                                                                cluster_name,
                                                                server_url) -> None:
    """Calls queued while every engine is busy: the first engine to free up takes one call
    (a long one), not a batch; the other engine runs all the rest meanwhile."""
    g0, g1, gb = gates(), gates(), gates()
    h0, h1 = g0.hold(rc, 0), g1.hold(rc, 1)
    long = block.remote(server_url, gb.started_key, gb.open_key, "long")
    fs = [pid_square.remote(i) for i in range(20)]
    wait_until(lambda: r.xlen(tasks_key(cluster_name)) == 21, what="21 calls in P:tasks")
    g0.open()  # engine 0 alone is free: it takes the first call, the long one
    took = r.blpop([gb.started_key], WAIT)
    assert took is not None and int(took[1]) == cluster.processes[0].pid
    g1.open()
    out = redisengines.get(fs, timeout=WAIT)  # while engine 0 is still held by `long`
    assert not long.done()
    assert [v for _, v in out] == [i * i for i in range(20)]
    assert {p for p, _ in out} == {cluster.processes[1].pid}
    assert r.xlen(tasks_key(cluster_name)) == 1  # only `long`, running on engine 0
    gb.open()
    assert long.result(timeout=WAIT) == "long"
    redisengines.get([h0, h1], timeout=WAIT)
    assert r.xlen(tasks_key(cluster_name)) == 0


def test_tasks_taken_behind_a_slow_one_are_given_back(rc, cluster, gates, r, cluster_name,
                                                      server_url) -> None:
    """An engine busy with short commands takes queued tasks several at a time; when one of
    them turns out slow, the tasks behind it go back to P:tasks, and an idle engine runs them
    while the slow one still runs (nothing waits behind it)."""
    g1 = gates()
    h1 = g1.hold(rc, 1)  # engine 1 takes nothing for now
    # Engine 0 works through short commands of its inbox: its pace says "take many".
    flood = [square.options(engine=0).remote(i) for i in range(8000)]
    wait_until(lambda: sum(f.done() for f in flood[:200]) == 200, what="engine 0 under way")
    requeued = 0
    for _ in range(10):  # until engine 0 took a batch with the slow call (the sender decides)
        gs = gates()
        added = r.xinfo_stream(tasks_key(cluster_name))["entries-added"]
        before = [pid_square.remote(i) for i in range(10)]
        slow = block.remote(server_url, gs.started_key, gs.open_key, "slow")
        behind = [pid_square.remote(i) for i in range(30)]
        took = r.blpop([gs.started_key], WAIT)
        assert took is not None and int(took[1]) == cluster.processes[0].pid
        g1.open()
        out = redisengines.get(behind, timeout=WAIT)  # while engine 0 is held by `slow`
        assert not slow.done()
        assert [v for _, v in out] == [i * i for i in range(30)]
        assert {pid for pid, _ in out} == {cluster.processes[1].pid}
        # Those engine 0 took with `slow` were given back: re-queued as new entries.
        requeued = r.xinfo_stream(tasks_key(cluster_name))["entries-added"] - added - 41
        g1 = gates()
        h1 = g1.hold(rc, 1)
        gs.open()
        assert slow.result(timeout=WAIT) == "slow"
        redisengines.get(before, timeout=WAIT)
        if requeued:
            break
    assert requeued > 0, "engine 0 never took a task behind the slow one"
    g1.open()
    h1.result(timeout=WAIT)
    rc.clear_queue(targets=0)  # the rest of the flood
    done, _ = concurrent.futures.wait(flood, timeout=WAIT)
    assert len(done) == len(flood)
    assert all(f.result() == i * i for i, f in enumerate(flood) if not f.cancelled()
               and f.exception() is None)
    assert all(isinstance(f.exception(), CancelledError) for f in flood
               if not f.cancelled() and f.exception() is not None)


def test_two_blocking_calls_run_at_once_on_both_engines(rc, cluster, gates, r,
                                                        server_url) -> None:
    """Neither engine takes a second call while it runs one: both blockers start."""
    g1, g2 = gates(), gates()
    f1 = block.remote(server_url, g1.started_key, g1.open_key, 1)
    f2 = block.remote(server_url, g2.started_key, g2.open_key, 2)
    p1 = r.blpop([g1.started_key], WAIT)
    p2 = r.blpop([g2.started_key], WAIT)
    assert p1 is not None and p2 is not None, "a call waited behind the other one"
    assert {int(p1[1]), int(p2[1])} == {p.pid for p in cluster.processes.values()}
    # and while both are held, a third call waits in the stream
    f3 = square.remote(3)
    assert not f3.done()
    g1.open()
    g2.open()
    assert redisengines.get([f1, f2, f3], timeout=WAIT) == [1, 2, 9]


# ------------------------------------------------------------- futures as arguments
def test_futures_as_arguments_chain(rc) -> None:
    assert redisengines.get(add.remote(square.remote(2), square.remote(3)), timeout=WAIT) == 13
    assert redisengines.get(add.remote(a=square.remote(4), b=1), timeout=WAIT) == 17


def test_deep_chain(rc) -> None:
    x = inc.remote(0)
    for _ in range(19):
        x = inc.remote(x)
    assert redisengines.get(x, timeout=WAIT) == 20


def test_put_object_passed_to_many_calls(rc, gates, r, cluster_name) -> None:
    arr = np.arange(200_000, dtype=np.float64)  # 1.6 MB
    ref = redisengines.put(arr)
    assert isinstance(ref, PendingResult) and ref.done()
    assert np.array_equal(redisengines.get(ref), arr)
    # while both engines are held, the calls sit in P:tasks: each carries a reference,
    # not a copy of the array
    g0, g1 = gates(), gates()
    h0, h1 = g0.hold(rc, 0), g1.hold(rc, 1)
    fs = [total.remote(ref, i) for i in range(10)]
    wait_until(lambda: r.xlen(tasks_key(cluster_name)) == 10, what="10 calls in P:tasks")
    entries = [entry_of(r, tasks_key(cluster_name), f) for f in fs]
    assert all(e is not None for e in entries)
    assert all(int(e[b"size"]) < 10_000 for e in entries), [e[b"size"] for e in entries]
    g0.open()
    g1.open()
    expected = float(arr.sum())
    assert redisengines.get(fs, timeout=WAIT) == [expected + i for i in range(10)]
    redisengines.get([h0, h1], timeout=WAIT)


def test_failed_upstream_fails_downstream_without_running_it(rc, r, server_url) -> None:
    key = f"test:side:{os.urandom(6).hex()}"
    up = boom.remote()
    down = mark.remote(server_url, key, up)
    downdown = mark.remote(server_url, key, down)
    with pytest.raises(ZeroDivisionError) as e1:
        down.result(timeout=WAIT)
    assert isinstance(e1.value, RemoteError)
    with pytest.raises(ZeroDivisionError):
        downdown.result(timeout=WAIT)
    with pytest.raises(ZeroDivisionError):
        up.result(timeout=WAIT)
    assert r.llen(key) == 0  # the downstream calls never ran


def test_large_result_passed_downstream(rc, cluster, gates, r, cluster_name) -> None:
    n = 300_000  # 2.4 MB of float64
    g = gates()
    held = g.hold(rc, 0)
    big = make_big.remote(n)  # runs on engine 1
    down = total.options(engine=0).remote(big, 1)  # waits in engine 0's inbox
    entry = wait_until(lambda: entry_of(r, inbox_key(cluster_name, 0), down),
                       what="the downstream call in engine 0's inbox")
    assert int(entry[b"size"]) < 10_000  # a reference, not the 2.4 MB value
    g.open()
    assert down.result(timeout=WAIT) == float(np.arange(n, dtype=np.float64).sum()) + 1
    held.result(timeout=WAIT)


def test_large_upstream_dropped_by_the_user_still_reaches_its_calls(rc) -> None:
    n = 300_000
    big = make_big.remote(n)
    fs = [total.remote(big, i) for i in range(3)]
    del big
    gc.collect()
    expected = float(np.arange(n, dtype=np.float64).sum())
    assert redisengines.get(fs, timeout=WAIT) == [expected + i for i in range(3)]


def test_multi_target_future_is_not_an_argument(rc) -> None:
    rc.push({"a": 1}, targets="all")
    multi = rc.pull("a", targets="all", block=False)
    with pytest.raises(TypeError):
        square.remote(multi)


# ---------------------------------------------------------------------------- actors
def test_actor_keeps_state_and_order(rc) -> None:
    c = Counter.remote(5)
    assert isinstance(c, ActorHandle)
    assert redisengines.get(c.incr.remote(2), timeout=WAIT) == 7
    fs = [c.record.remote(i) for i in range(50)]
    assert redisengines.get(fs, timeout=WAIT) == list(range(1, 51))
    assert redisengines.get(c.get_log.remote(), timeout=WAIT) == list(range(50))
    assert redisengines.get(c.incr.remote(k=3), timeout=WAIT) == 10


def test_actor_calls_in_order_from_two_threads(rc) -> None:
    c = Counter.remote()
    n = 150
    start = threading.Barrier(2)

    def send(t: str) -> list[PendingResult]:
        start.wait(timeout=WAIT)
        return [c.record.remote((t, i)) for i in range(n)]

    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        sent = list(ex.map(send, ["a", "b"]))
    for fs in sent:  # each thread's calls ran in the order that thread sent them
        positions = redisengines.get(fs, timeout=WAIT)
        assert positions == sorted(positions)
    log = redisengines.get(c.get_log.remote(), timeout=WAIT)
    assert len(log) == 2 * n
    for t in ("a", "b"):
        assert [i for tt, i in log if tt == t] == list(range(n))


def test_actor_call_waiting_on_a_future_keeps_its_place(rc, gates, server_url) -> None:
    g = gates()
    c = Counter.remote()
    slow = block.remote(server_url, g.started_key, g.open_key, "first")
    f1 = c.record.remote(slow)
    f2 = c.record.remote("second")  # sent after f1: runs after it, though it is ready now
    g.wait_started()
    g.open()
    assert redisengines.get([f1, f2], timeout=WAIT) == [1, 2]
    assert redisengines.get(c.get_log.remote(), timeout=WAIT) == ["first", "second"]


def test_several_actors_beside_the_namespace(rc, cluster) -> None:
    rc.execute("a = 10", targets=0)
    actors = [Counter.options(engine=0).remote(i * 100) for i in range(3)]
    assert [h.engine_id for h in actors] == [0, 0, 0]
    assert redisengines.get([h.incr.remote() for h in actors], timeout=WAIT) == [1, 101, 201]
    assert redisengines.get([h.incr.remote() for h in actors], timeout=WAIT) == [2, 102, 202]
    assert redisengines.get([h.pid.remote() for h in actors], timeout=WAIT) == \
        [cluster.processes[0].pid] * 3
    rc.execute("a += 1", targets=0)
    assert rc.pull("a", targets=0) == 11
    assert rc.keys(targets=0) == ["a"]
    rc.reset(targets=0)  # clearing the namespace leaves the actors alone
    assert redisengines.get(actors[0].incr.remote(), timeout=WAIT) == 3


def test_actor_goes_to_the_least_loaded_engine(rc, cluster, gates) -> None:
    # on an idle cluster, new actors are spread over the engines
    a, b = Counter.remote(), Counter.remote()
    assert {a.engine_id, b.engine_id} == {0, 1}
    redisengines.get([a.incr.remote(), b.incr.remote()], timeout=WAIT)  # both inboxes empty
    g = gates()
    held = g.hold(rc, 0)
    c = Counter.remote()  # engine 0 has a command in hand: the actor goes to engine 1
    assert c.engine_id == 1
    assert redisengines.get(c.pid.remote(), timeout=WAIT) == cluster.processes[1].pid
    assert not held.done()
    g.open()
    held.result(timeout=WAIT)


def test_named_actor_from_a_second_client(rc, cluster, monkeypatch) -> None:
    c = Counter.options(engine=1, name="c").remote(10)
    assert c.engine_id == 1 and c.name == "c"
    assert redisengines.get(c.incr.remote(), timeout=WAIT) == 11
    assert redisengines.get(c.pid.remote(), timeout=WAIT) == cluster.processes[1].pid
    other = cluster.client()
    monkeypatch.setattr(api, "_client", other)
    h = redisengines.get_actor("c")
    assert isinstance(h, ActorHandle) and h.engine_id == 1
    assert redisengines.get(h.incr.remote(5), timeout=WAIT) == 16  # the same actor's state
    with pytest.raises(ValueError):
        redisengines.get_actor("no-such-actor")
    # a live actor's name cannot be taken, from either client
    with pytest.raises(ValueError):
        Counter.options(name="c").remote()
    monkeypatch.setattr(api, "_client", rc)
    with pytest.raises(ValueError):
        Counter.options(engine=0, name="c").remote()
    assert redisengines.get(c.incr.remote(), timeout=WAIT) == 17  # untouched


def test_actor_handle_passed_to_a_remote_function(rc) -> None:
    c = Counter.options(engine=1).remote(0)
    # runs on engine 0, which calls the actor on engine 1 through its own client
    assert call_actor.options(engine=0).remote(c, 5).result(timeout=WAIT) == 5
    assert redisengines.get(c.incr.remote(1), timeout=WAIT) == 6


def test_actor_handle_used_on_the_actors_own_engine_does_not_hang(rc) -> None:
    """A remote call that lands on the engine hosting the actor it calls (pinned here; a
    load-balanced call lands there half the time) must not wait for itself: it returns the
    value, or fails at once with a clear error, not after its timeout."""
    c = Counter.options(engine=0).remote(0)
    f = call_actor_within.options(engine=0).remote(c, 5, 3.0)
    t0 = time.monotonic()
    try:
        value = f.result(timeout=WAIT)
    except TimeoutError as exc:
        pytest.fail(f"the call waited {time.monotonic() - t0:.1f} s for itself: {exc!r}")
    except redisengines.RedisEnginesError as exc:
        assert time.monotonic() - t0 < 3, exc
    else:
        assert value == 5


def test_remote_function_calls_a_remote_function(rc) -> None:
    assert call_remote.options(engine=0).remote(square, 7).result(timeout=WAIT) == 49


def test_nested_remote_failure_keeps_its_class(rc) -> None:
    f = call_remote.options(engine=0).remote(boom)
    with pytest.raises(ZeroDivisionError):
        f.result(timeout=WAIT)


def test_actor_creation_failure(rc) -> None:
    h = Broken.remote()
    f = h.m.remote()
    with pytest.raises(ActorDiedError, match="failed to start") as err:
        f.result(timeout=WAIT)
    assert "bad start" in str(err.value)
    with pytest.raises(ActorDiedError, match="failed to start"):
        h.m.remote().result(timeout=WAIT)


def test_actor_with_future_arguments(rc) -> None:
    c = Counter.remote(square.remote(3))
    assert redisengines.get(c.incr.remote(square.remote(2)), timeout=WAIT) == 13


def test_actor_whose_argument_failed_did_not_start(rc) -> None:
    c = Counter.remote(boom.remote())
    with pytest.raises(ActorDiedError, match="failed to start"):
        c.incr.remote().result(timeout=WAIT)


def test_actor_method_exception_keeps_class_and_actor_lives(rc) -> None:
    c = Counter.remote(1)
    with pytest.raises(ZeroDivisionError) as err:
        c.boom.remote().result(timeout=WAIT)
    assert isinstance(err.value, RemoteError) and err.value.engine_id == c.engine_id
    assert "in boom" in err.value.traceback
    assert redisengines.get(c.incr.remote(), timeout=WAIT) == 2


def test_kill_actor(rc) -> None:
    c = Counter.options(name="k").remote(0)
    before = [c.incr.remote() for _ in range(10)]
    redisengines.kill(c)
    after = c.incr.remote()
    assert redisengines.get(before, timeout=WAIT) == list(range(1, 11))
    with pytest.raises(ActorDiedError, match="killed"):
        after.result(timeout=WAIT)
    with pytest.raises(ActorDiedError):
        c.incr.remote().result(timeout=WAIT)
    with pytest.raises(ValueError):
        redisengines.get_actor("k")
    new = Counter.options(name="k").remote(100)  # the name is free again
    assert redisengines.get(new.incr.remote(), timeout=WAIT) == 101
    with pytest.raises(TypeError):
        redisengines.kill(square.remote(1))


def test_kill_runs_calls_still_waiting_for_their_arguments(rc, gates, server_url) -> None:
    g = gates()
    c = Counter.remote()
    slow = block.remote(server_url, g.started_key, g.open_key, "arg")
    before = c.record.remote(slow)  # sent before the kill; waits for its argument
    redisengines.kill(c)
    after = c.record.remote("late")
    g.open()
    assert before.result(timeout=WAIT) == 1
    with pytest.raises(ActorDiedError):
        after.result(timeout=WAIT)


def test_actor_misuse(rc) -> None:
    c = Counter.remote()
    with pytest.raises(AttributeError):
        c.no_such_method  # noqa: B018
    with pytest.raises(AttributeError):
        c._private  # noqa: B018
    with pytest.raises(TypeError):
        Counter()
    with pytest.raises(TypeError):
        c.incr(1)


def test_actor_on_a_sigkilled_engine(rc, cluster, gates, r, server_url) -> None:
    g = gates()
    c = Counter.options(engine=1, name="doomed").remote(0)
    running = c.block.remote(server_url, g.started_key, g.open_key)
    queued = c.incr.remote()
    started = r.blpop([g.started_key], WAIT)
    assert started is not None and int(started[1]) == cluster.processes[1].pid
    t0 = time.monotonic()
    os.kill(cluster.processes[1].pid, signal.SIGKILL)
    with pytest.raises(EngineDiedError) as died:
        running.result(timeout=WAIT)
    assert time.monotonic() - t0 < 6
    assert died.value.engine_id == 1 and died.value.started is True
    with pytest.raises(EngineDiedError) as not_started:
        queued.result(timeout=1)
    assert not_started.value.started is False
    assert r.llen(g.started_key) == 0  # at most once: the running call was not re-run
    with pytest.raises(ActorDiedError):
        c.incr.remote().result(timeout=WAIT)
    with pytest.raises(ActorDiedError):
        redisengines.get_actor("doomed")
    # its name can be reused on the engine that is left
    c2 = Counter.options(name="doomed").remote(1)
    assert c2.engine_id == 0
    assert redisengines.get(c2.incr.remote(), timeout=WAIT) == 2


# ---------------------------------------------------- load-balanced call, engine death
@pytest.mark.parametrize("retries", [None, 1])
def test_load_balanced_call_rerun_after_engine_death(rc, cluster, gates, r, server_url,
                                                     retries) -> None:
    g = gates()
    fn = block_first_run if retries is None else block_first_run.options(max_retries=retries)
    f = fn.remote(server_url, g.started_key, g.open_key)
    taken = r.blpop([g.started_key], WAIT)
    assert taken is not None
    dead = engine_of(cluster, taken[1])
    other = 1 - dead
    os.kill(cluster.processes[dead].pid, signal.SIGKILL)
    assert f.result(timeout=WAIT) == cluster.processes[other].pid
    assert int(r.get(g.started_key + ":runs")) == 2


def test_load_balanced_call_without_retries_fails_on_engine_death(rc, cluster, gates, r,
                                                                  server_url) -> None:
    g = gates()
    f = block_first_run.options(max_retries=0).remote(server_url, g.started_key, g.open_key)
    taken = r.blpop([g.started_key], WAIT)
    assert taken is not None
    dead = engine_of(cluster, taken[1])
    t0 = time.monotonic()
    os.kill(cluster.processes[dead].pid, signal.SIGKILL)
    with pytest.raises(EngineDiedError) as err:
        f.result(timeout=WAIT)
    assert time.monotonic() - t0 < 6
    assert err.value.started is True and err.value.engine_id == dead
    assert int(r.get(g.started_key + ":runs")) == 1
    # the engine that is left serves the next calls
    assert redisengines.get(pid.remote(), timeout=WAIT) == cluster.processes[1 - dead].pid


# ------------------------------------------------------------------------- get, wait
def test_wait(rc, gates, server_url) -> None:
    g = gates()
    slow = block.remote(server_url, g.started_key, g.open_key, "slow")
    g.wait_started()
    fast = [square.remote(i) for i in (1, 2, 3)]
    redisengines.get(fast, timeout=WAIT)
    fs = [slow, *fast]

    ready, pending = redisengines.wait(fs, num_returns=2)
    assert ready == [fast[0], fast[1]] and pending == [slow, fast[2]]
    assert all(a is b for a, b in zip(ready, fast[:2], strict=True))
    assert pending[0] is slow and pending[1] is fast[2]

    ready, pending = redisengines.wait(fs)  # num_returns=1
    assert len(ready) == 1 and ready[0] is fast[0]

    t0 = time.monotonic()
    ready, pending = redisengines.wait(fs, num_returns=4, timeout=0.3)
    elapsed = time.monotonic() - t0
    assert 0.25 <= elapsed < 3
    assert ready == fast and pending == [slow] and pending[0] is slow

    assert redisengines.wait(fs, num_returns=0, timeout=0) == ([], fs)
    for bad in (-1, 5):
        with pytest.raises(ValueError):
            redisengines.wait(fs, num_returns=bad)

    g.open()
    ready, pending = redisengines.wait(fs, num_returns=4, timeout=WAIT)
    assert pending == [] and [id(f) for f in ready] == [id(f) for f in fs]


def test_get_timeout_leaves_futures_usable(rc, gates, server_url) -> None:
    g = gates()
    slow = block.remote(server_url, g.started_key, g.open_key, 5)
    g.wait_started()
    quick = square.remote(4)
    with pytest.raises(TimeoutError):
        redisengines.get([quick, slow], timeout=0.2)
    with pytest.raises(TimeoutError):
        redisengines.get(slow, timeout=0.2)
    assert not slow.done()
    g.open()
    assert redisengines.get([quick, slow], timeout=WAIT) == [16, 5]


def test_get_and_wait_reject_non_futures(rc) -> None:
    with pytest.raises(TypeError):
        redisengines.get([square.remote(1), 3])
    with pytest.raises(TypeError):
        redisengines.wait([3])


# --------------------------------------------------------------------------- cancel
def test_cancel_a_queued_call(rc, gates, r, server_url) -> None:
    g = gates()
    held = g.hold(rc, 0)
    key = f"test:side:{os.urandom(6).hex()}"
    f = mark.options(engine=0).remote(server_url, key)
    keep = mark.options(engine=0).remote(server_url, key + ":kept")
    assert redisengines.cancel(f) is True
    with pytest.raises(CancelledError):
        f.result(timeout=WAIT)
    assert redisengines.cancel(f) is False  # already cancelled
    g.open()
    held.result(timeout=WAIT)
    keep.result(timeout=WAIT)
    barrier_on(rc, 0)
    assert r.llen(key) == 0  # it never ran
    assert r.llen(key + ":kept") == 1
    assert redisengines.cancel(keep) is False  # already finished


def test_cancel_a_queued_load_balanced_call(rc, gates, r, server_url, cluster_name) -> None:
    g0, g1 = gates(), gates()
    h0, h1 = g0.hold(rc, 0), g1.hold(rc, 1)
    key = f"test:side:{os.urandom(6).hex()}"
    f = mark.remote(server_url, key)
    wait_until(lambda: entry_of(r, tasks_key(cluster_name), f), what="the call in P:tasks")
    assert redisengines.cancel(f) is True
    with pytest.raises(CancelledError):
        f.result(timeout=WAIT)
    assert entry_of(r, tasks_key(cluster_name), f) is None
    g0.open()
    g1.open()
    redisengines.get([h0, h1], timeout=WAIT)
    redisengines.get([square.remote(i) for i in range(4)], timeout=WAIT)
    assert r.xlen(tasks_key(cluster_name)) == 0
    assert r.llen(key) == 0


def test_cancel_a_call_waiting_for_its_arguments(rc, gates, r, server_url) -> None:
    g = gates()
    key = f"test:side:{os.urandom(6).hex()}"
    up = block.remote(server_url, g.started_key, g.open_key, 1)
    down = mark.remote(server_url, key, up)
    g.wait_started()
    assert redisengines.cancel(down) is True
    with pytest.raises(CancelledError):
        down.result(timeout=WAIT)
    g.open()
    assert up.result(timeout=WAIT) == 1
    # a call sent after `up` completed runs on the free engines; `down` was never sent
    redisengines.get([mark.remote(server_url, key + ":later") for _ in range(2)], timeout=WAIT)
    assert r.llen(key) == 0


def test_cancel_an_actor_call_waiting_for_its_argument_frees_the_next(rc, gates,
                                                                      server_url) -> None:
    g = gates()
    c = Counter.options(engine=1).remote()
    slow = block.options(engine=0).remote(server_url, g.started_key, g.open_key, "arg")
    first = c.record.remote(slow)
    second = c.record.remote("second")
    assert redisengines.cancel(first) is True
    assert second.result(timeout=WAIT) == 1  # does not wait for `slow` any more
    assert not slow.done()
    g.open()
    with pytest.raises(CancelledError):
        first.result(timeout=WAIT)
    slow.result(timeout=WAIT)
    assert redisengines.get(c.get_log.remote(), timeout=WAIT) == ["second"]


def test_cancel_a_running_call_returns_false(rc, gates, server_url) -> None:
    g = gates()
    f = block.remote(server_url, g.started_key, g.open_key, "ran")
    g.wait_started()
    assert redisengines.cancel(f) is False
    assert not f.done()
    g.open()
    assert f.result(timeout=WAIT) == "ran"
    with pytest.raises(TypeError):
        redisengines.cancel(concurrent.futures.Future())


def test_call_timeout_when_it_cannot_start(rc, gates, r, server_url) -> None:
    g = gates()
    held = g.hold(rc, 0)
    key = f"test:side:{os.urandom(6).hex()}"
    t0 = time.monotonic()
    f = mark.options(engine=0, timeout=0.5).remote(server_url, key)
    with pytest.raises(TimeoutError):
        f.result(timeout=WAIT)
    assert 0.4 <= time.monotonic() - t0 < 5
    g.open()
    held.result(timeout=WAIT)
    barrier_on(rc, 0)
    assert r.llen(key) == 0  # it never ran


def test_call_timeout_does_not_limit_a_started_call(rc, gates, server_url) -> None:
    g = gates()
    f = block.options(timeout=0.3).remote(server_url, g.started_key, g.open_key, "done")
    g.wait_started()
    with pytest.raises(TimeoutError):
        f.result(timeout=1.0)  # still running past its start timeout: it is not failed
    assert not f.done()
    g.open()
    assert f.result(timeout=WAIT) == "done"


def test_call_timeout_while_waiting_for_arguments(rc, gates, r, server_url) -> None:
    g = gates()
    key = f"test:side:{os.urandom(6).hex()}"
    up = block.remote(server_url, g.started_key, g.open_key, 1)
    down = mark.options(timeout=0.5).remote(server_url, key, up)
    with pytest.raises(TimeoutError):
        down.result(timeout=WAIT)
    g.open()
    assert up.result(timeout=WAIT) == 1
    redisengines.get([mark.remote(server_url, key + ":later") for _ in range(2)], timeout=WAIT)
    assert r.llen(key) == 0


# ----------------------------------------------------------------- init / shutdown
def test_no_default_client_without_init(monkeypatch) -> None:
    monkeypatch.setattr(api, "_client", None)
    with pytest.raises(RuntimeError, match="init"):
        square.remote(1)
    with pytest.raises(RuntimeError):
        redisengines.put(1)


def test_init_starts_a_local_cluster_and_shutdown_stops_it(monkeypatch) -> None:
    monkeypatch.setattr(api, "_client", None)
    monkeypatch.setattr(api, "_cluster", None)
    try:
        client = redisengines.init(n=1)
        assert isinstance(client, redisengines.Client)
        assert client.ids == [0]
        engine_pid = redisengines.get(pid.remote(), timeout=WAIT)
        assert alive(engine_pid)
        assert redisengines.get(square.remote(redisengines.put(6)), timeout=WAIT) == 36
        url = client.url
        with pytest.raises(RuntimeError):
            redisengines.init(n=1)
    finally:
        redisengines.shutdown()
    wait_until(lambda: not alive(engine_pid), what="the engine process to exit")
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    with pytest.raises(RuntimeError):
        square.remote(1)
    redisengines.shutdown()  # idempotent


def test_init_with_a_url_joins_and_shutdown_leaves_engines(monkeypatch, cluster, server_url,
                                                           cluster_name) -> None:
    monkeypatch.setattr(api, "_client", None)
    monkeypatch.setattr(api, "_cluster", None)
    try:
        client = redisengines.init(url=server_url, cluster=cluster_name)
        assert client.cluster == cluster_name and client.ids == [0, 1]
        assert redisengines.get(pid.options(engine=1).remote(), timeout=WAIT) == \
            cluster.processes[1].pid
    finally:
        redisengines.shutdown()
    assert all(p.poll() is None for p in cluster.processes.values())
    assert cluster.client().execute("x = 1", targets="all") == {0: None, 1: None}


# ------------------------------------------------------------------ futures protocol
def test_futures_are_awaitable(rc) -> None:
    fs = [square.remote(i) for i in range(8)]

    async def main() -> list[int]:
        one = await fs[3]
        rest = await asyncio.gather(*fs)
        return [one, *rest]

    assert asyncio.run(main()) == [9] + [i * i for i in range(8)]

    async def failing() -> None:
        await boom.remote()

    with pytest.raises(ZeroDivisionError):
        asyncio.run(failing())


def test_futures_with_as_completed_and_callbacks(rc) -> None:
    fs = [square.remote(i) for i in range(10)]
    seen: list[int] = []
    called = threading.Event()
    fs[0].add_done_callback(lambda f: (seen.append(f.result()), called.set()))
    done = list(as_completed(fs, timeout=WAIT))
    assert sorted(id(f) for f in done) == sorted(id(f) for f in fs)
    assert sorted(f.result() for f in done) == [i * i for i in range(10)]
    assert called.wait(WAIT) and seen == [0]
    finished, not_finished = concurrent.futures.wait(fs, timeout=WAIT)
    assert len(finished) == 10 and not not_finished
