"""Engines on other hosts: each engine in its own network namespace, reaching Redis over veth.

Every engine gets a namespace and a veth pair whose root end and namespace end share a /30 of
10.0.0.0/8 that no interface or route of this machine uses; the server listens on the root
ends (and on loopback, for the client). Traffic goes only to the addresses the test created.
Cutting an engine's link while it runs a command must fail that command with
``EngineDiedError`` within a few heartbeat intervals and leave the other engine working;
once the link is back, the cut-off engine must not store its result over that decision,
and joins again under a new id.

Needs Linux, root and iproute2 (``ip netns``): skipped otherwise, except in CI (env ``CI``)
where it fails instead.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

import redisengines
from redisengines.server import find_server_binary, free_port

from ..helpers import WAIT, wait_until

pytestmark = pytest.mark.timeout(60)

HEARTBEAT = {"REDISENGINES_HEARTBEAT_INTERVAL": "0.25", "REDISENGINES_HEARTBEAT_TTL": "1.5"}
DETECTION_LIMIT = 6.0  # seconds from the cut to EngineDiedError: the 1.5 s lease and then some


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def _why_no_netns() -> str | None:
    """Why network namespaces cannot be made here, or None if they can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "`ip netns add` needs root"
    probe = f"re-probe-{uuid.uuid4().hex[:8]}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@pytest.fixture
def netns_available() -> None:
    reason = _why_no_netns()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the network namespace test, but {reason}")
    pytest.skip(reason)


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network of this machine's interfaces and routes (all tables)."""
    used = []
    for entry in json.loads(_ip("-j", "-4", "route", "show", "table", "all").stdout or "[]"):
        dst = entry.get("dst", "default")
        if dst != "default":
            used.append(ipaddress.ip_network(dst, strict=False))
    for link in json.loads(_ip("-j", "-4", "addr").stdout or "[]"):
        for a in link.get("addr_info", []):
            used.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
    return used


def _free_subnets(n: int) -> list[ipaddress.IPv4Network]:
    """``n`` /30 networks of 10.0.0.0/8 that overlap nothing this machine uses."""
    used = _networks_in_use()
    found: list[ipaddress.IPv4Network] = []
    rng = random.Random()
    while len(found) < n:
        net = ipaddress.ip_network(
            f"10.{rng.randrange(200, 255)}.{rng.randrange(256)}.{rng.randrange(64) * 4}/30")
        if not any(net.overlaps(u) for u in used + found):
            found.append(net)
    return found


@dataclass
class Host:
    """One engine's 'machine': a namespace linked to the root namespace by a veth pair."""

    netns: str
    root_end: str  # veth in the root namespace; the server listens on its address
    host_end: str  # veth inside the namespace
    server_addr: str
    host_addr: str


class Network:
    """Namespaces and veths made by the test; :meth:`remove` deletes all it made."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.hosts: list[Host] = []

    def add_host(self, subnet: ipaddress.IPv4Network) -> Host:
        i = len(self.hosts)
        server_addr, host_addr = (str(a) for a in subnet.hosts())
        # Interface names have at most 15 characters.
        host = Host(f"re-{self.tag}-e{i}", f"re{self.tag}h{i}", f"re{self.tag}n{i}",
                    server_addr, host_addr)
        self.hosts.append(host)  # registered first: remove() tolerates half-made hosts
        _ip("netns", "add", host.netns)
        _ip("link", "add", host.root_end, "type", "veth", "peer", "name", host.host_end,
            "netns", host.netns)
        _ip("addr", "add", f"{server_addr}/30", "dev", host.root_end)
        _ip("link", "set", host.root_end, "up")
        _ip("-n", host.netns, "addr", "add", f"{host_addr}/30", "dev", host.host_end)
        _ip("-n", host.netns, "link", "set", host.host_end, "up")
        _ip("-n", host.netns, "link", "set", "lo", "up")
        return host

    def cut(self, host: Host) -> None:
        """Pull the host's cable: its end of the veth goes down."""
        _ip("-n", host.netns, "link", "set", host.host_end, "down")

    def restore(self, host: Host) -> None:
        _ip("-n", host.netns, "link", "set", host.host_end, "up")

    def remove(self) -> None:
        for host in self.hosts:
            # Deleting the root end removes its peer at once; a namespace is freed lazily.
            _ip("link", "del", host.root_end, check=False)
            _ip("netns", "del", host.netns, check=False)


@contextlib.contextmanager
def _process(args: list[str], **kwargs: object) -> Iterator[subprocess.Popen[bytes]]:
    """A child process that is killed and reaped when the block ends, however it ends."""
    proc = subprocess.Popen(args, **kwargs)  # type: ignore[call-overload]
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def _server_args(binary: str, addrs: list[str], port: int, workdir: Path) -> list[str]:
    return [binary, "--bind", *addrs, "--port", str(port), "--save", "", "--appendonly", "no",
            "--protected-mode", "no", "--daemonize", "no", "--dir", str(workdir),
            "--loglevel", "warning", "--logfile", str(workdir / "server.log")]


def _ping(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1) as r:
            return bool(r.ping())
    except redis.RedisError:
        return False


def test_fault_27_engines_in_network_namespaces_and_a_cut_link(
        netns_available: None, tmp_path: Path, cluster_name: str) -> None:
    port = free_port()
    net = Network()
    with contextlib.ExitStack() as stack:
        stack.callback(net.remove)
        hosts = [net.add_host(subnet) for subnet in _free_subnets(2)]
        server = stack.enter_context(_process(
            _server_args(find_server_binary(), [h.server_addr for h in hosts] + ["127.0.0.1"],
                         port, tmp_path),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        local_url = f"redis://127.0.0.1:{port}/0"
        wait_until(lambda: server.poll() is not None or _ping(local_url), what="the server")
        assert server.poll() is None, (tmp_path / "server.log").read_text(errors="replace")

        env = {k: v for k, v in os.environ.items() if not k.startswith("REDISENGINES_")}
        env.update(HEARTBEAT, REDISENGINES_KEY=os.environ["REDISENGINES_KEY"])
        engines = {}  # pid -> (host, process)
        for host in hosts:
            url = f"redis://{host.server_addr}:{port}/0"
            proc = stack.enter_context(_process(
                ["ip", "netns", "exec", host.netns, sys.executable, "-m", "redisengines.actor",
                 "--url", url, "--cluster", cluster_name, "--parent-pid", str(os.getpid())],
                env=env))  # `ip netns exec` execs in place: proc.pid is the engine's pid
            engines[proc.pid] = (host, proc)

        client = stack.enter_context(redisengines.connect(
            local_url, cluster=cluster_name, heartbeat_interval=0.25, heartbeat_ttl=1.5))
        r = stack.enter_context(redis.Redis.from_url(local_url))
        wait_until(lambda: len(client.ids) == 2 or any(p.poll() is not None
                                                       for _h, p in engines.values()),
                   timeout=20, what="both engines to register")
        assert client.ids == [0, 1], {pid: p.poll() for pid, (_h, p) in engines.items()}

        # Both engines work, each from its own "host", over its own veth.
        client.execute("import os, socket; pid = os.getpid(); x = 1")
        pids = client.pull("pid")
        assert set(pids.values()) == set(engines)
        host_of = {eid: engines[pid][0] for eid, pid in pids.items()}
        peers = {c["addr"].rsplit(":", 1)[0] for c in r.client_list()}
        assert {h.host_addr for h in hosts} <= peers, peers
        client.push({"y": [1, 2, 3]})
        client.execute("z = x + sum(y)")
        assert client.pull(["x", "z"]) == {0: [1, 7], 1: [1, 7]}

        # Cut engine 0's link while it runs a long command: one that waits for a key on its
        # own connection (no socket timeout, so it waits out the cut) and then succeeds.
        victim, other = 0, 1
        victim_pid = pids[victim]
        victim_proc = engines[victim_pid][1]
        victim_url = f"redis://{host_of[victim].server_addr}:{port}/0"
        started_key, open_key = (f"test:netns:{uuid.uuid4().hex}:{k}" for k in ("started", "open"))
        stack.callback(r.rpush, open_key, 1)  # ends the command on failure too
        held = client.execute(
            f"import redis\n"
            f"conn = redis.Redis.from_url({victim_url!r}, socket_timeout=None)\n"
            f"conn.rpush({started_key!r}, 1)\n"
            f"conn.blpop([{open_key!r}], 60)\n", targets=victim, block=False)
        assert r.blpop([started_key], timeout=WAIT) is not None, "the long command did not start"
        queued = client.execute("q = 1", targets=victim, block=False)
        net.cut(host_of[victim])
        cut_at = time.monotonic()
        with pytest.raises(redisengines.EngineDiedError) as died:
            held.result(timeout=DETECTION_LIMIT + 4)
        detected = time.monotonic() - cut_at
        assert detected < DETECTION_LIMIT, f"death detected after {detected:.1f} s"
        assert died.value.engine_id == victim
        assert died.value.started is True
        with pytest.raises(redisengines.EngineDiedError) as dropped:
            queued.result(timeout=WAIT)
        assert dropped.value.engine_id == victim
        assert dropped.value.started is False

        # The other engine keeps working; the victim has left the cluster.
        assert client.execute("w = z * 2", targets=other) is None
        assert client.pull("w", targets=other) == 14
        assert client.ids == [other]
        with pytest.raises(redisengines.InvalidTargetError):
            client.execute("w = 0", targets=victim)

        # Back on the network, the cut-off engine ends its command, is refused when it tries
        # to store the result ("ok") over the decision, and joins again as a new engine.
        net.restore(host_of[victim])
        r.rpush(open_key, 1)
        wait_until(lambda: victim_proc.poll() is not None or len(client.ids) == 2, timeout=20,
                   what="the cut-off engine to join again once back on the network")
        assert victim_proc.poll() is None, \
            f"the cut-off engine exited (code {victim_proc.returncode}) instead of joining again"
        assert client.ids == [other, 2]  # a new id: ids are never reused
        client.execute("import os; pid = os.getpid()", targets=2)
        assert client.pull("pid", targets=2) == victim_pid
        assert "x" not in client.keys(targets=2)  # a new engine: the old namespace is gone
        result_key = f"re:{cluster_name}:{{r{held.cmd_ids[victim]}}}"
        status, error = r.hmget(result_key, ["status", "error"])
        assert status == b"error" and b"EngineDiedError" in error, (status, error)  # not "ok"
        assert client.pull("w", targets=other) == 14
