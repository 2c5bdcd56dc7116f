"""The error table of DESIGN.md, row by row, with real engines.

Engine death, foreign stream entries and a lost server are exercised in test_engine.py and
test_connection.py; a wait that times out in test_futures.py.
"""

from __future__ import annotations

import inspect
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import redisengines
from redisengines import (
    Client,
    CompositeError,
    DeserializationError,
    ObjectTooBigError,
    RedisEnginesError,
    RemoteError,
    SerializationError,
)

from .helpers import inbox_last_id, interactive


def raised(call: Callable[[], Any]) -> BaseException:
    """The exception ``call()`` raises (the test fails if it raises none)."""
    try:
        call()
    except BaseException as exc:  # noqa: BLE001
        return exc
    pytest.fail("no exception was raised")


# ------------------------------------------------------------------- serialization
def test_push_of_unpicklable_value_raises_before_sending(client: Client, r: redis.Redis,
                                                         cluster_name: str) -> None:
    client.push({"a": 1})
    before = [inbox_last_id(r, cluster_name, eid) for eid in (0, 1)]
    with pytest.raises(SerializationError) as info:
        client.push({"fine": 2, "mutex": threading.Lock()})
    message = str(info.value)
    assert "mutex" in message           # names the object...
    assert "_thread.lock" in message    # ...and the cause
    assert [inbox_last_id(r, cluster_name, eid) for eid in (0, 1)] == before
    assert client.pull_namespace() == {0: {"a": 1}, 1: {"a": 1}}


def test_pull_of_unpicklable_value_fails_on_the_engine(client: Client) -> None:
    client.execute("import threading\nmutex = threading.Lock()", targets=0)
    err = raised(lambda: client.pull("mutex", targets=0))
    assert isinstance(err, SerializationError)
    assert err.engine_id == 0
    assert "mutex" in str(err)          # names the object...
    assert "_thread.lock" in str(err)   # ...and the cause
    client.execute("x = 1", targets=0)  # the engine keeps serving
    assert client.pull("x", targets=0) == 1


def test_push_serialized_garbage_fails_on_the_engine(client: Client) -> None:
    err = raised(lambda: client.push_serialized({"s": b"not a pickle"}, targets=1))
    assert isinstance(err, DeserializationError)
    assert err.engine_id == 1
    assert "'s'" in str(err)
    assert client.keys(targets=1) == []

    both = raised(lambda: client.push_serialized({"s": b"\x80\x05junk"}))
    assert isinstance(both, CompositeError)
    assert both.results == {}
    assert sorted(both.errors) == [0, 1]
    for eid, e in both.errors.items():
        assert isinstance(e, DeserializationError) and e.engine_id == eid


@pytest.fixture
def engine_only_module(tmp_path: Path) -> tuple[Path, str]:
    """A module file that the engines may import and the client cannot."""
    name = f"engine_only_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("class Thing:\n    def __init__(self, n):\n"
                                         "        self.n = n\n")
    return tmp_path, name


def test_pull_of_value_the_client_cannot_unpickle(client: Client,
                                                  engine_only_module: tuple[Path, str]) -> None:
    where, name = engine_only_module
    client.execute(f"import sys\nsys.path.insert(0, {str(where)!r})\nimport {name}\n"
                   f"thing = {name}.Thing(3)\nn = thing.n", targets=0)
    err = raised(lambda: client.pull("thing", targets=0))
    assert isinstance(err, DeserializationError)
    assert err.engine_id == 0
    assert name in str(err)
    blob = client.pull_serialized("thing", targets=0)  # the bytes themselves are fine
    assert name.encode() in blob
    assert client.pull("n", targets=0) == 3
    assert name not in sys.modules


# --------------------------------------------------------------------- missing names
@pytest.mark.parametrize("call, mentions", [
    (lambda c: c.pull("nope", targets=0), "nope"),
    (lambda c: c.pull(["a", "nope"], targets=0), "nope"),
    (lambda c: c.pull_serialized("nope", targets=0), "nope"),
    (lambda c: c.pull_namespace(targets=0, names=["a", "nope"]), "nope"),
    (lambda c: c.get_result(50, targets=0), "50"),
    (lambda c: c.get_result(-50, targets=0), "-50"),
], ids=["pull", "pull-list", "pull_serialized", "pull_namespace", "get_result",
        "get_result-negative"])
def test_missing_name_is_a_key_error(client: Client, call, mentions: str) -> None:
    client.push({"a": 1}, targets=0)
    try:
        call(client)
    except KeyError as exc:
        err = exc
    else:
        pytest.fail("no KeyError")
    assert isinstance(err, RemoteError)
    assert err.engine_id == 0
    assert mentions in str(err)


def test_missing_name_on_one_of_several_targets(client: Client) -> None:
    client.push({"only0": "here"}, targets=0)
    err = raised(lambda: client.pull("only0"))
    assert isinstance(err, CompositeError)
    assert err.results == {0: "here"}
    assert list(err.errors) == [1]
    assert isinstance(err.errors[1], KeyError)
    assert err.errors[1].engine_id == 1


# ---------------------------------------------------------------------- object size
LIMIT = 1_000_000


@pytest.fixture(params=["settings", "environment"])
def limited(request: pytest.FixtureRequest, make_cluster, monkeypatch: pytest.MonkeyPatch,
            server_url: str, cluster_name: str) -> Iterator[Client]:
    """A client and engines whose max_object_size is LIMIT, set one way or the other."""
    if request.param == "settings":
        yield make_cluster(2, max_object_size=LIMIT).client()
        return
    monkeypatch.setenv("REDISENGINES_MAX_OBJECT_SIZE", str(LIMIT))
    with redisengines.Cluster(2, url=server_url, cluster=cluster_name) as cluster:
        client = redisengines.connect(cluster.url, cluster=cluster.name)
        try:
            yield client
        finally:
            client.close()


def test_push_too_big_raises_before_sending(limited: Client, r: redis.Redis,
                                            cluster_name: str) -> None:
    assert limited.max_object_size == LIMIT
    limited.push({"small": bytes(LIMIT // 2)}, targets=0)
    before = inbox_last_id(r, cluster_name, 0)
    objects_before = set(r.scan_iter(f"re:{cluster_name}:{{o*"))
    with pytest.raises(ObjectTooBigError) as info:
        limited.push({"big": bytes(2 * LIMIT)}, targets=0)
    assert info.value.limit == LIMIT
    assert 2 * LIMIT <= info.value.size < 2 * LIMIT + 1000
    assert inbox_last_id(r, cluster_name, 0) == before
    assert set(r.scan_iter(f"re:{cluster_name}:{{o*")) == objects_before  # no pages written
    assert limited.keys(targets=0) == ["small"]


def test_pull_too_big_is_raised_by_the_engine(limited: Client) -> None:
    limited.execute(f"big = bytes({2 * LIMIT})\nsmall = len(big)", targets=1)
    err = raised(lambda: limited.pull("big", targets=1))
    assert isinstance(err, ObjectTooBigError)
    assert err.engine_id == 1
    assert err.limit == LIMIT
    assert 2 * LIMIT <= err.size < 2 * LIMIT + 1000
    assert limited.pull("small", targets=1) == 2 * LIMIT


# ----------------------------------------------------------------- user exceptions
@interactive
class CustomError(Exception):
    """An exception class of the user's own."""


@interactive
def explode(what):
    if fail:  # noqa: F821 - pushed to each engine
        raise CustomError(f"boom: {what}")
    return f"fine: {what}"


def _raise_line(f: Callable[..., Any]) -> int:
    lines, start = inspect.getsourcelines(f)
    return start + next(i for i, line in enumerate(lines) if "raise " in line)


def test_user_exception_on_one_target(client: Client) -> None:
    code = "x = 1\ndef f(d):\n    return x / d\nf(0)\n"
    try:
        client.execute(code, targets=0)
    except ZeroDivisionError as exc:
        err = exc
    else:
        pytest.fail("no ZeroDivisionError")
    assert isinstance(err, RemoteError)
    assert err.engine_id == 0
    assert "line 3, in f" in err.traceback
    assert "return x / d" in err.traceback
    assert "division by zero" in str(err)
    with pytest.raises(ZeroDivisionError) as original:
        err.raise_original()
    assert type(original.value) is ZeroDivisionError


def test_user_exception_of_a_custom_class(client: Client) -> None:
    client.push({"fail": True}, targets=1)
    err = raised(lambda: client.apply(explode, "now", targets=1))
    assert isinstance(err, CustomError)
    assert isinstance(err, RemoteError)
    assert err.engine_id == 1
    assert f"line {_raise_line(explode)}, in explode" in err.traceback
    assert "boom: now" in str(err)
    with pytest.raises(CustomError) as original:
        err.raise_original()
    assert type(original.value) is CustomError
    assert original.value.args == ("boom: now",)


def test_composite_error_holds_errors_and_results(client: Client) -> None:
    client.push({"fail": False}, targets=0)
    client.push({"fail": True}, targets=1)
    single = raised(lambda: client.apply(explode, "x", targets=1))
    err = raised(lambda: client.apply(explode, "x"))

    assert isinstance(err, CompositeError) and isinstance(err, RedisEnginesError)
    assert err.results == {0: "fine: x"}
    assert list(err.errors) == [1]
    one = err.errors[1]
    assert type(one) is type(single)
    assert isinstance(one, CustomError) and isinstance(one, RemoteError)
    assert (one.engine_id, str(one), one.args, one.traceback) == \
        (single.engine_id, str(single), single.args, single.traceback)
    assert "boom: x" in str(err)
    assert f"line {_raise_line(explode)}, in explode" in err.traceback
    with pytest.raises(CustomError):
        err.raise_original()


def test_composite_error_of_execute(client: Client) -> None:
    client.push({"d": 1}, targets=0)
    client.push({"d": 0}, targets=1)
    err = raised(lambda: client.execute("r = 10 / d"))
    assert isinstance(err, CompositeError)
    assert err.results == {0: None}
    assert isinstance(err.errors[1], ZeroDivisionError) and err.errors[1].engine_id == 1
    assert "division by zero" in str(err)
    assert client.pull("r", targets=0) == 10.0


# -------------------------------------------------------------------- the classes
DESIGN_ERRORS = [
    "ClusterStateLostError", "CompositeError", "DeserializationError", "EngineDiedError",
    "EngineShutdownError", "InvalidTargetError", "ObjectTooBigError", "QueueFullError",
    "RedisEnginesError", "RemoteError", "SerializationError", "TimeLimitExceeded",
]


@pytest.mark.parametrize("name", DESIGN_ERRORS)
def test_error_class_importable_from_the_package(name: str) -> None:
    cls = getattr(redisengines, name)
    assert isinstance(cls, type) and issubclass(cls, Exception)
    assert issubclass(cls, RedisEnginesError)
    assert name in redisengines.__all__


def test_required_subclass_relations() -> None:
    assert issubclass(redisengines.InvalidTargetError, ValueError)
    for name in ("TimeLimitExceeded", "QueueFullError", "ClusterStateLostError",
                 "EngineDiedError", "InvalidTargetError"):
        assert issubclass(getattr(redisengines, name), RedisEnginesError), name


def test_all_is_sorted_and_resolves() -> None:
    names = redisengines.__all__
    assert names == sorted(names)
    assert len(set(names)) == len(names)
    missing = [n for n in names if not hasattr(redisengines, n)]
    assert missing == []
    namespace: dict[str, Any] = {}
    exec("from redisengines import *", namespace)
    assert set(names) <= set(namespace)
