"""Ray-style remote functions and actors, on the same engines, streams and Redis futures.

* ``f.remote(...)`` goes to the shared stream ``P:tasks``: the first idle engine takes it
  (group ``engine``; an engine takes several only while they are short, and gives back
  those behind one that turns out slow, so no engine hoards calls). ``f.options(engine=1)``
  sends it to that engine's inbox instead.
* ``Cls.remote(...)`` creates an actor on one engine; ``handle.method.remote(...)`` goes to
  that engine's inbox, so calls to one actor run one at a time, in the order they were sent.
* A future passed as an argument travels as a :class:`~redisengines.protocol.FutureRef`:
  the engine reads the value from Redis, never through the client. A call waits on the
  client until its future arguments are done (so no engine sits blocked on an upstream
  call, which could deadlock a small cluster); if one failed, the call fails with its error.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import logging
import threading
import uuid
from concurrent.futures import CancelledError, InvalidStateError
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import cloudpickle

from .connection import BLOCK_SECONDS, translate_errors
from .errors import (
    ActorDiedError,
    QueueFullError,
    RedisEnginesError,
    SerializationError,
    system_record,
)
from .futures import PendingResult
from .keys import ENGINE_GROUP
from .protocol import FutureRef, entry, limit_field
from .serialization import Serialized
from .watchdog import Watchdog

if TYPE_CHECKING:
    from .coordinator import Client

R = TypeVar("R")
log = logging.getLogger(__name__)

# Re-queues of a load-balanced call whose engine died (Ray's default); actors: none.
DEFAULT_MAX_RETRIES = 3
# Key of a load-balanced call in a PendingResult's cmd_ids: the engine is not known yet.
ANY_ENGINE = -1


@dataclass(frozen=True, kw_only=True)
class CallOptions:
    """Per-call options: ``engine`` (run there instead of load-balancing), ``timeout`` (seconds
    the call may wait, for its arguments and in the queue, before it starts; then it fails
    with TimeoutError), ``time_limit`` (seconds it may run; then it is interrupted on its
    engine and fails with TimeLimitExceeded), ``max_retries`` (re-queues if its engine
    dies), ``name`` (actors)."""

    engine: int | None = None
    timeout: float | None = None
    time_limit: float | None = None
    max_retries: int | None = None
    name: str | None = None


class _Pickled:
    """A function or class pickled once; engines cache the unpickled object by digest."""

    def __init__(self, obj: Any) -> None:
        try:
            self.blob = cloudpickle.dumps(obj, protocol=5)
        except Exception as exc:
            raise SerializationError(
                f"cannot serialize {getattr(obj, '__qualname__', obj)!r}: "
                f"{type(exc).__name__}: {exc}") from exc
        self.digest = hashlib.sha1(self.blob).hexdigest()


# ------------------------------------------------------------------------- sending
@dataclass(eq=False)
class _Call:
    pending: PendingResult
    lane: str  # calls in one lane are sent in order (an actor's calls share one)
    stream: str
    fields: dict[str, Any]
    deps: list[PendingResult]
    sent: tuple[str, str] | None = None  # (stream, entry id) once sent
    # The submit.lua call that sends it, made (and signed) when its arguments are ready, on
    # the thread that finds them ready: the sender thread only sends.
    submission: tuple[Any, ...] = ()
    actor: ActorHandle | None = None  # an actor call: fails if the actor failed to start


class Dispatcher:
    """Sends a client's calls: each once its future arguments are done, in order per lane.

    A call whose arguments are ready goes to the outbox; a sender thread sends what the
    outbox holds in one pipeline (``submit.lua`` per call, one round trip per batch), so a
    burst of ``.remote()`` calls costs the caller no round trip each. A call that comes
    alone (no other call of this client unsettled, nothing to send or being sent, and the
    last send reached Redis) is sent by its caller at once instead, in one round trip, as
    ``execute`` is: it then wakes no other thread on its way out (the sender would wait for
    the GIL first), which saves a single call about 0.05-0.1 ms here. Lanes stay in order:
    one send is under way at a time (``_flight``), each in order.
    """

    BATCH_MAX = 1000  # calls per pipeline

    def __init__(self, client: Client) -> None:
        self.client = client
        self._lock = threading.Lock()
        self._lanes: dict[str, collections.deque[_Call]] = {}
        self._calls: dict[int, _Call] = {}  # id(pending) -> call, until it is settled
        self._outbox: collections.deque[_Call] = collections.deque()
        self._wake = threading.Event()
        self._flight: threading.Event | None = None  # set once the send under way is done
        # Whether the last send reached Redis: while it does not, callers leave their calls
        # to the sender (one batch waits out the retries, not every call in turn).
        self._reaching = True
        # Calls put in the outbox and calls whose sending ended (sent or failed), counted
        # so that flush() waits for what was in the outbox when it was called, and no more.
        self._queued = self._done = 0
        self._sent_cond = threading.Condition(self._lock)
        self._sender: threading.Thread | None = None
        self._closed = False
        self._timeouts = Watchdog(name=f"re-timeouts-{client.client_id}")

    def submit(self, call: _Call, timeout: float | None) -> PendingResult:
        with self._lock:
            if self._closed:
                raise RuntimeError("this client is closed")
            self._lanes.setdefault(call.lane, collections.deque()).append(call)
            self._calls[id(call.pending)] = call
        call.pending.add_done_callback(self._settled)
        if timeout is not None:
            self._timeouts.arm(id(call), timeout, lambda: self._expire(call, timeout))
        for dep in call.deps:
            dep.add_done_callback(lambda _, lane=call.lane: self._pump(lane))
        self._pump(call.lane, caller=True)
        return call.pending

    def close(self) -> None:
        """Stop sending; calls not sent yet fail (nothing would ever send them)."""
        with self._lock:
            self._closed = True
            unsent = list(self._outbox) + [c for q in self._lanes.values() for c in q]
            self._done += len(self._outbox)
            self._sent_cond.notify_all()
            self._outbox.clear()
            self._lanes.clear()
        self._wake.set()
        if self._sender is not None and self._sender is not threading.current_thread():
            self._sender.join(timeout=5)
        self._timeouts.stop()
        for call in unsent:
            self._drop(call.pending, RedisEnginesError(
                f"the client was closed before {call.pending.op} {_cmd_id(call.pending)} "
                "was sent"))

    def _pump(self, lane: str, caller: bool = False) -> None:
        """Move the calls of ``lane`` whose arguments are ready to the outbox. ``caller``:
        on the thread that made the call, which sends it itself if it comes alone."""
        # Futures are settled after the lock is released: their callbacks take it too.
        failures: list[tuple[PendingResult, BaseException]] = []
        direct: _Call | None = None
        with self._lock:  # sending under the lock keeps each lane in order
            queue = self._lanes.get(lane)
            while queue and all(d.done() for d in queue[0].deps):
                call = queue.popleft()
                error = next(filter(None, map(_failure, call.deps)), None)
                if error is None and call.actor is not None:
                    error = call.actor._start_failure(dict(failures))
                if error is None:
                    try:
                        call.submission = self.client._submission(
                            call.stream, _cmd_id(call.pending), call.fields)
                    except Exception as exc:  # (this call fails, not the caller)
                        error = exc
                if error is not None:
                    failures.append((call.pending, error))
                    continue
                self._outbox.append(call)
                self._queued += 1
            if queue is not None and not queue:
                del self._lanes[lane]
            if caller and self._reaching and len(self._outbox) == 1 \
                    and not self._wake.is_set() \
                    and (self._flight is None or self._flight.is_set()) \
                    and self._alone(self._outbox[0]):
                direct = self._outbox.popleft()
                flight = self._flight = threading.Event()
            elif self._outbox:
                self._start_sender()
                if not self._wake.is_set():  # (set: the sender is yet to take the outbox,
                    self._wake.set()         # under this lock, so it takes this call too)
        for pending, exc in failures:
            pending.set_exception(exc)
        if direct is not None:
            self._send_flight([direct], flight, None)

    def _alone(self, call: _Call) -> bool:  # (under the lock)
        """No other call of this client is unsettled: at most one other is still known, and
        it is done (its caller may see the result before the listener's callbacks ran)."""
        return len(self._calls) <= 2 and all(
            c is call or c.pending.done() for c in self._calls.values())

    def _send_flight(self, batch: list[_Call], flight: threading.Event,
                     before: threading.Event | None) -> None:
        """Send ``batch`` once the send ``before`` it is done; then ``flight`` is over."""
        try:
            if before is not None:
                before.wait()
            self._reaching = self._send(batch)
        finally:
            flight.set()
            with self._lock:
                self._done += len(batch)
                self._sent_cond.notify_all()

    def _start_sender(self) -> None:  # (under the lock)
        if self._sender is None:
            self._sender = threading.Thread(target=self._send_loop, daemon=True,
                                            name=f"re-sender-{self.client.client_id}")
            self._sender.start()

    def _send_loop(self) -> None:
        while True:
            self._wake.wait()
            with self._lock:
                self._wake.clear()
                batch = [self._outbox.popleft()
                         for _ in range(min(len(self._outbox), self.BATCH_MAX))]
                if self._outbox:
                    self._wake.set()  # more than one batch's worth: go on at once
                if not batch:
                    if self._closed:
                        return
                    continue
                before = self._flight  # (a caller's own send may be under way)
                flight = self._flight = threading.Event()
            try:
                self._send_flight(batch, flight, before)
            except BaseException:  # noqa: B036 - never leave the sender dead
                log.exception("sending %d calls failed", len(batch))

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the calls whose arguments were ready are in Redis (or failed to get
        there): what the client sends or asks next (``execute``, ``queue_status``,
        ``clear_queue``...) comes after the calls it made before. Calls waiting for their
        arguments are not waited for.

        On the sender thread itself (a done-callback of a future it failed) it returns at
        once: that thread cannot wait for its own batch."""
        if threading.current_thread() is self._sender:
            return
        with self._lock:
            target = self._queued
            if not self._sent_cond.wait_for(lambda: self._done >= target, timeout):
                raise TimeoutError(f"calls made before were not sent within {timeout} s")

    def _send(self, batch: list[_Call]) -> bool:
        """Send ``batch`` in one pipeline; what cannot be sent fails its future. Returns
        whether the pipeline reached Redis."""
        client = self.client
        ids = [_cmd_id(call.pending) for call in batch]
        for call, cmd_id in zip(batch, ids, strict=True):
            client._listener.expect(cmd_id, call.pending, _route_engine(call))
        try:
            with translate_errors(batch[0].pending.op):
                entry_ids = client._submit_all([call.submission for call in batch])
        except BaseException as exc:  # noqa: B036 - every future must settle
            client._listener.forget(ids)
            for call in batch:
                self._drop(call.pending, exc)
            if not isinstance(exc, Exception) and threading.current_thread() is not self._sender:
                raise  # (Ctrl-C in a caller sending its own call: its future failed too)
            return False
        client._listener.acknowledged(ids)
        for call, cmd_id, entry_id in zip(batch, ids, entry_ids, strict=True):
            if entry_id is None:
                client._listener.forget([cmd_id])
                self._drop(call.pending, QueueFullError(
                    f"{call.stream} holds {client.settings.max_queue} commands "
                    f"(REDISENGINES_MAX_QUEUE); {call.pending.op} was not queued"))
            else:
                call.sent = (call.stream, entry_id)
        return True

    def _settled(self, pending: PendingResult) -> None:
        with self._lock:
            call = self._calls.pop(id(pending), None)
        if call is not None:
            self._timeouts.disarm(id(call))
            call.deps.clear()  # argument values are no longer needed by this call

    def cancel(self, pending: PendingResult, error: BaseException | None = None) -> bool:
        """Drop a call no engine has started; it ends cancelled, or failed with ``error``."""
        with self._lock:
            call = self._calls.get(id(pending))
            if call is None:
                return False
            queue = self._lanes.get(call.lane)
            unsent = call.sent is None and queue is not None and call in queue
            if unsent:
                queue.remove(call)  # type: ignore[union-attr]
            elif call.sent is None and call in self._outbox:
                self._outbox.remove(call)
                self._done += 1
                self._sent_cond.notify_all()
                unsent = True
            flight = self._flight if call.sent is None and not unsent else None
        if unsent:
            self._drop(pending, error)
            self._pump(call.lane)  # the calls behind it in its lane may go now
            return True
        if flight is not None:  # being sent: once it is queued in Redis, drop it there
            flight.wait(BLOCK_SECONDS)
        if call.sent is None:
            return False
        stream, entry_id = call.sent
        client = self.client
        stored = error or CancelledError(f"{pending.op} {_cmd_id(pending)} was cancelled")
        record = system_record(type(stored).__name__, str(stored))
        dropped = client.scripts.cancel(
            keys=[stream, client.schema.result(_cmd_id(pending)),
                  client.schema.replies(client.client_id)],
            args=[entry_id, _cmd_id(pending), int(client.settings.result_ttl * 1000),
                  json.dumps(record)])
        if int(dropped) != 1:
            return False
        client._listener.forget(list(pending.cmd_ids.values()))
        self._drop(pending, error)
        return True

    def running_on(self, pending: PendingResult) -> int | None:
        """The engine that took a load-balanced call from ``P:tasks`` and has not finished
        it, else None (queued, pinned to its lane, or done)."""
        with self._lock:
            call = self._calls.get(id(pending))
            sent = call.sent if call is not None else None
        if sent is None or sent[0] != self.client.schema.tasks:
            return None
        held = self.client.r.xpending_range(sent[0], ENGINE_GROUP, sent[1], sent[1], 1)
        consumer = held[0]["consumer"].decode() if held else ""
        return int(consumer[1:]) if consumer[1:].isdigit() else None

    @staticmethod
    def _drop(pending: PendingResult, error: BaseException | None) -> None:
        if error is None:
            pending._cancel_locally()
        else:
            try:
                pending.set_exception(error)
            except InvalidStateError:
                pass

    def _expire(self, call: _Call, timeout: float) -> None:  # (the watchdog's thread)
        self.cancel(call.pending, TimeoutError(
            f"{call.pending.op} {_cmd_id(call.pending)} did not start within {timeout} s"))


def _failure(f: PendingResult) -> BaseException | None:
    """The error of a done future, a cancellation included."""
    if f.cancelled():
        return CancelledError(f"{f.op} {_cmd_id(f)}, an argument of this call, was cancelled")
    return f.exception()


def _name(fn: Any) -> str:
    """A readable name for any callable (functions, partials, callable objects)."""
    return str(getattr(fn, "__qualname__", None) or getattr(type(fn), "__qualname__", repr(fn)))


def _cmd_id(pending: PendingResult) -> str:
    return next(iter(pending.cmd_ids.values()))


def _route_engine(call: _Call) -> int:
    return next(iter(call.pending.cmd_ids))


def _references(values: tuple[Any, ...] | dict[str, Any]) -> tuple[Any, list[PendingResult]]:
    """Replace top-level futures by FutureRefs; returns the new values and the futures."""
    deps: list[PendingResult] = []

    def ref(v: Any) -> Any:
        if isinstance(v, PendingResult):
            if len(v.cmd_ids) != 1:
                raise TypeError("only single-target futures can be passed as arguments")
            deps.append(v)
            return FutureRef(_cmd_id(v))
        return v
    if isinstance(values, dict):
        return {k: ref(v) for k, v in values.items()}, deps
    return tuple(ref(v) for v in values), deps


def _call(client: Client, op: str, *, target: int | None, lane: str | None, payload: Any,
          what: str, fields: dict[str, Any], deps: list[PendingResult],
          timeout: float | None, actor: ActorHandle | None = None,
          ser: Serialized | None = None) -> PendingResult:
    """Serialize now (errors raise here, before anything is sent), send when ready."""
    cmd_id = client._new_id()
    eid = ANY_ENGINE if target is None else target
    pending = client._pending(op, {eid: cmd_id}, single=True)
    pending._deps = deps  # type: ignore[attr-defined]  # keeps argument values alive
    pending._canceller = client._dispatcher.cancel
    body = client._payload(payload, 1, what, ser)
    if "obj" in body:
        pending._hold(body["obj"])  # released with the future
    stream = client.schema.tasks if target is None else client.schema.inbox(target)
    call = _Call(pending, lane or cmd_id, stream,
                 entry(op, cmd_id, client.client_id, **fields, **body), deps, actor=actor)
    return client._dispatcher.submit(call, timeout)


# ------------------------------------------------------------------------ functions
class RemoteFunction(Generic[R]):
    """A function made remote by ``@redisengines.remote``; call it with ``.remote(...)``."""

    def __init__(self, fn: Any, options: CallOptions | None = None,
                 client: Client | None = None) -> None:
        self._fn = fn
        self._options = options or CallOptions()
        self._client = client
        self._pickled: _Pickled | None = None
        try:
            functools.update_wrapper(self, fn)
        except AttributeError:  # a partial or callable object: nothing to copy
            pass

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"remote function {_name(self._fn)} cannot be called directly; "
                        "use .remote(...)")

    def options(self, *, engine: int | None = None, timeout: float | None = None,
                time_limit: float | None = None, max_retries: int | None = None,
                client: Client | None = None) -> RemoteFunction[R]:
        """A copy with these options for its calls (engine, timeout, time_limit,
        max_retries)."""
        limit_field(time_limit)  # checked now, not at the first call
        opts = dataclasses.replace(self._options, **{k: v for k, v in (
            ("engine", engine), ("timeout", timeout), ("time_limit", time_limit),
            ("max_retries", max_retries)) if v is not None})
        twin: RemoteFunction[R] = RemoteFunction(self._fn, opts, client or self._client)
        twin._pickled = self._pickled
        return twin

    def remote(self, /, *args: Any, **kwargs: Any) -> PendingResult:
        """Call the function on an engine; returns a future of its return value.

        A call made while this client has no other call unsettled is in Redis when this
        returns (one round trip); calls in a burst are sent in batches by a thread."""
        from .api import default_client
        client = self._client or default_client()
        if self._pickled is None:
            self._pickled = _Pickled(self._fn)
        opts = self._options
        if opts.engine is not None:
            client.verify_targets(opts.engine)
        args, deps = _references(args)
        kwargs, kdeps = _references(kwargs)
        retries = DEFAULT_MAX_RETRIES if opts.max_retries is None else opts.max_retries
        name = _name(self._fn)
        return _call(client, "call", target=opts.engine, lane=None,
                     payload=(self._pickled.digest, self._pickled.blob, args, kwargs),
                     what=f"call of {name}",
                     fields={"fn": name, "retries": retries, **limit_field(opts.time_limit)},
                     deps=deps + kdeps, timeout=opts.timeout)


# --------------------------------------------------------------------------- actors
class ActorClass:
    """A class made remote by ``@redisengines.remote``; ``Cls.remote(...)`` makes an actor."""

    def __init__(self, cls: type, options: CallOptions | None = None,
                 client: Client | None = None) -> None:
        self._cls = cls
        self._options = options or CallOptions()
        self._client = client
        self._pickled: _Pickled | None = None
        self.__name__ = cls.__name__
        self.__qualname__ = cls.__qualname__
        self.__doc__ = cls.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"actor class {self._cls.__qualname__} cannot be instantiated directly;"
                        f" use {self._cls.__name__}.remote(...)")

    def options(self, *, engine: int | None = None, name: str | None = None,
                client: Client | None = None) -> ActorClass:
        """A copy that creates its actor on ``engine`` and/or under ``name``."""
        opts = dataclasses.replace(self._options, **{k: v for k, v in (
            ("engine", engine), ("name", name)) if v is not None})
        twin = ActorClass(self._cls, opts, client or self._client)
        twin._pickled = self._pickled
        return twin

    def remote(self, /, *args: Any, **kwargs: Any) -> ActorHandle:
        """Create the actor on an engine (the least loaded unless ``engine`` was given)."""
        from .api import default_client
        client = self._client or default_client()
        if self._pickled is None:
            self._pickled = _Pickled(self._cls)
        eid = self._options.engine
        if eid is None:
            eid = client._least_loaded()
        else:
            client.verify_targets(eid)
        aid = uuid.uuid4().hex[:12]
        methods = frozenset(m for m in dir(self._cls)
                            if not m.startswith("_") and callable(getattr(self._cls, m, None)))
        handle = ActorHandle(aid, eid, self._cls.__qualname__, methods, self._options.name,
                             client=client)
        a, deps = _references(args)
        kw, kdeps = _references(kwargs)
        payload = (self._pickled.digest, self._pickled.blob, a, kw)
        what = f"actor {self._cls.__qualname__}"
        ser = client._serialized(payload, what)  # fails before the name is taken
        if handle.name is not None:
            client._name_actor(handle)
        handle._created = _call(
            client, "actor_new", target=eid, lane=aid, payload=payload, what=what,
            fields={"actor": aid, "cls": self._cls.__qualname__}, deps=deps + kdeps,
            timeout=None, ser=ser)
        return handle


class ActorHandle:
    """A handle to one actor: ``handle.method.remote(...)``. Can be passed to remote calls."""

    def __init__(self, actor_id: str, engine_id: int, cls_name: str, methods: frozenset[str],
                 name: str | None = None, *, client: Client | None = None) -> None:
        self.actor_id = actor_id
        self.engine_id = engine_id
        self.cls_name = cls_name
        self.name = name
        self._methods = methods
        self._client = client
        self._created: PendingResult | None = None

    def __getattr__(self, method: str) -> ActorMethod:
        if method.startswith("_") or method not in self._methods:
            raise AttributeError(f"actor {self.cls_name} has no method {method!r}")
        return ActorMethod(self, method)

    def __reduce__(self) -> Any:
        return (ActorHandle, (self.actor_id, self.engine_id, self.cls_name, self._methods,
                              self.name))

    def __repr__(self) -> str:
        named = f" {self.name!r}" if self.name else ""
        return f"<Actor {self.cls_name}{named} {self.actor_id} on engine {self.engine_id}>"

    def _start_failure(self, failing: dict[PendingResult, BaseException]
                       ) -> BaseException | None:
        """ActorDiedError if this client saw the actor's creation fail (or is failing it
        right now: ``failing``), else None."""
        created = self._created
        if created is None:
            return None
        error = failing.get(created)
        if error is None and created.done():
            error = _failure(created)
        if error is None:
            return None
        return ActorDiedError(f"actor {self.cls_name} {self.actor_id} failed to start: "
                              f"{type(error).__name__}: {error}", engine_id=self.engine_id)

    @property
    def client(self) -> Client:
        if self._client is None:
            from .api import default_client
            self._client = default_client()
        return self._client


class ActorMethod:
    """``handle.method``; ``.remote(*args, **kwargs)`` returns a future of its return value."""

    def __init__(self, handle: ActorHandle, method: str, timeout: float | None = None,
                 time_limit: float | None = None) -> None:
        self._handle = handle
        self._method = method
        self._timeout = timeout
        self._limit = limit_field(time_limit)

    def options(self, *, timeout: float | None = None,
                time_limit: float | None = None) -> ActorMethod:
        """A copy whose calls wait at most ``timeout`` s to start and run at most
        ``time_limit`` s (then TimeLimitExceeded; the actor lives on)."""
        return ActorMethod(self._handle, self._method, timeout, time_limit)

    def remote(self, /, *args: Any, **kwargs: Any) -> PendingResult:
        h = self._handle
        client = h.client
        if not client._is_live(h.engine_id):
            pending = client._pending("actor_call", {h.engine_id: client._new_id()}, single=True)
            pending.set_exception(ActorDiedError(
                f"actor {h.cls_name} {h.actor_id} lived on engine {h.engine_id}, which is gone",
                engine_id=h.engine_id))
            return pending
        a, deps = _references(args)
        kw, kdeps = _references(kwargs)
        return _call(client, "actor_call", target=h.engine_id, lane=h.actor_id,
                     payload=(a, kw), what=f"call of {h.cls_name}.{self._method}",
                     fields={"actor": h.actor_id, "method": self._method, **self._limit},
                     deps=deps + kdeps, timeout=self._timeout, actor=h)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"actor methods are called with .remote(): "
                        f"handle.{self._method}.remote(...)")
