"""FAULTS #23: failover or demotion of the Redis master.

A topology of its own per test: one master, one replica and three sentinels (the bundled
server binary; the sentinels run from small config files in ``tmp_path``), every process
stopped by pid in ``finally``. The cluster reaches Redis through a ``redis+sentinel://`` URL,
so the client and every engine must follow the master across a ``SENTINEL FAILOVER``. The
invariant of FAULTS.md is checked with the helpers of the other Redis fault tests: every
command reaches a terminal state, what completed before stays readable, nothing runs twice
(a ledger file outside Redis), engines are not declared dead, and new work runs.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.sentinel import SentinelConnectionPool

from redisengines import CommandLostError
from redisengines.connection import bulk_client, connect
from redisengines.launcher import set_parent_death_signal
from redisengines.server import EmbeddedServer, find_server_binary, free_port

from ..helpers import wait_until
from .test_redis_faults import (
    DEADLINE,
    NAMED,
    Latches,
    Ledger,
    own_cluster,
    reaped,
    settings,
    settle,
    untruthful,
)

pytestmark = pytest.mark.timeout(120)

SERVICE = "mymaster"
FAILOVER_DEADLINE = 30.0  # a planned failover, the old master reconfigured included


@pytest.fixture
def latches(r: redis.Redis, server_url: str) -> Iterator[Latches]:
    """Latches in the session server (not in the topology that fails over)."""
    made = Latches(r, server_url)
    yield made
    made.open_all()


class Topology:
    """One master, one replica, three sentinels on loopback; ``url`` is the sentinel URL."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.master: EmbeddedServer | None = None
        self.replica: EmbeddedServer | None = None
        self.sentinel_ports: list[int] = []
        self.sentinels: list[subprocess.Popen[bytes]] = []
        self._clients: dict[int, redis.Redis] = {}

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def start(self) -> Topology:
        self.master = EmbeddedServer(extra_args=["--repl-diskless-sync-delay", "0"]).start()
        self.replica = EmbeddedServer(extra_args=[
            "--replicaof", "127.0.0.1", str(self.master.port)]).start()
        binary = find_server_binary()
        for i in range(3):
            port = free_port()
            conf = self.tmp_path / f"sentinel{i}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.tmp_path}\n"
                f"logfile {self.tmp_path / f'sentinel{i}.log'}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n")
            self.sentinel_ports.append(port)
            self.sentinels.append(subprocess.Popen(
                [binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=set_parent_death_signal))
        replica = self.replica
        wait_until(lambda: _quiet(lambda: self.info(replica)["master_link_status"] == "up"),
                   timeout=FAILOVER_DEADLINE, what="the replica to sync")
        wait_until(self._sentinels_ready, timeout=FAILOVER_DEADLINE,
                   what="every sentinel to see the replica and the other sentinels")
        return self

    def _sentinels_ready(self) -> bool:
        for port in self.sentinel_ports:
            state = _quiet(lambda p=port: self.sentinel(p).sentinel_master(SERVICE))
            if not state or state["num-slaves"] < 1 or state["num-other-sentinels"] < 2:
                return False
        return True

    def stop(self) -> None:
        for client in self._clients.values():
            client.close()
        for proc in self.sentinels:
            proc.kill()
            proc.wait(10)
        for server in (self.replica, self.master):
            if server is not None:
                server.stop()

    def sentinel(self, port: int) -> redis.Redis:
        if port not in self._clients:
            self._clients[port] = redis.Redis(port=port, socket_timeout=2,
                                              socket_connect_timeout=2)
        return self._clients[port]

    @staticmethod
    def admin(server: EmbeddedServer) -> redis.Redis:
        return redis.Redis(port=server.port, socket_timeout=5, socket_connect_timeout=2)

    def info(self, server: EmbeddedServer) -> dict[str, Any]:
        with self.admin(server) as r:
            return r.info("replication")

    def master_port(self) -> int | None:
        """The master's port as the sentinels agree on it (None while they disagree)."""
        ports = {_quiet(lambda p=p: int(self.sentinel(p).sentinel_get_master_addr_by_name(
            SERVICE)[1])) for p in self.sentinel_ports}
        return ports.pop() if len(ports) == 1 else None

    def failover(self) -> tuple[EmbeddedServer, EmbeddedServer]:
        """``SENTINEL FAILOVER``; returns (new master, old master) once the old master is a
        replica of the new one (the sentinels reconfigure it some seconds after the switch)."""
        assert self.master is not None and self.replica is not None
        old, new = self.master, self.replica
        assert self.sentinel(self.sentinel_ports[0]).execute_command(
            "SENTINEL", "FAILOVER", SERVICE) in (b"OK", True)
        wait_until(lambda: self.master_port() == new.port, timeout=FAILOVER_DEADLINE,
                   what="the sentinels to switch to the replica")
        wait_until(lambda: _quiet(lambda: self.info(old)["role"] == "slave"
                                  and int(self.info(old)["master_port"]) == new.port),
                   timeout=FAILOVER_DEADLINE, what="the old master to become a replica")
        self.master, self.replica = new, old
        return new, old


def _quiet(f: Any) -> Any:
    """``f()``, or None while the server it asks is unreachable or busy failing over."""
    try:
        return f()
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
        return None


@contextlib.contextmanager
def topology(tmp_path: Path) -> Iterator[Topology]:
    topo = Topology(tmp_path)
    try:
        yield topo.start()
    finally:
        topo.stop()


# ------------------------------------------------------------------- sentinel URLs
def test_sentinel_url_gives_a_master_client_and_a_sentinel_managed_bulk_pool() -> None:
    r = connect("redis+sentinel://:pw@127.0.0.1:26400,[::1]:26401,sentinel3/svc?db=3"
                "&sentinel_password=spw", name="n", pool_size=3)
    try:
        pool = r.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        assert (pool.service_name, pool.max_connections) == ("svc", 3)
        assert {k: pool.connection_kwargs[k] for k in ("db", "password", "client_name")} == \
            {"db": 3, "password": "pw", "client_name": "n"}
        sentinels = [s.connection_pool.connection_kwargs for s in pool.sentinel_manager.sentinels]
        assert [(s["host"], s["port"], s["password"]) for s in sentinels] == [
            ("127.0.0.1", 26400, "spw"), ("::1", 26401, "spw"), ("sentinel3", 26379, "spw")]
        # page writes go through a pool of their own that follows the master too
        bulk = bulk_client(r).connection_pool
        assert isinstance(bulk, SentinelConnectionPool) and bulk is not pool
        assert bulk.connection_kwargs["connection_pool"] is bulk.proxy
        assert (bulk.connection_kwargs["db"], bulk.sentinel_manager) == (3, pool.sentinel_manager)
    finally:
        r.close()
    with connect("redis+sentinel://h:1/svc/5") as other:
        assert other.connection_pool.connection_kwargs["db"] == 5
    with pytest.raises(ValueError, match="service"):
        connect("redis+sentinel://h:1")


# ------------------------------------------------------------ #23 SENTINEL FAILOVER
def test_fault_23_sentinel_failover_keeps_results_engines_and_runs_nothing_twice(
        tmp_path: Path, latches: Latches) -> None:
    ledger = Ledger(tmp_path / "ran")
    with topology(tmp_path) as topo, \
            own_cluster(2, topo.url, settings("fo23", retries=12), latches) as cluster:
        assert topo.master is not None
        client = cluster.client()
        assert cluster.url.startswith("redis+sentinel://")
        # (a) completed before the failover
        before = {eid: client.execute(ledger.code(f"done{eid}") + f"v = {eid + 40}",
                                      targets=eid, block=False) for eid in (0, 1)}
        assert settle(before) == {0: None, 1: None}
        # (b) engine 0 runs a held command, (c) two more are queued behind it; engine 1 is
        # idle, blocked in XREADGROUP on the master that is about to be demoted
        latch = latches()
        pending = {"held": latch.hold(client, 0, ledger.code("held")),
                   **{f"q{i}": client.execute(ledger.code(f"q{i}"), targets=0, block=False)
                      for i in range(2)}}
        with topo.admin(topo.master) as old_admin:  # every write so far is on the replica
            assert old_admin.wait(1, 5000) == 1
        started = time.monotonic()
        new, old = topo.failover()
        took = time.monotonic() - started
        with topo.admin(new) as admin:
            assert admin.info("replication")["role"] == "master"
            # the new master lacks the scripts: complete.lua must be loaded again there (NOSCRIPT)
            latch.open()
            outcomes = settle(pending, timeout=DEADLINE + 5)
            live, lost, ran = client.ids, reaped(admin, "fo23"), ledger.counts()
            assert (outcomes, live, lost) == (dict.fromkeys(pending), [0, 1], []), (
                f"after the failover ({took:.1f} s): outcomes {outcomes}, live engines {live}, "
                f"engines presumed dead {lost}, times each command ran {dict(ran)}, "
                f"untruthful outcomes {untruthful(outcomes, ran)}")
            ledger.assert_ran_once(["done0", "done1", "held", "q0", "q1"])
            # what completed before the failover is readable on the new master
            for eid, f in before.items():
                result = admin.hgetall(f"re:fo23:{{r{f.cmd_ids[eid]}}}")
                assert result[b"status"] == b"ok" and b"v = " in result[b"code"], result
                record = client.get_result(0, targets=eid)
                assert (record.id, record.ok) == (f.cmd_ids[eid], True)
            # the engines kept their namespaces, and work sent now runs (from a new client too)
            assert client.pull("v") == {0: 40, 1: 41}
            after = {eid: client.execute(ledger.code(f"after{eid}") + "w = v * 2", targets=eid,
                                         block=False) for eid in (0, 1)}
            assert settle(after) == {0: None, 1: None}
            other = cluster.client()
            assert other.pull("w") == {0: 80, 1: 82}
            ledger.assert_ran_once(["after0", "after1"])
            # nothing is left pending on the new master; the old one serves as its replica
            assert [admin.xpending(f"re:fo23:{{e{eid}}}:inbox", "engine")["pending"]
                    for eid in (0, 1)] == [0, 0]
            assert topo.info(old)["role"] == "slave"
        print(f"#23 failover: the old master was a replica {took:.1f} s after SENTINEL FAILOVER")


def test_fault_23_commands_sent_during_a_failover_all_settle_and_none_runs_twice(
        tmp_path: Path) -> None:
    """Submissions keep coming while the master changes: the ones the old master took after
    the replica's promotion are lost with it (#17), the ones it re-delivers are not run again
    (#18); each one still ends with its result or a named error."""
    ledger = Ledger(tmp_path / "ran")
    with topology(tmp_path) as topo, \
            own_cluster(2, topo.url, settings("fo23b", retries=12)) as cluster:
        client = cluster.client()
        client.execute("import time")
        sent: dict[str, Any] = {}
        done = threading.Event()

        def submit() -> None:
            i = 0
            while not done.is_set():
                tag = f"s{i}"
                try:
                    sent[tag] = client.execute(ledger.code(tag) + "time.sleep(0.01)",
                                               targets=i % 2, block=False)
                except NAMED as exc:  # refused at submission: a terminal state too
                    sent[tag] = exc
                i += 1
                done.wait(0.02)

        submitter = threading.Thread(target=submit, name="test-submitter", daemon=True)
        submitter.start()
        try:
            wait_until(lambda: len(sent) >= 10, what="submissions before the failover")
            new, _old = topo.failover()
            time.sleep(0.5)  # (a few more on the new master)
        finally:
            done.set()
            submitter.join(10)
        futures = {t: f for t, f in sent.items() if isinstance(f, concurrent.futures.Future)}
        outcomes = {**{t: e for t, e in sent.items() if t not in futures},
                    **settle(futures, timeout=DEADLINE + 5)}
        ran = ledger.counts()
        unnamed = {t: repr(v) for t, v in outcomes.items()
                   if v is not None and not isinstance(v, NAMED)}
        twice = untruthful(outcomes, ran)
        with topo.admin(new) as admin:
            lost = reaped(admin, "fo23b")
        live = client.ids
        kinds = collections.Counter(type(v).__name__ for v in outcomes.values())
        assert (unnamed, twice, live, lost) == ({}, {}, [0, 1], []), (
            f"{len(outcomes)} commands sent across the failover ({dict(kinds)}): unnamed "
            f"errors {unnamed}, results or runs that do not match {twice}, live engines "
            f"{live}, engines presumed dead {lost}")
        assert client.execute("x = 1", timeout=DEADLINE) == {0: None, 1: None}
        lost_ran = sum(ran[t] for t, v in outcomes.items() if isinstance(v, CommandLostError))
        print(f"#23 during the failover: {dict(kinds)}; {lost_ran} of the lost had run")


# ------------------------------------------------------ #23 demotion without sentinel
def test_fault_23_master_demoted_then_promoted_again_engines_wait_and_resume(
        tmp_path: Path, latches: Latches) -> None:
    """``REPLICAOF`` on the master the cluster uses through a plain ``redis://`` URL (nothing
    to find another master with): a blocked XREADGROUP ends (UNBLOCKED or READONLY), writes
    are refused (READONLY). Engines neither crash nor get declared dead: they retry until the
    server is a master again, then finish what they held."""
    ledger = Ledger(tmp_path / "ran")
    with topology(tmp_path) as topo:
        assert topo.master is not None and topo.replica is not None
        master, replica = topo.master, topo.replica
        for proc in topo.sentinels:  # no sentinel: it would undo the demotion
            proc.kill()
            proc.wait(10)
        topo.sentinels.clear()
        with own_cluster(2, master.url, settings("dm23", retries=12), latches) as cluster, \
                topo.admin(master) as admin, topo.admin(replica) as other:
            client = cluster.client()
            before = {eid: client.execute(ledger.code(f"done{eid}") + f"v = {eid + 40}",
                                          targets=eid, block=False) for eid in (0, 1)}
            assert settle(before) == {0: None, 1: None}
            latch = latches()
            pending = {"held": latch.hold(client, 0, ledger.code("held")),
                       "q0": client.execute(ledger.code("q0"), targets=0, block=False)}
            assert admin.wait(1, 5000) == 1
            # demote the master under the cluster: a replica of its own replica, promoted
            other.replicaof("NO", "ONE")
            admin.replicaof("127.0.0.1", replica.port)
            wait_until(lambda: _quiet(lambda: topo.info(master)["master_link_status"] == "up"),
                       timeout=FAILOVER_DEADLINE, what="the demoted master to sync")
            latch.open()  # the held command ends while its result cannot be written
            time.sleep(3 * 1.5)  # (longer than a lease: no liveness condition to wait on)
            assert not any(f.done() for f in pending.values())
            admin.replicaof("NO", "ONE")
            other.replicaof("127.0.0.1", master.port)
            outcomes = settle(pending, timeout=DEADLINE + 5)
            live, lost, ran = client.ids, reaped(admin, "dm23"), ledger.counts()
            assert (outcomes, live, lost) == (dict.fromkeys(pending), [0, 1], []), (
                f"after the demotion: outcomes {outcomes}, live engines {live}, engines "
                f"presumed dead {lost}, times each command ran {dict(ran)}")
            ledger.assert_ran_once(["done0", "done1", "held", "q0"])
            assert client.pull("v") == {0: 40, 1: 41}
            assert [p.poll() for p in cluster.processes.values()] == [None, None]
