"""redisengines.Executor against what the standard library documents for its executors."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import operator
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, FIRST_EXCEPTION, CancelledError

import pytest
import redis

import redisengines
from redisengines import Client, Executor, PendingResult, RemoteError, SerializationError
from redisengines import api as re_api
from redisengines.remote import DEFAULT_MAX_RETRIES

from .helpers import WAIT, Gate, interactive, wait_until


# ------------------------------------------------------------- functions the engines run
@interactive
def square(x):
    return x * x


@interactive
def add(x, y):
    return x + y


@interactive
def fail_on(x, bad):
    if x == bad:
        raise ValueError(f"bad item {x}")
    return x


@interactive
def held(value, url, started_key=None, open_key=None):
    """Return ``value``; with keys, first signal the start and wait until the gate opens."""
    if started_key is not None:
        import redis

        r = redis.Redis.from_url(url)
        r.rpush(started_key, 1)
        r.blpop([open_key], 30)
    return value


@interactive
def finish_in_order(i, url, log_key, last):
    """Item 0 finishes only after item ``last``; each item logs when it finishes."""
    import redis

    r = redis.Redis.from_url(url)
    if i == 0:
        assert r.blpop([log_key + ":go"], 10) is not None, "item 0 was never released"
    r.rpush(log_key, i)
    if i == last:
        r.rpush(log_key + ":go", 1)
    return i * 10


# ----------------------------------------------------------------------------- helpers
def submit_held(ex: Executor, gate: Gate, url: str, value: object = "held") -> PendingResult:
    """Submit a call that runs until ``gate`` opens; returns once an engine runs it."""
    future = ex.submit(held, value, url, gate.started_key, gate.open_key)
    gate.wait_started()
    return future


def sent(client: Client, f: PendingResult) -> bool:
    """The call is in Redis: ``.remote()``/``submit`` return before the sender sent it."""
    call = client._dispatcher._calls.get(id(f))
    return call is not None and call.sent is not None


def hold_all(client: Client, gates: Callable[[], Gate]) -> list[Gate]:
    """Keep every engine busy, so load-balanced calls stay queued (and cancellable)."""
    made = []
    for eid in client.ids:
        gate = gates()
        gate.hold(client, eid)
        made.append(gate)
    return made


def returns_within(fn: Callable[[], object], timeout: float = WAIT) -> None:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{fn} did not return within {timeout} s"


def tasks_added(r: redis.Redis, client: Client) -> int:
    """How many load-balanced calls were ever queued in this cluster."""
    if not r.exists(client.schema.tasks):
        return 0
    return r.xinfo_stream(client.schema.tasks)["entries-added"]


# ------------------------------------------------------------------------------ submit
def test_is_a_concurrent_futures_executor(client: Client) -> None:
    ex = Executor(client)
    assert isinstance(ex, concurrent.futures.Executor)
    assert "Executor" in redisengines.__all__ and redisengines.Executor is Executor
    f = ex.submit(square, 7)
    assert isinstance(f, PendingResult) and isinstance(f, concurrent.futures.Future)
    assert f.result(timeout=WAIT) == 49
    assert f.done() and not f.cancelled() and f.exception() is None
    assert f.engine_id in client.ids
    assert ex.submit(add, y=2, x=1).result(timeout=WAIT) == 3


def test_submit_takes_any_callable(client: Client) -> None:
    ex = Executor(client)
    assert ex.submit(pow, 2, 10).result(timeout=WAIT) == 1024  # builtin, by reference
    assert ex.submit(functools.partial(pow, 2), 5).result(timeout=WAIT) == 32
    assert ex.submit(interactive(lambda *a, **kw: (a, kw)), 1, fn=2).result(timeout=WAIT) \
        == ((1,), {"fn": 2})
    assert ex.submit(redisengines.remote(square), 3).result(timeout=WAIT) == 9
    # A future as an argument is replaced by its value (as with RemoteFunction.remote).
    assert ex.submit(add, ex.submit(square, 3), 1).result(timeout=WAIT) == 10


def test_errors_keep_their_class(client: Client) -> None:
    ex = Executor(client)
    f = ex.submit(fail_on, 3, 3)
    with pytest.raises(ValueError, match="bad item 3") as info:
        f.result(timeout=WAIT)
    assert isinstance(info.value, RemoteError)
    assert info.value.engine_id in client.ids
    assert "in fail_on" in info.value.traceback
    assert isinstance(f.exception(), ValueError)
    with pytest.raises(KeyError):
        ex.submit(operator.getitem, {}, "missing").result(timeout=WAIT)
    with pytest.raises(TypeError):  # not callable: fails like the stdlib, in the future
        ex.submit(5).result(timeout=WAIT)


def test_unpicklable_function_raises_at_submit(client: Client) -> None:
    lock = threading.Lock()
    with pytest.raises(SerializationError):
        Executor(client).submit(interactive(lambda: lock))


def test_default_client(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(re_api, "_client", None)
    with pytest.raises(RuntimeError, match="no default client"):
        Executor()
    monkeypatch.setattr(re_api, "_client", client)
    ex = Executor()
    assert ex.client is client
    assert ex.submit(square, 4).result(timeout=WAIT) == 16


def test_max_retries_reaches_the_calls(client: Client, r: redis.Redis, gates) -> None:
    with pytest.raises(ValueError):
        Executor(client, max_retries=-1)
    hold_all(client, gates)
    for ex, expected in ((Executor(client, max_retries=0), b"0"),
                         (Executor(client), b"%d" % DEFAULT_MAX_RETRIES)):
        f = ex.submit(square, 2)
        wait_until(lambda f=f: sent(client, f), what="the call in P:tasks")  # (sent async)
        (_, fields), = r.xrevrange(client.schema.tasks, count=1)
        assert fields[b"retries"] == expected
        ex.shutdown(cancel_futures=True)
        with pytest.raises(CancelledError):
            f.result(timeout=WAIT)


# --------------------------------------------------------------------------------- map
def test_map_keeps_order_when_items_finish_out_of_order(client: Client, r: redis.Redis,
                                                        server_url: str,
                                                        cluster_name: str) -> None:
    log_key = f"test:{cluster_name}:finished"
    n = 6
    out = Executor(client).map(finish_in_order, range(n), [server_url] * n, [log_key] * n,
                               [n - 1] * n)
    assert list(out) == [i * 10 for i in range(n)]
    assert [int(x) for x in r.lrange(log_key, 0, -1)] == [*range(1, n), 0]


def test_map_submits_everything_at_once(client: Client, r: redis.Redis, gates) -> None:
    gates_held = hold_all(client, gates)
    out = Executor(client).map(square, range(3))
    # queued before the first result is asked for (by the client's sender thread)
    wait_until(lambda: r.xlen(client.schema.tasks) == 3, what="3 calls in P:tasks")
    for gate in gates_held:
        gate.open()
    assert list(out) == [0, 1, 4]


def test_map_zips_to_the_shortest(client: Client) -> None:
    ex = Executor(client)
    assert list(ex.map(add, [1, 2, 3], [10, 20])) == [11, 22]
    assert list(ex.map(add, [1, 2, 3, 4, 5], (10 * i for i in range(4)), chunksize=3)) \
        == [1, 12, 23, 34]
    assert list(ex.map(square, [])) == []
    assert list(ex.map(square, [], chunksize=4)) == []


def test_map_error_comes_after_the_earlier_results(client: Client) -> None:
    got = []
    out = Executor(client).map(fail_on, range(6), [3] * 6)
    with pytest.raises(ValueError, match="bad item 3") as info:
        for value in out:
            got.append(value)
    assert got == [0, 1, 2]
    assert isinstance(info.value, RemoteError)
    assert list(out) == []  # the iterator is finished after an error, as in the stdlib


def test_map_chunksize_sends_one_call_per_chunk(client: Client, r: redis.Redis) -> None:
    ex = Executor(client)
    before = tasks_added(r, client)
    assert list(ex.map(add, range(10), range(100, 110), chunksize=3)) \
        == [i + 100 + i for i in range(10)]
    assert tasks_added(r, client) - before == 4  # 3 + 3 + 3 + 1
    assert list(ex.map(square, range(5), chunksize=10)) == [0, 1, 4, 9, 16]
    with pytest.raises(ValueError, match="chunksize"):
        ex.map(square, range(3), chunksize=0)


def test_map_chunk_error_keeps_the_results_before_it(client: Client) -> None:
    got = []
    with pytest.raises(ValueError, match="bad item 4") as info:
        for value in Executor(client).map(fail_on, range(8), [4] * 8, chunksize=3):
            got.append(value)
    assert got == [0, 1, 2, 3]  # item 3 shares a chunk with the failed item 4
    assert "in fail_on" in info.value.traceback
    assert not hasattr(info.value, "_redisengines_done")


def test_map_timeout_is_measured_from_the_call(client: Client, gates, server_url: str) -> None:
    ex = Executor(client)
    gate = gates()
    timeout = 0.4
    start = time.monotonic()
    out = ex.map(held, [1, 2], [server_url] * 2, [None, gate.started_key],
                 [None, gate.open_key], timeout=timeout)
    assert next(out) == 1
    gate.wait_started()
    wait_until(lambda: time.monotonic() > start + timeout, what="the map deadline to pass")
    asked = time.monotonic()
    with pytest.raises(TimeoutError):
        next(out)
    assert time.monotonic() - asked < timeout  # the deadline had passed: no new wait
    with pytest.raises(StopIteration):
        next(out)


def test_map_timeout_raises_when_a_result_is_late(client: Client, gates) -> None:
    hold_all(client, gates)
    start = time.monotonic()
    out = Executor(client).map(square, range(3), timeout=0.3)
    with pytest.raises(TimeoutError):
        next(out)
    assert 0.3 <= time.monotonic() - start < WAIT


def test_leaving_map_early_cancels_the_queued_calls(client: Client, r: redis.Redis,
                                                   gates) -> None:
    ex = Executor(client)
    gates_held = hold_all(client, gates)
    out = ex.map(square, range(4), timeout=0.2)
    with pytest.raises(TimeoutError):
        next(out)
    assert r.xlen(client.schema.tasks) == 0  # all four dropped from P:tasks
    returns_within(ex.shutdown)  # their futures settled (CancelledError): nothing to wait for
    for gate in gates_held:
        gate.open()


# ---------------------------------------------------------------------------- shutdown
def test_submit_after_shutdown_raises(client: Client) -> None:
    ex = Executor(client)
    f = ex.submit(square, 3)
    ex.shutdown()
    assert f.result(timeout=0) == 9  # shutdown(wait=True) waited for it
    with pytest.raises(RuntimeError, match="^cannot schedule new futures after shutdown$"):
        ex.submit(square, 3)
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        ex.map(square, [1])
    ex.shutdown()  # idempotent
    ex.shutdown(wait=False, cancel_futures=True)
    # The client stays open: it was given, not owned.
    assert client.apply(square, 5, targets=0) == 25
    assert Executor(client).submit(square, 6).result(timeout=WAIT) == 36


def test_shutdown_wait_waits_for_running_calls(client: Client, gates, server_url: str) -> None:
    ex = Executor(client)
    gate = gates()
    f = submit_held(ex, gate, server_url, "ran")
    # The gate opens only once shutdown has begun, so f can only be done if shutdown waited.
    opener = threading.Thread(target=lambda: (wait_until(lambda: ex._shutdown), gate.open()))
    opener.start()
    ex.shutdown(wait=True)
    assert f.done() and f.result() == "ran"
    opener.join(WAIT)


def test_shutdown_without_wait_returns_at_once(client: Client, gates, server_url: str) -> None:
    ex = Executor(client)
    gate = gates()
    f = submit_held(ex, gate, server_url, "later")
    ex.shutdown(wait=False)
    assert not f.done()
    gate.open()
    assert f.result(timeout=WAIT) == "later"  # futures still complete after shutdown


def test_shutdown_cancel_futures_cancels_only_queued_calls(client: Client, gates,
                                                           server_url: str) -> None:
    ex = Executor(client)
    finished = ex.submit(square, 5)
    assert finished.result(timeout=WAIT) == 25
    gates().hold(client, 0)  # engine 0 is busy with its own command
    gate = gates()
    running = submit_held(ex, gate, server_url, "kept")  # so this one runs on engine 1
    queued = [ex.submit(square, i) for i in range(4)]
    ex.shutdown(wait=False, cancel_futures=True)
    for f in queued:
        with pytest.raises(CancelledError):
            f.result(timeout=WAIT)
    assert not running.done() and finished.result() == 25
    gate.open()
    assert running.result(timeout=WAIT) == "kept"
    ex.shutdown()


def test_shutdown_wait_and_cancel_futures_with_all_engines_held(client: Client,
                                                               gates) -> None:
    ex = Executor(client)
    hold_all(client, gates)
    queued = [ex.submit(square, i) for i in range(5)]
    returns_within(lambda: ex.shutdown(wait=True, cancel_futures=True))
    assert all(f.done() and f.cancelled() for f in queued)  # as the stdlib's executors do
    for f in queued:
        with pytest.raises(CancelledError):
            f.result()


def test_context_manager_shuts_down_and_waits(client: Client, gates, server_url: str) -> None:
    gate = gates()
    with Executor(client) as ex:
        assert isinstance(ex, Executor)
        f = submit_held(ex, gate, server_url, "in with")
        opener = threading.Thread(target=lambda: (wait_until(lambda: ex._shutdown), gate.open()))
        opener.start()
    assert f.done() and f.result() == "in with"
    with pytest.raises(RuntimeError):
        ex.submit(square, 1)
    opener.join(WAIT)


# ---------------------------------------------------- futures API and several threads
def test_as_completed_and_wait(client: Client, gates, server_url: str) -> None:
    ex = Executor(client)
    gate = gates()
    slow = submit_held(ex, gate, server_url, "slow")
    fast = ex.submit(square, 4)
    assert next(concurrent.futures.as_completed([slow, fast], timeout=WAIT)) is fast
    done, not_done = concurrent.futures.wait([slow, fast], timeout=WAIT,
                                             return_when=FIRST_COMPLETED)
    assert done == {fast} and not_done == {slow}
    failing = ex.submit(fail_on, 1, 1)
    done, not_done = concurrent.futures.wait([slow, failing], timeout=WAIT,
                                             return_when=FIRST_EXCEPTION)
    assert done == {failing} and not_done == {slow}
    seen = []
    slow.add_done_callback(seen.append)
    gate.open()
    done, not_done = concurrent.futures.wait([slow, fast, failing], timeout=WAIT)
    assert not not_done and slow.result() == "slow" and seen == [slow]
    assert set(concurrent.futures.as_completed([slow, fast, failing])) == {slow, fast, failing}


def test_asyncio_run_in_executor(client: Client) -> None:
    ex = Executor(client)

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        return [await loop.run_in_executor(ex, square, 6), await ex.submit(square, 7)]

    assert asyncio.run(main()) == [36, 49]


def test_submit_from_several_threads(client: Client) -> None:
    ex = Executor(client)

    def work(k: int) -> list[PendingResult]:
        return [ex.submit(add, k * 100, i) for i in range(25)]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        batches = list(pool.map(work, range(4)))
    for k, fs in enumerate(batches):
        assert [f.result(timeout=WAIT) for f in fs] == [k * 100 + i for i in range(25)]


def test_shutdown_while_threads_submit(client: Client) -> None:
    ex = Executor(client)
    got: list[list[PendingResult]] = [[] for _ in range(4)]

    def submit_until_shut(k: int) -> None:
        while True:
            try:
                got[k].append(ex.submit(add, k * 1000, len(got[k])))
            except RuntimeError:
                return

    threads = [threading.Thread(target=submit_until_shut, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: all(len(g) >= 5 for g in got), what="every thread to submit")
    ex.shutdown(wait=True)
    for t in threads:
        t.join(WAIT)
    # Every submit either raised or returned a future that shutdown waited for.
    assert all(f.done() for fs in got for f in fs)
    for k, fs in enumerate(got):
        assert [f.result() for f in fs] == [k * 1000 + i for i in range(len(fs))]
