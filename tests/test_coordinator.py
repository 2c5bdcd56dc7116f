"""The multiengine API of the Client, against real engines on a real server."""

from __future__ import annotations

import concurrent.futures
import gc
import hashlib
import pickle
import time

import numpy as np
import pytest

import redisengines
from redisengines import (
    Client,
    EngineDiedError,
    EngineShutdownError,
    InvalidTargetError,
    PendingResult,
    Result,
)

from .helpers import WAIT, interactive, wait_until


# ------------------------------------------------------------------------- targets
def test_ids_lists_the_live_engines(client: Client) -> None:
    assert client.ids == [0, 1]
    assert client.get_ids() == [0, 1]


def test_verify_targets_returns_the_ids_named(client: Client) -> None:
    assert client.verify_targets("all") == [0, 1]
    assert client.verify_targets(1) == [1]
    assert client.verify_targets([1, 0]) == [1, 0]


@pytest.mark.parametrize("targets", [7, [0, 7], "some", [], [0, 0], True],
                         ids=["unknown", "unknown-in-list", "bad-string", "empty", "duplicate",
                              "bool"])
def test_verify_targets_rejects_bad_targets(client: Client, targets: object) -> None:
    with pytest.raises(InvalidTargetError) as info:
        client.verify_targets(targets)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


def test_command_to_a_bad_target_raises_and_runs_nowhere(client: Client) -> None:
    with pytest.raises(InvalidTargetError):
        client.execute("ran = True", targets=[0, 7])
    assert client.keys() == {0: [], 1: []}


# ------------------------------------------------------------------ execute / push / pull
def test_execute_returns_none_per_engine(client: Client) -> None:
    assert client.execute("a = 10") == {0: None, 1: None}
    assert client.execute("b = a + 1", targets=0) is None
    assert client.execute("b = a + 2", targets=[1]) == {1: None}
    assert client.pull("b") == {0: 11, 1: 12}


def test_first_command_on_a_new_server_is_prompt() -> None:
    """A new cluster on its own fresh server answers its first command at once (not after
    an engine's blocking read of BLOCK_SECONDS times out)."""
    with redisengines.Cluster(1) as cluster:
        client = cluster.client()
        start = time.monotonic()
        assert client.execute("a = 1", targets=0) is None
        assert time.monotonic() - start < 1.0


def test_push_then_pull_shapes(client: Client) -> None:
    assert client.push({"x": 5, "y": [1, 2]}, targets=[0]) == {0: None}
    assert client.push({"x": 6}, targets=1) is None

    assert client.pull("x", targets=0) == 5                       # int target: plain value
    assert client.pull("x", targets=[0]) == {0: 5}                # list, even of one: dict
    assert client.pull("x") == {0: 5, 1: 6}                       # "all"
    assert client.pull(["x", "y"], targets=0) == [5, [1, 2]]      # list of names: list
    assert client.pull(["y", "x"], targets=[0]) == {0: [[1, 2], 5]}


def test_push_overwrites_and_keeps_other_names(client: Client) -> None:
    client.push({"x": 1, "y": 2}, targets=0)
    client.push({"x": "new"}, targets=0)
    assert client.pull(["x", "y"], targets=0) == ["new", 2]


def test_pull_namespace_whole_and_by_names(client: Client) -> None:
    client.push({"a": 1, "b": "two"})
    client.execute("c = [a, b]", targets=1)
    assert client.pull_namespace(targets=0) == {"a": 1, "b": "two"}
    assert client.pull_namespace() == {0: {"a": 1, "b": "two"},
                                       1: {"a": 1, "b": "two", "c": [1, "two"]}}
    assert client.pull_namespace(targets=1, names=["c", "a"]) == {"c": [1, "two"], "a": 1}
    assert client.pull_namespace(targets=[0], names=["b"]) == {0: {"b": "two"}}


def test_keys_are_sorted_and_hide_dunders(client: Client) -> None:
    client.execute("zeta = 1\nalpha = 2\n__hidden__ = 3\nmid = 4", targets=0)
    assert client.keys(targets=0) == ["alpha", "mid", "zeta"]
    assert client.keys() == {0: ["alpha", "mid", "zeta"], 1: []}
    assert client.pull("__hidden__", targets=0) == 3  # hidden from keys, still there


def test_reset_clears_only_the_targets(client: Client) -> None:
    client.push({"a": 1, "b": 2})
    assert client.reset(targets=0) is None
    assert client.keys() == {0: [], 1: ["a", "b"]}
    assert client.reset() == {0: None, 1: None}
    assert client.keys() == {0: [], 1: []}
    client.execute("c = len('xyz')", targets=0)  # builtins survive a reset
    assert client.pull("c", targets=0) == 3


# ------------------------------------------------------------------------ get_result
def test_get_result_records(client: Client) -> None:
    before = time.time()
    code = "print('hello')\nimport sys\nsys.stderr.write('careful')\na = 7"
    client.execute(code, targets=0)
    client.pull("a", targets=0)
    after = time.time()

    last = client.get_result(-1, targets=0)
    assert isinstance(last, Result)
    assert (last.op, last.value) == ("pull", 7)
    assert last.stdout == ""

    first = client.get_result(0, targets=0)
    assert first == client.get_result(-2, targets=0)
    assert first.op == "execute"
    assert first.code == code
    assert first.value is None
    assert first.stdout == "hello\n"
    assert first.stderr == "careful"
    assert isinstance(first.started, float) and isinstance(first.finished, float)
    assert before <= first.started <= first.finished <= after

    assert client.get_result(1, targets=0).value == 7


def test_get_result_default_is_last_command_on_each_target(client: Client) -> None:
    client.execute("x = 1")
    client.execute("x = 2", targets=1)
    records = client.get_result()
    assert sorted(records) == [0, 1]
    assert records[0].code == "x = 1"
    assert records[1].code == "x = 2"
    assert client.get_result(targets=[1])[1].code == "x = 2"


def test_get_result_of_a_large_value(client: Client, r, cluster_name) -> None:
    """A large result lives while its PendingResult does; then its pages are released."""
    arr = np.arange(500_000, dtype=np.int64)  # 4 MB: stored as a paged object
    client.push({"arr": arr}, targets=0)
    f = client.pull("arr", targets=0, block=False)
    np.testing.assert_array_equal(f.result(timeout=10), arr)
    record = client.get_result(-1, targets=0)
    assert record.error is None
    np.testing.assert_array_equal(record.value, arr)

    del f, record
    gc.collect()

    def released() -> BaseException | None:
        return client.get_result(-1, targets=0).error
    error = wait_until(released, what="pages released after the future was dropped")
    assert isinstance(error, redisengines.ObjectLostError)
    assert "released when the PendingResult" in str(error)
    assert not r.keys(f"re:{cluster_name}:{{o*")  # no pages left behind


# --------------------------------------------------------------- push/pull serialized
def test_push_serialized_and_pull_serialized(client: Client) -> None:
    value = {"k": [1, 2.5, "three"], "t": (None, True)}
    assert client.push_serialized({"s": pickle.dumps(value)}, targets=0) is None
    assert client.pull("s", targets=0) == value

    blob = client.pull_serialized("s", targets=0)
    assert isinstance(blob, bytes)
    assert pickle.loads(blob) == value

    client.push_serialized({"n": pickle.dumps(41), "m": pickle.dumps("m")})
    blobs = client.pull_serialized("n")
    assert {eid: pickle.loads(b) for eid, b in blobs.items()} == {0: 41, 1: 41}
    both = client.pull_serialized(["n", "m"], targets=1)
    assert [pickle.loads(b) for b in both] == [41, "m"]


# ---------------------------------------------------------------------- scatter/gather
def test_scatter_splits_contiguously_in_target_order(client: Client) -> None:
    client.scatter("chunk", list(range(10)))
    assert client.pull("chunk") == {0: [0, 1, 2, 3, 4], 1: [5, 6, 7, 8, 9]}
    assert client.gather("chunk") == list(range(10))

    client.scatter("odd", list(range(7)), targets=[1, 0])
    assert client.pull("odd") == {1: [0, 1, 2, 3], 0: [4, 5, 6]}
    assert client.gather("odd", targets=[1, 0]) == list(range(7))


def test_scatter_over_three_engines_sizes_differ_by_at_most_one(make_cluster) -> None:
    client = make_cluster(3).client()
    client.scatter("c", list(range(10)))
    assert client.pull("c") == {0: [0, 1, 2, 3], 1: [4, 5, 6], 2: [7, 8, 9]}
    assert client.gather("c") == list(range(10))

    client.scatter("few", ["a", "b"])
    assert client.pull("few") == {0: ["a"], 1: ["b"], 2: []}
    assert client.gather("few") == ["a", "b"]

    client.scatter("sub", list(range(5)), targets=[2, 0])
    assert client.pull("sub", targets=[0, 2]) == {0: [3, 4], 2: [0, 1, 2]}
    assert client.gather("sub", targets=[2, 0]) == list(range(5))
    assert "sub" not in client.keys(targets=1)


@pytest.mark.parametrize("seq", [tuple(range(9)), "abcdefghi", b"bytes!"],
                         ids=["tuple", "str", "bytes"])
def test_gather_joins_sequences_of_the_scattered_type(client: Client, seq: object) -> None:
    client.scatter("part", seq)
    parts = client.pull("part")
    assert all(type(p) is type(seq) for p in parts.values())
    assert parts[0] + parts[1] == seq
    assert client.gather("part") == seq


def test_gather_concatenates_numpy_arrays(client: Client) -> None:
    arr = np.arange(11, dtype=np.float32).reshape(11, 1) * 1.5
    client.scatter("a", arr)
    parts = client.pull("a")
    assert [p.shape for p in parts.values()] == [(6, 1), (5, 1)]
    out = client.gather("a")
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_array_equal(out, arr)


def test_gather_of_values_made_on_engines(client: Client) -> None:
    client.push({"eid": 0}, targets=0)
    client.push({"eid": 1}, targets=1)
    client.execute("part = [eid * 10, eid * 10 + 1]")
    assert client.gather("part") == [0, 1, 10, 11]
    assert client.gather("part", targets=[1]) == [10, 11]


# ----------------------------------------------------------------------------- apply
def test_apply_sees_pushed_names_and_takes_args(client: Client) -> None:
    client.push({"a": 3})

    @interactive
    def f(x, y=1):
        return a * x + y  # noqa: F821 - `a` lives in the engine's namespace

    assert client.apply(f, 2, y=5) == {0: 11, 1: 11}
    assert client.apply(f, 4, targets=1) == 13
    assert client.apply(interactive(lambda: a + 1), targets=[0]) == {0: 4}  # noqa: F821


def test_apply_lambdas_and_closures(client: Client) -> None:
    assert client.apply(lambda x, *rest, k=0: x + sum(rest) + k, 1, 2, 3, k=4) == {0: 10, 1: 10}

    offset = 100

    def add(x):
        return x + offset

    assert client.apply(add, 5, targets=0) == 105

    def make_counter(start):
        def count(step):
            return [start + step * i for i in range(3)]
        return count

    assert client.apply(make_counter(7), 2, targets=1) == [7, 9, 11]


def test_apply_returns_each_engines_value(client: Client) -> None:
    client.push({"n": 0}, targets=0)
    client.push({"n": 1}, targets=1)
    assert client.apply(interactive(lambda: n * 10 + 1)) == {0: 1, 1: 11}  # noqa: F821
    full = interactive(lambda: np.full(2, n))  # noqa: F821
    assert client.apply(full, targets=1).tolist() == [1, 1]


def test_apply_can_change_the_namespace(client: Client) -> None:
    @interactive
    def setup():
        global made
        made = "here"
        return len(made)

    assert client.apply(setup, targets=0) == 4
    assert client.pull("made", targets=0) == "here"
    assert client.keys(targets=1) == []


# --------------------------------------------------------------------------- barrier
def test_barrier_waits_for_all_pending(client: Client) -> None:
    f1 = client.execute("a = 1", block=False)
    f2 = client.push({"b": 2}, targets=0, block=False)
    f3 = client.pull("a", targets=1, block=False)
    assert client.barrier(f1, [f2, f3], timeout=WAIT) is None
    assert all(f.done() for f in (f1, f2, f3))
    assert f3.result() == 1


def test_barrier_timeout_leaves_futures_usable(client: Client, gates) -> None:
    gate = gates()
    held = gate.hold(client, 0)
    quick = client.execute("q = 1", targets=1, block=False)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        client.barrier(held, quick, timeout=0.3)
    assert time.monotonic() - start < WAIT
    assert not held.done()
    gate.open()
    client.barrier(held, quick, timeout=WAIT)
    assert held.result() is None and quick.result() is None


def test_barrier_raises_as_soon_as_one_fails(client: Client, gates) -> None:
    held = gates().hold(client, 0)
    failing = client.execute("1 / 0", targets=1, block=False)
    start = time.monotonic()
    with pytest.raises(ZeroDivisionError) as info:
        client.barrier(held, failing, timeout=25)
    assert time.monotonic() - start < WAIT
    assert info.value.engine_id == 1
    assert not held.done()


# ----------------------------------------------------- queue_status / clear_queue / kill
def test_queue_status_while_busy(client: Client, gates) -> None:
    client.execute("a = 1", targets=0)
    client.execute("a = 2", targets=0)
    assert client.queue_status(targets=0) == {"queued": 0, "running": 0, "completed": 2}

    gate = gates()
    held = gate.hold(client, 0)
    queued = [client.execute(f"a = {i}", targets=0, block=False) for i in range(3)]
    assert client.queue_status() == {0: {"queued": 3, "running": 1, "completed": 2},
                                     1: {"queued": 0, "running": 0, "completed": 0}}
    assert client.queue_status(targets=[1]) == {1: {"queued": 0, "running": 0, "completed": 0}}

    gate.open()
    client.barrier(held, queued, timeout=WAIT)
    assert client.queue_status(targets=0) == {"queued": 0, "running": 0, "completed": 6}


def test_clear_queue_cancels_queued_commands_only(client: Client, gates) -> None:
    gate = gates()
    held = gate.hold(client, 0)
    dropped = [client.execute(f"q{i} = {i}", targets=0, block=False) for i in range(2)]
    other = client.execute("kept = 1", targets=1, block=False)
    assert client.clear_queue(targets=0) == 2
    for f in dropped:
        with pytest.raises(concurrent.futures.CancelledError):
            f.result(timeout=WAIT)
    assert client.queue_status(targets=0)["queued"] == 0
    assert client.queue_status(targets=0)["running"] == 1

    gate.open()
    assert held.result(timeout=WAIT) is None  # the running command completes normally
    assert other.result(timeout=WAIT) is None
    client.execute("after = 3", targets=0)
    assert client.pull("after", targets=0) == 3
    assert client.keys(targets=0) == ["after"]  # the dropped commands never ran
    assert client.clear_queue() == {0: 0, 1: 0}


def test_kill_busy_engine(cluster: redisengines.Cluster, client: Client, gates) -> None:
    client.push({"a": 1})
    running = gates().hold(client, 1)
    queued = client.execute("b = 2", targets=1, block=False)

    assert client.kill(targets=1, timeout=WAIT) is None
    assert client.ids == [0]
    gone = (EngineShutdownError, EngineDiedError)
    with pytest.raises(gone) as info:
        running.result(timeout=WAIT)
    assert info.value.engine_id == 1
    with pytest.raises(gone):
        queued.result(timeout=WAIT)
    cluster.processes[1].wait(timeout=WAIT)  # the process exits

    with pytest.raises(InvalidTargetError):
        client.pull("a", targets=1)
    assert client.pull("a") == {0: 1}  # "all" is what is left
    client.execute("c = a + 1", targets=0)
    assert client.pull("c", targets=0) == 2


# ----------------------------------------------------------------------- big values
def test_large_array_round_trip(client: Client) -> None:
    arr = np.random.default_rng(1).random(50 * 2**20 // 8)  # 50 MiB of float64
    client.push({"big": arr}, targets=0)
    back = client.pull("big", targets=0)
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)
    assert back.flags.writeable
    back[0] = -1.0  # really writable


def test_large_value_pushed_to_two_engines(client: Client) -> None:
    arr = np.arange(50 * 2**20 // 8, dtype=np.int64)
    client.push({"big": arr})
    client.execute("import hashlib\nh = hashlib.sha256(big.tobytes()).hexdigest()\n"
                   "s = int(big.sum())")
    digest = hashlib.sha256(arr.tobytes()).hexdigest()
    assert client.pull(["h", "s"]) == {0: [digest, int(arr.sum())], 1: [digest, int(arr.sum())]}


# --------------------------------------------------------------------------- stdout
def test_stdout_is_captured_per_command(client: Client) -> None:
    client.push({"eid": 0}, targets=0)
    client.push({"eid": 1}, targets=1)

    one = client.execute("print('hello', eid)", targets=0, block=False)
    assert one.result(timeout=WAIT) is None
    assert one.stdout == "hello 0\n"

    every = client.execute("print('engine', eid)", block=False)
    every.result(timeout=WAIT)
    assert every.stdout == {0: "engine 0\n", 1: "engine 1\n"}

    listed = client.execute("x = 1", targets=[1], block=False)
    listed.result(timeout=WAIT)
    assert listed.stdout == {1: ""}  # nothing printed, nothing left over from before
    assert isinstance(listed, PendingResult)
