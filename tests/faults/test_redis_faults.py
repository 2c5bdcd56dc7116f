"""FAULTS #16-#20, #22, #25, #26, #28, #29, #47, #49: the Redis server misbehaves.

Every scenario that crashes, restores, freezes, pauses or proxies Redis runs its own server
(``EmbeddedServer`` with the persistence flags it needs) and its own cluster, stopped in
``finally``. Each checks the invariant of FAULTS.md, not just the error: every command
submitted reaches exactly one terminal state (its result, or a named error) before a
deadline; nothing acknowledged is lost; nothing runs twice. "Ran" is read from side
effects outside the faulty server: each command appends its tag to a file (the ledger), and
commands that must stay busy wait on a latch kept in the session server.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import gc
import json
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
import redis

import redisengines
from redisengines import (
    ClusterStateLostError,
    ConnectionLostError,
    EngineDiedError,
    RedisEnginesError,
    registry,
)
from redisengines.connection import SOCKET_TIMEOUT
from redisengines.server import EmbeddedServer

from ..conftest import FAST
from ..helpers import Gate, interactive, wait_until

pytestmark = pytest.mark.timeout(60)

DEADLINE = 10.0  # every command of a scenario settles within this, or the test fails
# FAULTS.md's name for an accepted command that a crash lost (if the library has it yet)
CommandLostError: type[Exception] = getattr(redisengines, "CommandLostError",
                                            type("NoCommandLostError", (Exception,), {}))
# The errors a command may end with when the server fails under it
NAMED = (EngineDiedError, ClusterStateLostError, ConnectionLostError, CommandLostError)


# --------------------------------------------------------------------------- helpers
def settings(cluster: str, **overrides: Any) -> redisengines.Settings:
    return redisengines.Settings(cluster=cluster, **{**FAST, **overrides})


@contextlib.contextmanager
def own_server(*extra_args: str) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(extra_args=list(extra_args)).start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def own_cluster(n: int, url: str, s: redisengines.Settings,
                latches: Latches | None = None) -> Iterator[redisengines.Cluster]:
    """A cluster of ``n`` engines; ``latches`` are opened before its engines are stopped
    (a failed test leaves none of them busy until its hold limit)."""
    cluster = redisengines.Cluster(n, url=url, settings=s)
    try:
        yield cluster.start()
    finally:
        if latches is not None:
            latches.open_all()
        cluster.stop()


class Ledger:
    """Side effects outside Redis: a command appends its tag to a file (O_APPEND, one line)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.touch()

    def code(self, tag: str) -> str:
        return f"open({str(self.path)!r}, 'a').write({tag + chr(10)!r})\n"

    def counts(self) -> collections.Counter[str]:
        return collections.Counter(self.path.read_text().split())

    def assert_ran_once(self, tags: list[str]) -> None:
        ran = self.counts()
        assert {t: ran[t] for t in tags} == dict.fromkeys(tags, 1), \
            f"commands lost or run twice (tag: times run): {dict(ran)}"


class Latches:
    """A factory of latches in the session server; ``open_all`` at the end of a test."""

    def __init__(self, r: redis.Redis, url: str) -> None:
        self.r, self.url = r, url
        self.made: list[Gate] = []

    def __call__(self) -> Gate:
        """A sticky gate in the session server (not the faulty one)."""
        self.made.append(Gate(self.r, self.url, sticky=True))
        return self.made[-1]

    def open_all(self) -> None:
        for latch in self.made:
            latch.open()


@pytest.fixture
def latches(r: redis.Redis, server_url: str) -> Iterator[Latches]:
    made = Latches(r, server_url)
    yield made
    made.open_all()


HUNG = "<no terminal state>"


def outcomes_of(futures: dict[str, concurrent.futures.Future], timeout: float = DEADLINE
                ) -> dict[str, Any]:
    """Each future's value or exception, or HUNG if it is still pending after ``timeout``."""
    concurrent.futures.wait(list(futures.values()), timeout=timeout)
    return {tag: (f.exception() or f.result()) if f.done() else HUNG
            for tag, f in futures.items()}


def settle(futures: dict[str, concurrent.futures.Future], timeout: float = DEADLINE
           ) -> dict[str, Any]:
    """Each future's value or exception; fails if any is still pending after ``timeout``."""
    outcomes = outcomes_of(futures, timeout)
    hung = sorted(t for t, v in outcomes.items() if v is HUNG)
    assert not hung, (f"{len(hung)} of {len(futures)} commands reached no terminal state "
                      f"within {timeout} s: {hung[:10]}")
    return outcomes


def untruthful(outcomes: dict[str, Any], ran: collections.Counter[str]) -> dict[str, str]:
    """Outcomes that misstate whether their command ran, by what the ledger shows: a result
    means it ran once; an error that says it never ran (EngineDiedError with
    ``started=False``) means it did not (the user may send it again); any other error
    (CommandLostError included: whether it ran is unknown) leaves it open, but nothing
    runs twice."""
    wrong = {}
    for tag, outcome in outcomes.items():
        never = isinstance(outcome, EngineDiedError) and not outcome.started
        if (outcome is None and ran[tag] != 1) or (never and ran[tag] != 0) or ran[tag] > 1:
            wrong[tag] = f"{outcome!r} but ran {ran[tag]} times"
    return wrong


def events(admin: redis.Redis, cluster: str) -> list[str]:
    """The membership events of a cluster, in order ("registered", "reap", ...)."""
    return [f[b"event"].decode() + f":{int(f[b'engine'])}"
            for _, f in admin.xrange(f"re:{cluster}:events")]


def reaped(admin: redis.Redis, cluster: str) -> list[str]:
    return [e for e in events(admin, cluster) if e.startswith("reap")]


class Probe(threading.Thread):
    """Pings the server on a fresh connection, recording when it was down or LOADING."""

    def __init__(self, url: str) -> None:
        super().__init__(name="test-probe", daemon=True)
        self.url = url
        self.down = threading.Event()
        self.loading = 0
        self.last_loading = 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        p = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        while not self._halt.is_set():
            try:
                p.ping()
            except redis.BusyLoadingError:
                self.loading += 1
                self.last_loading = time.monotonic()
            except (redis.ConnectionError, redis.TimeoutError):
                self.down.set()
            self._halt.wait(0.002)
        p.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


# ------------------------------------------------------------------------ TCP proxy
class Proxy:
    """A loopback TCP proxy in its own thread (an asyncio loop) in front of a server.

    ``stall()`` stops relaying in both directions but keeps every socket open (a half-open
    path: nothing is refused, nothing arrives), ``resume()`` delivers what was held;
    ``delay = (lo, hi)`` delays each chunk by a random time in that range, in order.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-proxy",
                                       daemon=True)
        self.port = 0
        self.delay: tuple[float, float] | None = None
        self.accepted = 0
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Proxy:
        self.thread.start()

        async def setup() -> int:
            self._flowing = asyncio.Event()
            self._flowing.set()
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
            return int(self._server.sockets[0].getsockname()[1])

        self.port = self._run(setup())
        return self

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def stall(self) -> None:
        async def clear() -> None:
            assert self._flowing is not None
            self._flowing.clear()
        self._run(clear())

    def resume(self) -> None:
        async def set_() -> None:
            assert self._flowing is not None
            self._flowing.set()
        self._run(set_())

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            self._run(close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        self._spawn(self._pump(reader, up_writer))
        self._spawn(self._pump(up_reader, writer))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            assert self._flowing is not None
            with contextlib.suppress(ConnectionError, OSError):
                while True:
                    at, data = await queue.get()
                    if not data:
                        break
                    await self._flowing.wait()
                    if at > loop.time():
                        await asyncio.sleep(at - loop.time())
                    await self._flowing.wait()
                    writer.write(data)
                    await writer.drain()

        sender = asyncio.ensure_future(send())
        last = 0.0
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    break
                at = loop.time()
                if self.delay is not None:  # netem-like: each chunk late, order kept
                    at = max(last, at + random.uniform(*self.delay))
                    last = at
                queue.put_nowait((at, data))
            queue.put_nowait((0.0, b""))
            await sender
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender
            writer.close()
            self._writers.discard(writer)


# ------------------------------------------------------------------ #16 AOF always
def test_fault_16_crash_with_aof_always_keeps_results_and_resumes(tmp_path, latches) -> None:
    ledger = Ledger(tmp_path / "ran")
    # A slow load: every 1 KiB loaded the server answers (LOADING) and it dawdles on keys.
    with own_server("--appendonly", "yes", "--appendfsync", "always",
                    "--enable-debug-command", "local",
                    "--loading-process-events-interval-bytes", "1024",
                    "--key-load-delay", "-8") as server, \
            own_cluster(2, server.url, settings("aof16", retries=12), latches) as cluster:
        admin = redis.Redis.from_url(server.url)
        client = cluster.client()
        before = {eid: client.execute(ledger.code(f"done{eid}") + f"v = {eid + 40}",
                                      targets=eid, block=False) for eid in (0, 1)}
        assert settle(before) == {0: None, 1: None}
        # 200k keys in the AOF base so that the restart loads for a while
        admin.execute_command("DEBUG", "POPULATE", 200_000)
        admin.bgrewriteaof()
        wait_until(lambda: not any(admin.info("persistence")[k] for k in
                                   ("aof_rewrite_in_progress", "aof_rewrite_scheduled")),
                   what="the AOF rewrite")
        # at the crash: engine 0 runs a held command with two more queued behind it
        latch = latches()
        pending = {"held": latch.hold(client, 0, ledger.code("held")),
                   **{f"q{i}": client.execute(ledger.code(f"q{i}"), targets=0, block=False)
                      for i in range(2)}}
        probe = Probe(server.url)
        probe.start()

        def submit_while_down() -> tuple[float, redisengines.PendingResult, float]:
            wait_until(probe.down.is_set, what="the server to go down")
            # sent while the server is down, then LOADING: retried until it is back
            sent = time.monotonic()
            f = client.execute(ledger.code("during") + "w = v * 2", targets=1, block=False)
            return sent, f, time.monotonic()

        # (the restart runs in the main thread: the server dies with the thread that
        # started it, PR_SET_PDEATHSIG)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            during = pool.submit(submit_while_down)
            try:
                server.restart(nosave=True)  # SIGKILL, then start again from the AOF
            finally:
                probe.stop()
            sent, pending["during"], queued = during.result(DEADLINE)
        # what completed before the crash is intact: results, history, the engines' state
        for eid, f in before.items():
            result = admin.hgetall(f"re:aof16:{{r{f.cmd_ids[eid]}}}")
            assert result[b"status"] == b"ok" and b"v = " in result[b"code"], result
            first = admin.xrange(f"re:aof16:{{e{eid}}}:done", "1-0", "1-0")
            assert first and first[0][1][b"id"] == f.cmd_ids[eid].encode()
        assert admin.xpending("re:aof16:{e0}:inbox", "engine")["pending"] == 1  # held
        assert admin.xlen("re:aof16:{e0}:inbox") == 3
        # A client that connects once the server is back must not take the engines for
        # dead: their leases lapsed while the server was down, but they renew them.
        other = cluster.client()
        assert probe.loading > 0, "the restarted server never answered LOADING"
        assert sent < probe.last_loading < queued, "the submission did not span the load"
        latch.open()
        outcomes = settle(pending)
        live, lost, ran = other.ids, reaped(admin, "aof16"), ledger.counts()
        assert (outcomes, live, lost) == (dict.fromkeys(pending), [0, 1], []), (
            f"after the AOF restart: outcomes {outcomes}, live engines {live}, "
            f"engines presumed dead {lost}, times each command ran {dict(ran)}, "
            f"untruthful outcomes {untruthful(outcomes, ran)}")
        ledger.assert_ran_once(["done0", "done1", "held", "q0", "q1", "during"])
        # and readable from the new client
        for eid, f in before.items():
            record = other.get_result(0, targets=eid)
            assert (record.id, record.ok) == (f.cmd_ids[eid], True)
            assert f"v = {eid + 40}" in record.code
        assert other.pull("v") == {0: 40, 1: 41}
        assert other.pull("w", targets=1) == 82


def test_engine_that_dies_across_a_restart_is_reaped_after_the_grace(tmp_path,
                                                                    latches) -> None:
    """The restart grace of #16 (leases lapsed by the downtime are not proof of death) is a
    delay, not an amnesty: an engine that really died meanwhile is reaped once it is over."""
    with own_server("--appendonly", "yes", "--appendfsync", "always") as server, \
            own_cluster(2, server.url, settings("grace16"), latches) as cluster:
        client = cluster.client()
        latch = latches()
        held = latch.hold(client, 0)
        queued = client.execute("pass", targets=0, block=False)
        os.kill(cluster.processes[0].pid, signal.SIGKILL)
        server.restart(nosave=True)
        restarted = time.monotonic()
        grace = registry.restart_grace(client.settings)
        for f, started in ((held, True), (queued, False)):
            with pytest.raises(EngineDiedError) as err:
                f.result(timeout=grace + DEADLINE)
            assert (err.value.engine_id, err.value.started) == (0, started)
        # not before the grace was over (it starts at the first reap on the new server run)
        assert time.monotonic() - restarted >= grace
        assert client.ids == [1]
        assert client.apply(os.getpid, targets=1) == cluster.processes[1].pid


# ---------------------------------------------------------------- #17 AOF everysec
def _incr_aof(server: EmbeddedServer) -> Path:
    """The AOF file the server appends to now (multi-part AOF: the newest *.incr.aof)."""
    assert server.dir is not None
    return max((server.dir / "appendonlydir").glob("*.incr.aof"),
               key=lambda p: int(p.name.split(".")[-3]))


def _burst_then_crash(client: redisengines.Client, ledger: Ledger, server: EmbeddedServer,
                      phase: str, lose_tail: bool) -> None:
    """200 submissions, kill -9 right after; every one settles, none runs twice."""
    aof = _incr_aof(server)
    since = aof.stat().st_size
    # 5 ms each: most are still queued when the server dies
    burst = {f"{phase}{i}": client.execute(ledger.code(f"{phase}{i}") + "time.sleep(0.005)",
                                           targets=i % 2, block=False) for i in range(200)}
    assert server.proc is not None
    server.proc.kill()  # kill -9 right after the burst was acknowledged
    server.proc.wait(10)
    server.proc = None
    unsettled = sum(not f.done() for f in burst.values())
    assert unsettled > 100, "the burst was over before the crash: nothing was tested"
    if lose_tail:
        # What a power cut loses under everysec: the writes of the last second, not yet
        # fsynced. (kill -9 alone loses nothing: the kernel has what write() was given.)
        written = aof.stat().st_size
        with open(aof, "r+b") as f:
            f.truncate(since + (written - since) // 2)
    server.restart()
    outcomes = outcomes_of(burst)
    ran = ledger.counts()
    hung = [t for t, v in outcomes.items() if v is HUNG]
    twice = [t for t in burst if ran[t] > 1]
    assert not hung and not twice, (
        f"{phase}: of 200 acknowledged submissions {len(hung)} reached no terminal state "
        f"within {DEADLINE} s ({sum(ran[t] > 0 for t in hung)} of them had run), "
        f"{len(twice)} ran twice: hung {hung[:5]}..., twice {twice[:5]}")
    wrong = {t: repr(v) for t, v in outcomes.items() if v is not None and not isinstance(v, NAMED)}
    assert not wrong, f"{phase}: submissions ended with an unnamed error: {wrong}"
    false = untruthful(outcomes, ran)
    assert not false, f"{phase}: outcomes that misstate whether the command ran: {false}"
    print(f"#17 {phase}: {unsettled} unsettled at the crash; "
          f"{sum(v is None for v in outcomes.values())} of 200 completed, errors "
          f"{collections.Counter(type(v).__name__ for v in outcomes.values() if v)}")


def test_fault_17_crash_right_after_a_burst_settles_every_submission(tmp_path) -> None:
    ledger = Ledger(tmp_path / "ran")
    with own_server("--appendonly", "yes", "--appendfsync", "everysec") as server, \
            own_cluster(2, server.url, settings("aof17", retries=10)) as cluster:
        client = cluster.client()
        client.execute("import time")
        _burst_then_crash(client, ledger, server, "kill", lose_tail=False)
        live = wait_until(client.get_ids, timeout=DEADLINE, what="a live engine")
        assert client.execute("x = 1", targets=live, timeout=DEADLINE) == dict.fromkeys(live)
        _burst_then_crash(client, ledger, server, "cut", lose_tail=True)
        live = wait_until(client.get_ids, timeout=DEADLINE, what="a live engine")
        assert client.execute("x = 2", targets=live, timeout=DEADLINE) == dict.fromkeys(live)


# ------------------------------------------------------------------- #18 RDB rollback
def test_fault_18_rollback_to_an_old_snapshot_is_detected_and_nothing_reruns(
        tmp_path, latches) -> None:
    ledger = Ledger(tmp_path / "ran")
    with own_server("--save", "3600 1", "--dbfilename", "snapshot.rdb") as server, \
            own_cluster(1, server.url, settings("rdb18", retries=10), latches) as cluster:
        admin = redis.Redis.from_url(server.url)
        client = cluster.client()
        assert client.execute(ledger.code("first"), targets=0) is None
        # the snapshot: engine 0 runs a held command, two more are queued behind it
        latch = latches()
        done = {"held": latch.hold(client, 0, ledger.code("held")),
                **{f"q{i}": client.execute(ledger.code(f"q{i}"), targets=0, block=False)
                   for i in range(2)}}
        saves = admin.info("persistence")["rdb_saves"]
        admin.bgsave()
        wait_until(lambda: admin.info("persistence")["rdb_saves"] > saves, what="BGSAVE")
        assert admin.info("persistence")["rdb_last_bgsave_status"] == "ok"
        # after it: all three complete, and one more is running when the server dies
        latch.open()
        assert settle(done) == dict.fromkeys(done)
        late_latch = latches()
        late = late_latch.hold(client, 0, ledger.code("late"))
        server.restart(nosave=True)  # SIGKILL; it comes back with the old snapshot
        assert admin.xlen("re:rdb18:{e0}:inbox") == 3, "the server did not go back in time"
        late_latch.open()
        # its entry is gone: only noticing the time travel can settle it
        outcome = outcomes_of({"late": late})["late"]
        # Engines serve again (under the old id or a new one); what re-appeared in their
        # streams is not run again: a marker sent now runs after anything re-delivered.
        live = wait_until(client.get_ids, timeout=DEADLINE, what="a live engine")
        assert client.execute(ledger.code("after"), targets=live, timeout=DEADLINE) == \
            dict.fromkeys(live)
        ran = ledger.counts()
        runs = {t: ran[t] for t in ("first", "held", "q0", "q1", "late", "after")}
        # The command was running when the server died, so whether it ran is unknown to
        # the client: ClusterStateLostError ("went back in time ... outcome is unknown"), not
        # an error that says it never ran (it did: the ledger shows it).
        # A named error either way: the server went back in time (when the event stream
        # shows it), or the command it had accepted is gone — CommandLostError, which does
        # not claim the command never ran (detection without an event is left for later).
        named = (isinstance(outcome, ClusterStateLostError) and "back in time" in str(outcome)) \
            or (isinstance(outcome, redisengines.CommandLostError)
                and "is unknown" in str(outcome))
        assert named and runs == dict.fromkeys(runs, 1), (
            f"after the rollback: the command running at the crash ended with {outcome!r} "
            f"(want ClusterStateLostError or CommandLostError); times each command ran: "
            f"{runs} (want 1 each: re-appeared entries must not run again)")


def _frozen(url: str) -> bool:
    """True when the server does not answer a PING within half a second."""
    p = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        p.ping()
        return False
    except (redis.TimeoutError, redis.ConnectionError):
        return True
    finally:
        p.close()


# ----------------------------------------------------------------- #19 server frozen
def test_fault_19_frozen_server_is_a_stall_not_every_engine_dead(tmp_path, latches) -> None:
    ledger = Ledger(tmp_path / "ran")
    with own_server("--enable-debug-command", "local") as server, \
            own_cluster(2, server.url, settings("frozen19"), latches) as cluster:
        admin = redis.Redis.from_url(server.url)
        client = cluster.client()
        pids = {eid: p.pid for eid, p in cluster.processes.items()}
        latch = latches()
        pending = {"held": latch.hold(client, 0, ledger.code("held")),
                   "queued": client.execute(ledger.code("queued"), targets=0, block=False)}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            # frozen twice the lease: every lease lapses while nobody can renew it
            freeze = pool.submit(redis.Redis.from_url(server.url).execute_command,
                                 "DEBUG", "SLEEP", 3)
            wait_until(lambda: _frozen(server.url), what="the server to freeze")
            started = time.monotonic()
            for eid in (0, 1):  # sent into the freeze: they wait, then run once
                pending[f"during{eid}"] = client.execute(ledger.code(f"during{eid}"),
                                                         targets=eid, block=False)
            latch.open()
            freeze.result(DEADLINE)
        assert time.monotonic() - started > 1.5, "the freeze was shorter than the lease"
        outcomes = settle(pending)
        live, lost = client.ids, reaped(admin, "frozen19")
        assert (outcomes, live, lost) == (dict.fromkeys(pending), [0, 1], []), (
            f"after the freeze: outcomes {outcomes}, live engines {live}, "
            f"engines presumed dead {lost}")
        ledger.assert_ran_once(list(pending))
        # the same engine processes under the same ids, and work continues
        assert client.apply(os.getpid, targets=[0, 1], timeout=DEADLINE) == pids
        assert cluster.client().ids == [0, 1], "a new client takes the engines for dead"


# ------------------------------------------------------------------ #20 writes paused
def test_fault_20_paused_writes_delay_heartbeats_without_false_deaths(tmp_path,
                                                                      latches) -> None:
    ledger = Ledger(tmp_path / "ran")
    with own_server() as server, \
            own_cluster(2, server.url, settings("paused20"), latches) as cluster:
        admin = redis.Redis.from_url(server.url)
        client = cluster.client()
        latch = latches()
        pending = {"held": latch.hold(client, 0, ledger.code("held"))}
        admin.execute_command("CLIENT", "PAUSE", 3000, "WRITE")
        paused = time.monotonic()
        # reads go on: the leases are seen to lapse (nobody can renew them)
        wait_until(lambda: not admin.exists("re:paused20:{e0}:hb", "re:paused20:{e1}:hb"),
                   timeout=3, what="the leases to lapse during the pause")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            # someone asks who is alive meanwhile: reaping waits for the pause too
            ids = pool.submit(client.get_ids)
            newcomer = pool.submit(lambda: cluster.client().ids)
            for eid in (0, 1):  # submitted during the pause: queued after it
                pending[f"during{eid}"] = client.execute(ledger.code(f"during{eid}"),
                                                         targets=eid, block=False)
            assert time.monotonic() - paused > 2.5, "submissions were not held by the pause"
            latch.open()
            outcomes = settle(pending)
            seen = (ids.result(DEADLINE), newcomer.result(DEADLINE))
        live, lost = client.ids, reaped(admin, "paused20")
        assert (outcomes, seen, live, lost) == (dict.fromkeys(pending), ([0, 1], [0, 1]),
                                                [0, 1], []), (
            f"after the pause: outcomes {outcomes}, engines seen during it {seen}, "
            f"live engines {live}, engines presumed dead {lost}")
        ledger.assert_ran_once(list(pending))


# ------------------------------------------------------ #22 wait connection killed
def _connections_of(r: redis.Redis) -> set[str]:
    """``ip:port`` of this process's end of each connection in ``r``'s pool."""
    pool = r.connection_pool
    conns = [*pool._available_connections, *pool._in_use_connections]
    return {"{}:{}".format(*c._sock.getsockname()[:2]) for c in conns if c._sock is not None}


def test_fault_22_killed_wait_connection_is_retried_and_the_result_kept(tmp_path,
                                                                        latches) -> None:
    ledger = Ledger(tmp_path / "ran")
    with own_server() as server, \
            own_cluster(1, server.url, settings("wait22"), latches) as cluster:
        admin = redis.Redis.from_url(server.url)
        client = cluster.client()
        latch = latches()
        pending = {"held": latch.hold(client, 0, ledger.code("held") + "answer = 42\n"),
                   "pull": client.pull("answer", targets=0, block=False)}
        listener = client._listener.r  # the reply listener's own connection pool

        def blocked_wait() -> set[str]:
            mine = _connections_of(listener)
            return {c["id"] for c in admin.client_list()
                    if c["addr"] in mine and c["cmd"] == "xread"}

        killed: set[str] = set()
        for _ in range(2):  # twice: the second kill hits the reconnected wait
            waits = wait_until(lambda: blocked_wait() - killed,  # noqa: B023
                               what="the listener blocked in XREAD on a live connection")
            for cid in waits:
                admin.client_kill_filter(_id=cid)
            killed |= waits
        # and once more as the results come in
        latch.open()
        for cid in blocked_wait() - killed:
            admin.client_kill_filter(_id=cid)
        outcomes = settle(pending)
        assert outcomes == {"held": None, "pull": 42}, f"results lost: {outcomes}"
        ledger.assert_ran_once(["held"])


# -------------------------------------------------------------- #26 SCRIPT FLUSH
def _square(x):
    return x * x


def test_fault_26_script_flush_mid_run_is_transparent(tmp_path, latches) -> None:
    ledger = Ledger(tmp_path / "ran")
    square = redisengines.remote(interactive(_square))
    big = np.arange(100_000, dtype=np.int64)  # 800 kB: paged, released by a script
    with own_server() as server, \
            own_cluster(2, server.url, settings("flush26"), latches) as cluster:
        admin = redis.Redis.from_url(server.url)
        client = cluster.client()
        assert client.execute(ledger.code("before") + "a = 1", targets=1) is None
        latch = latches()
        pending = {"held": latch.hold(client, 0, ledger.code("held"))}
        admin.script_flush()  # engine 0's completion, everybody's next call: NOSCRIPT
        pending["queued"] = client.execute(ledger.code("queued"), targets=0, block=False)
        pending["other"] = client.execute(ledger.code("other") + "b = a + 1", targets=1,
                                          block=False)
        pending["remote"] = square.options(client=client).remote(7)
        pending["push"] = client.push({"big": big}, targets=[0, 1], block=False)
        latch.open()
        outcomes = settle(pending)
        assert outcomes == {"held": None, "queued": None, "other": None, "remote": 49,
                            "push": {0: None, 1: None}}, f"after SCRIPT FLUSH: {outcomes}"
        admin.script_flush()  # again, with both engines idle in their blocking reads
        pulled = client.pull("big", targets=[0, 1], block=False)
        # (an engine reads a new command at once when idle, or right after the command it
        # was completing: wait until both took theirs, so that none is queued any more)
        wait_until(lambda: not any(q["queued"] for q in client.queue_status().values()),
                   what="the pulls taken")
        assert client.clear_queue() == {0: 0, 1: 0}
        assert all(np.array_equal(v, big) for v in pulled.result(DEADLINE).values())
        manifests = [f"re:flush26:{{o{oid}}}" for oid in pulled._objects]
        assert len(manifests) == 2 and admin.exists(*manifests) == 2
        del pulled  # its paged values are released by the listener (release_object.lua)
        gc.collect()
        wait_until(lambda: not admin.exists(*manifests), what="the pulled values released")
        assert client.execute(ledger.code("after"), timeout=DEADLINE) == {0: None, 1: None}
        assert client.pull("b", targets=1) == 2
        assert square.options(client=client).remote(8).result(DEADLINE) == 64
        ledger.assert_ran_once(["before", "held", "queued", "other"])
        assert ledger.counts()["after"] == 2
        assert client.ids == [0, 1] and reaped(admin, "flush26") == []


@contextlib.contextmanager
def proxied(server: EmbeddedServer) -> Iterator[Proxy]:
    proxy = Proxy(server.port).start()
    try:
        yield proxy
    finally:
        proxy.stop()


def _through(proxy: Proxy, admin: redis.Redis, n: int) -> None:
    """Every connection to the server but ``admin``'s comes through the proxy."""
    ours = {c["id"] for c in admin.client_list()} - {str(admin.client_id())}
    assert proxy.accepted >= n and len(ours) <= proxy.accepted, \
        f"{len(ours)} connections to the server, only {proxy.accepted} through the proxy"


# --------------------------------------------------------------- #29 latency, jitter
def test_fault_29_latency_and_jitter_cause_no_timeouts_or_deaths(tmp_path) -> None:
    ledger = Ledger(tmp_path / "ran")
    square = redisengines.remote(interactive(_square))
    data = np.random.default_rng(29).random(200_000)  # 1.6 MB: paged, many chunks
    with own_server() as server, proxied(server) as proxy:
        proxy.delay = (0.020, 0.040)
        with own_cluster(2, proxy.url, settings("slow29")) as cluster:
            admin = redis.Redis.from_url(server.url)
            client = cluster.client()
            direct = redis.Redis.from_url(proxy.url)
            t0 = time.monotonic()
            direct.ping()
            assert time.monotonic() - t0 >= 0.040, "the proxy does not delay"
            direct.close()
            _through(proxy, admin, 2 * 2 + 2)
            pending: dict[str, concurrent.futures.Future] = {
                f"x{i}": client.execute(ledger.code(f"x{i}") + f"x = {i}", targets=i % 2,
                                        block=False) for i in range(10)}
            pending["slow"] = client.execute(ledger.code("slow") + "import time; "
                                             "time.sleep(2)", targets=0, block=False)
            pending["push"] = client.push({"data": data}, block=False)
            pending.update({f"sq{i}": square.options(client=client).remote(i)
                            for i in range(6)})
            outcomes = settle(pending)
            assert outcomes == {**{f"x{i}": None for i in range(10)}, "slow": None,
                                "push": {0: None, 1: None},
                                **{f"sq{i}": i * i for i in range(6)}}, outcomes
            assert client.pull("x", timeout=DEADLINE) == {0: 8, 1: 9}
            back = client.pull("data", timeout=DEADLINE)
            assert all(np.array_equal(v, data) for v in back.values())
            client.scatter("part", list(range(10)), timeout=DEADLINE)
            assert client.gather("part", timeout=DEADLINE) == list(range(10))
            ledger.assert_ran_once([t for t in pending if t.startswith("x")] + ["slow"])
            assert client.ids == [0, 1] and reaped(admin, "slow29") == []


# ---------------------------------------------------------------- #28 half-open TCP
def test_fault_28_half_open_connection_never_hangs(tmp_path) -> None:
    ledger = Ledger(tmp_path / "ran")
    with own_server() as server, proxied(server) as proxy, \
            own_cluster(1, proxy.url, settings("halfopen28", retries=0)) as cluster:
        admin = redis.Redis.from_url(server.url)
        client = cluster.client()
        _through(proxy, admin, 2 + 2)
        client.execute("import time", targets=0)
        # 1. a stall longer than the lease, shorter than the socket timeout: once the path
        # relays again the command completes, and nobody was presumed dead
        first = client.execute(ledger.code("first") + "time.sleep(0.5)", targets=0,
                               block=False)
        proxy.stall()
        try:
            wait_until(lambda: not admin.exists("re:halfopen28:{e0}:hb"),
                       what="the lease to lapse behind the stalled path")
        finally:
            proxy.resume()
        assert settle({"first": first}) == {"first": None}
        wait_until(lambda: admin.exists("re:halfopen28:{e0}:hb"),
                   what="the engine to renew its lease")
        assert client.ids == [0] and reaped(admin, "halfopen28") == []
        assert client.execute(ledger.code("second"), targets=0, timeout=DEADLINE) is None
        # 2. a path that stays silent: the wait and a new call each end with
        # ConnectionLostError once the socket timeout is over, instead of hanging
        third = client.execute(ledger.code("third") + "time.sleep(0.5)", targets=0,
                               block=False)
        proxy.stall()
        limit = SOCKET_TIMEOUT + 3.0
        try:
            t0 = time.monotonic()
            with pytest.raises(ConnectionLostError):
                client.execute("y = 1", targets=0)
            assert time.monotonic() - t0 < limit
            outcome = outcomes_of({"third": third},
                                  timeout=max(0.0, t0 + limit - time.monotonic()))["third"]
        finally:
            proxy.resume()
        assert isinstance(outcome, ConnectionLostError), (
            f"a command waited on over a silent connection ended with {outcome!r} after "
            f"{limit} s (socket timeout {SOCKET_TIMEOUT} s): want ConnectionLostError")
        ran = ledger.counts()
        assert (ran["first"], ran["second"]) == (1, 1) and ran["third"] <= 1, dict(ran)


# ------------------------------------------------------------- #25 eviction policy
def test_fault_25_evicting_server_is_warned_about_at_connect(caplog) -> None:
    with own_server() as server:
        admin = redis.Redis.from_url(server.url)
        with caplog.at_level(logging.WARNING, logger="redisengines"):
            redisengines.connect(server.url, cluster="evict25").close()
        assert not [r for r in caplog.records if "maxmemory-policy" in r.getMessage()], \
            "a warning about the default noeviction policy"
        admin.config_set("maxmemory-policy", "allkeys-lru")
        with caplog.at_level(logging.WARNING, logger="redisengines"):
            client = redisengines.connect(server.url, cluster="evict25")
        client.close()
        warned = [r for r in caplog.records if r.levelno >= logging.WARNING
                  and "maxmemory-policy" in r.getMessage() and "allkeys-lru" in r.getMessage()]
        assert warned, ("no warning at connect about maxmemory-policy allkeys-lru: "
                        f"{[r.getMessage() for r in caplog.records]}")
        assert "noeviction" in warned[0].getMessage()  # what to set instead


# ---------------------------------------------------------- #49 version mismatch
def _fake_engine(r: redis.Redis, cluster: str, eid: int, **info: Any) -> None:
    """Register an engine entry by hand, as one on another runtime would: live lease,
    registry entry, ``registered`` event."""
    p = f"re:{cluster}"
    record = {"id": eid, "host": "elsewhere", "pid": 1, "state": "idle", "completed": 0,
              "started": time.time(), **info}
    pipe = r.pipeline(transaction=True)
    pipe.set(f"{p}:{{e{eid}}}:hb", 1, px=30_000)
    pipe.hset(f"{p}:engines", eid, json.dumps(record))
    pipe.xadd(f"{p}:events", {"event": "registered", "engine": eid})
    pipe.execute()


def test_fault_49_engine_on_another_python_is_warned_about(make_cluster, r, cluster_name,
                                                            caplog) -> None:
    cluster = make_cluster(1, **FAST)
    old = {"python": "2.7.18", "cloudpickle": "0.5.6", "version": "0.0.1"}
    try:
        _fake_engine(r, cluster_name, 90, **old)
        # a client that connects sees it in the registry
        with caplog.at_level(logging.WARNING, logger="redisengines"):
            client = cluster.client()
        about = [m for m in (rec.getMessage() for rec in caplog.records) if "engine 90" in m]
        assert about and "2.7" in about[0] and "0.5.6" in about[0], \
            f"no warning at connect about engine 90 on Python 2.7: {caplog.messages}"
        assert not [m for m in caplog.messages if "engine 0 " in m], "engine 0 matches"
        caplog.clear()
        # an engine that registers while the client is connected: told at its handshake
        with caplog.at_level(logging.WARNING, logger="redisengines"):
            _fake_engine(r, cluster_name, 91, **old)
            wait_until(lambda: 91 in client.ids, what="engine 91 to be seen")
            warned = wait_until(lambda: [m for m in caplog.messages if "engine 91" in m],
                                timeout=3, what="a warning about engine 91, which registered "
                                "while the client was connected")
        assert "2.7" in warned[0]
        assert client.execute("a = 1", targets=0) is None  # the matching engine serves
    finally:
        for eid in (90, 91):
            r.delete(f"re:{cluster_name}:{{e{eid}}}:hb")
            r.hdel(f"re:{cluster_name}:engines", eid)


# --------------------------------------------------------------------------- #47 ACL
# What a cluster's user needs, and nothing else: found with INFO commandstats over a run
# of every client call and the engines' scripts. Not CONFIG (the eviction check is then
# skipped), not KEYS/SCAN, no pub/sub channels.
ACL_COMMANDS = (
    "hello", "client|setname", "client|setinfo", "ping",            # connecting
    "script|load", "evalsha",                                       # the Lua scripts
    "multi", "exec", "time",
    "info",                                                         # restart detection
    "get", "set", "del", "exists", "incr", "pexpire",
    "hget", "hset", "hsetnx", "hdel", "hexists", "hgetall", "hincrby",
    "xadd", "xread", "xreadgroup", "xack", "xdel", "xlen", "xrange", "xrevrange",
    "xpending", "xtrim", "xgroup|create", "xgroup|delconsumer",
)


def _acl_user(admin: redis.Redis, server: EmbeddedServer, name: str, prefix: str,
              commands: tuple[str, ...]) -> str:
    """Create an ACL user with ``commands`` on the keys ``prefix*``; its URL."""
    admin.execute_command("ACL", "SETUSER", name, "reset", "on", ">s3cret!", f"~{prefix}*",
                          "resetchannels", "-@all", *(f"+{c}" for c in commands))
    return f"redis://{name}:{quote('s3cret!')}@127.0.0.1:{server.port}/0"


def test_fault_47_acl_user_limited_to_its_cluster_prefix(tmp_path) -> None:
    ledger = Ledger(tmp_path / "ran")
    square = redisengines.remote(interactive(_square))
    with own_server() as server:
        admin = redis.Redis.from_url(server.url)
        url = _acl_user(admin, server, "lab", "re:acl47:", ACL_COMMANDS)
        admin.acl_log_reset()
        with own_cluster(2, url, settings("acl47")) as cluster:
            client = cluster.client()
            assert client.execute(ledger.code("x") + "a = 20") == {0: None, 1: None}
            client.push({"big": np.arange(100_000)}, targets=0)
            assert client.pull("a", targets=1) == 20
            assert client.pull("big", targets=0)[-1] == 99_999
            client.scatter("part", list(range(6)))
            assert client.gather("part") == list(range(6))
            assert square.options(client=client).remote(9).result(DEADLINE) == 81
            held = client.execute("import time; time.sleep(1)", targets=0, block=False)
            client.execute("b = 1", targets=0, block=False)
            wait_until(lambda: client.queue_status(targets=0)["running"] == 1,
                       what="the held command running")
            assert client.queue_status(targets=0)["queued"] == 1
            assert client.clear_queue(targets=0) == 1
            held.result(DEADLINE)
            assert client.get_result(-1, targets=0).ok
            # A user without one permission the library uses (INFO, which few would grant
            # a per-cluster user) is refused clearly at connect, or everything works for
            # it, failure detection included: never a silent hang.
            bare = _acl_user(admin, server, "bare", "re:acl47:",
                             tuple(c for c in ACL_COMMANDS if c != "info"))
            try:
                watcher = redisengines.Client(bare, cluster="acl47", settings=cluster.settings)
            except RedisEnginesError as exc:
                assert "info" in str(exc).lower(), f"unclear refusal: {exc}"
                watcher = client
            doomed = watcher.execute("import time; time.sleep(30)", targets=1, block=False)
            wait_until(lambda: client.queue_status(targets=1)["running"] == 1,
                       what="engine 1 busy")
            cluster.processes[1].kill()
            outcome = outcomes_of({"doomed": doomed})["doomed"]
            assert isinstance(outcome, EngineDiedError) and outcome.started, (
                f"a command of a SIGKILLed engine ended with {outcome!r} for the ACL user "
                "without INFO")
            assert client.kill(targets=0) is None
            assert client.ids == []
            if watcher is not client:
                watcher.close()
        # refused: only what the user `bare` lacks, and CONFIG GET (the optional
        # eviction-policy check)
        denied = {(e["username"], e["object"]) for e in admin.acl_log()}
        assert {o for u, o in denied if u == "lab"} <= {"config|get"}, \
            f"the library needed more than ACL_COMMANDS: {denied}"
        # the same user cannot touch another cluster: directly, from Lua, or as a client
        user = redis.Redis.from_url(url)
        with pytest.raises(redis.exceptions.NoPermissionError):
            user.get("re:other:epoch")
        with pytest.raises(redis.exceptions.NoPermissionError):
            user.xadd("re:other:{e0}:inbox", {"op": "execute"})
        with pytest.raises(redis.exceptions.ResponseError, match="(?i)noperm|permission"):
            user.eval("return redis.call('GET', KEYS[1])", 1, "re:other:epoch")
        user.close()
        with pytest.raises(RedisEnginesError, match="(?i)noperm|permission"):
            redisengines.connect(url, cluster="other")
