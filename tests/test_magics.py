"""The IPython magics (``%px``, ``%%px``, ``%autopx``, ``%pxresult``, ``%pxconfig``) in a real
InteractiveShell, against real engines."""

from __future__ import annotations

import collections
import contextlib
import io
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

pytest.importorskip("IPython")

from IPython.core.error import UsageError  # noqa: E402
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402
from traitlets.config import Config  # noqa: E402

import redisengines  # noqa: E402
from redisengines import (  # noqa: E402
    CompositeError,
    PendingResult,
    RemoteError,
    TimeLimitExceeded,
)
from redisengines.magics import _AutoPx  # noqa: E402

from .helpers import WAIT, Gate  # noqa: E402

pytestmark = pytest.mark.timeout(60)


class Recorder(io.TextIOBase):
    """A ``sys.stdout`` that keeps what is written and tells when some text has appeared."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._watch: list[tuple[str, threading.Event]] = []
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        with self._lock:
            self._parts.append(s)
            text = "".join(self._parts)
            for needle, event in self._watch:
                if needle in text:
                    event.set()
        return len(s)

    def when(self, needle: str) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._watch.append((needle, event))
        return event

    def getvalue(self) -> str:
        with self._lock:
            return "".join(self._parts)


def in_thread(target: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def ip(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InteractiveShell]:
    """One real InteractiveShell for the module (no history file, no colours)."""
    main = sys.modules["__main__"]  # the shell replaces it with its user module
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IPYTHONDIR", str(tmp_path_factory.mktemp("ipython")))
        config = Config()
        config.HistoryManager.hist_file = ":memory:"
        config.InteractiveShell.colors = "nocolor"
        shell = InteractiveShell.instance(config=config)
        try:
            yield shell
        finally:
            InteractiveShell.clear_instance()
            sys.modules["__main__"] = main


@pytest.fixture
def px(ip: InteractiveShell, cluster: redisengines.Cluster,
       cluster_name: str) -> Iterator[InteractiveShell]:
    """The shell with ``%load_ext redisengines`` and a default client of two engines."""
    redisengines.init(url=cluster.url, cluster=cluster_name)
    try:
        ip.run_line_magic("load_ext", "redisengines")
        yield ip
    finally:
        ip.run_line_magic("unload_ext", "redisengines")
        redisengines.shutdown()
    assert not any(isinstance(t, _AutoPx) for t in ip.input_transformers_cleanup)


@contextlib.contextmanager
def recording() -> Iterator[Recorder]:
    """``sys.stdout`` is a Recorder (inside a test: pytest resumes its own capture, which
    replaces ``sys.stdout``, between a fixture's setup and the test)."""
    recorder = Recorder()
    with contextlib.redirect_stdout(recorder):
        yield recorder


def test_importing_redisengines_does_not_import_ipython() -> None:
    code = "import sys, redisengines; assert 'IPython' not in sys.modules, 'IPython imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_px_runs_a_line_on_every_engine_with_labelled_output(px, client, capsys) -> None:
    px.run_line_magic("px", "import sys; print('hello', 6 * 7); print('oops', file=sys.stderr)")
    out, err = capsys.readouterr()
    assert sorted(out.splitlines()) == ["[stdout:0] hello 42", "[stdout:1] hello 42"]
    assert sorted(err.splitlines()) == ["[stderr:0] oops", "[stderr:1] oops"]
    # through run_cell, and without IPython's {expr} expansion of the line
    result = px.run_cell("%px s = \"{len('ab')}\"")
    assert result.success
    assert client.pull("s") == {0: "{len('ab')}", 1: "{len('ab')}"}


def test_each_line_is_shown_once_whether_streamed_or_from_the_result(px, capsys) -> None:
    px.run_cell_magic("px", "", "for i in range(2000):\n    print(i, flush=True)\n"
                                "print('no newline', end='')")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * 2001
    counts = collections.Counter(lines)
    for eid in (0, 1):
        mine = [line for line in lines if line.startswith(f"[stdout:{eid}] ")]
        assert mine == [f"[stdout:{eid}] {i}" for i in range(2000)] + \
            [f"[stdout:{eid}] no newline"]
    assert set(counts.values()) == {1}


def test_cell_px_with_targets(px, client, capsys) -> None:
    px.run_cell_magic("px", "--targets 1", "x = 5\nprint('on', x)")
    assert capsys.readouterr().out == "[stdout:1] on 5\n"
    assert client.pull("x", targets=1) == 5
    with pytest.raises(KeyError):
        client.pull("x", targets=0)
    px.run_cell_magic("px", "-t 0,1", "y = 1")
    px.run_cell_magic("px", "-t ::2", "z = 2")
    px.run_cell_magic("px", "-t [1]", "w = 3")
    px.run_cell_magic("px", "--targets=-1: -o last_px", "t = 4")  # the last live engine
    assert client.keys() == {0: ["y", "z"], 1: ["t", "w", "x", "y"]}
    assert isinstance(px.user_ns.pop("last_px"), PendingResult)
    for bad in ("7", "nope", "5:"):
        with pytest.raises(UsageError):
            px.run_cell_magic("px", f"-t {bad}", "v = 0")
    with pytest.raises(UsageError):
        px.run_cell_magic("px", "--group-outputs=type", "v = 0")


def test_group_outputs_engine_shows_each_engine_as_a_block(px, capsys) -> None:
    px.run_cell_magic("px", "--group-outputs=engine", "print('a')\nprint('b')")
    assert capsys.readouterr().out == "[stdout:0]\na\nb\n[stdout:1]\na\nb\n"
    px.run_cell_magic("px", "-e", "print('a')")
    assert capsys.readouterr().out == "[stdout:0] a\n[stdout:1] a\n"


def test_group_outputs_order_shows_output_while_the_command_runs(px, gates) -> None:
    gate: Gate = gates()
    seen_while_running = []
    with recording() as stdout:
        first = stdout.when("[stdout:0] first\n")

        def release() -> None:
            seen_while_running.append(first.wait(WAIT))
            gate.open()

        thread = in_thread(release)
        px.run_cell_magic("px", "-t 0 --group-outputs=order",
                          "print('first', flush=True)\n" + gate.code + "print('second')\n")
    thread.join(WAIT)
    assert seen_while_running == [True]  # shown before the gate opened
    assert stdout.getvalue() == "[stdout:0] first\n[stdout:0] second\n"


def test_noblock_returns_the_pending_result_and_pxresult_waits_for_it(px, gates) -> None:
    gate: Gate = gates()
    seen_while_running = []
    with recording() as stdout:
        pending = px.run_cell_magic("px", "--noblock -t 0", "print('before', flush=True)\n"
                                    + gate.code + "print('after')")
        assert isinstance(pending, PendingResult)
        assert not pending.done()
        assert stdout.getvalue() == ""
        before = stdout.when("[stdout:0] before\n")

        def release() -> None:  # %pxresult streams the running command's output
            seen_while_running.append(before.wait(WAIT))
            gate.open()

        thread = in_thread(release)
        px.run_line_magic("pxresult", "")
        thread.join(WAIT)
        assert seen_while_running == [True]
        assert stdout.getvalue() == "[stdout:0] before\n[stdout:0] after\n"
        assert pending.done() and pending.stdout == "before\nafter\n"
        px.run_line_magic("pxresult", "--group-outputs=engine")  # shown again, grouped
        assert stdout.getvalue().endswith("[stdout:0]\nbefore\nafter\n")
    # as the value of a cell
    result = px.run_cell("%%px --noblock -t 1\nq = 1")
    assert isinstance(result.result, PendingResult)
    assert result.result.result(WAIT) is None


def test_a_remote_error_shows_the_remote_traceback_and_fails_the_cell(px, capsys) -> None:
    result = px.run_cell("%px print('before'); 1/0")
    assert isinstance(result.error_in_exec, CompositeError)
    out = capsys.readouterr().out
    for eid in (0, 1):
        assert f"[{eid}:execute]: ZeroDivisionError: division by zero" in out
        assert out.index(f"[stdout:{eid}] before") < out.index("[0:execute]")
    assert out.count("Traceback (most recent call last)") == 2  # the remote ones only
    assert "line 1, in <module>" in out
    assert "magics.py" not in out and "interactiveshell" not in out
    assert "CompositeError: 2 of 2 engines failed" in out

    result = px.run_cell("%%px -t 0\ndef f():\n    raise ValueError('bad')\nf()")
    err = result.error_in_exec
    assert isinstance(err, ValueError) and isinstance(err, RemoteError)
    out = capsys.readouterr().out
    assert out.startswith("[0:execute]: ValueError: bad\n")
    assert "line 2, in f" in out and "magics.py" not in out
    with pytest.raises(ZeroDivisionError):  # raised by run_line_magic / run_cell_magic
        px.run_cell_magic("px", "-t 1", "1/0")


def test_time_limit_interrupts_the_code_and_the_engine_serves_on(px, client, capsys) -> None:
    result = px.run_cell("%%px -t 0 --time-limit 0.3\nimport time\nwhile True:\n"
                         "    time.sleep(0.05)")
    assert isinstance(result.error_in_exec, TimeLimitExceeded)
    assert "[0:execute]: TimeLimitExceeded" in capsys.readouterr().out
    assert client.execute("ok = 1", targets=0) is None


def test_autopx_runs_every_cell_on_the_engines_until_toggled_off(px, client, capsys) -> None:
    px.run_cell("%autopx")
    assert capsys.readouterr().out.startswith("%autopx enabled")
    result = px.run_cell("a = 40\nb = a + 2\nprint(b)")
    assert result.success
    assert sorted(capsys.readouterr().out.splitlines()) == ["[stdout:0] 42", "[stdout:1] 42"]
    assert client.pull("b") == {0: 42, 1: 42}
    assert "b" not in px.user_ns
    # the terminal still sees an unfinished block as unfinished
    assert px.check_complete("for i in range(3):")[0] == "incomplete"
    result = px.run_cell("b / 0")
    assert isinstance(result.error_in_exec, CompositeError)
    assert "[1:execute]: ZeroDivisionError" in capsys.readouterr().out
    px.run_cell("%pxconfig --targets 1")  # this extension's magics run locally
    px.run_cell("c = 1")
    assert client.keys() == {0: ["a", "b"], 1: ["a", "b", "c"]}
    px.run_cell("%autopx")
    assert capsys.readouterr().out.strip() == "%autopx disabled"
    px.run_cell("d = 5")
    assert px.user_ns["d"] == 5
    assert client.keys() == {0: ["a", "b"], 1: ["a", "b", "c"]}


def test_unloading_the_extension_turns_autopx_off(px) -> None:
    px.run_cell("%autopx")
    px.run_line_magic("unload_ext", "redisengines")
    assert not any(isinstance(t, _AutoPx) for t in px.input_transformers_cleanup)
    assert "px" not in px.magics_manager.magics["line"]
    px.run_line_magic("load_ext", "redisengines")  # for the fixture's teardown


def test_pxconfig_sets_the_defaults(px, client, capsys) -> None:
    px.run_line_magic("pxconfig", "")
    assert capsys.readouterr().out == ("%pxconfig --targets all --block --group-outputs=order "
                                       "--time-limit none\n")
    px.run_line_magic("pxconfig", "--targets 1 --group-outputs engine")
    px.run_line_magic("px", "v = 3; print('here')")
    assert capsys.readouterr().out == "[stdout:1] here\n"
    assert client.keys() == {0: [], 1: ["v"]}
    px.run_line_magic("pxconfig", "--noblock -t all --time-limit 5")
    pending = px.run_line_magic("px", "u = 4")
    assert isinstance(pending, PendingResult)
    assert pending.result(WAIT) == {0: None, 1: None}
    assert px.run_cell_magic("px", "--block", "print('x')") is None  # only this cell blocks
    assert sorted(capsys.readouterr().out.splitlines()) == ["[stdout:0] x", "[stdout:1] x"]
    px.run_line_magic("pxconfig", "")
    assert capsys.readouterr().out == ("%pxconfig --targets all --noblock "
                                       "--group-outputs=engine --time-limit 5\n")
    for bad in ("--targets nope", "--time-limit -1", "--group-outputs type"):
        with pytest.raises(UsageError):
            px.run_line_magic("pxconfig", bad)


def test_ctrl_c_aborts_the_command_and_the_engine_serves_on(px, client, capsys) -> None:
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT does not raise KeyboardInterrupt in this process")
    main = threading.main_thread().ident
    assert main is not None and threading.current_thread().ident == main
    sent = []
    with recording() as stdout:
        working = stdout.when("[stdout:0] working\n")

        def ctrl_c() -> None:  # once the magic shows the command running
            if working.wait(WAIT):
                sent.append(time.monotonic())
                signal.pthread_kill(main, signal.SIGINT)

        thread = in_thread(ctrl_c)
        result = px.run_cell("%%px -t 0\nimport time\nprint('working', flush=True)\ntry:\n"
                             "    for _ in range(200):\n        time.sleep(0.05)\n"
                             "finally:\n    print('cleaned up')\n")
        thread.join(WAIT)
    assert sent and time.monotonic() - sent[0] < 5
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    out = stdout.getvalue()
    assert "[stdout:0] cleaned up\n" in out  # the aborted command's output
    assert "[0:execute]: KeyboardInterrupt" in out  # its remote traceback
    assert "time.sleep(0.05)" in out
    assert out.rstrip().endswith("KeyboardInterrupt: %px interrupted on engine 0")
    assert "Ctrl-C: interrupting execute on engine 0" in capsys.readouterr().err
    # the engine survived, reports the interrupt, and serves on
    record = client.get_result(-1, targets=0)
    assert isinstance(record.error, RemoteError)
    assert record.error.remote_type == "KeyboardInterrupt"
    assert client.execute("after = 1", targets=0) is None
    assert client.pull("after", targets=0) == 1
    assert client.ids == [0, 1]


def test_without_a_default_client_the_magics_say_so(ip, capsys) -> None:
    redisengines.shutdown()  # no default client
    ip.run_line_magic("load_ext", "redisengines")
    try:
        result = ip.run_cell("%px x = 1")
        assert isinstance(result.error_in_exec, UsageError)
        assert "call redisengines.init(url=..., cluster=...) first" in capsys.readouterr().err
        with pytest.raises(UsageError, match="none ran yet"):
            ip.run_line_magic("pxresult", "")
    finally:
        ip.run_line_magic("unload_ext", "redisengines")
