"""FAULTS #46: one engine's wall clock is 10 minutes off (ahead or behind).

Liveness (heartbeat leases: PEXPIRE in Lua) and the MAC timestamp window (``ts`` stamped and
checked on the Redis clock: each process measures its offset to Redis ``TIME`` when it
connects) must not depend on a process's own wall clock. Two engines run under libfaketime
(``LD_PRELOAD`` of the library the ``libfaketime`` wheel ships, ``FAKETIME="+600s"`` or
``"-600s"``), started as a user starts an engine on another machine (``python -m
redisengines engine --url URL --cluster NAME``), next to one normal engine.

``DONT_FAKE_MONOTONIC=1``: a skewed wall clock is the scenario (hosts disagree on the time
of day; monotonic clocks are per host and never compared across them). Faking
``CLOCK_MONOTONIC`` too breaks the process itself: Python takes the deadlines of its timed
waits on the monotonic clock, and under libfaketime without this ``threading.Event().wait(0.2)``
did not return within 5 s, with either offset.
``FAKETIME_FORCE_MONOTONIC_FIX=0`` (as the libfaketime package itself sets): on glibc >= 2.30
libfaketime otherwise rewrites the deadline of every ``pthread_cond_timedwait`` on a
``CLOCK_MONOTONIC`` condition variable, the GIL's included, as if the monotonic clock were
skewed too; GIL hand-offs between an engine's threads then stall for up to a second (its
heartbeat thread measurably missed 1.5 s leases under load), an artifact of the injection.

What the user sees, checked over several lease lengths: the skewed engines stay in
``client.ids``, their leases are never longer than ``heartbeat_ttl`` (a lease computed from
the skewed clock would be 10 minutes too long or already over), no reap event; execute,
apply, push, pull and ``get_result`` work on them; load-balanced calls (remote functions and
``Executor``) run on them; a remote call they make (signed with their stamp) is accepted by
the normal engine; a kill command (signed by the client, checked by the skewed engine) is
obeyed; a skewed engine that crashes is declared dead within the lease; and nothing is
logged as refused, by the skewed engines or by the client.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

import redisengines
from redisengines import EngineDiedError, launcher, registry
from redisengines.keys import Keys

from ..conftest import FAST
from ..helpers import interactive

pytestmark = pytest.mark.timeout(40)

SKEW = 600.0  # seconds: 10 minutes
DEADLINE = 10.0  # every command settles within this
LEASES = 4  # the steady phase lasts this many heartbeat leases
TTL_MS = int(FAST["heartbeat_ttl"] * 1000)
# Lines of an engine's log (--verbose: INFO and up) that must not appear
BAD_LOG = ("WARNING", "ERROR", "CRITICAL", "Traceback", "libfaketime")


def _square(x):
    return x * x


def _plus(k):
    return y + k  # noqa: F821 - runs on an engine: ``y`` is in its namespace


def _call_on(fn, engine, *args):
    """Runs on an engine: a call pinned to ``engine``, through the engine's own client."""
    import redisengines
    return redisengines.get(fn.options(engine=engine).remote(*args), timeout=20)


square = redisengines.remote(interactive(_square))
plus = interactive(_plus)
call_on = redisengines.remote(interactive(_call_on))


def _libfaketime() -> Path:
    """The library the libfaketime wheel ships (a test dependency)."""
    if not sys.platform.startswith("linux") or platform.machine() != "x86_64":
        pytest.skip("the libfaketime wheel ships an x86-64 Linux library only")
    spec = importlib.util.find_spec("libfaketime")
    assert spec is not None and spec.origin, \
        "libfaketime is not installed: pip install -e '.[test]'"
    so = Path(spec.origin).parent / "vendor" / "libfaketime" / "src" / "libfaketime.so.1"
    assert so.is_file(), f"the libfaketime wheel has no {so}"
    return so


@contextlib.contextmanager
def skewed_engines(n: int, r: redis.Redis, settings: redisengines.Settings, offset: str,
                   logs: Path) -> Iterator[dict[int, subprocess.Popen[bytes]]]:
    """``n`` engines that join ``settings``' cluster from processes whose wall clock is
    ``offset`` (libfaketime syntax) off; ``{engine_id: process}``, each killed on exit."""
    so = _libfaketime()
    env = {**os.environ, **settings.to_env(),
           "LD_PRELOAD": ":".join(filter(None, (str(so), os.environ.get("LD_PRELOAD")))),
           "FAKETIME": offset, "DONT_FAKE_MONOTONIC": "1", "FAKETIME_FORCE_MONOTONIC_FIX": "0"}
    keys = Keys(settings.cluster)
    since = registry.last_event_id(r, keys)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(n):
            with open(logs / f"skewed{i}.log", "wb") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "redisengines", "engine", "--url",
                     settings.redis_url or "", "--cluster", settings.cluster, "--verbose"],
                    env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT))
        found = launcher.wait_registered(r, keys, procs, since, timeout=30)
        by_pid = {p.pid: p for p in procs}
        yield {eid: by_pid[pid] for eid, pid in sorted(found.items())}
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait()


def events(r: redis.Redis, cluster: str) -> list[str]:
    """The membership events of a cluster, in order: "registered:0", "reap:2", ..."""
    return [f"{f[b'event'].decode()}:{int(f[b'engine'])}"
            for _, f in r.xrange(Keys(cluster).events)]


def bad_lines(logs: Path) -> list[str]:
    return [line for path in sorted(logs.glob("skewed*.log"))
            for line in path.read_text(errors="replace").splitlines()
            if any(word in line for word in BAD_LOG)]


def check_skewed_engine(sign: int, make_cluster, gates, r: redis.Redis, tmp_path: Path,
                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="redisengines")
    cluster = make_cluster(1, **FAST)
    name = cluster.name
    settings = cluster.settings.replace(redis_url=cluster.url)
    offset = f"{'+' if sign > 0 else '-'}{SKEW:.0f}s"
    with skewed_engines(2, r, settings, offset, tmp_path) as skewed:
        a, b = sorted(skewed)
        client = cluster.client()
        (normal,) = cluster.processes
        assert client.ids == sorted([normal, a, b])
        registered = events(r, name)

        # The skew is real: wall clocks off by 600 s, monotonic clocks not (one per host).
        before = time.time()
        client.execute("import time; t = time.time(); m = time.monotonic()", timeout=DEADLINE)
        after, mono = time.time(), time.monotonic()
        clocks = client.pull(["t", "m"], timeout=DEADLINE)
        for eid, (t, m) in clocks.items():
            skew = sign * SKEW if eid in skewed else 0.0
            assert before - 1 <= t - skew <= after + 1, \
                f"engine {eid}: wall clock off by {t - after:.1f} s, expected {skew:+.0f} s"
            assert mono - DEADLINE <= m <= mono, f"engine {eid}: monotonic clock faked"

        # Several leases long: the skewed engines stay alive, their leases are renewed on the
        # Redis clock (never longer than the TTL), every command on them works.
        start = time.monotonic()
        rounds = 0
        while time.monotonic() - start < LEASES * FAST["heartbeat_ttl"] or rounds < 3:
            rounds += 1
            both = [a, b]
            assert client.push({"x": rounds}, targets=both, timeout=DEADLINE) == \
                {a: None, b: None}
            assert client.execute("y = x * 2", targets=both, timeout=DEADLINE) == \
                {a: None, b: None}
            assert client.pull("y", targets=both, timeout=DEADLINE) == \
                {a: 2 * rounds, b: 2 * rounds}
            assert client.apply(plus, 1, targets=both, timeout=DEADLINE) == \
                {a: 2 * rounds + 1, b: 2 * rounds + 1}
            last = client.get_result(targets=a, timeout=DEADLINE)
            assert (last.op, last.value, last.error) == ("apply", 2 * rounds + 1, None)
            assert 0 <= last.duration < DEADLINE
            leases = {eid: r.pttl(Keys(name).heartbeat(eid)) for eid in both}
            assert all(0 < ms <= TTL_MS for ms in leases.values()), \
                f"round {rounds}: lease ms left {leases} (TTL {TTL_MS} ms)"
            assert client.ids == sorted([normal, a, b]), f"round {rounds}: {client.ids}"
            assert events(r, name) == registered, f"round {rounds}: {events(r, name)}"
            time.sleep(0.25)
        assert cluster.client().ids == sorted([normal, a, b]), "a new client reaped an engine"

        # Load-balanced calls run on the skewed engines while the normal one is held.
        gate = gates()
        held = gate.hold(client, normal)
        calls = [square.options(client=client).remote(i) for i in range(6)]
        with redisengines.Executor(client=client) as pool:
            mapped = list(pool.map(_square, range(6), timeout=DEADLINE))
        assert redisengines.get(calls, timeout=DEADLINE) == mapped == [i * i for i in range(6)]
        assert {f.engine_id for f in calls} <= {a, b}, [f.engine_id for f in calls]
        gate.open()
        held.result(timeout=DEADLINE)
        # A skewed engine's own client signs a call (its stamp) that the normal one checks.
        nested = call_on.options(engine=a, client=client).remote(square, normal, 7)
        assert nested.result(timeout=DEADLINE) == 49

        # A crash of a skewed engine is still noticed within its lease.
        gate = gates()
        busy = gate.hold(client, b)
        os.kill(skewed[b].pid, signal.SIGKILL)
        crashed = time.monotonic()
        with pytest.raises(EngineDiedError) as died:
            try:
                busy.result(timeout=FAST["heartbeat_ttl"] + 5)
            except TimeoutError:
                pytest.fail(f"engine {b} crashed and was not declared dead within 5 s "
                            "past its lease")
        noticed = time.monotonic() - crashed
        assert died.value.engine_id == b
        assert noticed < FAST["heartbeat_ttl"] + 3, f"death noticed after {noticed:.1f} s"
        # A kill command (signed on the client's clock) is obeyed by the skewed engine.
        client.kill(targets=a, timeout=DEADLINE)
        assert skewed[a].wait(DEADLINE) == 0
        assert client.ids == [normal]
        later = events(r, name)[len(registered):]  # (a reap may be recorded twice)
        assert set(later) == {f"reap:{b}", f"kill:{a}"}, later
    assert bad_lines(tmp_path) == [], "the skewed engines logged trouble"
    refused = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING]
    assert refused == [], "the client logged trouble"


def test_fault_46_engine_clock_10_min_ahead_changes_nothing(make_cluster, gates, r, tmp_path,
                                                            caplog) -> None:
    check_skewed_engine(+1, make_cluster, gates, r, tmp_path, caplog)


def test_fault_46_engine_clock_10_min_behind_changes_nothing(make_cluster, gates, r, tmp_path,
                                                             caplog) -> None:
    check_skewed_engine(-1, make_cluster, gates, r, tmp_path, caplog)
