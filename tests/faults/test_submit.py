"""FAULTS #19 (no duplicate submission on a retried write) and #40 (bounded queues)."""

from __future__ import annotations

import threading

import pytest

import redisengines
from redisengines.protocol import entry

from ..helpers import delay_sender, interactive


def test_fault_19_a_retried_submission_queues_nothing_twice(client, r, cluster_name) -> None:
    inbox = f"re:{cluster_name}:{{e0}}:inbox"
    client.execute("n = 0", targets=0)
    cmd_id = client._new_id()
    fields = entry("execute", cmd_id, client.client_id, code="n += 1")
    first = client._enqueue([(inbox, cmd_id, fields)])
    again = client._enqueue([(inbox, cmd_id, fields)])  # as redis-py's retry would send it
    assert first == again and first[0]
    assert client.pull("n", targets=0) == 1  # ran once (pull queues behind it)
    assert r.hget(f"re:{cluster_name}:{{r{cmd_id}}}", "status") == b"ok"


def test_fault_40_full_inbox_raises_queue_full_and_loses_nothing(make_cluster, gates) -> None:
    cluster = make_cluster(2, max_queue=3)
    client = cluster.client()
    gate = gates()
    held = gate.hold(client, 0)  # running: no longer counted in the stream after it ends
    queued = [client.execute(f"x{i} = {i}", targets=0, block=False) for i in range(2)]
    with pytest.raises(redisengines.QueueFullError, match="REDISENGINES_MAX_QUEUE"):
        client.execute("y = 1", targets=0)
    everywhere = client.execute("z = 1", block=False)  # engine 1 has room, engine 0 not
    gate.open()
    with pytest.raises(redisengines.CompositeError) as err:
        everywhere.result(timeout=10)
    assert isinstance(err.value.errors[0], redisengines.QueueFullError)
    assert err.value.results == {1: None}
    held.result(timeout=10)
    assert [f.result(timeout=10) for f in queued] == [None, None]
    assert client.pull(["x0", "x1"], targets=0) == [0, 1]
    assert "y" not in client.keys(targets=0)


def test_fault_40_a_callback_of_a_call_refused_as_full_can_ask_for_the_queue(
        make_cluster, gates, monkeypatch, server_url) -> None:
    """A .remote() call refused by a full inbox fails on the client's sender thread, where
    its done-callbacks run: one that asks queue_status() must get it, not wait for the
    sender (which is that very thread) until its timeout."""
    cluster = make_cluster(2, max_queue=2)
    client = cluster.client()
    gate, other = gates(), gates()
    held = gate.hold(client, 0)
    queued = client.execute("x = 1", targets=0, block=False)  # the inbox is full now
    # A call still running elsewhere: the next one does not come alone, so the sender sends it.
    waiting = redisengines.remote(wait_for).options(engine=1, client=client).remote(
        server_url, other.open_key)
    delay_sender(client, monkeypatch, 0.2)  # the callback below is added before it fails
    seen: list[tuple[str, object]] = []
    answered = threading.Event()

    def on_done(f: redisengines.PendingResult) -> None:
        try:
            seen.append((threading.current_thread().name, client.queue_status(targets=0,
                                                                               timeout=5)))
        except Exception as exc:  # (kept for the assertion below)
            seen.append((threading.current_thread().name, exc))
        answered.set()

    refused = redisengines.remote(_one).options(engine=0, client=client).remote()
    refused.add_done_callback(on_done)
    assert answered.wait(10)
    assert isinstance(refused.exception(timeout=1), redisengines.QueueFullError)
    (thread, status), = seen
    assert thread.startswith("re-sender-")
    assert isinstance(status, dict) and (status["queued"], status["running"]) == (1, 1), status
    gate.open()
    other.open()
    held.result(timeout=10)
    assert queued.result(timeout=10) is None
    assert waiting.result(timeout=10) is None


def _one() -> int:
    return 1


@interactive
def wait_for(url: str, key: str) -> None:
    import redis
    redis.Redis.from_url(url).blpop([key], 30)
