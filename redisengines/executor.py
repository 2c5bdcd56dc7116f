"""A ``concurrent.futures.Executor`` whose calls run on the engines, load-balanced.

``Executor.submit(fn, ...)`` is ``fn.remote(...)`` of a :class:`~redisengines.RemoteFunction`:
the call goes to the shared stream ``P:tasks`` and the first free engine runs it. ``map``
with ``chunksize > 1`` sends one call per chunk, as ``ProcessPoolExecutor`` does.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .errors import RedisEnginesError
from .futures import PendingResult
from .remote import RemoteFunction

if TYPE_CHECKING:
    from .coordinator import Client

_Caller = Callable[[tuple[Any, ...], dict[str, Any]], PendingResult]
# The results of a chunk's items before the one that raised travel on its exception.
_DONE = "_redisengines_done"


def _apply(fn: Any, /, *args: Any, **kwargs: Any) -> Any:
    """Runs on an engine: a callable that RemoteFunction cannot name (partial, instance)."""
    return fn(*args, **kwargs)


def _run_chunk(fn: Callable[..., Any], chunk: tuple[tuple[Any, ...], ...]) -> list[Any]:
    """Runs on an engine: ``fn`` over a chunk of argument tuples (a ``map`` with chunksize)."""
    done: list[Any] = []
    for args in chunk:
        try:
            done.append(fn(*args))
        except BaseException as exc:
            setattr(exc, _DONE, done)
            raise
    return done


class Executor(concurrent.futures.Executor):
    """A ``concurrent.futures.Executor`` over the engines' load-balanced remote calls.

    Each call runs on whichever engine is free first. Functions travel by value when
    cloudpickle can send them so (module-level functions of importable modules go by
    reference: the engines must be able to import them). Futures are
    :class:`~redisengines.PendingResult` objects; a future given as a top-level argument is
    replaced by its value on the engine. ``Future.cancel()`` drops a call no engine has
    started, as ``shutdown(cancel_futures=True)`` does for all of them; a started call runs
    to its end. Shutting the executor down never closes its client.

    Args:
        client: the client whose engines run the calls; default: the default client
            (see :func:`redisengines.init`), taken now.
        max_retries: re-queues of a call whose engine died (default: RemoteFunction's).

    Attributes:
        client: the client given or taken.

    Raises:
        RuntimeError: ``client`` is None and there is no default client.
    """

    def __init__(self, client: Client | None = None, *, max_retries: int | None = None) -> None:
        if client is None:
            from .api import default_client
            client = default_client()
        if max_retries is not None and max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.client = client
        self._max_retries = max_retries
        self._lock = threading.Lock()  # submit and shutdown exclude each other
        self._pending: dict[PendingResult, None] = {}  # this executor's unfinished futures
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> PendingResult:
        """Schedule ``fn(*args, **kwargs)`` on an engine.

        Returns:
            A future of its return value; it raises what ``fn`` raised (a RemoteError that
            is also an instance of the original class).

        Raises:
            RuntimeError: the executor was shut down.
            SerializationError: ``fn`` or an argument cannot be pickled (nothing was sent).
        """
        return self._submit(self._caller(fn), args, kwargs)

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any],
            timeout: float | None = None, chunksize: int = 1) -> Iterator[Any]:
        """Like ``map(fn, *iterables)``, with every call submitted at once.

        Args:
            fn: a callable taking one argument from each iterable (stops at the shortest).
            timeout: seconds from this call after which ``__next__`` raises TimeoutError if
                the next result is not ready; None waits without limit.
            chunksize: items sent per remote call; >1 saves round trips for small calls.

        Returns:
            An iterator of the results in input order. It raises an item's error when that
            item is reached, after the results before it; leaving it early cancels the calls
            not started yet.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        end = None if timeout is None else time.monotonic() + timeout
        items: Iterable[tuple[Any, ...]] = zip(*iterables, strict=False)  # the shortest
        if chunksize > 1:  # one call per chunk: _run_chunk(fn, chunk)
            caller = self._caller(_run_chunk, (_plain(fn),))
            it = iter(items)
            items = iter(lambda: (tuple(itertools.islice(it, chunksize)),), ((),))
        else:
            caller = self._caller(fn)
        fs: list[PendingResult] = []
        try:
            for args in items:
                fs.append(self._submit(caller, args, {}))
        except BaseException:
            for f in fs:
                self._cancel(f)
            raise
        return self._results(fs, end, chunksize > 1)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Accept no more calls. Safe to call several times; the client stays open.

        Args:
            wait: return only when every call of this executor has finished.
            cancel_futures: cancel the calls no engine has started; their futures raise
                ``CancelledError``. Running calls are not interrupted.
        """
        with self._lock:
            self._shutdown = True
            pending = list(self._pending)
        if cancel_futures:
            for f in pending:
                self._cancel(f)
        if wait:
            concurrent.futures.wait(pending)

    # ------------------------------------------------------------------ internals
    def _caller(self, fn: Any, prefix: tuple[Any, ...] = ()) -> _Caller:
        fn = _plain(fn)
        if not hasattr(fn, "__qualname__"):  # RemoteFunction names its calls by it
            fn, prefix = _apply, (fn, *prefix)
        rf = RemoteFunction(fn).options(client=self.client, max_retries=self._max_retries)
        return lambda args, kwargs: rf.remote(*prefix, *args, **kwargs)

    def _submit(self, caller: _Caller, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> PendingResult:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future = caller(args, kwargs)
            self._pending[future] = None
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._pending.pop(future, None)  # type: ignore[call-overload]

    def _cancel(self, future: PendingResult) -> bool:
        if future.done():
            return False
        try:
            return self.client.cancel(future)
        except RedisEnginesError:  # Redis unreachable: the call's own future reports it
            return False

    def _results(self, fs: list[PendingResult], end: float | None,
                 chunked: bool) -> Iterator[Any]:
        fs.reverse()  # pop from the end: no reference kept to what was yielded
        try:
            while fs:
                f = fs.pop()
                try:
                    value = f.result(None if end is None else end - time.monotonic())
                except BaseException as exc:
                    self._cancel(f)
                    del f
                    if chunked:  # the chunk's items before the failed one
                        yield from _done_before(exc)
                    raise
                del f
                yield from (value if chunked else (value,))
        finally:
            for f in fs:
                self._cancel(f)


def _plain(fn: Any) -> Any:
    """The function under a RemoteFunction (which holds a client, not to be pickled)."""
    return fn._fn if isinstance(fn, RemoteFunction) else fn


def _done_before(exc: BaseException) -> list[Any]:
    """The results a failed chunk carried on its exception (see :func:`_run_chunk`)."""
    original = getattr(exc, "original", None)
    if isinstance(original, BaseException):
        vars(original).pop(_DONE, None)
    return vars(exc).pop(_DONE, None) or []

