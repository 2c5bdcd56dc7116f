"""The Ray-style module functions, a thin layer over one default client.

``init()`` sets the default client (the only global); ``remote``, ``get``, ``wait``, ``put``,
``kill``, ``cancel`` and ``get_actor`` use it. Inside an engine, the default client is one
that engine opens on first use, so remote code can call other remote functions and actors.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as futures_wait
from typing import Any, overload

from .cluster import Cluster
from .config import Settings
from .coordinator import Client
from .errors import ActorDiedError
from .futures import PendingResult, refuse_self_wait
from .remote import ActorClass, ActorHandle, CallOptions, RemoteFunction

_lock = threading.Lock()
_client: Client | None = None
_cluster: Cluster | None = None
# Set by an engine process so that remote code gets a client of its own cluster.
engine_settings: Settings | None = None


def init(url: str | None = None, n: int = 2, *, cluster: str | None = None,
         **settings: Any) -> Client:
    """Set and return the default client.

    With no ``url`` (and no ``REDISENGINES_REDIS_URL``), start a local cluster of ``n``
    engines on an embedded server, stopped by :func:`shutdown` or at exit. With a URL,
    connect to the cluster that runs there.
    """
    global _client, _cluster
    with _lock:
        if _client is not None:
            raise RuntimeError("redisengines.init() was already called; "
                               "call redisengines.shutdown() first")
        s = Settings.from_env(redis_url=url, cluster=cluster, **settings)
        if s.redis_url:
            _client = Client(s.redis_url, cluster=s.cluster, settings=s)
        else:
            _cluster = Cluster(n, settings=s).start()
            _client = _cluster.client()
        return _client


def shutdown() -> None:
    """Close the default client and stop what :func:`init` started. Idempotent."""
    global _client, _cluster
    with _lock:
        client, cluster, _client, _cluster = _client, _cluster, None, None
    if client is not None:
        client.close()
    if cluster is not None:
        cluster.stop()


def default_client() -> Client:
    """The client of :func:`init` (inside an engine: a client of the engine's cluster)."""
    global _client
    with _lock:
        if _client is None and engine_settings is not None:
            s = engine_settings
            _client = Client(s.redis_url or "", cluster=s.cluster, settings=s)
        if _client is None:
            raise RuntimeError("no default client: call redisengines.init() first, or pass a "
                               "client with .options(client=...)")
        return _client


@overload
def remote(obj: type) -> ActorClass: ...
@overload
def remote(obj: Any) -> RemoteFunction[Any]: ...
def remote(obj: Any) -> Any:
    """Decorator: a function becomes a :class:`RemoteFunction`, a class an :class:`ActorClass`.

    ``f.remote(*args, **kwargs)`` returns a future right away; ``f.options(engine=...,
    timeout=..., max_retries=...)`` changes one call. ``Cls.remote(...)`` creates an actor.
    """
    if isinstance(obj, type):
        return ActorClass(obj, CallOptions())
    if callable(obj):
        return RemoteFunction(obj, CallOptions())
    raise TypeError(f"@remote applies to functions and classes, not {type(obj).__name__}")


def get(refs: Future | Sequence[Future], timeout: float | None = None) -> Any:  # type: ignore[type-arg]
    """The value of a future, or the values of a list of futures in the same order.

    Raises the first failure in list order, and ``TimeoutError`` (the futures stay usable)
    if they are not all done within ``timeout`` seconds.
    """
    if isinstance(refs, Future):
        return refs.result(timeout)
    futures = list(refs)
    _check_futures(futures)
    for f in futures:
        refuse_self_wait(f)
    done, not_done = futures_wait(futures, timeout)
    if not_done:
        raise TimeoutError(f"{len(not_done)} (of {len(futures)}) futures unfinished "
                           f"after {timeout} s")
    return [f.result() for f in futures]


def wait(refs: Sequence[Future], num_returns: int = 1,  # type: ignore[type-arg]
         timeout: float | None = None) -> tuple[list[Future], list[Future]]:  # type: ignore[type-arg]
    """``(ready, pending)``: at least ``num_returns`` done futures, or all done by ``timeout``.

    Both lists hold the very objects given, in input order; ``ready`` has at most
    ``num_returns`` of them.
    """
    futures = list(refs)
    _check_futures(futures)
    if not 0 <= num_returns <= len(futures):
        raise ValueError(f"num_returns must be between 0 and {len(futures)}")
    if len(set(map(id, futures))) != len(futures):
        raise ValueError("wait() got the same future twice")
    deadline = None if timeout is None else time.monotonic() + timeout
    while sum(f.done() for f in futures) < num_returns:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        futures_wait([f for f in futures if not f.done()], left, return_when=FIRST_COMPLETED)
    ready: list[Future] = []  # type: ignore[type-arg]
    pending: list[Future] = []  # type: ignore[type-arg]
    for f in futures:
        (ready if f.done() and len(ready) < num_returns else pending).append(f)
    return ready, pending


def put(value: Any) -> PendingResult:
    """Store ``value`` in Redis once; pass the returned future to any number of calls."""
    return default_client().put(value)


def kill(actor: ActorHandle) -> None:
    """Kill an actor: calls sent before run, later calls fail with ActorDiedError."""
    if not isinstance(actor, ActorHandle):
        raise TypeError(f"kill() takes an actor handle, not {type(actor).__name__}")
    actor.client._kill_actor(actor)


def cancel(future: PendingResult) -> bool:
    """Cancel a remote call that has not started; True if it was cancelled."""
    if not isinstance(future, PendingResult):
        raise TypeError(f"cancel() takes a future of a remote call, not {type(future).__name__}")
    return default_client().cancel(future)


def get_actor(name: str) -> ActorHandle:
    """The handle of the actor created under ``name``, from any client."""
    client = default_client()
    record = client.actor_record(name)
    if record is None:
        raise ValueError(f"no actor named {name!r} in cluster {client.cluster!r}")
    handle = ActorHandle(record["actor"], record["engine"], record["cls"],
                         frozenset(record["methods"]), name, client=client)
    if not client._is_live(handle.engine_id):
        raise ActorDiedError(f"actor {name!r} lived on engine {handle.engine_id}, which is gone",
                             engine_id=handle.engine_id)
    return handle


def _check_futures(futures: Iterable[Any]) -> None:
    for f in futures:
        if not isinstance(f, Future):
            raise TypeError(f"expected futures, got {type(f).__name__}")
