"""Progress bars on long waits: ``client.wait``/``barrier(progress=True)`` and
``PendingResult.wait_interactive``. Rich writes to the (captured) stdout."""

from __future__ import annotations

import time

import pytest

from redisengines import RemoteError
from redisengines.overview import age_text, running_for
from redisengines.progress import _engines_line

from .helpers import WAIT, wait_until

pytestmark = pytest.mark.timeout(60)


def test_wait_with_progress_shows_the_count_and_returns_when_done(client, capsys) -> None:
    futures = [client.execute("import time; time.sleep(0.1)", targets=i % 2, block=False)
               for i in range(4)]
    assert client.wait(futures, progress=True) is True
    assert all(f.done() for f in futures)
    assert "4/4" in capsys.readouterr().out


def test_wait_gives_false_at_its_timeout_with_or_without_a_bar(client, capsys, gates) -> None:
    gate = gates()
    held = gate.hold(client, 0)
    t0 = time.monotonic()
    assert client.wait([held], timeout=0.3, progress=True) is False
    assert client.wait(held, timeout=0.1) is False
    assert time.monotonic() - t0 < 3
    assert "0/1" in capsys.readouterr().out
    gate.open()
    assert client.wait(held, timeout=WAIT) is True


def test_wait_interactive_counts_the_engines_of_one_result(client, capsys) -> None:
    f = client.execute("import time; time.sleep(0.2)", block=False)
    assert f.wait_interactive(timeout=WAIT) is True
    assert f.result() == {0: None, 1: None}
    assert "2/2" in capsys.readouterr().out


def test_barrier_with_progress_raises_the_first_failure_at_once(client, capsys) -> None:
    slow = client.execute("import time; time.sleep(20)", targets=1, block=False)
    bad = client.execute("1/0", targets=0, block=False)
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as err:
        client.barrier([bad, slow], progress=True, timeout=WAIT)
    assert time.monotonic() - t0 < 3
    assert isinstance(err.value, ZeroDivisionError)
    slow.abort()


def test_the_engines_line_tells_who_is_busy_with_what(client, gates) -> None:
    gate = gates()
    gate.hold(client, 0)
    line = wait_until(lambda: (lambda s: s if "0 busy execute" in s else None)(
        _engines_line(client)), what="engine 0 published as busy")
    assert "1 idle" in line
    gate.open()


def test_running_for_counts_from_the_last_heartbeat_on_the_redis_clock() -> None:
    assert running_for({"running_for": 2.0, "beat": 100.0}, clock=103.5) == 5.5
    assert running_for({"running_for": 2.0}, clock=103.5) == 2.0
    assert [age_text(s) for s in (0.4, 59, 125, 3720)] == ["0s", "59s", "2m05s", "1h02m"]
