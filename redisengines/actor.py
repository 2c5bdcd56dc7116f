"""The engine: a long-lived process that runs the commands of its own Redis stream, in order.

Two threads, two connections:

* the main thread reads ``P:{e<id>}:inbox`` and ``P:tasks`` through the consumer group
  ``engine``, runs what it read (user code runs here, so signals reach it), and completes
  it with ``complete.lua`` — result, notice, history and XACK in one atomic step —
  pipelined with ``take.lua``, which reads the next entries without blocking; only an idle
  engine blocks, in XREADGROUP. Under a load of short commands it takes several entries
  per read and sends their completions together (:class:`_Pace`); tasks taken behind a
  command that turns out slow go back to ``P:tasks`` (``give_back.lua``). While a command
  that waits (sleeps, does I/O) runs, the round trip that goes with it is sent and read by
  a helper thread (:class:`_Courier`), which then has the CPU to itself;
* the control thread renews the heartbeat lease, publishes the engine's state, keeps the
  namespace index up to date, and serves ``P:{e<id>}:ctl`` (``kill``, ``interrupt``) even
  while the main thread is busy.

What a command prints is kept for its result and streamed to ``P:{e<id>}:out`` while it runs
(:mod:`redisengines.output`, on a thread of its own). A command is interrupted — an abort, its
time limit (:class:`~redisengines.watchdog.Watchdog`), a fence — by SIGINT to the main
thread, which raises in the user's code; one that ignores it for ``interrupt_grace`` seconds
takes the engine down.

An engine whose lease expired may be retired by any client (``retire.lua`` fails what it
held and sets its fence); ``complete.lua`` and ``heartbeat.lua`` then refuse the old
incarnation, which registers again under a new id.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
import uuid
from collections import OrderedDict, deque
from typing import Any

import redis
from redis.exceptions import NoScriptError, OutOfMemoryError, ResponseError

from . import __version__, signing
from .checks import eviction_policy, runtime
from .commands import Namespace, describe
from .config import Settings
from .connection import (
    BLOCK_SECONDS,
    SOCKET_TIMEOUT,
    connect,
    follow_master,
    lost_master,
    master_address,
    read_replies,
)
from .errors import ProtocolError, error_record, pickle_exception, system_record
from .keys import ENGINE_GROUP, Keys
from .launcher import set_parent_death_signal
from .output import Capture, Pump, PumpHandler
from .protocol import Command, identify
from .registry import retire
from .scripts import Scripts
from .signing import SignatureError
from .store import ObjectStore
from .watchdog import Watchdog

log = logging.getLogger("redisengines.actor")  # (also when run as __main__)

EXIT_PARENT_GONE = 4
EXIT_OVERRUN = 5  # an interrupted command ignored the interrupt for interrupt_grace
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_SEEN_KEPT = 100_000
# Notices up to this size carry the whole result; larger ones make the client fetch it.
_NOTICE_INLINE_MAX = 64 * 1024
# An engine under load takes as many queued entries per read as it expects to run in
# TAKE_BUDGET seconds (at most TAKE_MAX), and sends their completions together, at the
# latest FLUSH_AFTER seconds after the first of them finished.
TAKE_BUDGET = 0.001
TAKE_MAX = 32
FLUSH_AFTER = 0.002
# A command still running after this long gives the tasks taken behind it back to P:tasks.
GIVE_BACK_AFTER = 0.02
# Commands that take at least this long and mostly wait (sleep, I/O, native code that lets go
# of the GIL) have the round trip that runs with them sent and read by a helper thread.
OVERLAP_AFTER = 0.001


class _Shutdown(BaseException):
    """Raised in the main thread by SIGTERM while it waits for work."""


class _TimeLimit(BaseException):
    """Raised in a command's code when it ran past its time limit (a BaseException, so that
    ``except Exception`` in user code does not swallow it)."""


class Engine:
    """One engine process. ``run()`` registers it and serves until killed or stopped."""

    def __init__(self, settings: Settings, *, parent_pid: int | None = None,
                 handle_signals: bool = True) -> None:
        if not settings.redis_url:
            raise ValueError("an engine needs a Redis URL (REDISENGINES_REDIS_URL or --url)")
        self.settings = settings
        self.keys = Keys(settings.cluster)
        self.parent_pid = parent_pid
        self.handle_signals = handle_signals
        self.r = connect(settings.redis_url, retries=settings.retries, pool_size=4,
                         tls=settings.tls)
        self.scripts = Scripts(self.r)
        self.store = ObjectStore(self.r, self.keys, settings, self.scripts)
        self.id = -1
        self.seq = 0
        self.started_at = time.time()
        self._stopping = threading.Event()
        self._executing = False
        self._current: tuple[str, str, float] | None = None
        self._exit_code = 0
        self._killed = threading.Event()
        self._seen: OrderedDict[str, None] = OrderedDict()  # command ids run, for replays
        self._fence = threading.Event()  # set when this incarnation was retired
        self._faults = parse_faultpoints(os.environ.get(FAULTPOINT_ENV, ""))
        # Interrupts: _lock orders "which command runs" against "interrupt that command".
        self._lock = threading.Lock()
        self._interrupt: tuple[str, str] | None = None  # (command id, why) of our own SIGINT
        self._aborted: OrderedDict[str, None] = OrderedDict()  # aborted before they started
        self._pace = _Pace()
        self._courier = _Courier()
        # Entries read but not yet run (tasks first), each (stream, entry id, fields, status
        # of a task's result when take.lua read it, else None). The main thread runs them;
        # the watchdog may give the tasks back (_give_back). Under _ready_lock (its own lock:
        # a give-back holds it over a round trip, which must not delay an interrupt).
        self._ready_lock = threading.Lock()
        self._ready: deque[tuple[str, bytes, dict[bytes, bytes], bytes | None]] = deque()
        # Tasks started and not acknowledged yet (never given back), and tasks given back
        # that a read under way may still deliver (dropped when it does). Under _ready_lock.
        self._keep: set[str] = set()
        self._given_back: set[bytes] = set()
        self._give_back_r: redis.Redis | None = None  # its connection: one try, no retries
        self._watchdog = Watchdog(name="re-watchdog")
        self._pump = Pump(lambda: connect(settings.redis_url, retries=settings.retries,
                                          pool_size=1, tls=settings.tls))

    # --------------------------------------------------------------------- lifecycle
    def register(self) -> int:
        eviction_policy(self.r)
        if self.store.signer is not None:  # timestamps are checked on the Redis clock
            sec, usec = self.r.time()
            self.store.signer.clock_offset = sec + usec / 1e6 - time.time()
        info = self._info()
        self.id = int(self.scripts.register(
            keys=[self.keys.next_id, self.keys.engines, self.keys.events, self.keys.tasks,
                  self.keys.epoch, self.keys.server],
            args=[self.keys.prefix, self._ttl_ms(), json.dumps(info), uuid.uuid4().hex]))
        self.namespace = Namespace(self.id, self.store)
        from . import futures
        futures.current_engine = self.id  # its commands must not wait on its own inbox
        # Loaded now: a NOSCRIPT for complete.lua would only come back after the
        # blocking read it is pipelined with, stalling the first command by BLOCK_SECONDS.
        self.r.script_load(self.scripts.complete.script)
        self.r.script_load(self.scripts.take.script)
        log.info("engine %d registered in cluster %r (pid %d)", self.id, self.settings.cluster,
                 os.getpid())
        return self.id

    def run(self) -> int:
        """Register, serve until stopped, unregister; returns the process exit code.

        An engine retired by the cluster while it was unreachable or frozen (its lease
        expired and someone reaped it) comes back under a new id, with a fresh namespace:
        the cluster failed what the old id held, so nothing of it may go on.
        """
        from . import api
        api.engine_settings = self.settings  # remote code may call remote functions too
        if self.handle_signals:
            signal.signal(signal.SIGTERM, self._on_sigterm)
            signal.signal(signal.SIGINT, self._on_sigint)
        self._pump.start()
        logs = PumpHandler(self._pump, lambda: self.keys.output(self.id) if self.id >= 0 else None,
                           lambda: (self._current or ("",))[0])
        logging.getLogger("redisengines").addHandler(logs)
        try:
            return self._run_incarnations()
        finally:
            logging.getLogger("redisengines").removeHandler(logs)
            self._watchdog.stop()
            self._pump.stop()

    def _run_incarnations(self) -> int:
        control: threading.Thread | None = None
        while True:
            served = threading.Event()  # the lease is renewed until serving is over
            try:
                if self.id < 0:
                    self.register()
                control = threading.Thread(target=self._control_loop,
                                           args=(self._fence, self.id, served),
                                           name=f"re-control-{self.id}", daemon=True)
                control.start()
                self._serve()
            except _Shutdown:
                pass
            finally:
                served.set()
            if self._killed.is_set() and control is not None:  # the control thread exits
                control.join(timeout=30)
                return 0
            if not self._fence.is_set() or self._stopping.is_set():
                break
            log.warning("engine %d was retired by the cluster; joining again as a new engine",
                        self.id)
            try:
                if control is not None:
                    control.join(timeout=self.settings.heartbeat_interval + 10)
            except _Shutdown:  # stopped while rejoining: nothing of the old id is left to do
                return 0
            self._fence = threading.Event()
            self._reset()
        if self._exit_code == 0 and self.id >= 0:
            self._retire("shutdown")
        return self._exit_code

    def _reset(self) -> None:
        """Forget the retired incarnation: id, counters, namespace, actors."""
        self.id = -1
        self.seq = 0
        self._exit_code = 0
        self.started_at = time.time()

    def stop(self) -> None:
        self._stopping.set()

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self._stopping.is_set():
            return  # already shutting down: let it finish
        self._stopping.set()
        if not self._executing:
            raise _Shutdown()

    def _on_sigint(self, signum: int, frame: Any) -> None:
        """Ctrl-C interrupts the running command; an idle engine shuts down. Our own SIGINT
        (an abort, a time limit, a fence) interrupts the command it was sent for, if that
        is still the one running, and is otherwise ignored."""
        ours, self._interrupt = self._interrupt, None
        if ours is not None:
            current = self._current
            if self._executing and current is not None and current[0] == ours[0]:
                if ours[1] == "time_limit":
                    raise _TimeLimit()
                raise KeyboardInterrupt()
            return
        if self._executing:
            raise KeyboardInterrupt()
        if not self._fence.is_set():  # (a retired engine interrupts itself: not a shutdown)
            self._on_sigterm(signum, frame)

    def _fenced(self, where: str, fence: threading.Event | None = None) -> None:
        log.error("engine %d: retired by the cluster (%s): it was presumed dead", self.id, where)
        (fence or self._fence).set()
        current = self._current
        if current is not None and threading.current_thread() is not threading.main_thread():
            # Its command was failed already: stop the wasted work.
            self._interrupt_command(current[0], "fenced")

    def _interrupt_command(self, cmd_id: str, why: str) -> bool:
        """Interrupt ``cmd_id`` if it is running: SIGINT to the main thread (so that a
        blocking call, a sleep or I/O, is interrupted too), and a grace period after which
        an engine still running it goes down. False if it is not running."""
        with self._lock:
            current = self._current
            if not (self._executing and current is not None and current[0] == cmd_id):
                return False
            if not self.handle_signals:
                return False
            self._interrupt = (cmd_id, why)
        log.warning("engine %d: interrupting %s %s (%s)", self.id, current[1], cmd_id,
                    why.replace("_", " "))
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        grace = self.settings.interrupt_grace
        if grace > 0 and why != "fenced":
            self._watchdog.arm(("grace", cmd_id), grace, lambda: self._overrun(cmd_id, why))
        return True

    def _abort(self, cmd_id: str) -> None:
        """An ``interrupt`` control entry: interrupt ``cmd_id`` now, or when it starts."""
        with self._lock:
            if not (self._current is not None and self._current[0] == cmd_id):
                self._aborted[cmd_id] = None  # (one that already ran is never read again)
                if len(self._aborted) > _SEEN_KEPT:
                    self._aborted.popitem(last=False)
                return
        self._interrupt_command(cmd_id, "abort")

    def _overrun(self, cmd_id: str, why: str) -> None:
        """The watchdog: ``cmd_id`` ignored its interrupt for the whole grace period."""
        current = self._current
        if current is None or current[0] != cmd_id:
            return
        log.error("engine %d: %s %s ignored its interrupt (%s) for %.1f s; the engine goes "
                  "down with it", self.id, current[1], cmd_id, why.replace("_", " "),
                  self.settings.interrupt_grace)
        self._killed.set()
        self._retire("kill")
        self._pump.stop()
        os._exit(EXIT_OVERRUN)

    def _retire(self, mode: str) -> int:
        # Its own connection: the main one may be in the middle of a read.
        r = connect(self.settings.redis_url, retries=self.settings.retries,
                    tls=self.settings.tls)
        try:
            return retire(r, self.keys, self.id, mode, self.settings)
        except redis.RedisError as exc:
            log.error("engine %d: could not unregister: %s", self.id, exc)
            return 0
        finally:
            r.close()

    # --------------------------------------------------------------------- main loop
    def _serve(self) -> None:
        # The read/complete loop retries by itself: a transparently retried XREADGROUP '>'
        # would leave an entry delivered by the lost attempt unseen in our PEL.
        if getattr(self, "_loop_r", None) is not None:
            self._loop_r.close()  # the connection of a retired incarnation
        self._loop_r = connect(self.settings.redis_url, retries=0, pool_size=1,
                               name=f"{self.keys.prefix}:e{self.id}:loop", tls=self.settings.tls)
        conn = self._loop_r.connection_pool.get_connection()
        try:
            self._loop(conn)
        finally:
            self._courier.settle()  # (a round it was sending when the loop left)
            self._loop_r.connection_pool.release(conn)

    def _loop(self, conn: Any) -> None:
        """Run what the inbox and ``P:tasks`` deliver until stopped or fenced.

        Each round sends the completions of what ran with the read of what comes next, and
        runs the next entry already read while that round trip is under way: an engine with
        work never waits for Redis. It blocks (in XREADGROUP) only when it has nothing.
        """
        inbox, tasks = self.keys.inbox(self.id), self.keys.tasks
        consumer = f"e{self.id}"
        block_ms = int(BLOCK_SECONDS * 1000)
        # Completions of commands that ran and are not confirmed yet, and when the oldest of
        # them finished.
        complete: list[_Completion] = []
        held_since = 0.0
        acks: list[tuple[str, bytes]] = []  # entries deleted while pending, to acknowledge
        cursor = "0"  # our own delivered-but-unfinished entries first, then new ones
        failures = oom = 0
        ready = self._ready
        # After a command, take.lua reads the next entries without blocking, in the round
        # trip of its completion; only when it found nothing does the loop block in
        # XREADGROUP (an idle engine waits there, and wakes at once for a new entry).
        idle = True
        master = None  # where a sentinel URL's master was (the control thread follows it)
        while True:
            where = master_address(self._loop_r)
            if where != master:
                if master is not None:
                    # A failover: the new master's copy of our PEL is what counts (it may hold
                    # entries whose completion the old master lost); what we read from the
                    # old one is re-read there or, if it never got there, was lost with it.
                    log.warning("engine %d: the master moved to %s:%s; re-reading our pending "
                                "entries there", self.id, *where)
                    conn.disconnect()  # (held by this loop: follow_master leaves it alone)
                    cursor = "0"
                    self._forget_ready()
                master = where
            # still complete what ran, read nothing more
            stopping = self._stopping.is_set() or self._fence.is_set()
            # With one entry left (short commands, new entries), read the next ones while it
            # runs. (A re-read of our PEL, cursor "0", waits until nothing is left: it would
            # deliver those again.)
            ahead = (not stopping and len(ready) == 1 and cursor != "0" and not idle
                     and self._pace.seconds < GIVE_BACK_AFTER)
            if ready and not stopping and not ahead and (
                    not complete or not self._pace.flush_due(len(complete), held_since)):
                # Taken entries run back to back; their completions go out together.
                held_since = self._run_next(complete, held_since)
                continue
            if not complete and stopping:
                if any(e[0] == tasks for e in ready):  # (no read is under way now)
                    self._give_back()
                return
            reading = not stopping and (not ready or ahead)
            taking = reading and cursor != "0" and not idle
            count = self._pace.count()
            sent = complete
            commands: list[Any] = [
                ("XACK", stream, ENGINE_GROUP, entry_id) for stream, entry_id in acks]
            commands += [c.command for c in sent]  # (made as sent: see _Completion)
            # Reading ahead (taking, with an entry left to run) takes no command of our inbox:
            # one queued behind the command running stays "not started" (started=False) if
            # this engine dies meanwhile.
            if taking:
                commands.append(("EVALSHA", self.scripts.take.sha, 2, tasks, inbox, consumer,
                                 self.keys.prefix, count, 0 if ahead else count))
            elif reading:
                commands.append(("XREADGROUP", "GROUP", ENGINE_GROUP, consumer,
                                 "COUNT", count if cursor == "0" else 1,
                                 *(() if cursor == "0" or ready else ("BLOCK", block_ms)),
                                 "STREAMS", inbox, tasks, cursor, cursor))
            complete, acks = [], []
            try:
                if ready and not stopping and (taking or not reading):
                    # Run the next entry while Redis answers (tasks read meanwhile are given
                    # back if it is slow). While a command that waits runs, a helper thread
                    # sends and reads: on a machine with few cores this thread would lose the
                    # CPU, between two commands, to the Redis server its send wakes.
                    if self._pace.waits():
                        self._courier.stage(conn, commands)  # (sent when the command starts)
                        held_since = self._run_next(complete, held_since, reading_ahead=taking)
                        replies = self._courier.replies()
                    else:
                        _send(conn, commands)
                        held_since = self._run_next(complete, held_since, reading_ahead=taking)
                        replies = read_replies(conn, len(commands))
                else:
                    replies = _exchange(conn, commands)
                demoted = next((e for e in replies if isinstance(e, Exception)
                                and lost_master(e)), None)
                if demoted is not None:  # (a completion is retried: complete.lua is idempotent)
                    raise redis.ConnectionError(f"the server is no master now: {demoted}")
                failures = 0
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                conn.disconnect()
                complete[:0] = sent  # sent again, first (complete.lua is idempotent)
                failures += 1
                log.warning("engine %d: Redis unreachable (%s); retry %d", self.id, exc, failures)
                time.sleep(min(2.0, 0.05 * 2 ** failures))
                cursor = "0"  # re-read what a lost reply may have delivered to us
                self._forget_ready()
                continue
            replies = replies[len(commands) - len(sent) - reading:]  # (not the XACKs)
            if sent:
                done = replies[:len(sent)]
                if any(isinstance(d, NoScriptError) for d in done):
                    self.r.script_load(self.scripts.complete.script)
                    complete[:0] = sent
                    cursor = "0"  # what the read delivered is re-read from our PEL
                    self._forget_ready()
                    continue
                if any(isinstance(d, OutOfMemoryError) for d in done):
                    # Keep the results and retry: nothing was written, and the lease holds
                    # (PEXPIRE is allowed at maxmemory). Those that were stored are stored
                    # again, the same (complete.lua is idempotent).
                    complete[:0] = sent
                    oom += 1
                    if oom == 1:
                        log.warning("engine %d: Redis is out of memory; keeping the result of "
                                    "%s and retrying until it can be stored", self.id,
                                    ", ".join(c.cmd_id for c in complete))
                    time.sleep(min(1.0, 0.05 * 2 ** oom))
                    cursor = "0"
                    self._forget_ready()
                    continue
                error = next((d for d in done if isinstance(d, Exception)), None)
                if error is not None:
                    raise error
                if -1 in done:
                    self._fenced("complete")
                    return
                oom = 0
                with self._ready_lock:
                    self._keep.difference_update(c.entry_id for c in sent if c.stream == tasks)
            if stopping:
                continue  # (what ran meanwhile is completed next round, then we stop)
            if reading:
                read = replies[-1]
                if taking and isinstance(read, NoScriptError):
                    self.r.script_load(self.scripts.take.script)
                    idle = True  # (nothing was read: block this time)
                    continue
                if isinstance(read, ResponseError):
                    if "NOGROUP" not in str(read):
                        raise read
                    if self._killed.is_set():  # a kill removes the inbox on purpose
                        return
                    if not self.r.exists(inbox):
                        self._fenced("inbox removed")
                        return
                    self.r.xgroup_create(tasks, ENGINE_GROUP, id="0", mkstream=True)
                    continue
                got: list[tuple[str, bytes, dict[bytes, bytes], bytes | None]] = []
                if taking:
                    taken, commands_read, statuses = read
                    # Load-balanced tasks first: holding them while we run our own commands
                    # would keep them from an idle engine.
                    got += [(tasks, *_entry(t), status or b"")
                            for t, status in zip(taken, statuses, strict=True)]
                    got += [(inbox, *_entry(c), None) for c in commands_read]
                else:
                    streams = read.items() if isinstance(read, dict) else read or []  # RESP3/2
                    for stream, entries in sorted(streams, key=lambda s: s[0] != tasks.encode()):
                        got += [(stream.decode(), *_entry(e), None) for e in entries]
                # (an entry deleted while pending has no fields: only acknowledged)
                acks += [(stream, entry_id) for stream, entry_id, fields, _ in got
                         if fields is None]
                with self._ready_lock:
                    back = self._given_back
                    ready.extend(e for e in got if e[2] is not None and e[1] not in back)
                    back.difference_update(e[1] for e in got)
                if not ahead:  # (a read ahead looked at P:tasks only)
                    idle = not ready
                if not got and cursor == "0":
                    cursor = ">"

    def _run_next(self, complete: list[_Completion], held_since: float,
                  reading_ahead: bool = False) -> float:
        """Run the next entry read; its completion joins ``complete``. Returns when the
        oldest completion held was made. ``reading_ahead``: a read is under way, whose tasks
        will wait behind this entry."""
        tasks = self.keys.tasks
        with self._ready_lock:
            if not self._ready:
                return held_since  # (the watchdog gave them back)
            stream, entry_id, fields, status = self._ready.popleft()
            behind = reading_ahead or any(e[0] == tasks for e in self._ready)
            if stream == tasks:
                self._keep.add(entry_id.decode())
        began, cpu = time.monotonic(), time.thread_time()
        if not complete:
            held_since = began
        if behind:  # if this one is slow, the tasks behind it go to an idle engine
            self._watchdog.arm("give_back", GIVE_BACK_AFTER, self._give_back)
        complete.append(self._run(stream, entry_id.decode(), fields, status))
        if behind:
            self._watchdog.disarm("give_back")
        self._pace.ran(time.monotonic() - began, time.thread_time() - cpu)
        return held_since

    def _forget_ready(self) -> None:
        """Drop what was read and not run: it is re-read from our PEL (cursor "0")."""
        with self._ready_lock:
            self._ready.clear()
            self._given_back.clear()  # (the PEL holds them no more)

    def _give_back(self) -> None:
        """Return the tasks taken but not started to the end of ``P:tasks``, for an idle
        engine: the command running is slow (the watchdog calls this), or we are stopping.

        What our PEL holds counts, not only what was read: a read under way (read ahead
        while the command runs) delivered tasks that the main thread has not seen yet.
        Under the lock, so that no task starts while it is given back; one try, so that an
        unreachable Redis does not hold the main thread for long.
        """
        tasks = self.keys.tasks
        with self._ready_lock:
            try:
                if self._give_back_r is None:
                    self._give_back_r = connect(self.settings.redis_url, retries=0,
                                                pool_size=1, tls=self.settings.tls)
                back = set(self.scripts.give_back(
                    keys=[tasks], args=[f"e{self.id}", self.keys.prefix, *self._keep],
                    client=self._give_back_r))
            except redis.RedisError as exc:  # they run here after all
                log.warning("engine %d: could not give tasks back: %s", self.id, exc)
                return
            if not back:
                return
            log.debug("engine %d: gave %d task(s) back", self.id, len(back))
            kept = [e for e in self._ready if e[0] != tasks or e[1] not in back]
            self._given_back |= back - {e[1] for e in self._ready}
            self._ready.clear()
            self._ready.extend(kept)

    def _run(self, stream: str, entry_id: str, fields: dict[bytes, bytes],
             status: bytes | None = None) -> _Completion:
        """Run one entry; returns its completion. ``status``: that of the entry's result if
        already read (take.lua), else None."""
        self.seq += 1
        started = time.time()
        if self._faults:
            self._faultpoint("after_read")
        try:
            if self.store.signer is not None:
                self._authenticate(stream, fields, status)
            cmd = Command.decode(entry_id, fields)
        except (ProtocolError, ValueError) as exc:
            cmd_id, client = identify(fields)
            log.warning("engine %d: skipping bad stream entry %s: %s", self.id, entry_id, exc)
            record = error_record(ProtocolError(str(exc)), engine_id=self.id, op="invalid",
                                  cmd_id=cmd_id)
            result = {"status": "error", "error": json.dumps(record)}
            # Stored under its own key: the id it claims may name someone else's result
            # (a replay), which must not be overwritten. The named client is still told.
            invalid = f"invalid-{self.id}-{entry_id}"  # entry ids repeat across streams
            return self._completion(stream, entry_id, cmd_id or invalid, client, "invalid",
                                    result, started, result_key=self.keys.result(invalid))
        try:
            limit = float(cmd.fields[b"tl"]) if b"tl" in cmd.fields else None
        except ValueError:
            limit = None
        with self._lock:
            aborted = cmd.id in self._aborted
            if aborted:
                del self._aborted[cmd.id]
            else:
                self._current = (cmd.id, cmd.op, started)
        if aborted:
            record = system_record("CancelledError", f"{cmd.op} {cmd.id} was aborted before it "
                                   f"started on engine {self.id}", engine_id=self.id,
                                   cmd_id=cmd.id)
            return self._completion(stream, entry_id, cmd.id, cmd.client, cmd.op,
                                    {"status": "error", "error": json.dumps(record)}, started)
        output = self.keys.output(self.id)
        out = Capture("stdout", cmd.id, output, self._pump)
        err = Capture("stderr", cmd.id, output, self._pump)
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        self._courier.go()
        self._executing = True
        if limit is not None:
            self._watchdog.arm(("limit", cmd.id), limit,
                               lambda: self._interrupt_command(cmd.id, "time_limit"))
        try:
            if self._faults:
                self._faultpoint("before_exec")
            value = self.namespace.run(cmd)
            if self._faults:
                self._faultpoint("after_exec")
            # refs=1: a large result is released when its client's future is dropped.
            result = {"status": "ok", **self.store.encode(value, what=_what(cmd), refs=1)}
        except BaseException as exc:  # noqa: B036 - user code may raise anything
            if isinstance(exc, _Shutdown):
                raise
            if isinstance(exc, _TimeLimit):
                result = self._time_limit_fields(exc, cmd, limit)
            else:
                result = self._error_fields(exc, cmd)
        finally:
            with self._lock:
                self._executing = False
                self._current = None
                self._interrupt = None
            if limit is not None:
                self._watchdog.disarm(("limit", cmd.id))
            self._watchdog.disarm(("grace", cmd.id))
            sys.stdout, sys.stderr = saved
        result["stdout"] = out.getvalue()
        result["stderr"] = err.getvalue()
        if cmd.op == "execute":
            result["code"] = cmd.fields.get(b"code", b"")
        if self._faults:
            self._faultpoint("before_ack")
        return self._completion(stream, entry_id, cmd.id, cmd.client, cmd.op, result, started)

    def _authenticate(self, stream: str, fields: dict[bytes, bytes],
                      status: bytes | None = None) -> None:
        """Refuse (SignatureError) an entry not signed for this stream, or one already run:
        copied from another stream, altered, forged, or replayed."""
        signer = self.store.signer
        assert signer is not None
        signer.verify(fields, stream, max_age=self.settings.result_ttl)
        cmd_id = fields.get(b"id", b"").decode("utf-8", "replace")
        replayed = cmd_id in self._seen
        if not replayed and stream == self.keys.tasks:  # another engine may have run it
            if status is None:
                status = self.r.hget(self.keys.result(cmd_id), "status")
            replayed = status in (b"ok", b"error")
        if replayed:
            raise SignatureError(f"command {cmd_id} was already run: a replayed entry")
        self._seen[cmd_id] = None
        if len(self._seen) > _SEEN_KEPT:
            self._seen.popitem(last=False)

    def _error_fields(self, exc: BaseException, cmd: Command) -> dict[str, Any]:
        _drop_signal_frame(exc)
        tb = exc.__traceback__
        skip = 0  # drop the engine's own frames above the user's
        while tb is not None and tb.tb_next is not None and \
                tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR):
            tb, skip = tb.tb_next, skip + 1
        record = error_record(exc, engine_id=self.id, op=cmd.op, cmd_id=cmd.id, skip_frames=skip)
        fields: dict[str, Any] = {"status": "error", "error": json.dumps(record)}
        pickled = pickle_exception(exc)
        if pickled is not None:
            fields["exc"] = pickled
        return fields

    def _time_limit_fields(self, exc: _TimeLimit, cmd: Command,
                           limit: float | None) -> dict[str, Any]:
        """TimeLimitExceeded, with where the code was when it was interrupted."""
        message = (f"{cmd.op} {cmd.id} ran longer than its time limit of {limit:g} s on "
                   f"engine {self.id} and was interrupted")
        where = json.loads(self._error_fields(exc, cmd)["error"]).get("traceback", "")
        tb = where.rstrip("\n").rpartition("\n")[0] + f"\nTimeLimitExceeded: {message}\n"
        record = system_record("TimeLimitExceeded", message, engine_id=self.id, cmd_id=cmd.id,
                               op=cmd.op, time_limit=limit, traceback=tb)
        return {"status": "error", "error": json.dumps(record)}

    def _completion(self, stream: str, entry_id: str, cmd_id: str, client: str | None,
                    op: str, result: dict[str, Any], started: float,
                    result_key: str | None = None) -> _Completion:
        result.update(engine=self.id, op=op, started=started, finished=time.time())
        keys = self.keys
        return _Completion(self.scripts.complete.sha, self.store.signer, client is not None, [
            stream, keys.fenced(self.id), keys.done(self.id),
            result_key or keys.result(cmd_id), keys.replies(client or "-"),
            entry_id, cmd_id, self.seq, self._result_ttl_ms(), self.settings.done_history,
        ], result)

    # ------------------------------------------------------------------ control thread
    def _control_loop(self, fence: threading.Event, engine_id: int,
                      served: threading.Event) -> None:
        """One incarnation's side thread: it uses only its own ``fence`` and ``engine_id``,
        so that a late one cannot touch the next incarnation. It renews the lease until the
        main thread is done serving, even after SIGTERM (a command may still be running)."""
        r = connect(self.settings.redis_url, retries=self.settings.retries,
                    tls=self.settings.tls)
        scripts = Scripts(r)
        ctl = self.keys.ctl(engine_id)
        last = "0-0"
        interval = self.settings.heartbeat_interval
        next_beat = 0.0
        ns_snapshot: dict[str, tuple[int, type]] = {}
        demoted = False  # the server refuses writes: said once, not every interval
        while not served.is_set() and not fence.is_set():
            try:
                now = time.monotonic()
                if now >= next_beat:
                    if not self._heartbeat(scripts, engine_id):
                        self._fenced("heartbeat", fence)
                        return
                    ns_snapshot = self._publish_namespace(r, ns_snapshot)
                    next_beat = now + interval
                    # A sentinel URL: move every connection to a new master at once (the main
                    # loop re-reads its PEL there), not when the old one is reconfigured.
                    if follow_master(r, self.r, getattr(self, "_loop_r", None),
                                     self._give_back_r):
                        log.warning("engine %d: the master moved (failover)", self.id)
                    if self.parent_pid is not None and os.getppid() != self.parent_pid:
                        log.error("engine %d: parent process is gone, exiting", self.id)
                        self._retire("shutdown")
                        os._exit(EXIT_PARENT_GONE)
                wait_ms = max(1, int((next_beat - time.monotonic()) * 1000))
                resp = r.xread({ctl: last}, count=16, block=wait_ms)
                for _stream, entries in resp or []:
                    for entry_id, fields in entries:
                        last = entry_id
                        self._control(r, fields)
                demoted = False
            except redis.ConnectionError as exc:
                log.warning("engine %d: control connection: %s", self.id, exc)
                time.sleep(interval)
            except Exception as exc:
                if lost_master(exc):  # demoted under us: as a lost connection
                    if not demoted:
                        log.warning("engine %d: control connection: %s", self.id, exc)
                    demoted = True
                    time.sleep(interval)
                    continue
                log.exception("engine %d: unexpected error in the control thread", self.id)
                time.sleep(interval)

    def _heartbeat(self, scripts: Scripts, engine_id: int) -> bool:
        keys = self.keys
        sent = time.time()
        redis_ms = int(scripts.heartbeat(
            keys=[keys.heartbeat(engine_id), keys.engines, keys.fenced(engine_id)],
            args=[engine_id, self._ttl_ms(), json.dumps(self._info())]))
        if redis_ms and self.store.signer is not None:
            # Signatures are stamped on the Redis clock: follow it if this host's clock is
            # stepped (NTP), not just as it was at registration.
            self.store.signer.clock_offset = redis_ms / 1000 - (sent + time.time()) / 2
        return redis_ms != 0

    def _publish_namespace(self, r: redis.Redis,
                           before: dict[str, tuple[int, type]]) -> dict[str, tuple[int, type]]:
        user = dict(self.namespace.user)
        now = {k: (id(v), type(v)) for k, v in user.items()
               if not (k.startswith("__") and k.endswith("__"))}
        if now != before:
            key = self.keys.namespace(self.id)
            pipe = r.pipeline(transaction=True)
            pipe.delete(key)
            if now:
                pipe.hset(key, mapping={k: json.dumps(describe(user[k])) for k in now})
            pipe.execute()
        return now

    def _control(self, r: redis.Redis, fields: dict[bytes, bytes]) -> None:
        op = fields.get(b"op", b"").decode("utf-8", "replace")
        if self.store.signer is not None:
            try:
                self.store.signer.verify(fields, self.keys.ctl(self.id),
                                         max_age=self.settings.result_ttl)
            except SignatureError as exc:
                log.warning("engine %d: refusing a control entry: %s", self.id, exc)
                return
        if op == "interrupt":
            self._abort(fields.get(b"id", b"").decode("utf-8", "replace"))
            return
        if op != "kill":
            log.warning("engine %d: ignoring unknown control entry %r", self.id, op)
            return
        self._killed.set()
        failed = self._retire("kill")  # also answers the kill command itself
        log.info("engine %d: killed (%d commands failed)", self.id, failed)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    # ------------------------------------------------------------------------ helpers
    def _faultpoint(self, where: str) -> None:
        """Tests only (REDISENGINES_FAULTPOINT): die, exit or hang at a point of a command."""
        action = self._faults.get(where)
        if action is None:
            return
        log.warning("engine %d: fault point %s:%s", self.id, where, action)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "exit":
            os._exit(1)
        elif action == "hang":
            threading.Event().wait()

    def _info(self) -> dict[str, Any]:
        current = self._current
        info: dict[str, Any] = {
            "id": self.id, "host": socket.gethostname(), "pid": os.getpid(),
            "started": round(self.started_at, 3), "version": __version__,
            "python": sys.version.split()[0], "cloudpickle": runtime()["cloudpickle"],
            "state": "busy" if current else "idle",
            "completed": self.seq, "rss": _rss(),
        }
        now = time.time()
        info["uptime"] = round(now - self.started_at, 3)
        if current:
            # `since` on this host's clock; `running_for` as of `beat` (the Redis time that
            # heartbeat.lua adds), which is what an age is computed from, skew-free
            info.update(running=current[0], op=current[1], since=round(current[2], 3),
                        running_for=round(now - current[2], 3))
        return info

    def _ttl_ms(self) -> int:
        return int(self.settings.heartbeat_ttl * 1000)

    def _result_ttl_ms(self) -> int:
        return int(self.settings.result_ttl * 1000)


FAULTPOINT_ENV = "REDISENGINES_FAULTPOINT"
FAULT_POINTS = ("after_read", "before_exec", "after_exec", "before_ack")
FAULT_ACTIONS = ("kill", "exit", "hang")


class _Pace:
    """How many entries an engine takes per read, and when its held completions go out.

    It takes what it expects to run within ``TAKE_BUDGET``, judging by its recent commands:
    one at a time after a slow command, so that no engine hoards work an idle one could take
    (a slow command counts at once; fast ones lower the estimate gradually). While commands
    take less than ``GIVE_BACK_AFTER`` it also reads the next tasks while the last one it
    holds runs, so that it never waits for Redis between two.
    """

    def __init__(self) -> None:
        # What a command takes, as far as we know: nothing yet, so slow (no read-ahead);
        # and the share of that time it keeps the CPU: all of it.
        self.seconds = GIVE_BACK_AFTER
        self.busy = 1.0

    def ran(self, seconds: float, cpu: float) -> None:
        self.seconds = seconds if seconds > self.seconds else 0.8 * self.seconds + 0.2 * seconds
        self.busy = 0.8 * self.busy + 0.2 * min(1.0, cpu / seconds if seconds > 0 else 1.0)

    def waits(self) -> bool:
        """Recent commands took a while and mostly waited, not computed."""
        return self.seconds >= OVERLAP_AFTER and self.busy < 0.5

    def count(self) -> int:
        return max(1, min(TAKE_MAX, int(TAKE_BUDGET / max(self.seconds, 1e-6))))

    @staticmethod
    def flush_due(held: int, since: float) -> bool:
        return held >= TAKE_MAX or time.monotonic() - since >= FLUSH_AFTER


class _Completion:
    """The call of ``complete.lua`` for one command that ran. Its result is signed and
    flattened (what costs) when the call is made, as it is sent: behind a command that
    waits, on the courier's thread. Made once: a completion sent again is the same."""

    __slots__ = ("_sha", "_signer", "_notify", "_head", "_result", "_args")

    def __init__(self, sha: str, signer: signing.Signer | None, notify: bool,
                 head: list[Any], result: dict[str, Any]) -> None:
        self._sha, self._signer, self._notify = sha, signer, notify
        self._head, self._result = head, result  # head: complete.lua's first arguments
        self._args: tuple[Any, ...] | None = None

    stream = property(lambda self: self._head[0])
    entry_id = property(lambda self: self._head[5])
    cmd_id = property(lambda self: self._head[6])

    def command(self) -> tuple[Any, ...]:
        if self._args is None:
            result = self._result
            if self._signer is not None:
                self._signer.sign(result, self._head[3], stamp=False, skip=signing.RESULT)
            flat: list[Any] = []
            size = 0
            for k, v in result.items():
                flat += [k, v]
                size += len(v) if isinstance(v, (bytes, str)) else 8
            notify = 0 if not self._notify else (1 if size <= _NOTICE_INLINE_MAX else 2)
            self._args = ("EVALSHA", self._sha, 5, *self._head, notify, result["op"],
                          result["status"], *flat)
        return self._args


def _send(conn: Any, commands: list[Any]) -> None:
    """Send ``commands``, each a tuple or a callable that makes it (a completion)."""
    # (a dropped connection reconnects here: for a sentinel URL, to the master the
    # sentinels name now; a send would reconnect to the old address)
    conn.connect()
    conn.send_packed_command(conn.pack_commands([c() if callable(c) else c for c in commands]),
                             check_health=False)


def _exchange(conn: Any, commands: list[Any]) -> list[Any]:
    _send(conn, commands)
    return read_replies(conn, len(commands))


class _Courier:
    """Sends a round of commands and reads its replies on a thread of its own, while the
    main thread runs a command: ``stage`` the round, ``go`` as the command starts (so that
    its thread wakes once this one has nothing left to do but wait), then ``replies``. One
    round at a time; the connection is the courier's from ``go`` until ``replies`` (or
    ``settle``) returns."""

    # A round ends within the socket timeouts (a connect, then each reply); past this its
    # thread is presumed stuck and the round lost (what it brings back later is dropped).
    WAIT = 5.0 + SOCKET_TIMEOUT * 2

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[int, Any, list[Any]]] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[tuple[int, bool, Any]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # (main thread only) the round staged; the number of the last one sent, and whether
        # it is still under way
        self._staged: tuple[Any, list[Any]] | None = None
        self._sent = 0
        self._out = False

    def stage(self, conn: Any, commands: list[Any]) -> None:
        self._staged = (conn, commands)

    def go(self) -> None:
        """Send the round staged, if any."""
        if self._staged is None:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="re-courier", daemon=True)
            self._thread.start()
        self._sent += 1
        self._out = True
        self._jobs.put((self._sent, *self._staged))
        self._staged = None

    def replies(self) -> list[Any]:
        """The round's replies (an error reply as its exception); raises what the round
        raised (a lost connection, a timeout)."""
        self.go()  # (no command ran: the entry was bad, aborted, or given back)
        deadline = time.monotonic() + self.WAIT
        n = -1
        while n != self._sent:
            try:
                n, ok, value = self._done.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self._out = False
                raise redis.TimeoutError(f"no reply from Redis in {self.WAIT:g} s") from None
        self._out = False
        if not ok:
            raise value
        return value

    def settle(self) -> None:
        """Drop the round staged; wait for the one under way, if any, to end, and drop
        what it got."""
        self._staged = None
        if self._out:
            with contextlib.suppress(Exception):
                self.replies()

    def _serve(self) -> None:
        while True:
            n, conn, commands = self._jobs.get()
            try:
                self._done.put((n, True, _exchange(conn, commands)))
            except BaseException as exc:  # noqa: B036 - handed to the main thread
                self._done.put((n, False, exc))


def parse_faultpoints(spec: str) -> dict[str, str]:
    """``"after_read:kill,before_ack:exit"`` -> ``{"after_read": "kill", ...}``."""
    points = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        where, _, action = item.partition(":")
        if where not in FAULT_POINTS or action not in FAULT_ACTIONS:
            raise ValueError(f"{FAULTPOINT_ENV}: {item!r} is not <point>:<action> with point in "
                             f"{FAULT_POINTS} and action in {FAULT_ACTIONS}")
        points[where] = action
    return points


def _entry(raw: Any) -> tuple[bytes, dict[bytes, bytes] | None]:
    """An entry as Redis sends it (``[id, [field, value, ...]]``): id and fields (None for
    an entry deleted while pending)."""
    entry_id, flat = raw
    if flat is None:
        return entry_id, None
    return entry_id, dict(zip(flat[::2], flat[1::2], strict=True))


def _drop_signal_frame(exc: BaseException) -> None:
    """Cut our SIGINT handler's frame off the end of an interrupt's traceback: the user's
    traceback ends where their code was interrupted."""
    prev, tb = None, exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        prev, tb = tb, tb.tb_next
    if prev is not None and tb is not None and tb.tb_frame.f_code is Engine._on_sigint.__code__:
        prev.tb_next = None


def _rss() -> int:
    """This process's resident memory in bytes (its peak where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def _what(cmd: Command) -> str:
    """How a command's result is named in a serialization error."""
    names = cmd.names() if cmd.op in ("pull", "pull_namespace", "pull_serialized") else None
    if names:
        return f"{cmd.op} of {', '.join(map(repr, names))}"
    return f"result of {cmd.op}"



def main(argv: list[str] | None = None) -> int:
    """``python -m redisengines.actor --url URL --cluster NAME``: run one engine."""
    import argparse

    parser = argparse.ArgumentParser(prog="redisengines engine", description=main.__doc__)
    parser.add_argument("--url", help="Redis URL (default: REDISENGINES_REDIS_URL)")
    parser.add_argument("--cluster", help="cluster name (default: REDISENGINES_CLUSTER)")
    parser.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s engine[%(process)d] %(levelname)s %(message)s")
    settings = Settings.from_env(redis_url=args.url, cluster=args.cluster)
    if args.parent_pid is not None:
        set_parent_death_signal()
        if os.getppid() != args.parent_pid:
            return EXIT_PARENT_GONE
    return Engine(settings, parent_pid=args.parent_pid).run()


if __name__ == "__main__":
    sys.exit(main())
