"""Engine output: kept with each result, and streamed to ``P:{e<id>}:out`` while it runs."""

from __future__ import annotations

import threading

import pytest

from redisengines import output
from redisengines.keys import Keys
from redisengines.output import Capture, Chunk, _merge

from .helpers import WAIT, wait_until

pytestmark = pytest.mark.timeout(60)


def test_output_is_streamed_while_the_command_runs(client, r, cluster_name, gates) -> None:
    gate = gates()
    code = ("import sys\nprint('one')\nprint('err', file=sys.stderr)\nprint('two', flush=True)\n"
            + gate.code + "print('three')\n")
    f = client.execute(code, targets=0, block=False)
    gate.wait_started()
    keys = Keys(cluster_name)
    # readable while it still runs (the pump sends within tens of milliseconds)
    seen = wait_until(lambda: [c for c in output.read(r, keys, 0) if c.cmd == f.cmd_ids[0]]
                      if len(output.read(r, keys, 0)) >= 2 else None, what="streamed output")
    assert not f.done()
    by_fd = {fd: "".join(c.text for c in seen if c.fd == fd) for fd in ("stdout", "stderr")}
    assert by_fd == {"stdout": "one\ntwo\n", "stderr": "err\n"}
    gate.open()
    assert f.result(WAIT) is None
    assert (f.stdout, f.stderr) == ("one\ntwo\nthree\n", "err\n")
    # offsets place every chunk in the command's text: a reader that showed a prefix prints
    # only the rest of the result's output
    chunks = wait_until(lambda: (lambda cs: cs if "".join(c.text for c in cs) ==
                                 "one\ntwo\nthree\n" else None)(
        [c for c in output.read(r, keys, 0) if c.cmd == f.cmd_ids[0] and c.fd == "stdout"]),
        what="all of stdout in the stream")
    assert all(f.stdout[c.off:c.off + len(c.text)] == c.text for c in chunks)


def test_follow_yields_new_chunks_of_the_engines_asked_for(client, r, cluster_name) -> None:
    keys = Keys(cluster_name)
    stop = threading.Event()
    got: list[Chunk] = []
    client.execute("print('before')", targets=1)  # written before following: not yielded
    wait_until(lambda: r.xlen(keys.output(1)), what="the first chunk")
    chunks = output.follow(r, keys, [1], stop=stop, block=0.05)  # '$' is resolved here

    def reader() -> None:
        for chunk in chunks:
            got.append(chunk)

    t = threading.Thread(target=reader)
    t.start()
    try:
        client.execute("print('on 0')", targets=0)
        client.execute("print('after')", targets=1)
        wait_until(lambda: any(c.text == "after\n" for c in got), what="the followed chunk")
    finally:
        stop.set()
        t.join(WAIT)
    assert [c.text for c in got if c.fd == "stdout"] == ["after\n"]
    assert {c.engine for c in got} == {1} and got[0].label == "[stdout:1]"


def test_engine_log_lines_go_to_its_output_stream(client, r, cluster_name) -> None:
    with pytest.raises(Exception):  # noqa: B017 - any error; the log line is the point
        client.execute("import time; time.sleep(5)", targets=0, time_limit=0.2)
    keys = Keys(cluster_name)
    logs = wait_until(lambda: [c for c in output.read(r, keys, 0) if c.fd == "log"
                               and "interrupting" in c.text], what="the engine's log line")
    assert "WARNING" in logs[0].text


def test_huge_output_is_capped_in_the_result_and_the_stream(client, r, cluster_name) -> None:
    f = client.execute(f"print('x' * {output.TEXT_MAX + 1000})", targets=0, block=False)
    f.result(WAIT)
    assert f.stdout.startswith("x" * 1000)
    assert f.stdout.endswith("[... 1001 more characters dropped]\n")
    keys = Keys(cluster_name)
    streamed = wait_until(lambda: (lambda n: n if n >= output.TEXT_MAX else None)(
        sum(len(c.text) for c in output.read(r, keys, 0, count=1000))),
        what="the streamed output")
    assert streamed == output.TEXT_MAX


def test_a_dead_engines_output_outlives_it_with_a_ttl(client, cluster, r, cluster_name) -> None:
    client.execute("print('last words')", targets=1)
    keys = Keys(cluster_name)
    wait_until(lambda: r.xlen(keys.output(1)), what="the output")
    client.kill(targets=1)
    wait_until(lambda: r.pttl(keys.output(1)) > 0, what="a TTL on the output stream")
    assert any(c.text == "last words\n" for c in output.read(r, keys, 1))


# ------------------------------------------------------------------------ pure logic
def test_capture_keeps_text_and_hands_chunks_with_offsets() -> None:
    sent: list[tuple] = []

    class FakePump:
        def put(self, *item):
            sent.append(item)

    cap = Capture("stdout", "c-1", "S", FakePump())  # type: ignore[arg-type]
    assert cap.write("ab") == 2 and cap.write("") == 0 and cap.write("cde") == 3
    assert cap.getvalue() == "abcde"
    assert sent == [("S", "c-1", "stdout", 0, "ab"), ("S", "c-1", "stdout", 2, "cde")]
    with pytest.raises(TypeError):
        cap.write(b"bytes")  # type: ignore[arg-type]


def test_merge_joins_consecutive_chunks_of_one_command_and_fd() -> None:
    batch = [("S", "c", "stdout", 0, "a"), ("S", "c", "stdout", 1, "b"),
             ("S", "c", "stderr", 0, "x"), ("S", "c", "stdout", 2, "c"),
             ("S", "d", "stdout", 0, "z")]
    assert _merge(batch) == [("S", "c", "stdout", 0, "ab"), ("S", "c", "stderr", 0, "x"),
                             ("S", "c", "stdout", 2, "c"), ("S", "d", "stdout", 0, "z")]
