"""FAULTS #6 (zombie engine), #15 (Redis restart without persistence)."""

from __future__ import annotations

import os
import signal

import pytest

import redisengines
from redisengines import ClusterStateLostError, EngineDiedError
from redisengines.server import EmbeddedServer

from ..helpers import wait_until


def test_fault_06_zombie_is_fenced_and_rejoins_as_a_new_engine(cluster, client, r,
                                                                cluster_name) -> None:
    f = client.execute("import time; time.sleep(2); x = 1", targets=0, block=False)
    wait_until(lambda: client.queue_status(targets=0)["running"] == 1, what="engine 0 busy")
    pid = cluster.processes[0].pid
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(EngineDiedError) as died:
            f.result(timeout=10)  # lease 1.5 s: declared dead while frozen
        assert died.value.started is True
    finally:
        os.kill(pid, signal.SIGCONT)
    # It wakes, finishes its sleep, and its late result is refused: the decision stands.
    wait_until(lambda: 2 in client.get_ids(), timeout=15, what="the zombie to rejoin")
    assert client.ids == [1, 2]
    cmd_id = f.cmd_ids[0]
    assert r.hget(f"re:{cluster_name}:{{r{cmd_id}}}", "status") == b"error"
    info = client.pull_namespace(targets=2)
    assert info == {}  # a new engine: the old namespace is gone with the old id
    assert client.apply(os.getpid, targets=2) == pid  # the same process, a new engine


def test_fault_15_restart_without_persistence_fails_pending_with_state_lost() -> None:
    server = EmbeddedServer().start()
    settings = redisengines.Settings(cluster="lost", heartbeat_interval=0.25, heartbeat_ttl=1.5)
    cluster = redisengines.Cluster(1, url=server.url, settings=settings).start()
    try:
        client = cluster.client()
        client.execute("a = 1", targets=0)
        pending = client.execute("import time; time.sleep(30)", targets=0, block=False)
        server.restart(nosave=True)
        with pytest.raises(ClusterStateLostError, match="lost the cluster's state"):
            pending.result(timeout=15)
        # the engine process registers again under a fresh state; work resumes
        wait_until(lambda: client.get_ids(), timeout=15, what="an engine to register again")
        (eid,) = client.ids
        assert client.execute("b = 2", targets=eid, timeout=10) is None
    finally:
        cluster.stop()
        server.stop()
