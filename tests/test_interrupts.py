"""Interrupting commands on their engines: ``time_limit=``, ``abort()``, and the grace period
after which an engine whose code ignores the interrupt goes down with it. Real engines."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time

import pytest

import redisengines
from redisengines import EngineShutdownError, RemoteError, TimeLimitExceeded
from redisengines.watchdog import Watchdog

from .conftest import FAST
from .helpers import WAIT, interactive, wait_until

pytestmark = pytest.mark.timeout(60)

SLEEPER = "import time\nfor _ in range(600):\n    time.sleep(0.05)\n"
DEAF = ("import time\nwhile True:\n    try:\n        time.sleep(0.05)\n"
        "    except BaseException:\n        pass\n")


def _nap(seconds):
    import time
    time.sleep(seconds)
    return seconds


nap = redisengines.remote(interactive(_nap))


@redisengines.remote
@interactive
class Counter:
    def __init__(self):
        self.n = 0

    def bump(self):
        self.n += 1
        return self.n

    def stall(self, seconds):
        import time
        time.sleep(seconds)


# --------------------------------------------------------------------------- time_limit
def test_execute_over_its_time_limit_is_interrupted_and_the_engine_serves_on(client) -> None:
    client.execute("kept = 'still here'", targets=0)
    t0 = time.monotonic()
    with pytest.raises(TimeLimitExceeded) as err:
        client.execute("import time\nprint('before')\n" + SLEEPER, targets=0, time_limit=0.3)
    assert 0.3 <= time.monotonic() - t0 < 3
    e = err.value
    assert (e.engine_id, e.time_limit, e.op) == (0, 0.3, "execute")
    assert "time limit of 0.3 s" in str(e) and "engine 0" in str(e)
    # where the code was when it was interrupted, without the engine's own frames
    assert "time.sleep(0.05)" in e.traceback and "actor.py" not in e.traceback
    assert isinstance(e, TimeoutError)  # also a builtin TimeoutError
    # the engine survived with its namespace, and the next command is not interrupted
    assert client.execute("import time; time.sleep(0.5); ok = kept", targets=0,
                          time_limit=5) is None
    assert client.pull("ok", targets=0) == "still here"
    assert client.ids == [0, 1]


def test_time_limit_on_several_targets_and_on_apply(client) -> None:
    client.push({"ENGINE": 0}, targets=0)
    client.push({"ENGINE": 1}, targets=1)
    with pytest.raises(redisengines.CompositeError) as err:
        client.execute("import time\nif ENGINE == 1:\n    time.sleep(30)\nv = ENGINE",
                       time_limit=0.5)
    assert set(err.value.errors) == {1}
    assert isinstance(err.value.errors[1], TimeLimitExceeded)
    assert client.pull("v", targets=0) == 0
    assert client.apply(_nap, 0.1, targets=1, time_limit=5) == 0.1
    with pytest.raises(TimeLimitExceeded):
        client.apply(_nap, 30, targets=1, time_limit=0.2)


def test_time_limit_on_remote_functions_and_actor_methods(client) -> None:
    fast = nap.options(client=client, time_limit=5)
    slow = nap.options(client=client, time_limit=0.2)
    assert fast.remote(0.05).result(WAIT) == 0.05
    with pytest.raises(TimeLimitExceeded) as err:
        slow.remote(30).result(WAIT)
    assert err.value.op == "call"
    c = Counter.options(client=client).remote()
    assert c.bump.remote().result(WAIT) == 1
    with pytest.raises(TimeLimitExceeded):
        c.stall.options(time_limit=0.2).remote(30).result(WAIT)
    assert c.bump.remote().result(WAIT) == 2  # the actor lives on, its state intact


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "1", True])
def test_a_bad_time_limit_is_refused_before_sending(client, bad) -> None:
    with pytest.raises(ValueError, match="time_limit"):
        client.execute("x = 1", targets=0, time_limit=bad)
    with pytest.raises(ValueError, match="time_limit"):
        nap.options(client=client, time_limit=bad)


# ------------------------------------------------------------------------------ abort
def test_abort_interrupts_the_running_command_and_cancels_the_queued_one(client, r,
                                                                          cluster_name) -> None:
    running = client.execute("import time\nprint('working', flush=True)\n" + SLEEPER,
                             targets=0, block=False)
    queued = client.execute("never = 1", targets=0, block=False)
    wait_until(lambda: b"working" in b"".join(
        f[b"text"] for _, f in r.xrange(f"re:{cluster_name}:{{e0}}:out")),
        what="the command to start")
    t0 = time.monotonic()
    client.abort([running, queued])
    with pytest.raises(RemoteError) as err:
        running.result(WAIT)
    assert time.monotonic() - t0 < 2
    assert err.value.remote_type == "KeyboardInterrupt" and err.value.engine_id == 0
    assert "time.sleep(0.05)" in err.value.traceback and "actor.py" not in err.value.traceback
    assert running.stdout == "working\n"
    with pytest.raises(concurrent.futures.CancelledError):
        queued.result(WAIT)
    assert queued.cancelled()
    assert client.pull("never", targets=0, block=False).exception(WAIT) is not None
    assert client.execute("after = 1", targets=0) is None and client.ids == [0, 1]
    # PendingResult.abort; aborting what already finished does nothing
    again = client.execute(SLEEPER, targets=1, block=False)
    wait_until(lambda: client.queue_status(1)["running"], what="the command to start")
    again.abort()
    assert again.exception(WAIT).remote_type == "KeyboardInterrupt"
    done = client.execute("x = 1", targets=0, block=False)
    done.result(WAIT)
    done.abort()
    assert client.execute("y = 1", targets=0) is None


def test_abort_of_load_balanced_calls_queued_and_running(make_cluster) -> None:
    cluster = make_cluster(1, **FAST)
    client = cluster.client()
    running = nap.options(client=client).remote(30)
    wait_until(lambda: client._dispatcher.running_on(running) == 0,
               what="the call to be taken")
    queued = nap.options(client=client).remote(30)
    client.abort([running, queued])
    with pytest.raises(RemoteError) as err:
        running.result(WAIT)
    assert err.value.remote_type == "KeyboardInterrupt"
    with pytest.raises(concurrent.futures.CancelledError):
        queued.result(WAIT)
    assert nap.options(client=client).remote(0.01).result(WAIT) == 0.01


def test_code_that_ignores_the_interrupt_takes_its_engine_down_after_the_grace(
        make_cluster) -> None:
    cluster = make_cluster(2, interrupt_grace=1.0, **FAST)
    client = cluster.client()
    pid = cluster.processes[0].pid
    t0 = time.monotonic()
    with pytest.raises(EngineShutdownError) as err:
        client.execute(DEAF, targets=0, time_limit=0.2, timeout=WAIT)
    assert 1.2 <= time.monotonic() - t0 < 5
    assert err.value.engine_id == 0 and err.value.started is True
    assert cluster.processes[0].wait(WAIT) == 5  # EXIT_OVERRUN
    assert client.ids == [1]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_real_ctrl_c_still_interrupts_and_an_idle_engine_still_stops(cluster, client,
                                                                       r, cluster_name) -> None:
    f = client.execute("print('go', flush=True)\n" + SLEEPER, targets=0, block=False)
    wait_until(lambda: r.xlen(f"re:{cluster_name}:{{e0}}:out"), what="the command to start")
    os.kill(cluster.processes[0].pid, signal.SIGINT)
    with pytest.raises(RemoteError) as err:
        f.result(WAIT)
    assert err.value.remote_type == "KeyboardInterrupt"
    os.kill(cluster.processes[1].pid, signal.SIGINT)  # idle: a clean shutdown
    assert cluster.processes[1].wait(WAIT) == 0


# --------------------------------------------------------------------------- watchdog
def test_watchdog_fires_in_deadline_order_and_not_when_disarmed() -> None:
    fired: list[str] = []
    dog = Watchdog()
    dog.arm("late", 0.3, lambda: fired.append("late"))
    dog.arm("early", 0.05, lambda: fired.append("early"))
    dog.arm("never", 0.1, lambda: fired.append("never"))
    dog.disarm("never")
    dog.arm("moved", 0.02, lambda: fired.append("moved-old"))
    dog.arm("moved", 0.2, lambda: fired.append("moved"))  # re-armed: the old one is void
    wait_until(lambda: len(fired) == 3, timeout=5, what="three deadlines")
    time.sleep(0.2)
    dog.stop()
    assert fired == ["early", "moved", "late"]
