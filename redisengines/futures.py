"""Pending results: real ``concurrent.futures.Future`` objects completed from Redis.

One :class:`ReplyListener` thread per client blocks on the client's reply stream
(``XREAD BLOCK``) and routes each completion notice to its :class:`PendingResult`. The
same thread watches the leases of the engines it is waiting on: when one expires it runs
``retire.lua``, whose failure notices arrive through the very same stream. Nothing polls
for results.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import weakref
from collections.abc import Callable, Generator
from concurrent.futures import CancelledError, Future, InvalidStateError
from typing import TYPE_CHECKING, Any

import redis

from . import checks
from .connection import (
    BLOCK_SECONDS,
    connect,
    exchange,
    follow_master,
    lost_master,
    master_address,
    stream_entries,
)
from .errors import (
    ClusterStateLostError,
    CommandLostError,
    CompositeError,
    ConnectionLostError,
    DeserializationError,
    RedisEnginesError,
)
from .registry import retire

if TYPE_CHECKING:
    from .coordinator import Client

log = logging.getLogger(__name__)

Finalize = Callable[[dict[int, Any]], Any]


class PendingResult(Future):  # type: ignore[type-arg]
    """The future result of one command on one or more engines.

    For an int target it resolves to that engine's value (or raises its error); for a list
    of targets or ``"all"``, to ``{engine_id: value}`` (or raises :class:`CompositeError`
    holding each engine's error and the values of those that succeeded). It works with
    ``concurrent.futures.wait``/``as_completed``, ``add_done_callback`` and ``await``.

    Attributes:
        op: the command (``execute``, ``pull``…).
        cmd_ids: ``{engine_id: command id}``; a result is stored at ``P:{r<command id>}``.
    """

    def __init__(self, op: str, cmd_ids: dict[int, str], *, single: bool,
                 finalize: Finalize | None = None) -> None:
        super().__init__()
        # Stays PENDING until settled: whether an engine has started it is known in Redis
        # only, and cancel() must stay possible for a call no engine has taken.
        self.op = op
        self.cmd_ids = cmd_ids
        self.single = single
        self._finalize = finalize
        self._lock = threading.Lock()
        self._values: dict[int, Any] = {}
        self._errors: dict[int, BaseException] = {}
        self._stdout: dict[int, str] = {}
        self._stderr: dict[int, str] = {}
        self._objects: list[str] = []  # paged values held by this result, released at GC
        self._ran_on: int | None = None  # the engine that took a load-balanced call
        self._store: Any = None  # set by the client: reads large values on demand
        self._canceller: Callable[[PendingResult], bool] | None = None
        self._client: Client | None = None  # the client that sent it
        self._on_part: list[Callable[[], None]] = []  # told when an engine answers

    @property
    def engine_ids(self) -> list[int]:
        return list(self.cmd_ids)

    @property
    def engine_id(self) -> int | None:
        """The engine that ran it (single target or remote call), else None."""
        if not self.single:
            return None
        eid = next(iter(self.cmd_ids), None)
        return self._ran_on if eid == -1 else eid

    @property
    def stdout(self) -> str | dict[int, str]:
        """What the command printed: a str for an int target, else ``{engine_id: str}``."""
        return self._per_target(self._stdout)

    @property
    def stderr(self) -> str | dict[int, str]:
        return self._per_target(self._stderr)

    def _per_target(self, d: dict[int, str]) -> str | dict[int, str]:
        if self.single:
            return next(iter(d.values()), "")
        return {eid: d.get(eid, "") for eid in self.cmd_ids}

    def result(self, timeout: float | None = None) -> Any:
        """The value; a large one is read from Redis on the first call."""
        refuse_self_wait(self)
        value = super().result(timeout)
        if isinstance(value, _Paged):
            with self._lock:
                if isinstance(self._result, _Paged):
                    self._result = _Fetched(value, self._store)
                value = self._result.value()
        elif isinstance(value, _Fetched):
            value = value.value()
        return value

    def exception(self, timeout: float | None = None) -> BaseException | None:
        refuse_self_wait(self)
        return super().exception(timeout)

    def cancel(self) -> bool:
        """Cancel a remote call that no engine has started; True if it is now cancelled.

        Commands sent with the multiengine API are not cancelled this way (use
        ``client.clear_queue``); for them this returns False, as for a started call.
        """
        if self.done():
            return self.cancelled()
        return self._canceller(self) if self._canceller is not None else False

    def abort(self) -> None:
        """Interrupt this command on its engines, queued or running (see
        :meth:`Client.abort`); wait for the future to learn how it ended."""
        if self._client is None:
            raise RuntimeError(f"this {self.op} cannot be aborted (it has no client)")
        self._client.abort(self)

    def wait_interactive(self, timeout: float | None = None) -> bool:
        """Wait showing a progress bar (engines done out of targeted, elapsed time, what
        each engine is doing), in a terminal or in Jupyter; True if it is done."""
        from .progress import show_progress

        def answered() -> int:
            with self._lock:
                return len(self._values) + len(self._errors) if not self.done() \
                    else len(self.cmd_ids)

        def subscribe(wake: Callable[[], None]) -> None:
            self._on_part.append(wake)
            self.add_done_callback(lambda _: wake())

        show_progress(len(self.cmd_ids), answered, subscribe, timeout=timeout,
                      client=self._client, what=self.op)
        return self.done()

    def _cancel_locally(self) -> bool:
        """Enter the cancelled state (the call was dropped before any engine took it).

        As an executor does: ``cancel()`` then ``set_running_or_notify_cancel()``, which
        is what wakes ``concurrent.futures.wait``/``as_completed`` waiters.
        """
        with self._lock:  # the notice of the drop and the canceller may both get here
            if self.cancelled():
                return True
            if not Future.cancel(self):
                return False
            self.set_running_or_notify_cancel()
            return True

    def get(self, timeout: float | None = None) -> Any:
        """Alias of :meth:`result`."""
        return self.result(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until done; True if done. Never raises the command's error."""
        try:
            self.exception(timeout)
        except TimeoutError:
            return False
        return True

    def __await__(self) -> Generator[Any, None, Any]:
        return asyncio.wrap_future(self).__await__()

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled() else "done" if self.done() else "pending"
        where = self.engine_ids if -1 not in self.cmd_ids else \
            f"engine {self._ran_on}" if self._ran_on is not None else "any engine"
        return f"<PendingResult {self.op} on {where} {state}>"

    def __reduce__(self) -> Any:
        raise TypeError("a future can only be passed to a remote call as a top-level argument "
                        "(not inside a list, dict or object); pass it directly, or its "
                        ".result()")

    def _hold(self, oid: str) -> None:
        """Keep paged value ``oid`` until this future is garbage collected, then release it
        (the release is registered with the first one: most futures hold none)."""
        if not self._objects and self._client is not None:
            weakref.finalize(self, self._client._unreferenced.extend, self._objects)
        self._objects.append(oid)

    # ------------------------------------------------------------- listener side
    def _deliver(self, engine_id: int, ok: bool, value: Any, stdout: str, stderr: str) -> None:
        with self._lock:
            if engine_id in self._values or engine_id in self._errors or self.done():
                return
            if ok:
                self._values[engine_id] = value
            else:
                self._errors[engine_id] = value
            self._stdout[engine_id] = stdout
            self._stderr[engine_id] = stderr
            last = len(self._values) + len(self._errors) == len(self.cmd_ids)
        for wake in self._on_part:
            wake()
        if last:
            self._settle()

    def _settle(self) -> None:
        try:
            self._set_outcome()
        except InvalidStateError:  # cancelled meanwhile: the cancellation stands
            pass

    def _set_outcome(self) -> None:
        if self._errors:
            if self.single:
                error = next(iter(self._errors.values()))
                if isinstance(error, CancelledError) and self._cancel_locally():
                    return  # dropped by clear_queue or cancel: a real cancelled state
                self.set_exception(error)
            else:
                self.set_exception(CompositeError(self._errors, self._values))
            return
        values = {eid: self._values[eid] for eid in self.cmd_ids}
        try:
            out = self._finalize(values) if self._finalize else values
        except Exception as exc:  # a gather of parts that do not fit together, say
            self.set_exception(exc)
            return
        if self.single and self._finalize is None:
            out = values[next(iter(values))]
        self.set_result(out)


# Set in an engine process to its engine id: code it runs must not wait on its own inbox.
current_engine: int | None = None


def refuse_self_wait(f: Future) -> None:  # type: ignore[type-arg]
    """Raise at once instead of deadlocking: an engine's running command waiting on a
    command queued to that same engine (which can only start after it)."""
    if current_engine is None or f.done() or not isinstance(f, PendingResult):
        return
    if current_engine in f.cmd_ids and threading.current_thread() is threading.main_thread():
        raise RedisEnginesError(
            f"code running on engine {current_engine} waits for {f.op} "
            f"{f.cmd_ids[current_engine]}, queued on engine {current_engine} itself: it can "
            "only start after the current command ends. Run it on another engine, or return "
            "the future instead of waiting for it")


class _Paged:
    """A large value still in Redis (a paged object)."""

    __slots__ = ("oid", "what", "engine_id")

    def __init__(self, oid: str, what: str, engine_id: int) -> None:
        self.oid, self.what, self.engine_id = oid, what, engine_id


class _Fetched:
    """A large value once read: the value, or the error reading it raised (raised each time)."""

    __slots__ = ("_value", "_error")

    def __init__(self, paged: _Paged, store: Any) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        try:
            self._value = store.get(paged.oid, what=paged.what)
        except RedisEnginesError as exc:
            exc.engine_id = paged.engine_id  # type: ignore[attr-defined]
            self._error = exc

    def value(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value


def completed(op: str, value: Any = None, exc: BaseException | None = None) -> PendingResult:
    """A PendingResult that is already done (for calls answered from Redis directly)."""
    f = PendingResult(op, {}, single=True)
    if exc is not None:
        f.set_exception(exc)
    else:
        f.set_result(value)
    return f


class ReplyListener(threading.Thread):
    """Routes completion notices from ``P:{c<client>}:replies`` to pending results."""

    def __init__(self, client: Client, events_from: str) -> None:
        super().__init__(name=f"re-replies-{client.client_id}", daemon=True)
        self.client = client
        self.r = connect(client.transport_url, retries=client.settings.retries, pool_size=2,
                         tls=client.settings.tls)
        self.stream = client.schema.replies(client.client_id)
        self._routes: dict[str, tuple[PendingResult, int]] = {}
        self._acknowledged: set[str] = set()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._last = "0-0"
        self.events = client.schema.events
        self._events_last = events_from
        self._epoch: bytes | None = client.r.get(client.schema.epoch)
        self._run_id = _run_id(client.r)
        # After the server stalled (frozen, paused), leases may have lapsed with the engines
        # alive: they renew within a heartbeat interval, so nobody is reaped before that.
        self._no_reap_until = 0.0

    def expect(self, cmd_id: str, pending: PendingResult, engine_id: int) -> None:
        """Route the notice for ``cmd_id`` to ``pending`` (call before sending the command)."""
        with self._lock:
            self._routes[cmd_id] = (pending, engine_id)

    def acknowledged(self, cmd_ids: list[str]) -> None:
        """Redis accepted these commands (their submission returned)."""
        with self._lock:
            self._acknowledged.update(c for c in cmd_ids if c in self._routes)

    def forget(self, cmd_ids: list[str]) -> None:
        with self._lock:
            for cmd_id in cmd_ids:
                self._routes.pop(cmd_id, None)
                self._acknowledged.discard(cmd_id)

    def close(self) -> None:
        self._closing.set()
        waker = connect(self.client.transport_url, retries=0, tls=self.client.settings.tls)
        try:  # wake the blocked read at once; no retrying if Redis is gone
            waker.xadd(self.stream, {"wake": "1"})
        except redis.RedisError:
            pass
        finally:
            waker.close()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=BLOCK_SECONDS + 1)
        self.r.close()
        # Nothing can complete them any more: fail them rather than leave waiters hanging.
        self._fail_all(RedisEnginesError("the client was closed before this result arrived; "
                                         "it stays readable in Redis by its command id"))

    # ------------------------------------------------------------------ the thread
    def run(self) -> None:
        interval = self.client.settings.heartbeat_interval
        block_ms = int(min(BLOCK_SECONDS, interval) * 1000)
        next_check = time.monotonic() + interval
        failures = 0
        # The blocking read has a connection of its own, held by this thread, and is sent as
        # packed bytes: a result wakes its waiter sooner when this thread goes back to its
        # read (and lets go of the GIL) sooner.
        pool = self.r.connection_pool
        conn = None
        master = None  # where a sentinel URL's master was (follow_master leaves conn alone)
        while not self._closing.is_set():
            try:
                if conn is None:
                    conn = pool.get_connection()
                where = master_address(self.r)
                if where != master:
                    if master is not None:
                        conn.disconnect()
                    master = where
                commands: list[tuple[Any, ...]] = []
                if self._last != "0-0":  # trim what we have read, in the same round trip
                    commands.append(("XTRIM", self.stream, "MINID", self._last))
                commands.append(("XREAD", "COUNT", 512, "BLOCK", block_ms, "STREAMS",
                                 self.stream, self.events, self._last, self._events_last))
                sent = time.monotonic()
                replies = exchange(conn, commands)
                error = next((e for e in replies if isinstance(e, Exception)), None)
                if error is not None:
                    raise error
                if time.monotonic() - sent > block_ms / 1000 + 1.0:
                    self._no_reap_until = time.monotonic() + 2 * interval + 1.0
                failures = 0
                for stream, entries in stream_entries(replies[-1]):
                    if stream == self.events.encode():
                        self._membership(entries)
                    else:
                        self._handle(entries)
                if time.monotonic() >= next_check:
                    self._check_leases()
                    next_check = time.monotonic() + interval
                self._release_unreferenced()
            except (redis.ConnectionError, redis.TimeoutError) as exc:  # silent sockets too
                failures += 1
                if self._closing.is_set():
                    return
                log.warning("reply listener: Redis unreachable: %s", exc)
                self._fail_all(ConnectionLostError(f"lost the connection to Redis: {exc}"))
                time.sleep(min(2.0, 0.1 * 2 ** failures))
            except Exception as exc:
                if self._closing.is_set():
                    return
                if lost_master(exc):
                    # Demoted under us (a URL without a sentinel to find the new master): a
                    # stall while it lasts, then given up on as a lost connection.
                    failures += 1
                    log.warning("reply listener: the server is no master now: %s", exc)
                    self._no_reap_until = time.monotonic() + 2 * interval + 1.0
                    if failures > self.client.settings.retries:
                        self._fail_all(ConnectionLostError(
                            f"the Redis server stopped being a master: {exc}"))
                    time.sleep(min(2.0, 0.1 * 2 ** failures))
                    continue
                log.exception("reply listener: unexpected error")
                time.sleep(0.1)

    def _membership(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        if self._epoch is None:  # the first engine registered since we connected
            self._epoch = self.r.get(self.client.schema.epoch)
        for entry_id, fields in entries:
            self._events_last = entry_id.decode()
            try:
                event, eid = fields[b"event"].decode(), int(fields[b"engine"])
            except (KeyError, ValueError):
                log.warning("ignoring malformed event %s: %r", entry_id, fields)
                continue
            self.client._engine_event(event, eid)
            if event == "registered":  # the runtime check of connect(), for newcomers
                raw = self.r.hget(self.client.schema.engines, eid)
                if raw:
                    checks.mismatches({eid: json.loads(raw)})

    def _handle(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        fetch: list[tuple[str, dict[bytes, bytes]]] = []
        for entry_id, fields in entries:
            self._last = entry_id.decode()
            cmd = fields.get(b"id")
            if cmd is None:
                continue
            cmd_id = cmd.decode()
            if fields.get(b"fetch") == b"1":
                fetch.append((cmd_id, fields))
            else:
                self._route(cmd_id, fields)
        if fetch:
            pipe = self.r.pipeline(transaction=False)
            for cmd_id, _ in fetch:
                pipe.hgetall(self.client.schema.result(cmd_id))
            for (cmd_id, notice), full in zip(fetch, pipe.execute(), strict=True):
                self._route(cmd_id, full or notice)

    def _route(self, cmd_id: str, fields: dict[bytes, bytes]) -> None:
        with self._lock:
            route = self._routes.pop(cmd_id, None)
            self._acknowledged.discard(cmd_id)
        if route is None:
            return
        pending, engine_id = route
        if engine_id == -1 and fields.get(b"engine") is not None:
            pending._ran_on = int(fields[b"engine"])
        oid = fields.get(b"obj")
        if oid is not None and fields.get(b"status") == b"ok":
            try:
                self.client._verify(fields, self.client.schema.result(cmd_id))
            except RedisEnginesError as exc:
                pending._deliver(engine_id, False, exc, "", "")
                return
            pending._hold(oid.decode())
            if pending.single and pending._finalize is None:
                # Fetched on first result(): not on this thread, and not at all for a
                # value that is only passed on to other calls.
                what = f"result of {fields.get(b'op', b'').decode()} from engine {engine_id}"
                pending._deliver(engine_id, True, _Paged(oid.decode(), what, engine_id),
                                 _text(fields.get(b"stdout")), _text(fields.get(b"stderr")))
                return
        try:
            ok, value = self.client._outcome(fields, engine_id,
                                             self.client.schema.result(cmd_id))
        except Exception as exc:  # never drop a notice: its future would wait forever
            log.exception("reply listener: cannot read the result of %s", cmd_id)
            ok, value = False, DeserializationError(
                f"the result of {cmd_id} from engine {engine_id} cannot be read: "
                f"{type(exc).__name__}: {exc}")
        pending._deliver(engine_id, ok, value, _text(fields.get(b"stdout")),
                         _text(fields.get(b"stderr")))

    def _release_unreferenced(self) -> None:
        queue = self.client._unreferenced
        oids = []
        while queue:
            oids.append(queue.popleft())
        if oids:
            self.client.store.release_many(oids)

    def stalled(self) -> bool:
        """True shortly after the server stalled (frozen, paused): lapsed leases are not proof
        of death then; engines renew them within an interval. (After a restart, retire.lua
        itself grants that grace, to every reaper.)"""
        return time.monotonic() < self._no_reap_until

    def _check_state(self) -> bool:
        """Fail everything pending with ClusterStateLostError if the server lost its state
        (its epoch changed: a restart without persistence) or went back in time (a restore
        from an older snapshot: the event stream is behind what we saw). True if lost."""
        schema = self.client.schema
        pipe = self.r.pipeline(transaction=False)
        pipe.get(schema.epoch)
        pipe.xrevrange(schema.events, count=1)
        pipe.time()
        sent = time.time()
        epoch, last, (sec, usec) = pipe.execute()
        signer = self.client.store.signer
        if signer is not None:  # stamps follow the Redis clock, even if ours is stepped
            signer.clock_offset = sec + usec / 1e6 - (sent + time.time()) / 2
        run_id = _run_id(self.r)  # None where INFO is not allowed (an ACL user)
        restarted, self._run_id = run_id != self._run_id, run_id
        newest = last[0][0].decode() if last else "0-0"
        went_back = _stream_id(newest) < _stream_id(self._events_last)
        if self._epoch is None or (epoch == self._epoch and not went_back):
            self._epoch = self._epoch or epoch
            if restarted:  # it kept its data: did it keep our commands?
                self._check_commands()
            return False
        why = ("went back in time (restored from an older snapshot)" if epoch == self._epoch
               else "lost the cluster's state (restarted without persistence?)")
        log.error("Redis %s: failing every pending result", why)
        self._epoch, self._events_last, self._last = epoch, newest, "0-0"
        self._fail_all(ClusterStateLostError(
            f"the Redis server of cluster {self.client.cluster!r} {why}; this command's "
            "outcome is unknown"))
        self.client.get_ids()
        return True

    def _check_commands(self) -> None:
        """After a restart, fail the pending commands Redis no longer knows (accepted after its
        last fsync): their result hash, opened with the entry by submit.lua, is gone."""
        with self._lock:  # only commands whose submission had been acknowledged
            pending = [(c, r) for c, r in self._routes.items() if c in self._acknowledged]
        if not pending:
            return
        pipe = self.r.pipeline(transaction=False)
        for cmd_id, _ in pending:
            pipe.exists(self.client.schema.result(cmd_id))
        for (cmd_id, (future, eid)), known in zip(pending, pipe.execute(), strict=True):
            if known or future.op == "kill":
                continue
            self.forget([cmd_id])
            log.error("command %s was lost when Redis restarted", cmd_id)
            future._deliver(eid, False, CommandLostError(
                f"{future.op} {cmd_id} was accepted, then lost when the Redis server restarted "
                "(written after its last fsync, or restored from an older snapshot); whether an "
                "engine had started it is unknown"), "", "")

    def _check_leases(self) -> None:
        """Reap the engines we wait on whose lease expired; their notices follow."""
        # A sentinel URL: move to a new master now (the run id check below then looks for
        # what the failover lost), not when the old one is reconfigured.
        if follow_master(self.r, self.client.r):
            log.warning("reply listener: the master moved (failover)")
        if self._check_state() or self.stalled():
            return  # (a stall: engines get time to renew their leases first)
        with self._lock:
            waiting = {eid for _, eid in self._routes.values()}
        if -1 in waiting:  # a load-balanced call may be on any engine
            waiting.discard(-1)
            with self.client._lock:
                waiting |= self.client._known
        if not waiting:
            return
        keys = self.client.schema
        order = sorted(waiting)
        pipe = self.r.pipeline(transaction=False)
        for eid in order:
            pipe.exists(keys.heartbeat(eid))
        for eid, alive in zip(order, pipe.execute(), strict=True):
            if not alive:
                n = retire(self.r, keys, eid, "reap", self.client.settings)
                log.info("engine %d lease expired: reaped, %d commands failed", eid, n)
                self.client._engine_gone(eid)

    def _fail_all(self, exc: RedisEnginesError) -> None:
        with self._lock:
            routes, self._routes = self._routes, {}
            self._acknowledged.clear()
        for pending, engine_id in routes.values():
            pending._deliver(engine_id, False, exc, "", "")


def _server_info(r: redis.Redis) -> dict[str, Any]:
    """``INFO server``, or {} where the ACL user may not read it."""
    try:
        return r.info("server")
    except redis.RedisError:
        return {}


def _run_id(r: redis.Redis) -> str | None:
    """The server's run id: it changes when the server restarts."""
    return _server_info(r).get("run_id")


def _stream_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _text(raw: bytes | None) -> str:
    return raw.decode("utf-8", "replace") if raw else ""
