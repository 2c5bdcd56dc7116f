"""The runner's workloads on the peers: IPython Parallel, Dask, Ray and rq.

``python -m benchmarks`` runs each peer in a process of its own::

    python -m benchmarks.peers NAME [--quick] [--only W1,W2,...]

which prints one JSON line per figure (a :class:`~benchmarks.common.Result`) on stdout and
its progress on stderr. A workload that fails gives a ``failed`` line and the others still
run; whatever the process started (a local cluster of 2 workers on loopback addresses only)
is stopped before it exits, also on Ctrl-C or SIGTERM. Only the peer's own package is
imported here (and redis-py plus the embedded server for rq, which needs a Redis server),
so its memory figures are its own. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import os
import signal
import sys
import time
import uuid
from typing import Any

from benchmarks.common import (
    ENGINES,
    FULL,
    MB,
    QUICK,
    WAIT_TIMEOUT,
    WORKLOADS,
    Result,
    Sizes,
    failed,
    latency,
    make_array,
    median,
    process_tree,
    progress,
    rss_mb,
    sample,
    scatter_sum,
    sleeps,
    start_stop,
    timed,
    total_rss_mb,
)

LOOPBACK = "127.0.0.1"


# ------------------------------------------------------ what the workers run (by reference)
def noop() -> None:
    return None


def nap(seconds: float) -> None:
    import time  # (IPython Parallel sends this function by value, without our globals)

    time.sleep(seconds)


def total(x: Any) -> float:
    return float(x.sum())


class Holder:
    """Ray's actor: a no-op method, and one value to set and get."""

    def __init__(self) -> None:
        self.value: Any = None

    def noop(self) -> None:
        return None

    def set(self, value: Any) -> None:
        self.value = value

    def get(self) -> Any:
        return self.value


# ------------------------------------------------------------------------- adapters
class Peer:
    """A peer's local cluster of ENGINES workers and the workloads on it.

    ``start`` returns once every worker is ready to run a call, and puts on ``self.stack``
    how to undo each thing it began (before beginning it), so that ``stop`` ends all of it in
    reverse order, also after a partial start. A workload method returns its figures; ``vs``
    names the figure of ours each is compared with.
    """

    name = ""
    package = ""  # the distribution whose version is reported

    def __init__(self) -> None:
        self.stack = contextlib.ExitStack()

    @property
    def version(self) -> str:
        return importlib.metadata.version(self.package)

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self.stack.close()

    def call(self) -> None:
        """One no-op call, waited for (a warm-up)."""
        raise NotImplementedError

    def up(self) -> None:
        self.stack = contextlib.ExitStack()
        try:
            self.start()
        except BaseException:
            self.stop()
            raise

    def result(self, workload: str, metric: str, label: str, values: list[float], unit: str,
               vs: str) -> Result:
        return median(workload, self.name, metric, label, values, unit, vs=vs,
                      version=self.version)

    def latency(self, metric: str, label: str, fn: Any, s: Sizes, vs: str) -> Result:
        return latency("W1", self.name, metric, label, sample(fn, s.samples, s.warmup), vs=vs,
                       version=self.version)

    def rate(self, metric: str, label: str, batch: Any, s: Sizes, vs: str) -> Result:
        """W2: calls/s of ``batch(n)``, which submits n calls at once and waits for all."""
        batch(min(s.calls, 100))  # warm-up
        rates = [s.calls / timed(lambda: batch(s.calls)) for _ in range(s.runs)]
        return self.result("W2", metric, label, rates, "calls/s", vs)

    def bandwidth(self, s: Sizes, push: Any, pull: Any, push_all: Any) -> list[Result]:
        """W3: GB/s of ``push(arr)`` to worker 0, ``pull()`` it back, ``push_all(arr)``."""
        warm = make_array(1 * MB)  # workers import numpy
        push(warm)
        pull()
        push_all(warm)
        arr = make_array(s.nbytes)
        runs: dict[str, list[float]] = {"push": [], "pull": [], "push2": []}
        for _ in range(s.runs):
            runs["push"].append(timed(lambda: push(arr)))
            runs["pull"].append(timed(pull))
            runs["push2"].append(timed(lambda: push_all(arr)))
        gb = arr.nbytes / 1e9
        labels = {"push": "push to worker 0", "pull": "pull from worker 0",
                  "push2": f"push to {ENGINES} workers at once"}
        return [self.result("W3", key, labels[key], [gb / t for t in times], "GB/s",
                            vs=f"{key}.tcp") for key, times in runs.items()]

    # The workloads; a peer without an equivalent returns [].
    def w1(self, s: Sizes) -> list[Result]:
        return []

    def w2(self, s: Sizes) -> list[Result]:
        return []

    def w3(self, s: Sizes) -> list[Result]:
        return []

    def w4(self, s: Sizes) -> list[Result]:
        return []

    def w6(self, s: Sizes) -> list[Result]:
        return []


class IPyParallel(Peer):
    """A controller and 2 engines (``ipp.Cluster``), the controller on 127.0.0.1."""

    name = package = "ipyparallel"

    def start(self) -> None:
        import ipyparallel as ipp
        cluster = ipp.Cluster(n=ENGINES, controller_ip=LOOPBACK, log_level=logging.WARNING)
        self.stack.callback(cluster.stop_cluster_sync)
        self.rc = cluster.start_and_connect_sync()
        self.stack.callback(self.rc.close)
        self.rc.wait_for_engines(ENGINES, timeout=WAIT_TIMEOUT)

    def call(self) -> None:
        self.rc[0].apply_sync(noop)

    def w1(self, s: Sizes) -> list[Result]:
        e0 = self.rc[0]
        return [self.latency("apply_sync", "DirectView(0).apply_sync(noop)",
                             lambda: e0.apply_sync(noop), s, vs="apply.tcp")]

    def _load_balanced(self, f: Any, n: int, *args: Any) -> None:
        view = self.rc.load_balanced_view()
        for ar in [view.apply_async(f, *args) for _ in range(n)]:
            ar.get(WAIT_TIMEOUT)

    def w2(self, s: Sizes) -> list[Result]:
        return [self.rate("apply_async", f"LoadBalancedView.apply_async(noop) x{s.calls}, get each",
                          lambda n: self._load_balanced(noop, n), s, vs="function.tcp")]

    def w3(self, s: Sizes) -> list[Result]:
        e0, both = self.rc[0], self.rc[:]
        return self.bandwidth(s, lambda a: e0.push({"a": a}, block=True),
                              lambda: e0.pull("a", block=True),
                              lambda a: both.push({"a": a}, block=True))

    def w4(self, s: Sizes) -> list[Result]:
        view = self.rc[:]

        def once(arr: Any) -> float:
            view.scatter("x", arr, block=True)
            view.execute("s = x.sum()", block=True)
            return sum(view.pull("s", block=True))
        return scatter_sum(self.name, self.version, s,
                           "DirectView: scatter, execute('s = x.sum()'), pull", once)

    def w6(self, s: Sizes) -> list[Result]:
        return sleeps(self.name, self.version, s,
                      f"LoadBalancedView.apply_async(nap, {s.sleep}) x{s.sleeps}",
                      lambda n, sec: self._load_balanced(nap, n, sec))


class Dask(Peer):
    """``LocalCluster``: 2 worker processes of 1 thread, on 127.0.0.1, no dashboard."""

    name = "dask"
    package = "distributed"

    def start(self) -> None:
        from dask.distributed import Client, LocalCluster
        cluster = self.stack.enter_context(LocalCluster(
            n_workers=ENGINES, threads_per_worker=1, processes=True, host=LOOPBACK,
            dashboard_address=None))
        self.client = self.stack.enter_context(Client(cluster))
        self.client.wait_for_workers(ENGINES, timeout=WAIT_TIMEOUT)

    def call(self) -> None:
        self.client.submit(noop, pure=False).result()

    def _submit_all(self, f: Any, n: int, *args: Any) -> None:
        self.client.gather([self.client.submit(f, *args, pure=False) for _ in range(n)])

    def w1(self, s: Sizes) -> list[Result]:
        return [self.latency("submit", "submit(noop).result()", self.call, s,
                             vs="function.tcp")]

    def w2(self, s: Sizes) -> list[Result]:
        return [self.rate("submit", f"submit(noop) x{s.calls}, gather",
                          lambda n: self._submit_all(noop, n), s, vs="function.tcp")]

    def w3(self, s: Sizes) -> list[Result]:
        c = self.client
        w0 = sorted(c.scheduler_info()["workers"])[0]
        held: dict[str, Any] = {}

        def push(a: Any) -> None:
            held["a"] = c.scatter(a, workers=[w0], direct=True, hash=False)

        def push_all(a: Any) -> None:
            held["all"] = c.scatter(a, broadcast=True, direct=True, hash=False)
        return self.bandwidth(s, push, lambda: held["a"].result(), push_all)

    def w4(self, s: Sizes) -> list[Result]:
        import numpy as np
        c = self.client

        def once(arr: Any) -> float:
            parts = c.scatter(np.array_split(arr, ENGINES), direct=True, hash=False)
            return sum(c.gather([c.submit(total, p, pure=False) for p in parts]))
        return scatter_sum(self.name, self.version, s,
                           "scatter 2 parts, submit(total) on each, gather", once)

    def w6(self, s: Sizes) -> list[Result]:
        return sleeps(self.name, self.version, s, f"submit(nap, {s.sleep}) x{s.sleeps}, gather",
                      lambda n, sec: self._submit_all(nap, n, sec))


class Ray(Peer):
    """``ray.init(num_cpus=2)`` on 127.0.0.1, no dashboard; ready once 2 tasks have run."""

    name = package = "ray"

    def start(self) -> None:
        import ray
        self.stack.callback(ray.shutdown)  # also after a partial init
        ray.init(num_cpus=ENGINES, include_dashboard=False, _node_ip_address=LOOPBACK,
                 log_to_driver=False)
        self.actors: list[Any] = []
        self.task, self.nap, self.total = ray.remote(noop), ray.remote(nap), ray.remote(total)
        self.holder = ray.remote(Holder)
        ray.get([self.task.remote() for _ in range(ENGINES)], timeout=WAIT_TIMEOUT)

    def call(self) -> None:
        import ray
        ray.get(self.task.remote(), timeout=WAIT_TIMEOUT)

    def _actor(self, i: int) -> Any:
        import ray
        while len(self.actors) <= i:
            self.actors.append(self.holder.remote())
            ray.get(self.actors[-1].noop.remote(), timeout=WAIT_TIMEOUT)
        return self.actors[i]

    def w1(self, s: Sizes) -> list[Result]:
        import ray
        a = self._actor(0)
        return [self.latency("actor", "ray.get(actor.noop.remote())",
                             lambda: ray.get(a.noop.remote()), s, vs="actor.tcp"),
                self.latency("task", "ray.get(noop.remote())", self.call, s, vs="function.tcp")]

    def w2(self, s: Sizes) -> list[Result]:
        import ray
        a = self._actor(0)
        return [self.rate("task", f"noop.remote() x{s.calls}, ray.get(all)",
                          lambda n: ray.get([self.task.remote() for _ in range(n)]), s,
                          vs="function.tcp"),
                self.rate("actor", f"actor.noop.remote() x{s.calls}, ray.get(all)",
                          lambda n: ray.get([a.noop.remote() for _ in range(n)]), s,
                          vs="actor.tcp")]

    def w3(self, s: Sizes) -> list[Result]:
        import ray
        a0, a1 = self._actor(0), self._actor(1)

        def push_all(arr: Any) -> None:
            ref = ray.put(arr)
            ray.get([a0.set.remote(ref), a1.set.remote(ref)])
        return self.bandwidth(s, lambda arr: ray.get(a0.set.remote(arr)),
                              lambda: ray.get(a0.get.remote()), push_all)

    def w4(self, s: Sizes) -> list[Result]:
        import numpy as np
        import ray

        def once(arr: Any) -> float:
            refs = [ray.put(p) for p in np.array_split(arr, ENGINES)]
            return sum(ray.get([self.total.remote(r) for r in refs]))
        return scatter_sum(self.name, self.version, s,
                           "ray.put 2 parts, total.remote() on each, ray.get", once)

    def w6(self, s: Sizes) -> list[Result]:
        import ray
        return sleeps(self.name, self.version, s,
                      f"nap.remote({s.sleep}) x{s.sleeps}, ray.get(all)",
                      lambda n, sec: ray.get([self.nap.remote(sec) for _ in range(n)]))


class RQ(Peer):
    """An embedded Redis-compatible server on 127.0.0.1 and 2 ``SimpleWorker`` processes."""

    name = package = "rq"

    def start(self) -> None:
        import redis

        from benchmarks.bench_core import _rq_queue, rq_workers
        from redisengines.server import EmbeddedServer
        server = self.stack.enter_context(EmbeddedServer())
        name = "bench-" + uuid.uuid4().hex[:8]
        self.stack.enter_context(rq_workers(server.url, name, ENGINES))
        self.queue = _rq_queue(self.stack.enter_context(redis.Redis.from_url(server.url)), name)

    def call(self) -> None:
        from benchmarks.bench_core import rq_round_trip
        rq_round_trip(self.queue)

    def w1(self, s: Sizes) -> list[Result]:
        return [self.latency("enqueue", "enqueue(noop), wait for its result", self.call,
                             s, vs="function.tcp")]

    def w2(self, s: Sizes) -> list[Result]:
        from benchmarks.bench_core import rq_throughput
        return [self.rate("enqueue", f"enqueue(noop) x{s.calls}, wait for each",
                          lambda n: rq_throughput(self.queue, n), s, vs="function.tcp")]

    def w6(self, s: Sizes) -> list[Result]:
        from benchmarks.bench_core import _rq_wait

        def batch(n: int, sec: float) -> None:
            for job in [self.queue.enqueue("time.sleep", sec) for _ in range(n)]:
                _rq_wait(job)
        return sleeps(self.name, self.version, s,
                      f"enqueue('time.sleep', {s.sleep}) x{s.sleeps}, wait for each", batch)


PEERS: dict[str, type[Peer]] = {p.name: p for p in (IPyParallel, Dask, Ray, RQ)}
MODULES = {"ipyparallel": "ipyparallel", "dask": "distributed", "ray": "ray", "rq": "rq"}


# ------------------------------------------------------------------------------ run
def idle_memory(peer: Peer) -> list[Result]:
    """Memory: RSS of this process and every process it started, idle after one call."""
    peer.up()
    try:
        peer.call()
        time.sleep(1.0)  # let start-up work (imports, spawned helpers) settle
        tree = process_tree(os.getpid())
        client, whole = rss_mb(os.getpid()), total_rss_mb(tree)
    finally:
        peer.stop()
    out = [Result("memory", peer.name, "idle.client", "idle: client process", client, "MB",
                  n=1, vs="idle.client"),
           Result("memory", peer.name, "idle.total",
                  f"idle: client + every process it started ({len(tree)} processes)",
                  whole, "MB", n=1, vs="idle.total")]
    for r in out:
        r.version = peer.version
    return out


def run(peer: Peer, s: Sizes, only: list[str], emit: Any) -> None:
    """The workloads in ``only`` on ``peer``, each figure to ``emit``; a workload that fails
    gives a ``failed`` figure and the next one runs."""
    def guarded(workload: str, fn: Any) -> None:
        progress(f"{peer.name}: {WORKLOADS[workload]}")
        try:
            results = fn()
        except Exception as e:
            progress(f"{peer.name}: {workload} failed: {type(e).__name__}: {e}")
            results = [failed(workload, peer.name, e)]
        for r in results:
            emit(r)

    if "memory" in only:
        guarded("memory", lambda: idle_memory(peer))
    if "W5" in only:
        guarded("W5", lambda: start_stop(peer.name, peer.version, s, peer.up,
                                         lambda _: peer.stop()))
    rest = [w for w in ("W1", "W2", "W3", "W4", "W6") if w in only]
    if not rest:
        return
    try:
        peer.up()
        peer.call()
    except Exception as e:
        for w in rest:
            emit(failed(w, peer.name, e))
        return
    try:
        for w in rest:
            guarded(w, lambda w=w: getattr(peer, w.lower())(s))
    finally:
        peer.stop()


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: the clusters stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers",
                                     description="One peer's workloads, as JSON lines.")
    parser.add_argument("peer", choices=sorted(PEERS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default=",".join(WORKLOADS))
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    peer = PEERS[args.peer]()

    def emit(r: Result) -> None:
        print(json.dumps(r.record()), flush=True)

    try:
        run(peer, QUICK if args.quick else FULL, args.only.split(","), emit)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
