"""Core benchmark of redisengines: latency, throughput, bandwidth, and the same against baselines.

Run from the repository root::

    python -m benchmarks.bench_core            # full sizes (a few minutes)
    python -m benchmarks.bench_core --quick    # tiny sizes, seconds (used by the tests)
    python -m benchmarks.bench_core --json out.jsonl

Every figure is measured in this run on this machine, next to its baseline:

* W1 latency: round trip of one no-op command on one engine (``execute("pass")`` and
  ``apply(noop)``) against a bare redis-py PING and a raw redis-py stream ping-pong,
  over TCP and over the embedded default (unix socket).
* Throughput: many tiny ``apply`` calls submitted at once (``block=False``) over 2 engines.
* Bandwidth: push and pull of a large float64 array against raw paged SET/GET.
* Peer: rq (the Redis job queue), if installed, against the same TCP server.

Everything started here (servers, engines, worker processes) is stopped here, also on
Ctrl-C. Only loopback addresses are used. See ``benchmarks/README.md`` for what each
figure means.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import redis

import redisengines
from benchmarks.common import (
    ENGINES,
    MB,
    WAIT_TIMEOUT,
    fmt,
    make_array,
    progress,
    sample,
    timed,
)
from redisengines.launcher import set_parent_death_signal
from redisengines.server import EmbeddedServer

ROOT = Path(__file__).resolve().parents[1]
PAGE_SIZE = 4 * 2**20  # the raw baseline's page: the library's default page size (4 MiB)
# The raw GET reads this many pages per pipeline: one pipeline of all 25 pages holds 100 MB
# of replies at once and measured slower here (~210-270 ms vs ~140 ms per 100 MB).
GET_BATCH = 8
GROUP = "g"
RQ_FUNC = "benchmarks.bench_core.noop"


def noop(*args: Any, **kwargs: Any) -> None:
    """The function that ``apply`` and rq run."""
    return None


# ----------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Sizes:
    samples: int  # latency samples per figure (after warm-up)
    warmup: int
    calls: int  # apply calls per throughput run
    runs: int  # runs of throughput and bandwidth figures (their median is reported)
    nbytes: int  # array size for bandwidth
    rq_samples: int
    rq_jobs: int


FULL = Sizes(samples=300, warmup=30, calls=2000, runs=3, nbytes=100 * MB,
             rq_samples=300, rq_jobs=2000)
QUICK = Sizes(samples=20, warmup=3, calls=100, runs=1, nbytes=1 * MB,
              rq_samples=20, rq_jobs=100)


# --------------------------------------------------------------------------- figures
@dataclass
class Figure:
    name: str  # stable id, e.g. "w1.tcp.apply"
    label: str  # what a human reads in the table
    value: float  # the median (or the ratio)
    unit: str  # "s", "calls/s", "GB/s" or "x"
    p90: float | None = None
    n: int = 0  # samples or runs behind the median

    def as_json(self) -> dict[str, Any]:
        out = {"name": self.name, "value": self.value, "unit": self.unit, "n": self.n,
               "label": self.label}
        if self.p90 is not None:
            out["p90"] = self.p90
        return out


class Report:
    """Collects figures, prints them as a table and writes them as JSON lines."""

    def __init__(self, json_file: IO[str] | None) -> None:
        self.figures: list[Figure] = []
        self.sections: list[tuple[str, list[Figure]]] = []
        self.notes: list[str] = []
        self.json_file = json_file

    def section(self, title: str) -> None:
        self.sections.append((title, []))
        progress(title)

    def add(self, fig: Figure) -> Figure:
        self.figures.append(fig)
        self.sections[-1][1].append(fig)
        if self.json_file is not None:  # written at once: an interrupted run keeps its figures
            self.json_file.write(json.dumps(fig.as_json()) + "\n")
            self.json_file.flush()
        progress(f"  {fig.label}: {fmt(fig.value, fig.unit)}")
        return fig

    def latency(self, name: str, label: str, samples: list[float]) -> Figure:
        return self.add(Figure(name, label, statistics.median(samples), "s",
                               p90=p90(samples), n=len(samples)))

    def ratio(self, name: str, label: str, num: Figure, den: Figure) -> Figure:
        return self.add(Figure(name, label, num.value / den.value, "x"))

    def note(self, text: str) -> None:
        self.notes.append(text)
        progress(f"  {text}")

    def print_table(self, header: list[str]) -> None:
        width = max([len(f.label) for f in self.figures] + [20])
        print()
        for line in header:
            print(line)
        for title, figs in self.sections:
            print()
            print(title)
            if figs:
                print(f"  {'':<{width}}  {'median':>12}  {'p90':>12}  {'n':>5}")
            for f in figs:
                p = fmt(f.p90, f.unit) if f.p90 is not None else ""
                n = str(f.n) if f.n else ""
                print(f"  {f.label:<{width}}  {fmt(f.value, f.unit):>12}  {p:>12}  {n:>5}")
        for text in self.notes:
            print()
            print(text)


def p90(samples: list[float]) -> float:
    if len(samples) < 2:
        return samples[0]
    return statistics.quantiles(samples, n=10)[8]


# ------------------------------------------------------------------------ processes
def start_process(args: list[str], **popen: Any) -> subprocess.Popen[bytes]:
    """A helper process in the repository root, killed by the kernel if we die (Linux).

    The repository root is on its PYTHONPATH, and so on that of the processes it starts.
    ``popen``: more arguments for ``subprocess.Popen`` (``stdout=subprocess.PIPE``)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            start_new_session=True, preexec_fn=set_parent_death_signal, **popen)


def stop_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------- W1: raw baselines
def raw_ping(url: str, sizes: Sizes) -> list[float]:
    """Round trips of a bare redis-py PING."""
    with redis.Redis.from_url(url) as r:
        return sample(r.ping, sizes.samples, sizes.warmup)


def pingpong_worker(url: str, req: str, rep: str) -> None:
    """The raw ping-pong's worker process: answer each entry of ``req`` on ``rep``.

    Like an engine, it pipelines its reply (XADD + XACK) with its next blocking
    XREADGROUP: one round trip per message.
    """
    r = redis.Redis.from_url(url)
    answer: bytes | None = None
    while True:
        pipe = r.pipeline(transaction=False)
        if answer is not None:
            pipe.xadd(rep, {"re": answer}, maxlen=1000, approximate=True)
            pipe.xack(req, GROUP, answer)
        pipe.xreadgroup(GROUP, "w", {req: ">"}, count=1, block=0)
        entry_id, fields = pipe.execute()[-1][0][1][0]
        if fields.get(b"stop"):
            r.xack(req, GROUP, entry_id)
            return
        answer = entry_id


def raw_pingpong(url: str, sizes: Sizes) -> list[float]:
    """Round trips of client XADD -> worker XREADGROUP -> worker XADD+XACK -> client XREAD.

    The client pipelines its XADD with its blocking XREAD of the reply stream.
    """
    tag = uuid.uuid4().hex[:8]
    req, rep = f"bench:{{pp{tag}}}:req", f"bench:{{pp{tag}}}:rep"
    with redis.Redis.from_url(url) as r:
        r.xgroup_create(req, GROUP, id="0", mkstream=True)  # before the worker: nothing is lost
        proc = start_process([sys.executable, "-c",
                              "import sys; from benchmarks.bench_core import pingpong_worker; "
                              "pingpong_worker(*sys.argv[1:])", url, req, rep])
        last = b"0-0"

        def once() -> None:
            nonlocal last
            pipe = r.pipeline(transaction=False)
            pipe.xadd(req, {"op": "ping"}, maxlen=1000, approximate=True)
            pipe.xread({rep: last}, count=1, block=int(WAIT_TIMEOUT * 1000))
            resp = pipe.execute()[-1]
            if not resp:
                raise TimeoutError("raw ping-pong worker did not answer")
            last = resp[0][1][-1][0]

        try:
            return sample(once, sizes.samples, max(sizes.warmup, 1))
        finally:
            try:
                r.xadd(req, {"stop": "1"})
            finally:
                stop_process(proc)
                r.delete(req, rep)


# ------------------------------------------------------------------ W1: redisengines
def engine_latency(client: redisengines.Client, target: int,
                   sizes: Sizes) -> tuple[list[float], list[float]]:
    """Round trips of ``execute("pass")`` and of ``apply(noop)`` on one engine."""
    execute = sample(lambda: client.execute("pass", targets=target), sizes.samples, sizes.warmup)
    apply = sample(lambda: client.apply(noop, targets=target), sizes.samples, sizes.warmup)
    return execute, apply


def w1(report: Report, transport: str, client: redisengines.Client, raw_url: str,
       sizes: Sizes) -> None:
    report.section(f"W1 latency over {transport}: round trip of one no-op on one engine")
    target = client.ids[0]
    ping = report.latency(f"w1.{transport}.redis_ping", f"{transport}: redis-py PING",
                          raw_ping(raw_url, sizes))
    pp = report.latency(f"w1.{transport}.raw_pingpong", f"{transport}: raw stream ping-pong",
                        raw_pingpong(raw_url, sizes))
    execute, apply = engine_latency(client, target, sizes)
    ex = report.latency(f"w1.{transport}.execute", f"{transport}: execute('pass', targets=0)",
                        execute)
    ap = report.latency(f"w1.{transport}.apply", f"{transport}: apply(noop, targets=0)", apply)
    report.ratio(f"w1.{transport}.execute_over_raw_pingpong",
                 f"{transport}: execute / raw ping-pong", ex, pp)
    report.ratio(f"w1.{transport}.apply_over_raw_pingpong",
                 f"{transport}: apply / raw ping-pong", ap, pp)
    report.ratio(f"w1.{transport}.raw_pingpong_over_ping",
                 f"{transport}: raw ping-pong / PING", pp, ping)


# ------------------------------------------------------------------------ throughput
def apply_throughput(client: redisengines.Client, ids: list[int], calls: int) -> float:
    """Calls/s of ``calls`` tiny applies submitted at once, alternating over ``ids``."""
    t0 = time.perf_counter()
    futures = [client.apply(noop, targets=ids[i % len(ids)], block=False) for i in range(calls)]
    client.barrier(futures, timeout=WAIT_TIMEOUT)
    return calls / (time.perf_counter() - t0)


def throughput(report: Report, transport: str, client: redisengines.Client,
               sizes: Sizes) -> Figure:
    report.section(f"Throughput over {transport}: {sizes.calls} apply(noop, block=False) "
                   f"alternating targets 0 and 1, then wait for all")
    ids = client.ids[:ENGINES]
    apply_throughput(client, ids, min(sizes.calls, 100))  # warm-up
    runs = [apply_throughput(client, ids, sizes.calls) for _ in range(sizes.runs)]
    return report.add(Figure(f"throughput.{transport}.apply", f"{transport}: apply calls/s",
                             statistics.median(runs), "calls/s", n=len(runs)))


# ------------------------------------------------------------------------- bandwidth
def engine_bandwidth(client: redisengines.Client, ids: list[int], arr: Any,
                     runs: int) -> dict[str, list[float]]:
    """Seconds per push to one engine, pull from it, and push to all ``ids`` at once."""
    import numpy as np
    client.push({"a": make_array(1 * MB)}, targets=ids)  # warm-up: engines import numpy
    client.pull("a", targets=ids)
    client.reset(targets=ids)
    out: dict[str, list[float]] = {"push": [], "pull": [], "push_all": []}
    for run in range(runs):
        out["push"].append(timed(lambda: client.push({"a": arr}, targets=ids[0])))
        t0 = time.perf_counter()
        back = client.pull("a", targets=ids[0])
        out["pull"].append(time.perf_counter() - t0)
        if run == 0 and not np.array_equal(back, arr):
            raise AssertionError("pulled array differs from the pushed one")
        del back
        client.reset(targets=ids[:1])
        out["push_all"].append(timed(lambda: client.push({"a": arr}, targets=ids)))
        client.reset(targets=ids)
    return out


def raw_paged(url: str, arr: Any, runs: int, **redis_kwargs: Any) -> dict[str, list[float]]:
    """Seconds per paged SET and GET of ``arr`` with raw redis-py.

    SET: every page in one pipeline; GET: pipelines of GET_BATCH pages, each page copied
    into one preallocated buffer (what a reader that rebuilds the array must do).
    ``redis_kwargs`` go to ``redis.Redis.from_url`` (``command_packer=...``).
    """
    import numpy as np
    view = memoryview(arr).cast("B")
    offsets = list(range(0, view.nbytes, PAGE_SIZE))
    tag = uuid.uuid4().hex[:8]
    keys = [f"bench:{{raw{tag}}}:{i}" for i in range(len(offsets))]
    out: dict[str, list[float]] = {"set": [], "get": []}
    with redis.Redis.from_url(url, **redis_kwargs) as r:
        def put() -> None:
            pipe = r.pipeline(transaction=False)
            for key, off in zip(keys, offsets, strict=True):
                pipe.set(key, view[off:off + PAGE_SIZE])
            pipe.execute()

        def get() -> Any:
            buf = bytearray(view.nbytes)
            dest = memoryview(buf)
            for start in range(0, len(keys), GET_BATCH):
                pipe = r.pipeline(transaction=False)
                for key in keys[start:start + GET_BATCH]:
                    pipe.get(key)
                for off, data in zip(offsets[start:], pipe.execute(), strict=False):
                    dest[off:off + len(data)] = data
            return np.frombuffer(buf, dtype=arr.dtype)

        try:
            for run in range(runs):
                out["set"].append(timed(put))
                t0 = time.perf_counter()
                back = get()
                out["get"].append(time.perf_counter() - t0)
                if run == 0 and not np.array_equal(back, arr):
                    raise AssertionError("raw GET read back different bytes")
                del back
        finally:
            r.delete(*keys)
    return out


def bandwidth(report: Report, transport: str, client: redisengines.Client, raw_url: str,
              sizes: Sizes) -> None:
    mb = sizes.nbytes / MB
    report.section(f"Bandwidth over {transport}: a {mb:g} MB float64 array "
                   f"(GB/s = payload bytes / time)")
    arr = make_array(sizes.nbytes)
    ours = engine_bandwidth(client, client.ids[:ENGINES], arr, sizes.runs)
    raw = raw_paged(raw_url, arr, sizes.runs)
    gb = arr.nbytes / 1e9
    rows = [("push", "push to engine 0", ours["push"]),
            ("pull", "pull from engine 0", ours["pull"]),
            ("push_all", "push to engines 0 and 1 at once", ours["push_all"]),
            ("raw_set", "raw redis-py SET, 4 MiB pages, 1 pipeline", raw["set"]),
            ("raw_get", f"raw redis-py GET, 4 MiB pages, pipelines of {GET_BATCH}",
             raw["get"])]
    secs = {}
    for key, label, times in rows:
        med = statistics.median(times)
        secs[key] = report.add(Figure(f"bandwidth.{transport}.{key}.seconds",
                                      f"{transport}: {label}, seconds", med, "s", n=len(times)))
        report.add(Figure(f"bandwidth.{transport}.{key}.gbps", f"{transport}: {label}, GB/s",
                          gb / med, "GB/s", n=len(times)))
    # One push or pull is one write to Redis plus one read from it: compare with SET + GET.
    raw_both = secs["raw_set"].value + secs["raw_get"].value
    for key in ("push", "pull"):
        report.add(Figure(f"bandwidth.{transport}.{key}_over_raw_set_get",
                          f"{transport}: {key} time / (raw SET + GET time)",
                          secs[key].value / raw_both, "x"))


# ------------------------------------------------------------------------------ peer
def rq_missing() -> bool:
    try:
        import rq  # noqa: F401
    except ImportError:
        return True
    return False


@contextmanager
def rq_workers(url: str, queue: str, n: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``n`` rq SimpleWorker processes on ``queue``, stopped on exit."""
    from rq import Worker
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(n):
            procs.append(start_process([
                sys.executable, "-m", "rq.cli", "worker", "--worker-class",
                "rq.worker.SimpleWorker", "--url", url, "--path", str(ROOT), "--quiet",
                "--name", f"{queue}-{i}", queue]))
        with redis.Redis.from_url(url) as r:
            deadline = time.monotonic() + 60
            while Worker.count(connection=r, queue=_rq_queue(r, queue)) < n:
                for p in procs:
                    if p.poll() is not None:
                        raise RuntimeError(f"rq worker exited with code {p.returncode}")
                if time.monotonic() > deadline:
                    raise TimeoutError("rq workers did not register within 60 s")
                time.sleep(0.05)  # start-up only: rq has no registration event to block on
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            stop_process(p, grace=10.0)


def _rq_queue(r: redis.Redis, name: str) -> Any:
    from rq import Queue
    return Queue(name, connection=r)


def rq_round_trip(q: Any) -> None:
    job = q.enqueue(RQ_FUNC)
    _rq_wait(job)


def _rq_wait(job: Any) -> None:
    result = job.latest_result(timeout=int(WAIT_TIMEOUT))  # a blocking XREAD inside rq
    if result is None:
        raise TimeoutError(f"rq job {job.id} did not finish")
    if result.type != result.Type.SUCCESSFUL:
        raise RuntimeError(f"rq job {job.id} failed: {result.exc_string}")


def rq_throughput(q: Any, jobs: int) -> float:
    t0 = time.perf_counter()
    enqueued = [q.enqueue(RQ_FUNC) for _ in range(jobs)]
    for job in enqueued:
        _rq_wait(job)
    return jobs / (time.perf_counter() - t0)


def measure_rq(report: Report, url: str, prefix: str, samples: int, warmup: int, jobs: int,
               runs: int) -> tuple[Figure, Figure] | None:
    """rq's round trip and throughput with 2 SimpleWorkers on ``url`` (None: rq missing)."""
    report.section(f"Peer: rq over tcp ({ENGINES} SimpleWorker processes, same server)")
    if rq_missing():
        report.note("rq: not installed (pip install -r benchmarks/requirements-peers.txt)")
        return None
    import rq
    queue = "bench-" + uuid.uuid4().hex[:8]
    with rq_workers(url, queue, ENGINES), redis.Redis.from_url(url) as r:
        q = _rq_queue(r, queue)
        lat = report.latency(f"{prefix}.round_trip",
                             f"rq {rq.__version__}: enqueue(noop) + wait for result",
                             sample(lambda: rq_round_trip(q), samples, warmup))
        rq_throughput(q, min(jobs, 100))  # warm-up
        rates = [rq_throughput(q, jobs) for _ in range(runs)]
        thr = report.add(Figure(f"{prefix}.throughput",
                                f"rq: {jobs} jobs enqueued, then all waited, jobs/s",
                                statistics.median(rates), "calls/s", n=len(rates)))
        q.empty()
    return lat, thr


def peer_rq(report: Report, url: str, sizes: Sizes, ours: dict[str, Figure]) -> None:
    rq_figures = measure_rq(report, url, "peer.rq", sizes.rq_samples, sizes.warmup,
                            sizes.rq_jobs, sizes.runs)
    if rq_figures is None:
        return
    lat, thr = rq_figures
    report.ratio("peer.rq.apply_latency_over_rq", "tcp: our apply latency / rq round trip",
                 ours["apply"], lat)
    report.ratio("peer.rq.apply_throughput_over_rq", "tcp: our apply calls/s / rq jobs/s",
                 ours["throughput"], thr)


# ------------------------------------------------------------------------------ main
def run_transport(report: Report, transport: str, cluster: redisengines.Cluster, raw_url: str,
                  sizes: Sizes) -> dict[str, Figure]:
    client = cluster.client()
    if len(client.ids) < ENGINES:
        raise RuntimeError(f"expected {ENGINES} engines, found {client.ids}")
    w1(report, transport, client, raw_url, sizes)
    thr = throughput(report, transport, client, sizes)
    bandwidth(report, transport, client, raw_url, sizes)
    apply = next(f for f in report.figures if f.name == f"w1.{transport}.apply")
    return {"apply": apply, "throughput": thr}


def machine(server_url: str, title: str, quick: bool) -> list[str]:
    """The first two lines of a report: what ran, when, and on what."""
    with redis.Redis.from_url(server_url) as r:
        info = r.info("server")
    server = (f"valkey {info['valkey_version']}" if "valkey_version" in info
              else f"redis {info.get('redis_version', '?')}")
    return [
        f"redisengines {redisengines.__version__} {title} ({'quick' if quick else 'full'}), "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}",
        f"python {platform.python_version()}, redis-py {redis.__version__}, {server}, "
        f"{os.cpu_count()} CPUs, {platform.platform()}",
    ]


def header(server_url: str, sizes: Sizes, quick: bool) -> list[str]:
    return [
        *machine(server_url, "benchmark", quick),
        f"sizes: {sizes.samples} latency samples after {sizes.warmup} warm-up, "
        f"{sizes.calls} calls, {sizes.nbytes / MB:g} MB, median of {sizes.runs} runs",
        "tcp = Cluster(n=2, url=<TCP url of an EmbeddedServer>); "
        "unix = Cluster(n=2) (embedded default, unix socket)",
    ]


def drive(argv: list[str] | None, *, prog: str, doc: str, sizes: tuple[Any, Any],
          header: Callable[..., list[str]], transport: Callable[..., dict[str, Figure]],
          peer: Callable[..., None]) -> int:
    """The command line both benchmark scripts share: ``--quick``, ``--json``; one server;
    ``transport`` over tcp then unix (``(report, name, cluster, url, sizes)``); the peer;
    everything stopped on Ctrl-C; the table last."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds, for tests)")
    parser.add_argument("--json", metavar="FILE", help="also write one JSON line per figure")
    args = parser.parse_args(argv)
    chosen = sizes[0] if args.quick else sizes[1]
    json_file = open(args.json, "w") if args.json else None  # noqa: SIM115
    report = Report(json_file)
    try:
        with EmbeddedServer() as server:
            head = header(server.url, chosen, args.quick)
            with redisengines.Cluster(n=ENGINES, url=server.url, cluster="bench") as cluster:
                ours_tcp = transport(report, "tcp", cluster, server.url, chosen)
            with redisengines.Cluster(n=ENGINES) as cluster:
                transport(report, "unix", cluster, cluster.local_url, chosen)
            peer(report, server.url, chosen, ours_tcp)
    except KeyboardInterrupt:
        progress("interrupted: everything started was stopped")
        return 130
    finally:
        if json_file is not None:
            json_file.close()
    report.print_table(head)
    return 0


def main(argv: list[str] | None = None) -> int:
    return drive(argv, prog="python -m benchmarks.bench_core", doc=__doc__ or "",
                 sizes=(QUICK, FULL), header=header, transport=run_transport, peer=peer_rq)


if __name__ == "__main__":
    sys.exit(main())
