"""FAULTS #36 (wrong or missing HMAC, malicious pickle) and #37 (replay, cross-stream copy)."""

from __future__ import annotations

import os
import pickle

import pytest

import redisengines
from redisengines.protocol import entry
from redisengines.serialization import dumps

from ..helpers import wait_until


class Evil:
    """Unpickling it creates a marker file: it must never happen on an engine or client."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _inbox(cluster_name: str, eid: int = 0) -> str:
    return f"re:{cluster_name}:{{e{eid}}}:inbox"


def _refused(r, cluster_name: str, cmd_id: str) -> str:
    """The error message the engine recorded for a refused command (under its entry id)."""
    done = f"re:{cluster_name}:{{e0}}:done"

    def record() -> bytes | None:
        for _, f in r.xrevrange(done, count=20):
            if f[b"id"] == cmd_id.encode() and f[b"op"] == b"invalid":
                return r.hget(f[b"key"], "error")
        return None
    return wait_until(record, what=f"{cmd_id} to be refused").decode()


def test_fault_36_unsigned_malicious_pickle_is_never_unpickled(client, r, cluster_name,
                                                               tmp_path) -> None:
    marker = tmp_path / "pwned"
    fields = entry("push", "attacker-1", "nobody", names=["x"], value=dumps({"x": Evil(marker)}))
    r.xadd(_inbox(cluster_name), fields)
    assert "unsigned message" in _refused(r, cluster_name, "attacker-1")
    assert client.execute("ok = 1", targets=0) is None  # the engine keeps serving
    assert not marker.exists()
    assert "x" not in client.keys(targets=0)


def test_fault_36_tampered_entry_is_refused(client, r, cluster_name, tmp_path) -> None:
    marker = tmp_path / "pwned"
    inbox = _inbox(cluster_name)
    fields = client._signed(entry("push", "c-tamper", client.client_id, names=["x"],
                                  value=dumps({"x": 1})), inbox)
    fields["value"] = dumps({"x": Evil(marker)})  # same signature, other payload
    r.xadd(inbox, fields)
    assert "bad signature" in _refused(r, cluster_name, "c-tamper")
    flipped = client._signed(entry("execute", "c-flip", client.client_id, code="y = 1"), inbox)
    flipped["code"] = "y = 2"
    r.xadd(inbox, flipped)
    assert "bad signature" in _refused(r, cluster_name, "c-flip")
    assert client.execute("z = 1", targets=0) is None
    assert not marker.exists() and client.keys(targets=0) == ["z"]


def test_fault_37_replayed_and_copied_entries_are_refused(client, r, cluster_name) -> None:
    client.execute("n = 0")
    inbox0, inbox1 = _inbox(cluster_name, 0), _inbox(cluster_name, 1)
    signed = client._signed(entry("execute", "c-once", client.client_id, code="n += 1"), inbox0)
    r.xadd(inbox0, signed)
    wait_until(lambda: r.hget(f"re:{cluster_name}:{{rc-once}}", "status") == b"ok",
               what="the command to run")
    r.xadd(inbox0, signed)  # replayed into the same stream
    r.xadd(inbox1, signed)  # copied into another engine's stream
    assert client.pull("n") == {0: 1, 1: 0}  # ran once, on engine 0 only
    assert "already run" in str(client.get_result(-2, targets=0).error)  # the replay
    assert "bad signature" in str(client.get_result(-2, targets=1).error)  # the copy
    # the refusals did not overwrite the genuine result
    assert r.hget(f"re:{cluster_name}:{{rc-once}}", "status") == b"ok"


def test_fault_37_stale_entry_is_refused(make_cluster, r) -> None:
    cluster = make_cluster(1, result_ttl=60)
    client = cluster.client()
    inbox = _inbox(cluster.name)
    signer = client.store.signer
    signer.clock_offset -= 3600  # stamped an hour ago, beyond the 60 s window
    r.xadd(inbox, client._signed(entry("execute", "c-old", client.client_id, code="a = 1"),
                                 inbox))
    signer.clock_offset += 3600
    assert "old: stale or replayed" in _refused(r, cluster.name, "c-old")
    assert "a" not in client.keys(targets=0)


def test_forged_result_is_refused_by_the_client(client, r, cluster_name, tmp_path) -> None:
    """A notice with a pickled value that no engine signed: never unpickled."""
    marker = tmp_path / "pwned"
    cmd_id = f"{client.client_id}-forged"
    pending = redisengines.PendingResult("execute", {0: cmd_id}, single=True)
    client._listener.expect(cmd_id, pending, 0)
    r.xadd(f"re:{cluster_name}:{{c{client.client_id}}}:replies",
           {"id": cmd_id, "status": "ok", "value": dumps(Evil(marker))})
    with pytest.raises(redisengines.ProtocolError, match="unsigned message"):
        pending.result(timeout=5)
    assert not marker.exists()


def test_client_without_the_key_is_told_so(cluster, monkeypatch) -> None:
    monkeypatch.delenv("REDISENGINES_KEY")
    stranger = redisengines.connect(cluster.url, cluster=cluster.name)
    try:
        with pytest.raises(redisengines.ProtocolError, match="requires its key"):
            stranger.execute("a = 1", targets=0, timeout=5)
    finally:
        stranger.close()


def test_cluster_key_lets_another_process_join(cluster, monkeypatch) -> None:
    monkeypatch.delenv("REDISENGINES_KEY")
    other = redisengines.connect(cluster.url, cluster=cluster.name, key=cluster.key)
    try:
        assert other.execute("b = 2", targets=0, timeout=5) is None
    finally:
        other.close()
    assert pickle.loads(pickle.dumps(2)) == 2


def _count(url, key):
    import redis
    return redis.Redis.from_url(url).incr(key)


@pytest.mark.parametrize("busy", [False, True], ids=["idle engine", "busy engine"])
def test_fault_37_replayed_task_is_refused_by_another_engine(make_cluster, r, server_url,
                                                             gates, busy) -> None:
    """A load-balanced task replayed into P:tasks after it ran is refused by whichever engine
    takes it (its result already has a final status): one waiting in its blocking read, or
    one that takes it right after finishing its previous command."""
    from ..conftest import FAST
    from ..helpers import interactive

    cluster = make_cluster(2, **FAST)
    client = cluster.client()
    count = redisengines.remote(interactive(_count)).options(client=client)
    key, tasks = f"test:replay:{busy}", f"re:{cluster.name}:tasks"
    first = gates()
    held = first.hold(client, 1)  # engine 0 takes the task; its entry is copied before it runs
    hold0 = gates()
    hold0.hold(client, 0)
    f = count.remote(server_url, key)
    (_, signed), = wait_until(lambda: r.xrange(tasks), what="the task in P:tasks")
    hold0.open()
    assert f.result(timeout=10) == 1
    ran_on = f.engine_id
    other = 1 - ran_on
    blocker = gates()
    blocker.hold(client, ran_on)  # the replay must go to the other engine
    first.open()
    if busy:  # the other engine is running a command when the replay arrives
        second = gates()
        second.hold(client, other)
        r.xadd(tasks, signed)
        second.open()
    else:  # the other engine has finished and waits in its blocking read
        held.result(timeout=10)
        r.xadd(tasks, signed)
    done = f"re:{cluster.name}:{{e{other}}}:done"
    wait_until(lambda: any(e[b"op"] == b"invalid" for _, e in r.xrevrange(done, count=5)),
               what="the replay to be refused")
    blocker.open()
    assert int(r.get(key)) == 1  # it ran once
    refusal = next(e for _, e in r.xrevrange(done, count=5) if e[b"op"] == b"invalid")
    assert b"already run" in r.hget(refusal[b"key"], "error")
