"""FAULTS #12, #30-#35, #38 and #41: objects and stream entries that go wrong.

Every test checks the invariant of FAULTS.md as well as the error: the user gets exactly one
named error, nothing acknowledged is lost (later commands on the same engine work, earlier
values and results are intact), nothing is left half-written where the scenario says so,
and the engine's stream and pending list are settled (PEL empty, nothing queued).

Row by row, what tests/test_errors.py already covers is not repeated here: these tests add
the other submit paths (apply, scatter, put, remote functions, actors), the exact size
boundary, the key-level "nothing was written" checks, P:tasks, and tampering.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pytest
import redis

import redisengines
from redisengines import (
    DeserializationError,
    ObjectIntegrityError,
    ObjectLostError,
    ObjectTooBigError,
    RedisEnginesError,
    RemoteError,
    SerializationError,
)
from redisengines.serialization import serialize

from ..conftest import FAST
from ..helpers import WAIT, interactive, wait_until
from ..test_errors import raised


# ----------------------------------------------------------------------- remote code
def _echo(x):
    return x


def _too_big(n):
    return bytes(n)


class _Acc:
    """An actor that takes anything."""

    def __init__(self, *args):
        self.args = args

    def ping(self):
        return "pong"

    def take(self, x):
        return type(x).__name__


echo = redisengines.remote(interactive(_echo))
too_big = redisengines.remote(interactive(_too_big))
Acc = redisengines.remote(interactive(_Acc))
_echo_fn = interactive(_echo)


# -------------------------------------------------------------------------- helpers
def prefixed(r: redis.Redis, cluster_name: str, pattern: str = "*") -> set[bytes]:
    return set(r.scan_iter(f"re:{cluster_name}:{pattern}", count=1000))


def object_keys(r: redis.Redis, cluster_name: str) -> set[bytes]:
    """Manifests ``P:{o<oid>}`` and pages ``P:{o<oid>}:<n>`` of the cluster."""
    return prefixed(r, cluster_name, "{o*")


def manifests(r: redis.Redis, cluster_name: str) -> set[bytes]:
    return prefixed(r, cluster_name, "{o*}")


def pages(r: redis.Redis, cluster_name: str) -> set[bytes]:
    return prefixed(r, cluster_name, "{o*}:*")


def inbox(cluster_name: str, eid: int) -> str:
    return f"re:{cluster_name}:{{e{eid}}}:inbox"


def tasks(cluster_name: str) -> str:
    return f"re:{cluster_name}:tasks"


def result_key(cluster_name: str, cmd_id: str) -> str:
    return f"re:{cluster_name}:{{r{cmd_id}}}"


def page_key(cluster_name: str, oid: str, n: int) -> str:
    return f"re:{cluster_name}:{{o{oid}}}:{n}"


def pel(r: redis.Redis, stream: str) -> int:
    """How many entries of ``stream`` are delivered and not acked (XPENDING count)."""
    if not r.exists(stream):
        return 0
    return r.xpending(stream, "engine")["pending"]


def cmd_id(f: Any) -> str:
    return next(iter(f.cmd_ids.values()))


def settle(value: Any) -> Any:
    """The value of a call that may have returned a future."""
    return value.result(timeout=WAIT) if isinstance(value, Future) else value


@dataclass(frozen=True)
class Snapshot:
    """What a client could have written: keys, stream heads, named actors."""

    keys: frozenset[bytes]
    streams: dict[str, tuple[int, bytes | None]]
    actors: dict[bytes, bytes]


def snapshot(r: redis.Redis, cluster_name: str, eids: tuple[int, ...] = (0, 1)) -> Snapshot:
    # :ns and :hb are rewritten by each engine's control thread on its own schedule.
    keys = frozenset(k for k in prefixed(r, cluster_name)
                     if not k.endswith((b":ns", b":hb")))
    streams = {}
    for stream in [*(inbox(cluster_name, e) for e in eids), tasks(cluster_name)]:
        head = r.xinfo_stream(stream)["last-generated-id"] if r.exists(stream) else None
        streams[stream] = (r.xlen(stream), head)
    return Snapshot(keys, streams, r.hgetall(f"re:{cluster_name}:actors"))


def assert_nothing_written(before: Snapshot, after: Snapshot) -> None:
    assert sorted(after.keys - before.keys) == [], "keys written by a submission that failed"
    assert after.streams == before.streams, "an entry was queued by a submission that failed"
    assert after.actors == before.actors, "P:actors changed by a submission that failed"


def assert_settled(client: redisengines.Client, r: redis.Redis, cluster_name: str) -> None:
    """Every stream of the cluster is drained: nothing queued, running or unacked."""
    eids = client.ids
    status = client.queue_status(targets=eids)
    assert all(s["queued"] == 0 and s["running"] == 0 for s in status.values()), status
    for eid in eids:
        assert pel(r, inbox(cluster_name, eid)) == 0
    assert pel(r, tasks(cluster_name)) == 0
    assert r.xlen(tasks(cluster_name)) == 0


def ready_actor(client: redisengines.Client, engine: int = 1, **options: Any):
    handle = Acc.options(client=client, engine=engine, **options).remote()
    assert handle.ping.remote().result(timeout=WAIT) == "pong"
    return handle


# --------------------------------------------------------------- #30 / #31: sizes
LIMIT = 1_000_000
PAGE = 64 * 1024
INLINE = 16 * 1024
SMALL_PAGED = 200_000  # under LIMIT, over INLINE: written as pages


@pytest.fixture
def limited(make_cluster) -> redisengines.Client:
    """Two engines whose client and engines share a small max_object_size and page size."""
    return make_cluster(2, max_object_size=LIMIT, page_size=PAGE, inline_max=INLINE,
                        **FAST).client()


def test_fault_30_limit_is_exact_and_nothing_is_written(limited, r, cluster_name) -> None:
    """An object of exactly max_object_size goes (as pages); one byte more raises
    ObjectTooBigError(size=limit+1, limit) before anything reaches Redis."""
    half = LIMIT // 2
    overhead = serialize({"v": bytes(half)}).nbytes - half
    at_limit = bytes(LIMIT - overhead)
    over = bytes(LIMIT - overhead + 1)
    assert serialize({"v": at_limit}).nbytes == LIMIT  # the test's own premise
    assert serialize({"v": over}).nbytes == LIMIT + 1

    limited.push({"v": at_limit}, targets=0)
    before = snapshot(r, cluster_name)
    err = raised(lambda: limited.push({"v": over}, targets=0))
    assert type(err) is ObjectTooBigError
    assert (err.size, err.limit) == (LIMIT + 1, LIMIT)
    assert "REDISENGINES_MAX_OBJECT_SIZE" in str(err)
    assert_nothing_written(before, snapshot(r, cluster_name))
    assert limited.pull("v", targets=0) == at_limit  # the accepted value is intact
    assert limited.execute("n = len(v)", targets=0) is None
    assert limited.pull("n", targets=0) == len(at_limit)


# Each submits ``big`` (over LIMIT) one way; ``actor`` is a live actor on engine 1.
TOO_BIG_OPS: dict[str, Callable[[redisengines.Client, bytes, Any], Any]] = {
    "push": lambda c, big, actor: c.push({"big": big}, targets=0),
    "push-all": lambda c, big, actor: c.push({"big": big}),
    "push_serialized": lambda c, big, actor: c.push_serialized({"big": big}, targets=0),
    "apply": lambda c, big, actor: c.apply(_echo_fn, big, targets=0),
    "put": lambda c, big, actor: c.put(big),
    "remote-call": lambda c, big, actor: echo.options(client=c).remote(big),
    "actor-call": lambda c, big, actor: actor.take.remote(big),
    "named-actor": lambda c, big, actor: Acc.options(client=c, name="acc").remote(big),
    # the first part fits (and is paged), the second does not
    "scatter": lambda c, big, actor: c.scatter("part", [bytes(SMALL_PAGED), big]),
}


@pytest.mark.parametrize("op", list(TOO_BIG_OPS))
def test_fault_30_object_over_max_size_on_push(limited, r, cluster_name, op) -> None:
    limited.push({"small": bytes(SMALL_PAGED)})  # paged, under the limit
    actor = ready_actor(limited)
    before = snapshot(r, cluster_name)

    err = raised(lambda: settle(TOO_BIG_OPS[op](limited, bytes(2 * LIMIT), actor)))
    assert type(err) is ObjectTooBigError, repr(err)
    assert err.limit == LIMIT
    assert 2 * LIMIT <= err.size < 2 * LIMIT + 10_000

    assert_nothing_written(before, snapshot(r, cluster_name))
    # engines unaffected, earlier values intact, the failed names never set
    assert limited.pull("small") == {0: bytes(SMALL_PAGED), 1: bytes(SMALL_PAGED)}
    assert limited.keys() == {0: ["small"], 1: ["small"]}
    assert actor.ping.remote().result(timeout=WAIT) == "pong"
    if op == "named-actor":  # the name was never taken
        named = Acc.options(client=limited, name="acc").remote()
        assert named.ping.remote().result(timeout=WAIT) == "pong"
    assert_settled(limited, r, cluster_name)


def test_fault_31_result_over_max_size_on_pull(limited, r, cluster_name) -> None:
    """Pull, apply and remote calls whose result is too big: ObjectTooBigError from the
    engine, no page of it in Redis, and the earlier (paged) result still readable."""
    limited.execute(f"big = bytes({2 * LIMIT})\nok = bytes({SMALL_PAGED})")
    earlier = limited.pull("ok", targets=1, block=False)
    assert earlier.wait(WAIT)  # done, its pages not read yet
    objects_before = object_keys(r, cluster_name)
    assert objects_before, "the earlier result should be paged"

    err = raised(lambda: limited.pull("big", targets=1))
    assert isinstance(err, ObjectTooBigError) and isinstance(err, RemoteError)
    assert err.engine_id == 1 and err.limit == LIMIT
    assert 2 * LIMIT <= err.size < 2 * LIMIT + 10_000
    assert "'big'" in str(err)

    both = raised(lambda: limited.pull("big"))
    assert isinstance(both, redisengines.CompositeError) and both.results == {}
    assert sorted(both.errors) == [0, 1]
    assert all(isinstance(e, ObjectTooBigError) for e in both.errors.values())

    applied = raised(lambda: limited.apply(_too_big, 2 * LIMIT, targets=0))
    assert isinstance(applied, ObjectTooBigError) and applied.engine_id == 0

    called = echo.options(client=limited).remote(bytes(0))  # a fine call first
    assert called.result(timeout=WAIT) == b""
    remote = raised(lambda: too_big.options(client=limited).remote(2 * LIMIT).result(WAIT))
    assert isinstance(remote, ObjectTooBigError) and remote.engine_id in (0, 1)

    # no page of any refused result, and their result records carry the error, not a value
    assert object_keys(r, cluster_name) == objects_before
    for f_err in (err, applied, remote):
        fields = r.hgetall(result_key(cluster_name, f_err.cmd_id))
        assert fields[b"status"] == b"error" and b"obj" not in fields and b"value" not in fields
    assert earlier.result() == bytes(SMALL_PAGED)  # read now: the pages are intact
    assert limited.pull("ok", targets=1) == bytes(SMALL_PAGED)
    assert_settled(limited, r, cluster_name)


# ------------------------------------------------------------ #32: cannot serialize
@pytest.fixture(params=["lock", "socket"])
def unpicklable(request) -> Iterator[tuple[Callable[[], Any], str]]:
    """A lambda closing over a lock or a socket, and the cause the error must name."""
    if request.param == "lock":
        lock = threading.Lock()
        yield (lambda: lock), "_thread.lock"
        return
    with socket.socket() as sock:
        yield (lambda: sock), "socket"


UNPICKLABLE_OPS: dict[str, Callable[[redisengines.Client, Any, Any], Any]] = {
    "push": lambda c, bad, actor: c.push({"fine": 1, "f": bad}, targets=0),
    "push-all": lambda c, bad, actor: c.push({"f": bad}),
    "apply-function": lambda c, bad, actor: c.apply(bad, targets=0),
    "apply-argument": lambda c, bad, actor: c.apply(_echo_fn, bad, targets=0),
    "remote-function": lambda c, bad, actor: redisengines.remote(bad).options(client=c).remote(),
    "remote-argument": lambda c, bad, actor: echo.options(client=c).remote(bad),
    "remote-on-engine": lambda c, bad, actor: echo.options(client=c, engine=0).remote(x=bad),
    "actor-call": lambda c, bad, actor: actor.take.remote(bad),
    "named-actor": lambda c, bad, actor: Acc.options(client=c, name="acc").remote(bad),
    "scatter": lambda c, bad, actor: c.scatter("part", [bytes(SMALL_PAGED), bad]),
}


@pytest.mark.parametrize("op", list(UNPICKLABLE_OPS))
def test_fault_32_unpicklable_object_at_submit(make_cluster, r, cluster_name, unpicklable,
                                               op) -> None:
    client = make_cluster(2, inline_max=INLINE, page_size=PAGE, **FAST).client()
    bad, cause = unpicklable
    client.push({"kept": [1, 2]})
    actor = ready_actor(client)
    before = snapshot(r, cluster_name)

    err = raised(lambda: settle(UNPICKLABLE_OPS[op](client, bad, actor)))
    assert type(err) is SerializationError, repr(err)  # raised here, not by an engine
    assert cause in str(err)
    if op == "push":
        assert "'f'" in str(err)  # names the culprit

    assert_nothing_written(before, snapshot(r, cluster_name))
    assert client.pull("kept") == {0: [1, 2], 1: [1, 2]}
    assert client.keys() == {0: ["kept"], 1: ["kept"]}
    assert actor.ping.remote().result(timeout=WAIT) == "pong"
    if op == "named-actor":
        named = Acc.options(client=client, name="acc").remote()
        assert named.ping.remote().result(timeout=WAIT) == "pong"
    assert_settled(client, r, cluster_name)


# ------------------------------------------------- #33: cannot unpickle on the engine
@pytest.fixture
def client_only_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A module the client imports from a directory that only the client has on sys.path."""
    name = f"client_only_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        class Point:
            def __init__(self, x):
                self.x = x

        def double(x):
            return 2 * x
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    yield module
    sys.modules.pop(name, None)


@interactive
class Refuses:
    """Sent by value; unpickling it raises in __setstate__."""

    def __init__(self):
        self.x = 1

    def __setstate__(self, state):
        raise ValueError("Refuses cannot be unpickled here")


@pytest.fixture(params=["missing-module", "setstate-raises"])
def poison(request, client_only_module) -> tuple[Any, list[str]]:
    """An object the engines cannot unpickle, and what the error must show."""
    if request.param == "missing-module":
        name = client_only_module.__name__
        return client_only_module.Point(3), ["ModuleNotFoundError", name]
    return Refuses(), ["ValueError", "Refuses cannot be unpickled here", "in __setstate__"]


POISON_OPS: dict[str, Callable[[redisengines.Client, Any, Any], Any]] = {
    "push": lambda c, p, actor: c.push({"p": p}, targets=0, block=False),
    "apply": lambda c, p, actor: c.apply(_echo_fn, p, targets=0, block=False),
    "remote-call": lambda c, p, actor: echo.options(client=c).remote(p),
    "actor-call": lambda c, p, actor: actor.take.remote(p),
}


@pytest.mark.parametrize("op", list(POISON_OPS))
def test_fault_33_unpickling_raises_on_the_engine(client, r, cluster_name, poison, op) -> None:
    obj, shown = poison
    client.push({"kept": "before"})
    actor = ready_actor(client)
    done_before = {e: s["completed"] for e, s in client.queue_status().items()}

    sent = POISON_OPS[op](client, obj, actor)
    err = raised(lambda: settle(sent))
    assert isinstance(err, DeserializationError) and isinstance(err, RemoteError), repr(err)
    expected_engine = {"push": 0, "apply": 0, "actor-call": actor.engine_id}.get(op)
    if expected_engine is None:  # load-balanced: the engine that took it
        expected_engine = sent.engine_id
    assert err.engine_id == expected_engine in (0, 1)
    for text in shown[:2]:
        assert text in str(err)
    assert err.traceback  # the remote traceback, down to the cause
    for text in shown:
        assert text in err.traceback

    # the entry was acked and counted once, the engine serves on, nothing else changed
    assert_settled(client, r, cluster_name)
    done_after = {e: s["completed"] for e, s in client.queue_status().items()}
    assert sum(done_after.values()) == sum(done_before.values()) + 1
    assert client.execute("alive = 1", targets=expected_engine) is None
    assert client.pull("kept") == {0: "before", 1: "before"}
    assert "p" not in client.keys(targets=0)
    assert actor.ping.remote().result(timeout=WAIT) == "pong"


def test_fault_33_remote_code_from_a_module_the_engine_lacks(client, r, cluster_name,
                                                             client_only_module) -> None:
    """The function itself is pickled by reference to a module only the client has."""
    double = redisengines.remote(client_only_module.double).options(client=client)
    f = double.remote(21)
    err = raised(lambda: f.result(timeout=WAIT))
    assert isinstance(err, DeserializationError) and isinstance(err, RemoteError)
    assert err.engine_id == f.engine_id in (0, 1)
    assert f"engine {err.engine_id}" in str(err)
    assert "ModuleNotFoundError" in str(err) and client_only_module.__name__ in str(err)
    assert "ModuleNotFoundError" in err.traceback
    assert_settled(client, r, cluster_name)
    assert echo.options(client=client, engine=err.engine_id).remote(5).result(WAIT) == 5


# ----------------------------------------------- #34: cannot unpickle on the client
@pytest.fixture
def engine_object(client: redisengines.Client, tmp_path: Path) -> str:
    """Engine 0 holds ``small`` and ``large`` (paged) whose pickles name a module that only
    engine 0 can import (``__reduce__`` returns one of its functions)."""
    name = f"engine_only_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("def rebuild(payload):\n"
                                         "    return ('rebuilt', payload)\n")
    client.execute(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import {name}

        class Opaque:
            def __init__(self, payload):
                self.payload = payload

            def __reduce__(self):
                return {name}.rebuild, (self.payload,)

        small = Opaque(b"tiny")
        large = Opaque(bytes(range(256)) * 2048)  # 512 KiB: over inline_max, paged
    """), targets=0)
    return name


@pytest.fixture
def importable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], None]]:
    """Call it to let the client import the engine-only module too (recovering the bytes)."""
    names = set(sys.modules)
    yield lambda: monkeypatch.syspath_prepend(str(tmp_path))
    for name in set(sys.modules) - names:
        if name.startswith("engine_only_"):
            del sys.modules[name]


@pytest.mark.parametrize("which", ["small", "large"])
def test_fault_34_result_unpickling_fails_on_the_client(client, r, cluster_name, engine_object,
                                                        importable, which) -> None:
    f = client.pull(which, targets=0, block=False)
    err = raised(lambda: f.result(timeout=WAIT))
    assert type(err) is DeserializationError
    assert err.engine_id == 0 and "engine 0" in str(err)
    assert "ModuleNotFoundError" in str(err) and engine_object in str(err)
    assert raised(lambda: f.result(timeout=WAIT)) is err  # the same error, every time

    # the bytes are kept: the result record, with its value, lives on until its TTL
    key = result_key(cluster_name, cmd_id(f))
    fields = r.hgetall(key)
    assert fields[b"status"] == b"ok" and r.pttl(key) > 0
    assert (b"obj" if which == "large" else b"value") in fields
    if which == "large":
        oid = fields[b"obj"].decode()
        assert r.exists(f"re:{cluster_name}:{{o{oid}}}")
        assert r.pttl(f"re:{cluster_name}:{{o{oid}}}") > 0
    record = client.get_result(-1, targets=0)
    assert (record.id, record.op, record.value) == (cmd_id(f), "pull", None)
    assert isinstance(record.error, DeserializationError) and record.error.engine_id == 0

    importable()  # once the client can import the module, the very same bytes load
    payload = b"tiny" if which == "small" else bytes(range(256)) * 2048
    assert client.store.decode(r.hgetall(key)) == ("rebuilt", payload)
    assert client.get_result(-1, targets=0).value == ("rebuilt", payload)
    client.execute("n = len(large.payload)", targets=0)  # the engine serves on
    assert client.pull("n", targets=0) == 512 * 1024
    assert_settled(client, r, cluster_name)


# ------------------------------------------------------------ #35: garbage entries
@pytest.fixture
def logged_engine(make_cluster, server_url: str, cluster_name: str,
                  tmp_path: Path) -> Iterator[tuple[redisengines.Client, Path]]:
    """One engine started here with its stderr (its log) in a file, and a client."""
    cluster = make_cluster(0, **FAST)
    log = tmp_path / "engine.log"
    env = {**os.environ, **redisengines.Settings(redis_url=server_url, cluster=cluster_name,
                                                 **FAST).to_env()}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "redisengines.actor",
                                 "--parent-pid", str(os.getpid())],
                                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        client = cluster.client()
        wait_until(lambda: client.get_ids() == [0], what="the engine to register")
        yield client, log
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_fault_35_garbage_in_inbox_and_tasks(logged_engine, r, cluster_name) -> None:
    """`XADD <stream> * foo bar` into the inbox and into P:tasks: each is logged, acked,
    recorded as a failed command, and the entry behind it runs."""
    client, log = logged_engine
    done_before = client.queue_status(targets=0)["completed"]
    bad_inbox = r.execute_command("XADD", inbox(cluster_name, 0), "*", "foo", "bar").decode()
    bad_task = r.execute_command("XADD", tasks(cluster_name), "*", "foo", "bar").decode()
    assert client.execute("a = 1", targets=0) is None  # queued behind the inbox garbage
    assert echo.options(client=client).remote(7).result(timeout=WAIT) == 7  # behind the task's

    for entry_id in (bad_inbox, bad_task):
        # logged, with the entry id
        wait_until(lambda entry_id=entry_id: f"bad stream entry {entry_id}" in log.read_text(),
                   what=f"a log line about {entry_id}")
        # recorded as a failed command (what an operator finds with redis-cli)
        fields = r.hgetall(result_key(cluster_name, f"invalid-0-{entry_id}"))
        assert fields[b"status"] == b"error" and fields[b"op"] == b"invalid"
        record = json.loads(fields[b"error"])
        # refused before anything is decoded: the garbage is not signed with the cluster key
        assert record["type"].endswith("ProtocolError") and "unsigned" in record["message"]
    # acked and gone from both streams; counted as two completed commands
    for stream in (inbox(cluster_name, 0), tasks(cluster_name)):
        assert pel(r, stream) == 0 and r.xlen(stream) == 0
    assert client.queue_status(targets=0) == {"queued": 0, "running": 0,
                                              "completed": done_before + 4}
    history = r.xrange(f"re:{cluster_name}:{{e0}}:done")
    invalid = [f for _, f in history if f[b"op"] == b"invalid"]
    assert len(invalid) == 2 and all(f[b"status"] == b"error" for f in invalid)
    assert client.pull("a", targets=0) == 1


def test_fault_35_malformed_task_naming_a_client_fails_its_future(client, r,
                                                                  cluster_name) -> None:
    """A task entry that decodes as a command but carries no payload: the engine answers
    the client it names (never a hang) and takes the next task."""
    bogus = f"{client.client_id}-bogus"
    pending = redisengines.PendingResult("call", {-1: bogus}, single=True)
    client._listener.expect(bogus, pending, -1)
    # signed with the cluster's key (a holder of the key wrote it), so it reaches decoding
    r.xadd(tasks(cluster_name), client._signed({"op": "call", "id": bogus,
                                                "client": client.client_id}, tasks(cluster_name)))
    err = raised(lambda: pending.result(timeout=WAIT))
    assert isinstance(err, RedisEnginesError) and isinstance(err, RemoteError)
    assert err.engine_id in (0, 1) and "carries no value" in str(err)
    assert echo.options(client=client).remote(3).result(timeout=WAIT) == 3
    assert_settled(client, r, cluster_name)


# ------------------------------------------------------- #38: tampered paged objects
ARRAY = np.repeat(np.arange(8, dtype=np.uint8), PAGE)  # pages 1..8 all differ; page 0: pickle


def tamper(r: redis.Redis, cluster_name: str, oid: str, how: str) -> None:
    man = r.hgetall(f"re:{cluster_name}:{{o{oid}}}")
    assert int(man[b"pages"]) == 9 and int(man[b"page_size"]) == PAGE  # the test's premise
    if how == "truncate":
        key = page_key(cluster_name, oid, 3)
        assert r.set(key, r.get(key)[:-1], keepttl=True)
    elif how == "delete":
        assert r.delete(page_key(cluster_name, oid, 4)) == 1
    else:  # swap two pages of the same length
        k1, k2 = page_key(cluster_name, oid, 1), page_key(cluster_name, oid, 2)
        p1, p2 = r.get(k1), r.get(k2)
        assert len(p1) == len(p2) == PAGE and p1 != p2
        r.set(k1, p2, keepttl=True)
        r.set(k2, p1, keepttl=True)


@pytest.fixture
def paged_cluster(make_cluster) -> redisengines.Client:
    return make_cluster(1, page_size=PAGE, inline_max=INLINE, **FAST).client()


@pytest.mark.parametrize("how", ["truncate", "delete", "swap"])
def test_fault_38_tampered_pages_of_a_push(paged_cluster, gates, r, cluster_name, how) -> None:
    """Pages of a queued push are damaged before the engine reads them: the push fails with
    a RedisEnginesError naming the object (FAULTS: ObjectIntegrityError); nothing is set."""
    client = paged_cluster
    client.push({"kept": 1}, targets=0)
    gate = gates()
    held = gate.hold(client, 0)
    f = client.push({"arr": ARRAY}, targets=0, block=False)
    (_, fields), = r.xrange(inbox(cluster_name, 0), "-", "+")[-1:]
    oid = fields[b"obj"].decode()
    tamper(r, cluster_name, oid, how)
    gate.open()
    assert held.result(timeout=WAIT) is None

    err = f.exception(WAIT)
    if err is None:
        got = client.pull("arr", targets=0)
        pytest.fail(f"the engine accepted object {oid} ({how} of its pages) without an error "
                    f"(its data {'equals' if np.array_equal(got, ARRAY) else 'differs from'} "
                    "what was pushed)")
    assert isinstance(err, RedisEnginesError) and err.engine_id == 0, repr(err)
    assert oid in str(err)
    assert isinstance(err, ObjectLostError if how == "delete" else ObjectIntegrityError)
    assert client.keys(targets=0) == ["kept"]  # nothing half-applied
    assert client.pull("kept", targets=0) == 1
    assert_settled(client, r, cluster_name)
    for key in object_keys(r, cluster_name):  # what is left of it expires
        assert r.pttl(key) > 0, key


@pytest.mark.parametrize("how", ["truncate", "delete", "swap"])
def test_fault_38_tampered_pages_of_a_pulled_result(paged_cluster, r, cluster_name,
                                                    how) -> None:
    """The pages of a large result are damaged after the engine wrote them and before the
    client reads them: result() raises a RedisEnginesError naming the object."""
    client = paged_cluster
    client.push({"arr": ARRAY}, targets=0)
    f = client.pull("arr", targets=0, block=False)
    assert f.wait(WAIT)  # the notice arrived; the pages are read by result()
    oid = r.hget(result_key(cluster_name, cmd_id(f)), "obj").decode()
    tamper(r, cluster_name, oid, how)

    try:
        got = f.result(timeout=WAIT)
    except RedisEnginesError as exc:
        err = exc
    else:
        pytest.fail(f"result object {oid} ({how} of its pages) was returned without an error (data "
                    f"{'equals' if np.array_equal(got, ARRAY) else 'differs from'} the original)")
    assert err.engine_id == 0 and oid in str(err)
    assert isinstance(err, ObjectLostError if how == "delete" else ObjectIntegrityError)
    np.testing.assert_array_equal(client.pull("arr", targets=0), ARRAY)  # the source is intact
    assert_settled(client, r, cluster_name)


# ----------------------------------------------------- #41: clear_queue while busy
def test_fault_41_clear_queue_during_execution(client, gates, r, cluster_name) -> None:
    client.push({"kept": 1}, targets=0)
    done_before = client.queue_status(targets=0)["completed"]
    gate = gates()
    held = gate.hold(client, 0)
    queued: list[Future] = []
    for i in range(20):
        kind = i % 4
        if kind == 0:
            queued.append(client.execute(f"x{i} = {i}", targets=0, block=False))
        elif kind == 1:
            queued.append(client.push({f"p{i}": i}, targets=0, block=False))
        elif kind == 2:
            queued.append(client.apply(_echo_fn, i, targets=0, block=False))
        else:
            queued.append(echo.options(client=client, engine=0).remote(i))
    other = client.execute("y = 1", targets=1, block=False)
    assert client.queue_status(targets=0) == {"queued": 20, "running": 1,
                                              "completed": done_before}

    assert client.clear_queue(targets=0) == 20
    for f in queued:
        with pytest.raises(CancelledError):
            f.result(timeout=WAIT)
        assert f.cancelled()
        fields = r.hgetall(result_key(cluster_name, cmd_id(f)))  # visible to any client
        assert fields[b"status"] == b"error" and b"CancelledError" in fields[b"error"]
    assert client.queue_status(targets=0) == {"queued": 0, "running": 1,
                                              "completed": done_before}
    assert not held.done()  # the running command is unaffected...

    gate.open()
    assert held.result(timeout=WAIT) is None  # ...and completes normally
    assert other.result(timeout=WAIT) is None
    wait_until(lambda: pel(r, inbox(cluster_name, 0)) == 0, what="engine 0's PEL to empty")
    assert r.xlen(inbox(cluster_name, 0)) == 0
    assert client.execute("after = 2", targets=0) is None
    assert client.keys(targets=0) == ["after", "kept"]  # none of the dropped ones ran
    assert client.queue_status(targets=0) == {"queued": 0, "running": 0,
                                              "completed": done_before + 3}
    assert_settled(client, r, cluster_name)


def test_fault_41_dropped_push_releases_its_pages(client, gates, r, cluster_name) -> None:
    """A queued push of a paged object is dropped by clear_queue: nobody will ever read
    its pages, so they must go with it (not linger for result_ttl, a day by default).

    Stricter than the letter of FAULTS #41 (which asks for a consistent PEL): the engine
    releases a push's object when it runs it, so a dropped push must release it too."""
    gate = gates()
    held = gate.hold(client, 0)
    f = client.push({"big": bytes(2 << 20)}, targets=0, block=False)
    (_, fields), = r.xrange(inbox(cluster_name, 0), "-", "+")[-1:]
    oid = fields[b"obj"].decode()
    assert client.clear_queue(targets=0) == 1
    with pytest.raises(CancelledError):
        f.result(timeout=WAIT)
    gate.open()
    held.result(timeout=WAIT)
    left = sorted(k.decode() for k in object_keys(r, cluster_name) if oid.encode() in k)
    assert left == [], f"the dropped push's object {oid} is still in Redis: {left[:3]}..."


# ------------------------------------------------- #12: client dies mid-push
class ThrottledProxy:
    """A TCP proxy to Redis that forwards client->server data slowly (a slow link), so that
    a large pipelined write is still in flight when the client is killed."""

    def __init__(self, upstream: tuple[str, int], chunk: int = 64 * 1024,
                 pause: float = 0.005) -> None:
        self.upstream, self.chunk, self.pause = upstream, chunk, pause
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                down, _ = self.listener.accept()
                up = socket.create_connection(self.upstream)
            except OSError:
                return
            self._sockets += [down, up]
            for src, dst, slow in ((down, up, True), (up, down, False)):
                t = threading.Thread(target=self._pump, args=(src, dst, slow), daemon=True)
                self._threads.append(t)
                t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, slow: bool) -> None:
        try:
            while True:
                data = src.recv(self.chunk)
                if not data:
                    break
                dst.sendall(data)
                if slow and self._closed.wait(self.pause):
                    break
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._closed.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        except OSError:
            pass
        self.listener.close()
        for s in list(self._sockets):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(5)
        for s in self._sockets:
            s.close()


CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    import redisengines
    client = redisengines.connect(sys.argv[1], cluster=sys.argv[2])
    arr = np.ones(50 * 2**20 // 8)  # 50 MiB
    print("pushing", flush=True)
    client.push({"big": arr})
    print("pushed", flush=True)
""")


def test_fault_12_client_dies_mid_push(client, r, cluster_name, server_url) -> None:
    client.push({"kept": 1})
    before = snapshot(r, cluster_name)
    assert not object_keys(r, cluster_name)
    url = urlparse(server_url)
    proxy = ThrottledProxy((url.hostname, url.port))
    via_proxy = url._replace(netloc=url.netloc.replace(f"{url.hostname}:{url.port}",
                                                       f"127.0.0.1:{proxy.port}")).geturl()
    env = {**os.environ, "REDISENGINES_PAGE_SIZE": str(1 << 20),
           "REDISENGINES_RESULT_TTL": "3"}
    child = subprocess.Popen([sys.executable, "-c", CHILD,
                              via_proxy, cluster_name],
                             env=env, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert child.stdout.readline() == b"pushing\n"
        wait_until(lambda: pages(r, cluster_name), timeout=20, what="the first pages")
        assert child.poll() is None, "the push finished before the kill: no fault injected"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(WAIT)
    finally:
        proxy.close()
        child.kill()
        child.wait()
        child.stdout.close()
    written = pages(r, cluster_name)
    ttls = {k: r.pttl(k) for k in written}
    assert written and all(t > 0 or t == -2 for t in ttls.values()), ttls  # -2: expired
    assert any(t > 0 for t in ttls.values())
    assert manifests(r, cluster_name) == set()  # never committed: the object is invisible
    after = snapshot(r, cluster_name)
    assert after.streams == before.streams  # nothing was queued for the engines
    wait_until(lambda: not object_keys(r, cluster_name), timeout=15,
               what="the orphan pages to expire")
    # the engines never noticed
    assert client.ids == [0, 1]
    assert client.pull("kept") == {0: 1, 1: 1}
    assert client.keys() == {0: ["kept"], 1: ["kept"]}
    assert_settled(client, r, cluster_name)
