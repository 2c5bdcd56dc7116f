"""PendingResult is a concurrent.futures.Future completed from Redis, and awaitable."""

from __future__ import annotations

import asyncio
import concurrent.futures
import pickle
import threading

import pytest

import redisengines
from redisengines import Client, PendingResult

from .helpers import WAIT


def test_block_false_returns_a_future(client: Client) -> None:
    f = client.execute("a = 6 * 7", block=False)
    assert isinstance(f, PendingResult)
    assert isinstance(f, concurrent.futures.Future)
    assert f.result(timeout=WAIT) == {0: None, 1: None}
    assert f.done() and not f.cancelled()
    assert client.pull("a", targets=0, block=False).result(timeout=WAIT) == 42


@pytest.mark.parametrize("call, expected", [
    (lambda c: c.execute("z = 1", targets=0, block=False), None),
    (lambda c: c.push({"p": 1}, block=False), {0: None, 1: None}),
    (lambda c: c.pull("a", targets=[1], block=False), {1: [1]}),
    (lambda c: c.pull_namespace(targets=0, block=False), {"a": [1]}),
    (lambda c: c.keys(targets=0, block=False), ["a"]),
    (lambda c: c.reset(targets=1, block=False), None),
    (lambda c: c.push_serialized({"s": pickle.dumps(5)}, targets=0, block=False), None),
    (lambda c: c.scatter("s", [1, 2], block=False), {0: None, 1: None}),
    (lambda c: c.gather("a", targets=[0, 1], block=False), [1, 1]),
    (lambda c: c.apply(len, "abc", targets=0, block=False), 3),
    (lambda c: c.queue_status(targets=0, block=False),
     {"queued": 0, "running": 0, "completed": 1}),
    (lambda c: c.clear_queue(targets=0, block=False), 0),
    (lambda c: c.kill(targets=1, block=False), None),
], ids=["execute", "push", "pull", "pull_namespace", "keys", "reset", "push_serialized",
        "scatter", "gather", "apply", "queue_status", "clear_queue", "kill"])
def test_every_method_accepts_block_false(client: Client, call, expected) -> None:
    client.execute("a = [1]")
    f = call(client)
    assert isinstance(f, PendingResult)
    assert f.result(timeout=WAIT) == expected


def test_pull_serialized_accepts_block_false(client: Client) -> None:
    client.push({"a": [1]}, targets=0)
    f = client.pull_serialized("a", targets=0, block=False)
    assert isinstance(f, PendingResult)
    assert pickle.loads(f.result(timeout=WAIT)) == [1]


def test_get_result_accepts_block_false(client: Client) -> None:
    client.execute("a = 1", targets=0)
    f = client.get_result(-1, targets=0, block=False)
    assert isinstance(f, PendingResult)
    assert f.result(timeout=WAIT).code == "a = 1"


def test_result_timeout_then_result(client: Client) -> None:
    f = client.execute("import time; time.sleep(1)", targets=0, block=False)
    with pytest.raises(TimeoutError):
        f.result(timeout=0.1)
    assert not f.done()
    assert f.result(timeout=WAIT) is None
    assert f.done()


def test_blocking_call_timeout_raises_and_engine_carries_on(client: Client, gates) -> None:
    gate = gates()
    gate.hold(client, 0)
    client.push({"x": 1}, targets=1)
    with pytest.raises(TimeoutError):
        client.pull("x", targets=[0, 1], timeout=0.2)
    gate.open()
    client.execute("x = 2", targets=0)
    assert client.pull("x") == {0: 2, 1: 1}


def test_futures_wait(client: Client, gates) -> None:
    gate = gates()
    slow = gate.hold(client, 0)
    fast = client.execute("b = 1", targets=1, block=False)
    done, not_done = concurrent.futures.wait(
        [slow, fast], timeout=WAIT, return_when=concurrent.futures.FIRST_COMPLETED)
    assert done == {fast} and not_done == {slow}
    gate.open()
    done, not_done = concurrent.futures.wait([slow, fast], timeout=WAIT)
    assert done == {slow, fast} and not not_done


def test_as_completed_yields_in_completion_order(client: Client, gates) -> None:
    gate = gates()
    slow = gate.hold(client, 0)
    fast = client.pull("a", targets=1, block=False)  # fails: no such name
    order = []
    for f in concurrent.futures.as_completed([slow, fast], timeout=WAIT):
        order.append(f)
        if f is fast:
            assert isinstance(f.exception(), KeyError)
            gate.open()
    assert order == [fast, slow]


def test_add_done_callback(client: Client, gates) -> None:
    gate = gates()
    f = gate.hold(client, 0)
    seen: list[object] = []
    called = threading.Event()

    def callback(future: concurrent.futures.Future) -> None:
        seen.append((future, future.result()))
        called.set()

    f.add_done_callback(callback)
    assert not called.is_set()
    gate.open()
    assert called.wait(WAIT)
    assert seen == [(f, None)]

    late: list[object] = []  # added after completion: called at once
    f.add_done_callback(late.append)
    assert late == [f]


def test_await_pending_results(client: Client) -> None:
    async def main() -> tuple[object, ...]:
        await client.push({"a": 2}, block=False)
        pulled = await client.pull("a", targets=0, block=False)
        both = await asyncio.gather(client.pull("a", block=False),
                                    client.apply(pow, 2, 10, targets=1, block=False))
        wrapped = await asyncio.wrap_future(client.keys(targets=0, block=False))
        with pytest.raises(ZeroDivisionError):
            await client.execute("1 / 0", targets=0, block=False)
        return pulled, both, wrapped

    pulled, both, wrapped = asyncio.run(main())
    assert pulled == 2
    assert both == [{0: 2, 1: 2}, 1024]
    assert wrapped == ["a"]


def test_results_readable_by_a_second_client(cluster: redisengines.Cluster) -> None:
    first = cluster.client()
    first.execute("v = 41 + 1\nprint('made v')", targets=0)
    assert first.pull("v", targets=0, block=False).result(timeout=WAIT) == 42
    first.close()

    second = redisengines.connect(cluster.url, cluster=cluster.name)
    try:
        last = second.get_result(-1, targets=0)
        assert (last.op, last.value, last.error) == ("pull", 42, None)
        made = second.get_result(0, targets=0)
        assert (made.op, made.code, made.stdout) == ("execute", "v = 41 + 1\nprint('made v')",
                                                     "made v\n")
    finally:
        second.close()


def test_closing_the_client_fails_its_pending_futures(cluster) -> None:
    other = cluster.client()
    f = other.execute("import time; time.sleep(30)", targets=0, block=False)
    other.close()
    with pytest.raises(redisengines.RedisEnginesError, match="client was closed"):
        f.result(timeout=5)
    cluster.client().kill(targets=0)  # do not leave it sleeping until teardown
