"""The client: targets, commands multiplexed over engines, scatter/gather, barrier.

Commands go to each target's inbox stream (pipelined: one round trip for any number of
targets); results come back through the client's reply stream to :class:`PendingResult`
futures. ``queue_status``, ``clear_queue`` and ``get_result`` are answered from Redis
directly, so they work while an engine is busy; ``kill`` goes out of band through the
engine's control stream.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from typing import Any, Literal

import redis

from . import checks, registry, signing
from .config import Settings
from .connection import connect as redis_connect
from .connection import send_batch, translate_errors
from .errors import (
    CompositeError,
    DeserializationError,
    InvalidTargetError,
    ObjectLostError,
    QueueFullError,
    SerializationError,
    error_from_fields,
    error_from_record,
)
from .futures import Finalize, PendingResult, ReplyListener, completed
from .keys import ENGINE_GROUP, Keys
from .progress import wait_with_progress
from .protocol import entry, limit_field
from .scripts import Scripts
from .serialization import Serialized, check_size, serialize
from .signing import SignatureError, needs_signature
from .store import ObjectStore

log = logging.getLogger(__name__)

Targets = int | Sequence[int] | Literal["all"]


@dataclass(frozen=True)
class Result:
    """The record of one completed command, as ``get_result`` returns it."""

    engine_id: int
    id: str
    op: str
    code: str | None
    value: Any
    error: BaseException | None
    stdout: str
    stderr: str
    started: float | None
    finished: float | None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def duration(self) -> float | None:
        if self.started is None or self.finished is None:
            return None
        return self.finished - self.started


class Client:
    """Drives the engines of one cluster. Use :func:`redisengines.connect` to make one.

    Every command method takes ``targets`` (an engine id, a list of ids, or ``"all"``),
    ``block`` and ``timeout`` (seconds, None = no limit). An int target gives that engine's
    plain value; a list or ``"all"`` gives ``{engine_id: value}``. ``block=False`` returns a
    :class:`PendingResult` instead of waiting.
    """

    def __init__(self, url: str, *, cluster: str = "default", settings: Settings | None = None,
                 transport_url: str | None = None) -> None:
        self.settings = (settings or Settings.from_env()).replace(redis_url=url, cluster=cluster)
        self.url = url
        self.transport_url = transport_url or url
        self.cluster = cluster
        self.schema = Keys(cluster)
        self.client_id = uuid.uuid4().hex[:16]
        self.r = redis_connect(self.transport_url, retries=self.settings.retries,
                               name=f"re:{cluster}:client", tls=self.settings.tls)
        self.scripts = Scripts(self.r)
        self.store = ObjectStore(self.r, self.schema, self.settings, self.scripts)
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self._known: set[int] = set()
        self._closed = False
        # Paged objects of results whose PendingResult was garbage collected; the reply
        # listener releases them (finalizers must not do I/O in whatever thread runs GC).
        self._unreferenced: collections.deque[str] = collections.deque()
        self._actors_placed: collections.Counter[int] = collections.Counter()
        with translate_errors("connect"):
            if self.store.signer is not None:  # timestamps on the Redis clock
                sec, usec = self.r.time()
                self.store.signer.clock_offset = sec + usec / 1e6 - time.time()
            self.scripts.load("submit", "cancel", "clear_queue", "release_object")
            events_from = registry.last_event_id(self.r, self.schema)
            self.get_ids()
            checks.eviction_policy(self.r)
            checks.mismatches(registry.engines(self.r, self.schema))
        self._listener = ReplyListener(self, events_from)
        self._listener.start()
        from .remote import Dispatcher
        self._dispatcher = Dispatcher(self)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Stop the reply listener and drop the reply stream. Engines keep running."""
        if self._closed:
            return
        self._closed = True
        self._dispatcher.close()
        self._listener.close()
        try:
            self.r.delete(self.schema.replies(self.client_id))
        except redis.RedisError:
            pass
        self.store.close()
        self.r.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Client cluster={self.cluster!r} url={self.url!r}>"

    @property
    def max_object_size(self) -> int:
        """Largest serialized object, in bytes, that push accepts and pull returns."""
        return self.settings.max_object_size

    # -------------------------------------------------------------------- targets
    @property
    def ids(self) -> list[int]:
        """Ids of the live engines, sorted."""
        return self.get_ids()

    def get_ids(self) -> list[int]:
        listener = getattr(self, "_listener", None)
        reap = listener is None or not listener.stalled()
        with translate_errors("ids"):
            live = registry.live_ids(self.r, self.schema, self.settings, self.scripts, reap)
        with self._lock:
            self._known = set(live)
        return live

    def verify_targets(self, targets: Targets) -> list[int]:
        """The ids ``targets`` names; :class:`InvalidTargetError` for any that is not live."""
        return self._targets(targets)[0]

    def _targets(self, targets: Targets) -> tuple[list[int], bool]:
        if isinstance(targets, str):
            if targets != "all":
                raise InvalidTargetError(f"targets must be an int, a list of ints or 'all', "
                                         f"not {targets!r}")
            with self._lock:  # kept current by the listener, which follows P:events
                ids = sorted(self._known)
            if not ids:
                ids = self.get_ids()
            if not ids:
                raise InvalidTargetError(f"no live engines in cluster {self.cluster!r}")
            return ids, False
        single = isinstance(targets, int) and not isinstance(targets, bool)
        try:
            wanted = [targets] if single else list(targets)  # type: ignore[list-item]
        except TypeError:
            raise InvalidTargetError(f"targets must be an int, a list of ints or 'all', "
                                     f"not {targets!r}") from None
        if not single and not wanted:
            raise InvalidTargetError("empty list of targets")
        for t in wanted:
            if not isinstance(t, int) or isinstance(t, bool):
                raise InvalidTargetError(f"invalid target {t!r}: engine ids are ints")
        if len(set(wanted)) != len(wanted):
            raise InvalidTargetError(f"duplicate targets in {wanted}")
        with self._lock:
            unknown = set(wanted) - self._known
        if unknown:
            live = set(self.get_ids())
            missing = sorted(set(wanted) - live)
            if missing:
                raise InvalidTargetError(
                    f"no live engine with id {', '.join(map(str, missing))} in cluster "
                    f"{self.cluster!r} (live: {sorted(live)})")
        return wanted, single

    def _is_live(self, engine_id: int) -> bool:
        with self._lock:
            if engine_id in self._known:
                return True
        return engine_id in self.get_ids()

    def _least_loaded(self) -> int:
        """The live engine with the shortest inbox (ties: fewest actors made here, lowest id)."""
        eids, _ = self._targets("all")
        pipe = self.r.pipeline(transaction=False)
        for eid in eids:
            pipe.xlen(self.schema.inbox(eid))
        depth = dict(zip(eids, pipe.execute(), strict=True))
        with self._lock:
            placed = self._actors_placed
            best = min(eids, key=lambda e: (depth[e], placed[e], e))
            placed[best] += 1
        return best

    def _engine_gone(self, engine_id: int) -> None:
        with self._lock:
            self._known.discard(engine_id)

    def _engine_event(self, event: str, engine_id: int) -> None:
        """An entry of ``P:events``: an engine registered, or left (kill, shutdown, reap)."""
        with self._lock:
            if event == "registered":
                self._known.add(engine_id)
            else:
                self._known.discard(engine_id)

    # ------------------------------------------------------------------- sending
    def _new_id(self) -> str:
        return f"{self.client_id}-{next(self._seq)}"

    def _submit(self, op: str, targets: Targets, fields: dict[str, Any] | None = None, *,
                per_target: dict[int, dict[str, Any]] | None = None,
                finalize: Finalize | None = None, block: bool = True,
                timeout: float | None = None, ids: tuple[list[int], bool] | None = None) -> Any:
        """Send one command to each target and return its result (or PendingResult)."""
        if self._closed:
            raise RuntimeError("this client is closed")
        eids, single = ids or self._targets(targets)
        # After this client's .remote() calls made before (sent by the dispatcher's thread):
        # an engine runs one client's commands in the order they were made, whatever API.
        self._dispatcher.flush(timeout)
        cmd_ids = {eid: self._new_id() for eid in eids}
        pending = self._pending(op, cmd_ids, single=single, finalize=finalize)
        for eid, cmd_id in cmd_ids.items():
            self._listener.expect(cmd_id, pending, eid)
        items = []
        for eid, cmd_id in cmd_ids.items():
            extra = per_target[eid] if per_target is not None else (fields or {})
            items.append((self.schema.inbox(eid), cmd_id,
                          entry(op, cmd_id, self.client_id, **extra)))
        try:
            with translate_errors(op):
                entry_ids = self._enqueue(items)
        except BaseException:
            self._listener.forget(list(cmd_ids.values()))
            raise
        self._listener.acknowledged(list(cmd_ids.values()))
        for eid, entry_id in zip(cmd_ids, entry_ids, strict=True):
            if entry_id is None:  # that inbox was full: this part fails, the others run
                self._listener.forget([cmd_ids[eid]])
                pending._deliver(eid, False, QueueFullError(
                    f"engine {eid}'s queue holds {self.settings.max_queue} commands "
                    f"(REDISENGINES_MAX_QUEUE); {op} was not queued there"), "", "")
        return self._finish(pending, block, timeout)

    def _signed(self, fields: dict[str, Any], stream: str) -> dict[str, Any]:
        """``fields`` signed for ``stream`` when the cluster has a key."""
        signer = self.store.signer
        return signer.sign(dict(fields), stream) if signer is not None else fields

    def _enqueue(self, items: list[tuple[str, str, dict[str, Any]]]) -> list[str | None]:
        """Queue commands (stream, command id, fields) in one round trip; see
        :meth:`_submit_all`."""
        return self._submit_all([self._submission(*item) for item in items])

    def _submission(self, stream: str, cmd_id: str, fields: dict[str, Any]) -> tuple[Any, ...]:
        """The ``submit.lua`` call that queues one command on ``stream``, signed now."""
        flat = [x for kv in self._signed(fields, stream).items() for x in kv]
        return ("EVALSHA", self.scripts.submit.sha, 2, stream, self.schema.result(cmd_id),
                self.settings.max_queue, int(self.settings.result_ttl * 1000), *flat)

    def _submit_all(self, commands: list[tuple[Any, ...]]) -> list[str | None]:
        """Send :meth:`_submission` calls in one round trip. Returns each entry id, or None
        where the stream was full. Submitting is idempotent per command id, so a retry after
        a lost reply queues nothing twice.
        """
        replies = send_batch(self.r, commands)
        if any(isinstance(r, redis.exceptions.NoScriptError) for r in replies):
            self.scripts.load("submit")  # SCRIPT FLUSH: load it, send those again
            again = [i for i, r in enumerate(replies)
                     if isinstance(r, redis.exceptions.NoScriptError)]
            for i, reply in zip(again, send_batch(self.r, [commands[i] for i in again]),
                                strict=True):
                replies[i] = reply
        error = next((r for r in replies if isinstance(r, Exception)), None)
        if error is not None:
            raise error
        return [None if r == -1 else r.decode() if isinstance(r, bytes) else r for r in replies]

    def _pending(self, op: str, cmd_ids: dict[int, str], *, single: bool,
                 finalize: Finalize | None = None) -> PendingResult:
        """A PendingResult whose large values are released once it is garbage collected
        (see ``PendingResult._hold``)."""
        pending = PendingResult(op, cmd_ids, single=single, finalize=finalize)
        pending._store = self.store
        pending._client = self
        return pending

    @staticmethod
    def _finish(pending: PendingResult, block: bool, timeout: float | None) -> Any:
        return pending.result(timeout) if block else pending

    def _verify(self, fields: dict[bytes, bytes], key: str) -> None:
        """Refuse a result (stored at ``key``) that would be unpickled unless it was signed."""
        signer = self.store.signer
        if signer is not None and needs_signature(fields):
            signer.verify(fields, key, skip=signing.RESULT)

    def _outcome(self, fields: dict[bytes, bytes], engine_id: int,
                 key: str) -> tuple[bool, Any]:
        """``(ok, value or exception)`` for a result's fields, stored at ``key``."""
        try:
            self._verify(fields, key)
        except SignatureError as exc:
            return False, exc
        if fields.get(b"status") != b"ok":
            return False, error_from_fields(fields)
        if b"value" not in fields and b"obj" not in fields:
            return True, None  # a result without a value (a kill answered by retire.lua)
        op = fields.get(b"op", b"").decode()
        try:
            return True, self.store.decode(fields, what=f"result of {op} from engine {engine_id}")
        except (DeserializationError, ObjectLostError) as exc:
            exc.engine_id = engine_id  # type: ignore[attr-defined]
            return False, exc

    def _serialized(self, obj: Any, what: str) -> Serialized:
        """``obj`` serialized and within ``max_object_size``; nothing is written yet."""
        ser = serialize(obj, what=what)
        check_size(ser, self.settings.max_object_size, what=what)
        return ser

    def _payload(self, obj: Any, n: int, what: str,
                 ser: Serialized | None = None) -> dict[str, Any]:
        """Message fields carrying ``obj`` (or its ``ser``) to ``n`` engines, written once."""
        if ser is None:
            ser = self._serialized(obj, what)
        with translate_errors(what):
            fields = self.store.fields_for(ser, refs=n)
        fields["size"] = ser.nbytes
        return fields

    # ---------------------------------------------------------- the multiengine API
    def execute(self, code: str, targets: Targets = "all", block: bool = True,
                timeout: float | None = None, time_limit: float | None = None) -> Any:
        """Run ``code`` in each target's namespace; ``None`` per engine.

        ``timeout`` bounds the wait here; ``time_limit`` bounds the run there: code still
        running after ``time_limit`` seconds is interrupted on its engine and fails with
        :class:`TimeLimitExceeded` (the engine serves on).
        """
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, not {type(code).__name__}")
        return self._submit("execute", targets, {"code": code, **limit_field(time_limit)},
                            block=block, timeout=timeout)

    def apply(self, f: Callable[..., Any], /, *args: Any, targets: Targets = "all",
              block: bool = True, timeout: float | None = None,
              time_limit: float | None = None, **kwargs: Any) -> Any:
        """Call ``f(*args, **kwargs)`` on each target and return what it returns.

        A function defined interactively (in ``__main__``) runs with the engine's namespace
        as its globals, so it sees the names ``push`` and ``execute`` put there.
        ``time_limit`` as for :meth:`execute`.
        """
        if not callable(f):
            raise TypeError(f"apply needs a callable, not {type(f).__name__}")
        limit = limit_field(time_limit)
        ids = self._targets(targets)
        name = getattr(f, "__qualname__", type(f).__name__)
        fields = self._payload((f, args, kwargs), len(ids[0]), f"call of {name}")
        fields["fn"] = name
        return self._submit("apply", targets, {**fields, **limit}, block=block,
                            timeout=timeout, ids=ids)

    def push(self, namespace: dict[str, Any], targets: Targets = "all", block: bool = True,
             timeout: float | None = None) -> Any:
        """Set names in each target's namespace; the values are serialized and sent once."""
        names = _check_names(namespace)
        ids = self._targets(targets)
        try:
            fields = self._payload(dict(namespace), len(ids[0]), "pushed namespace")
        except SerializationError:
            for name, value in namespace.items():  # name the culprit
                serialize(value, what=repr(name))
            raise
        return self._submit("push", targets, {"names": names, **fields}, block=block,
                            timeout=timeout, ids=ids)

    def pull(self, names: str | Sequence[str], targets: Targets = "all", block: bool = True,
             timeout: float | None = None) -> Any:
        """Values of ``names`` (a name gives its value, a list gives a list)."""
        single, listed = _names(names)
        return self._submit("pull", targets, {"names": listed, "single": single},
                            block=block, timeout=timeout)

    def pull_namespace(self, targets: Targets = "all", names: Sequence[str] | None = None,
                       block: bool = True, timeout: float | None = None) -> Any:
        """A dict of each target's namespace (or of just ``names``)."""
        listed = None if names is None else _names(names)[1]
        return self._submit("pull_namespace", targets, {"names": listed}, block=block,
                            timeout=timeout)

    def keys(self, targets: Targets = "all", block: bool = True,
             timeout: float | None = None) -> Any:
        """The sorted names defined in each target's namespace."""
        return self._submit("keys", targets, block=block, timeout=timeout)

    def reset(self, targets: Targets = "all", block: bool = True,
              timeout: float | None = None) -> Any:
        """Clear each target's namespace."""
        return self._submit("reset", targets, block=block, timeout=timeout)

    def push_serialized(self, namespace: dict[str, bytes], targets: Targets = "all",
                        block: bool = True, timeout: float | None = None) -> Any:
        """Set names from pickle bytes; each engine unpickles them."""
        names = _check_names(namespace)
        for name, blob in namespace.items():
            if not isinstance(blob, (bytes, bytearray, memoryview)):
                raise TypeError(f"push_serialized needs bytes for {name!r}, "
                                f"not {type(blob).__name__}")
        ids = self._targets(targets)
        blobs = {k: bytes(v) for k, v in namespace.items()}
        fields = self._payload(blobs, len(ids[0]), "pushed bytes")
        return self._submit("push_serialized", targets, {"names": names, **fields},
                            block=block, timeout=timeout, ids=ids)

    def pull_serialized(self, names: str | Sequence[str], targets: Targets = "all",
                        block: bool = True, timeout: float | None = None) -> Any:
        """Pickle bytes of ``names`` that ``pickle.loads`` reads."""
        single, listed = _names(names)
        return self._submit("pull_serialized", targets, {"names": listed, "single": single},
                            block=block, timeout=timeout)

    def scatter(self, name: str, seq: Any, targets: Targets = "all", block: bool = True,
                timeout: float | None = None) -> Any:
        """Split ``seq`` into contiguous parts, one per target in order, stored as ``name``."""
        _check_names({name: None})
        eids, single = self._targets(targets)
        try:
            length = len(seq)
        except TypeError:
            raise TypeError(f"scatter needs a sequence, not {type(seq).__name__}") from None
        what = f"part of {name!r}"
        # Every part is serialized and checked before any is written: a bad part leaves
        # nothing behind.
        parts = [self._serialized({name: seq[lo:hi]}, what)
                 for lo, hi in partition(length, len(eids))]
        per_target = {eid: {"names": [name], **self._payload(None, 1, what, ser)}
                      for eid, ser in zip(eids, parts, strict=True)}
        return self._submit("push", targets, per_target=per_target, block=block,
                            timeout=timeout, ids=(eids, single))

    def gather(self, name: str, targets: Targets = "all", block: bool = True,
               timeout: float | None = None) -> Any:
        """Each target's ``name``, joined in target order (lists, tuples, arrays, strings)."""
        eids, _ = self._targets(targets)
        return self._submit("pull", targets, {"names": [name], "single": True},
                            finalize=concatenate, block=block, timeout=timeout,
                            ids=(eids, False))

    def kill(self, targets: Targets = "all", block: bool = True,
             timeout: float | None = None) -> Any:
        """Stop engines at once (even busy ones); what they held fails with EngineShutdownError."""
        eids, single = self._targets(targets)
        cmd_ids = {eid: self._new_id() for eid in eids}
        pending = self._pending("kill", cmd_ids, single=single)
        for eid, cmd_id in cmd_ids.items():
            self._listener.expect(cmd_id, pending, eid)
        pipe = self.r.pipeline(transaction=False)
        for eid, cmd_id in cmd_ids.items():
            ctl = self.schema.ctl(eid)
            pipe.xadd(ctl, self._signed({"op": "kill", "id": cmd_id, "client": self.client_id},
                                        ctl),
                      maxlen=100, approximate=True)
        with translate_errors("kill"):
            pipe.execute()
        for eid in eids:
            self._engine_gone(eid)
        return self._finish(pending, block, timeout)

    def abort(self, pending: PendingResult | Iterable[PendingResult]) -> None:
        """Interrupt the given commands or calls on their engines, queued or running.

        A running one gets ``KeyboardInterrupt`` raised in its code (its ``finally`` blocks
        run): it fails with a :class:`RemoteError` whose ``remote_type`` is
        ``KeyboardInterrupt``, and the engine serves on. One that has not started fails with
        ``CancelledError`` when its engine reaches it. Code that ignores the interrupt for
        ``INTERRUPT_GRACE`` seconds takes its engine down with it (``EngineShutdownError``).
        Finished parts are left alone. Returns once the requests are in Redis. Abort several
        with one call: then none of them starts while the others are being aborted.
        """
        futures = [pending] if isinstance(pending, PendingResult) else list(pending)
        targets: list[tuple[int, str]] = []
        for f in futures:
            if f.done():
                continue
            for eid, cmd_id in f.cmd_ids.items():
                if eid == -1:  # load-balanced: still queued, or taken by some engine
                    if self._dispatcher.cancel(f):
                        break
                    eid = self._dispatcher.running_on(f)
                    if eid is None:
                        continue
                targets.append((eid, cmd_id))
        if not targets:
            return
        # Latest first: an engine learns of the queued ones before the running one ends,
        # so none of them starts in between.
        targets.sort(key=lambda t: _seq_of(t[1]), reverse=True)
        pipe = self.r.pipeline(transaction=False)
        for eid, cmd_id in targets:
            ctl = self.schema.ctl(eid)
            pipe.xadd(ctl, self._signed({"op": "interrupt", "id": cmd_id,
                                         "client": self.client_id}, ctl),
                      maxlen=100, approximate=True)
        with translate_errors("abort"):
            pipe.execute()

    # ------------------------------------------------------- answered from Redis
    def queue_status(self, targets: Targets = "all", block: bool = True,
                     timeout: float | None = None) -> Any:
        """``{"queued": n, "running": n, "completed": n}`` per target, read from Redis.

        Calls made before by this client (``.remote()``, sent in the background) count.
        """
        eids, single = self._targets(targets)
        self._dispatcher.flush(timeout)
        pipe = self.r.pipeline(transaction=False)
        for eid in eids:
            pipe.xlen(self.schema.inbox(eid))
            pipe.xpending(self.schema.inbox(eid), ENGINE_GROUP)
            pipe.xrevrange(self.schema.done(eid), count=1)
        with translate_errors("queue_status"):
            raw = pipe.execute(raise_on_error=False)
        out = {}
        for i, eid in enumerate(eids):
            length, pend, last = raw[3 * i: 3 * i + 3]
            length = length if isinstance(length, int) else 0
            # Delivered entries: the one running, and any the engine took to run next (an
            # engine busy with short commands reads several at once), which count as queued.
            running = min(1, pend["pending"]) if isinstance(pend, dict) else 0
            done = int(last[0][0].split(b"-")[0]) if isinstance(last, list) and last else 0
            out[eid] = {"queued": max(0, length - running), "running": running,
                        "completed": done}
        return self._answer(out, single, block)

    def clear_queue(self, targets: Targets = "all", block: bool = True,
                    timeout: float | None = None) -> Any:
        """Drop queued, not yet started commands; their futures fail with CancelledError.

        The command an engine is running is not affected, calls made before by this client
        (``.remote()``, sent in the background) are. Returns how many were dropped.
        """
        eids, single = self._targets(targets)
        self._dispatcher.flush(timeout)
        pipe = self.r.pipeline(transaction=False)
        ttl = int(self.settings.result_ttl * 1000)
        for eid in eids:
            pipe.evalsha(self.scripts.clear_queue.sha, 1, self.schema.inbox(eid), eid,
                         self.schema.prefix, ttl)
        with translate_errors("clear_queue"):
            try:
                replies = pipe.execute()
            except redis.exceptions.NoScriptError:
                replies = [self.scripts.clear_queue(keys=[self.schema.inbox(eid)],
                                                    args=[eid, self.schema.prefix, ttl])
                           for eid in eids]
            objects = [oid.decode() for reply in replies for oid in reply[1:]]
            if objects:  # what the dropped pushes carried
                self.store.release_many(objects)
        counts = [int(reply[0]) for reply in replies]
        return self._answer(dict(zip(eids, counts, strict=True)), single, block)

    def get_result(self, i: int = -1, targets: Targets = "all", block: bool = True,
                   timeout: float | None = None) -> Any:
        """The :class:`Result` of the i-th command run on each target (negative: from the end).

        Raises a remote error that is a ``KeyError`` when there is no such record.
        """
        eids, single = self._targets(targets)
        records, errors = {}, {}
        for eid in eids:
            try:
                records[eid] = self._result_record(eid, i)
            except KeyError as exc:
                errors[eid] = exc
        if errors:
            exc: BaseException = (next(iter(errors.values())) if single
                                  else CompositeError(errors, records))
            if block:
                raise exc
            return completed("get_result", exc=exc)
        return self._answer(records, single, block)

    def _result_record(self, eid: int, i: int) -> Result:
        done = self.schema.done(eid)
        with translate_errors("get_result"):
            if i >= 0:
                found = self.r.xrange(done, f"{i + 1}-0", f"{i + 1}-0")
            else:
                found = self.r.xrevrange(done, count=-i)
                found = found[-i - 1:] if len(found) >= -i else []
        if not found:
            raise _missing_result(eid, f"engine {eid} has no record of command {i}")
        cmd_id = found[0][1][b"id"].decode()
        key = found[0][1].get(b"key", self.schema.result(cmd_id).encode()).decode()
        fields = self.r.hgetall(key)
        if not fields:
            raise _missing_result(eid, f"the result of command {i} ({cmd_id}) on engine {eid} "
                                       "has expired")
        ok, value = self._outcome(fields, eid, key)
        if not ok and isinstance(value, ObjectLostError) and b"obj" in fields:
            value = ObjectLostError(
                f"the value of command {i} ({cmd_id}) on engine {eid} was a large object, "
                "released when the PendingResult that received it was dropped")
        code = fields.get(b"code")
        return Result(
            engine_id=eid, id=cmd_id, op=fields.get(b"op", b"").decode(),
            code=code.decode() if code is not None else None,
            value=value if ok else None, error=None if ok else value,
            stdout=fields.get(b"stdout", b"").decode("utf-8", "replace"),
            stderr=fields.get(b"stderr", b"").decode("utf-8", "replace"),
            started=_float(fields.get(b"started")), finished=_float(fields.get(b"finished")))

    @staticmethod
    def _answer(out: dict[int, Any], single: bool, block: bool) -> Any:
        value = next(iter(out.values())) if single else out
        return value if block else completed("query", value)

    # ------------------------------------------------- futures, objects, named actors
    def cancel(self, pending: PendingResult) -> bool:
        """Cancel a remote call that has not started; it then raises ``CancelledError``.

        Returns False if it already started or finished (a running call is not interrupted).
        """
        with translate_errors("cancel"):
            return self._dispatcher.cancel(pending)

    def put(self, value: Any) -> PendingResult:
        """Store ``value`` in Redis once; the returned (done) future can be passed to calls."""
        put_id = self._new_id()
        ser = serialize(value, what="put value")
        check_size(ser, self.settings.max_object_size, what="put value")
        pending = self._pending("put", {-1: put_id}, single=True)
        with translate_errors("put"):
            fields: dict[str, Any] = {"status": "ok", "op": "put",
                                      **self.store.fields_for(ser, refs=1)}
        if "obj" in fields:
            pending._hold(fields["obj"])
        key = self.schema.result(put_id)
        pipe = self.r.pipeline(transaction=False)
        if self.store.signer is not None:
            self.store.signer.sign(fields, key, stamp=False, skip=signing.RESULT)
        pipe.hset(key, mapping=fields)
        pipe.pexpire(key, int(self.settings.result_ttl * 1000))
        with translate_errors("put"):
            pipe.execute()
        pending.set_result(value)
        return pending

    def _name_actor(self, handle: Any) -> None:
        """Record a named actor in ``P:actors``; a live actor's name cannot be taken."""
        record = json.dumps({"actor": handle.actor_id, "engine": handle.engine_id,
                             "cls": handle.cls_name, "methods": sorted(handle._methods)})
        with translate_errors("actor name"):
            if self.r.hsetnx(self.schema.actors, handle.name, record):
                return
            current = self.actor_record(handle.name)
            if current is not None and self._is_live(current["engine"]):
                raise ValueError(f"an actor named {handle.name!r} already exists in cluster "
                                 f"{self.cluster!r} (on engine {current['engine']})")
            self.r.hset(self.schema.actors, handle.name, record)

    def actor_record(self, name: str) -> dict[str, Any] | None:
        raw = self.r.hget(self.schema.actors, name)
        return json.loads(raw) if raw else None

    def _kill_actor(self, handle: Any) -> None:
        from .remote import _call
        if handle.name is not None:
            current = self.actor_record(handle.name)
            if current is not None and current["actor"] == handle.actor_id:
                self.r.hdel(self.schema.actors, handle.name)
        if self._is_live(handle.engine_id):
            _call(self, "actor_del", target=handle.engine_id, lane=handle.actor_id,
                  payload=None, what="actor kill", fields={"actor": handle.actor_id}, deps=[],
                  timeout=None)

    # -------------------------------------------------------------------- waiting
    def wait(self, pending: Future | Iterable[Future], timeout: float | None = None,
             progress: bool = False) -> bool:
        """Wait until the given pending results are done (failed ones count as done); True
        if they all are within ``timeout``. ``progress=True`` shows a progress bar with what
        each engine is doing, in a terminal or in Jupyter."""
        futures = _flatten([pending])
        if progress:
            return wait_with_progress(futures, timeout=timeout, client=self, what="waiting")
        return not futures_wait(futures, timeout=timeout).not_done

    def barrier(self, *pending: Future | Iterable[Future], timeout: float | None = None,
                progress: bool = False) -> None:
        """Wait until every given pending result is done.

        Raises the first error as soon as one fails (a dead engine does not make the
        barrier wait out its timeout), and ``TimeoutError`` naming how many are unfinished.
        ``progress=True`` shows a progress bar meanwhile.
        """
        futures = _flatten(pending)
        if progress:
            first_error = threading.Event()
            for f in futures:
                f.add_done_callback(
                    lambda f: not f.cancelled() and f.exception() is not None
                    and first_error.set())
            wait_with_progress(futures, timeout=timeout, client=self, what="barrier",
                               stop=first_error)
        done, not_done = futures_wait(futures, timeout=0 if progress else timeout,
                                      return_when=FIRST_EXCEPTION)
        for f in done:
            if f.exception() is not None:
                raise f.exception()  # type: ignore[misc]
        if not_done:
            raise TimeoutError(f"{len(not_done)} (of {len(futures)}) pending results unfinished "
                               f"after {timeout} s")


# ------------------------------------------------------------------------ helpers
def _seq_of(cmd_id: str) -> int:
    """The client-side sequence number of a command id (``<client>-<n>``)."""
    tail = cmd_id.rpartition("-")[2]
    return int(tail) if tail.isdigit() else 0


def _flatten(items: Iterable[Any]) -> list[Future]:  # type: ignore[type-arg]
    out: list[Future] = []  # type: ignore[type-arg]
    for item in items:
        if isinstance(item, Future):
            out.append(item)
        elif isinstance(item, Iterable) and not isinstance(item, (str, bytes)):
            out.extend(_flatten(item))
        else:
            raise TypeError(f"barrier takes pending results, not {type(item).__name__}")
    return out


def _names(names: str | Sequence[str]) -> tuple[bool, list[str]]:
    if isinstance(names, str):
        return True, [names]
    listed = list(names)
    if not all(isinstance(n, str) for n in listed):
        raise TypeError("names must be strings")
    return False, listed


def _check_names(namespace: dict[str, Any]) -> list[str]:
    if not isinstance(namespace, dict):
        raise TypeError(f"expected a dict of names, not {type(namespace).__name__}")
    for name in namespace:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{name!r} is not a valid Python name")
    return list(namespace)


def _missing_result(eid: int, message: str) -> BaseException:
    return error_from_record({"kind": "remote", "type": "KeyError", "message": message,
                              "engine_id": eid, "op": "get_result", "traceback": ""})


def _float(raw: bytes | None) -> float | None:
    return float(raw) if raw else None


def partition(length: int, n: int) -> list[tuple[int, int]]:
    """``n`` contiguous ``(start, stop)`` ranges covering ``length`` items, sizes within one."""
    q, r = divmod(length, n)
    bounds, lo = [], 0
    for k in range(n):
        hi = lo + q + (1 if k < r else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def concatenate(parts: dict[int, Any]) -> Any:
    """Join gathered parts in target order: lists, tuples, strings, numpy arrays."""
    values = list(parts.values())
    if all(isinstance(v, list) for v in values):
        return [x for v in values for x in v]
    if all(isinstance(v, tuple) for v in values):
        return tuple(x for v in values for x in v)
    if all(isinstance(v, str) for v in values):
        return "".join(values)
    if all(isinstance(v, (bytes, bytearray)) for v in values):
        return b"".join(values)
    np = sys.modules.get("numpy")
    if np is not None and all(isinstance(v, np.ndarray) for v in values):
        return np.concatenate(values)
    return values

