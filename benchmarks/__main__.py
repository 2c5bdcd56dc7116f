"""Run the same workloads on redisengines, on raw Redis baselines and on each peer installed.

    python -m benchmarks                      # full sizes (several minutes)
    python -m benchmarks --quick              # tiny sizes, seconds (used by the tests)
    python -m benchmarks --only W1,W3 --peers rq --json figures.jsonl --markdown table.md

Workloads (``benchmarks/README.md`` says exactly what each times):

* W1 latency: round trip of a no-op on one engine; baselines PING and a raw stream
  ping-pong, over TCP and the unix socket (the embedded default).
* W2 throughput: 5,000 tiny calls submitted at once, load-balanced over 2 engines, and to one
  actor; baseline: small XADDs pipelined by one redis-py client.
* W3 bandwidth: push and pull of a 100 MB float64 array, and a push to 2 engines at once;
  baselines: raw paged SET (both redis-py command packers) and GET.
* W4: scatter 10,000,000 float64 over 2 engines, sum on each, gather the sums.
* W5: start a local 2-engine cluster until ready, and stop it.
* W6: 400 calls of ``time.sleep(0.01)`` over 2 engines; efficiency = 2.0 s / wall.
* memory: RSS of the idle cluster (server + engines + client), before and after a soak of
  100,000 calls, and the client's memory per pending future.

Peers (IPython Parallel, Dask, Ray, rq: ``benchmarks/requirements-peers.txt``) run the
same workloads, each in a process of its own (``benchmarks/peers.py``), after ours, on this
machine. Everything started is stopped, also on Ctrl-C. Loopback addresses only.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import IO, Any

import cloudpickle
import redis
import redis.utils
from redis.connection import Encoder, PythonRespSerializer

import redisengines
from benchmarks import bench_core, bench_remote
from benchmarks.bench_core import (
    GET_BATCH,
    engine_bandwidth,
    engine_latency,
    raw_paged,
    raw_ping,
    raw_pingpong,
    start_process,
    stop_process,
)
from benchmarks.bench_remote import Accumulator, actor_throughput, function_throughput, tiny
from benchmarks.common import (
    ENGINES,
    FULL,
    MB,
    OURS,
    QUICK,
    WAIT_TIMEOUT,
    WORKLOADS,
    Result,
    Sizes,
    failed,
    fmt,
    latency,
    make_array,
    median,
    progress,
    rss_mb,
    sample,
    scatter_sum,
    sleeps,
    start_stop,
    total_rss_mb,
)
from benchmarks.peers import MODULES, PEERS
from redisengines.pagereader import allocate
from redisengines.server import EmbeddedServer, find_server_binary

RAW = "redis-py"  # the raw baselines' system
MACHINE = "machine"  # what the machine allows without Redis (no version)
VERSION = redisengines.__version__
PEER_TIMEOUT = {True: 600.0, False: 3600.0}  # seconds a peer's process may take (quick, full)
SOAK_BATCH = 1000  # the soak's calls are submitted this many at a time, then waited for

# The scripts' functions and classes travel by value, as a script's or a notebook's do.
cloudpickle.register_pickle_by_value(bench_core)
cloudpickle.register_pickle_by_value(bench_remote)


def nap(seconds: float) -> None:
    """W6's remote function."""
    time.sleep(seconds)


def part_sum() -> float:
    """W4: the sum of this engine's part (``__main__``'s functions see its namespace)."""
    return float(globals()["x"].sum())


# The memory workload's gate: each engine says it is in, then blocks until released.
GATE = """\
import redis as _redis
with _redis.Redis.from_url({url!r}) as _gate:
    _gate.rpush({inside!r}, 1)
    _gate.blpop({release!r})
"""


# ----------------------------------------------------------------------------- setup
@dataclass
class Setup:
    """A running 2-engine cluster of ours, with what the workloads call on it."""

    transport: str  # "tcp" or "unix"
    client: redisengines.Client
    raw_url: str  # the same server, for the raw baselines
    function: Any  # tiny(), a remote function
    actor: Any  # an Accumulator on engine 0


@contextmanager
def setup(transport: str) -> Iterator[Setup]:
    """tcp: ``Cluster(n=2, url=<TCP URL of an EmbeddedServer>)``; unix: ``Cluster(n=2)``,
    the embedded default, whose client and engines use the server's unix socket."""
    with ExitStack() as stack:
        if transport == "tcp":
            server = stack.enter_context(EmbeddedServer())
            cluster = stack.enter_context(
                redisengines.Cluster(n=ENGINES, url=server.url, cluster="bench"))
            raw_url = server.url
        else:
            cluster = stack.enter_context(redisengines.Cluster(n=ENGINES))
            raw_url = cluster.local_url
        client = cluster.client()
        if client.ids != list(range(ENGINES)):
            raise RuntimeError(f"expected engines {list(range(ENGINES))}, found {client.ids}")
        function = redisengines.remote(tiny).options(client=client)
        actor = redisengines.remote(Accumulator).options(engine=0, client=client).remote()
        actor.add.remote().result(WAIT_TIMEOUT)  # created, its class unpickled
        yield Setup(transport, client, raw_url, function, actor)


# ------------------------------------------------------------------------ workloads
def w1(st: Setup, s: Sizes) -> list[Result]:
    t, c = st.transport, st.client
    ping = raw_ping(st.raw_url, s)
    pingpong = raw_pingpong(st.raw_url, s)
    execute, apply = engine_latency(c, 0, s)
    actor = sample(lambda: st.actor.add.remote().result(WAIT_TIMEOUT), s.samples, s.warmup)
    function = sample(lambda: st.function.remote().result(WAIT_TIMEOUT), s.samples, s.warmup)
    return [
        latency("W1", OURS, f"execute.{t}", f"{t}: execute('pass', targets=0)", execute),
        latency("W1", OURS, f"apply.{t}", f"{t}: apply(noop, targets=0)", apply),
        latency("W1", OURS, f"actor.{t}", f"{t}: actor.add.remote().result()", actor),
        latency("W1", OURS, f"function.{t}", f"{t}: f.remote().result(), load-balanced",
                function),
        latency("W1", RAW, f"ping.{t}", f"{t}: PING", ping, vs=f"execute.{t}"),
        latency("W1", RAW, f"pingpong.{t}", f"{t}: raw stream ping-pong", pingpong,
                vs=f"execute.{t}"),
    ]


def raw_xadds(url: str, n: int) -> float:
    """XADDs/s of ``n`` small entries (2 short fields) in one pipeline of one client."""
    stream = f"bench:{{xadd{uuid.uuid4().hex[:8]}}}"
    entries = [{"op": "call", "id": f"{i:032x}"} for i in range(n)]
    with redis.Redis.from_url(url) as r:
        try:
            t0 = time.perf_counter()
            pipe = r.pipeline(transaction=False)
            for fields in entries:
                pipe.xadd(stream, fields)
            pipe.execute()
            return n / (time.perf_counter() - t0)
        finally:
            r.delete(stream)


def w2(st: Setup, s: Sizes) -> list[Result]:
    t, n = st.transport, s.calls
    warm = min(n, 100)
    function_throughput(st.function, warm)
    functions = [function_throughput(st.function, n)[0] for _ in range(s.runs)]
    actor_throughput(st.actor, warm)
    actors = [actor_throughput(st.actor, n)[0] for _ in range(s.runs)]
    raw_xadds(st.raw_url, warm)
    xadds = [raw_xadds(st.raw_url, n) for _ in range(s.runs)]
    return [
        median("W2", OURS, f"function.{t}", f"{t}: f.remote() x{n}, load-balanced, get(all)",
               functions, "calls/s"),
        median("W2", OURS, f"actor.{t}", f"{t}: actor.add.remote() x{n}, get(all)", actors,
               "calls/s"),
        median("W2", RAW, f"xadd.{t}", f"{t}: small XADD x{n}, one pipeline", xadds,
               "calls/s", vs=f"function.{t}"),
    ]


def packers() -> list[tuple[str, dict[str, Any]]]:
    """redis-py's command packers: hiredis's (its default when hiredis is installed: it
    copies a memoryview into bytes) and the pure-Python one (sends a memoryview as is; the
    one redisengines uses)."""
    python = ("python packer", {"command_packer": PythonRespSerializer(
        6000, Encoder("utf-8", "strict", False).encode)})
    return ([("hiredis packer", {}), python] if redis.utils.HIREDIS_AVAILABLE else [python])


def w3(st: Setup, s: Sizes) -> list[Result]:
    t, c = st.transport, st.client
    arr = make_array(s.nbytes)
    gb = arr.nbytes / 1e9

    def gbps(times: list[float]) -> list[float]:
        return [gb / x for x in times]

    ours = engine_bandwidth(c, c.ids[:ENGINES], arr, s.runs)
    out = [median("W3", OURS, f"push.{t}", f"{t}: push({{'a': arr}}, targets=0)",
                  gbps(ours["push"]), "GB/s"),
           median("W3", OURS, f"pull.{t}", f"{t}: pull('a', targets=0)", gbps(ours["pull"]),
                  "GB/s"),
           median("W3", OURS, f"push2.{t}", f"{t}: push({{'a': arr}}, targets=[0, 1])",
                  gbps(ours["push_all"]), "GB/s")]
    gets = []
    for name, kwargs in packers():
        raw = raw_paged(st.raw_url, arr, s.runs, **kwargs)
        key = name.split()[0]
        out.append(median("W3", RAW, f"set.{key}.{t}",
                          f"{t}: SET 4 MiB pages, 1 pipeline, {name}", gbps(raw["set"]),
                          "GB/s", vs=f"push.{t}"))
        gets.append(median("W3", RAW, f"get.{t}",
                           f"{t}: GET 4 MiB pages, {GET_BATCH} per pipeline",
                           gbps(raw["get"]), "GB/s", vs=f"pull.{t}"))
    out.append(max(gets, key=lambda r: r.value or 0.0))  # GET packs no payload: the best
    return out + (fresh_memory(arr, s) if t == "unix" else [])  # (the machine's: once)


def fresh_memory(arr: Any, s: Sizes) -> list[Result]:
    """GB/s of copying ``arr`` into a buffer just allocated (as a pull or an engine reads
    pages into one), right after freeing a buffer as large, and ``s.reclaim_wait`` seconds
    after: a virtual machine may hand freed memory back to its host (free page reporting),
    and touching it again then costs more than the copy. Every transfer of W3 and W4 lands
    in memory fresh to some process (the server's, an engine's, the client's)."""
    src = memoryview(arr).cast("B")

    def fill() -> float:
        t0 = time.perf_counter()
        buf = allocate(src.nbytes)
        memoryview(buf)[:] = src
        took = time.perf_counter() - t0
        del buf
        return took

    fill()
    soon, later = [], []
    for _ in range(s.runs):
        soon.append(fill())
        time.sleep(s.reclaim_wait)
        later.append(fill())
    gb = arr.nbytes / 1e9
    mb = f"{arr.nbytes / 1e6:,.0f} MB"
    return [median("W3", MACHINE, "fresh.soon",
                   f"copy {mb} into fresh memory, right after freeing as much",
                   [gb / x for x in soon], "GB/s"),
            median("W3", MACHINE, "fresh.later",
                   f"the same, {s.reclaim_wait:g} s after freeing as much",
                   [gb / x for x in later], "GB/s")]


def w4(st: Setup, s: Sizes) -> list[Result]:
    c, ids = st.client, list(range(ENGINES))

    def once(arr: Any) -> float:
        c.scatter("x", arr, targets=ids)
        return sum(c.apply(part_sum, targets=ids).values())
    return scatter_sum(OURS, VERSION, s,
                       f"{st.transport}: scatter('x', arr), apply(part_sum)", once)


def w5(s: Sizes) -> list[Result]:
    def up() -> redisengines.Cluster:
        cluster = redisengines.Cluster(n=ENGINES).start()
        try:
            client = cluster.client()
            deadline = time.monotonic() + WAIT_TIMEOUT
            while client.ids != list(range(ENGINES)):  # start() has waited: never loops
                if time.monotonic() > deadline:
                    raise TimeoutError(f"engines {client.ids}")
                time.sleep(0.001)
        except BaseException:
            cluster.stop()
            raise
        return cluster
    return start_stop(OURS, VERSION, s, up, lambda cluster: cluster.stop())


def w6(st: Setup, s: Sizes) -> list[Result]:
    f = redisengines.remote(nap).options(client=st.client)
    return sleeps(OURS, VERSION, s, f"{st.transport}: nap.remote({s.sleep}) x{s.sleeps}, "
                  "load-balanced, get(all)",
                  lambda n, sec: redisengines.get([f.remote(sec) for _ in range(n)],
                                                  timeout=WAIT_TIMEOUT))


def memory(s: Sizes) -> list[Result]:
    """RSS of every process of a fresh ``Cluster(2)``: idle, around a soak of calls; and the
    client's memory per pending future."""
    out: list[Result] = []

    def add(metric: str, label: str, value: float, unit: str = "MB", n: int = 1) -> None:
        out.append(Result("memory", OURS, metric, label, value, unit, n=n, version=VERSION))

    with redisengines.Cluster(n=ENGINES) as cluster:
        assert cluster.server is not None and cluster.server.proc is not None
        client = cluster.client()
        client.execute("pass")
        time.sleep(1.0)  # as for the peers: let start-up work settle
        pids = {"server": [cluster.server.proc.pid],
                "engines": [p.pid for p in cluster.processes.values()],
                "client": [os.getpid()]}

        def rss() -> dict[str, float]:
            parts = {name: total_rss_mb(p) for name, p in pids.items()}
            return parts | {"total": sum(parts.values())}

        idle = rss()
        add("idle.server", "idle: the Valkey server", idle["server"])
        add("idle.engines", f"idle: the {ENGINES} engines", idle["engines"])
        add("idle.client", "idle: the client process (this one)", idle["client"])
        add("idle.total", "idle: total", idle["total"])

        f = redisengines.remote(tiny).options(client=client)
        before = rss()
        for start in range(0, s.soak, SOAK_BATCH):
            redisengines.get([f.remote() for _ in range(min(SOAK_BATCH, s.soak - start))],
                             timeout=WAIT_TIMEOUT)
        gc.collect()
        after = rss()
        add("soak.before", f"before a soak of {s.soak:,} f.remote() calls: total",
            before["total"])
        add("soak.after", "after it: total", after["total"], n=s.soak)
        for name in ("server", "engines", "client"):
            add(f"soak.growth.{name}", f"growth over the soak: {name}",
                after[name] - before[name], n=s.soak)

        # Last: tracemalloc's own memory would count in the soak's figures.
        traced, resident = pending_cost(cluster.local_url, client, f, s.pending)
        add("pending.tracemalloc", f"client memory per pending future (tracemalloc, "
            f"{s.pending:,} held)", traced, "B", s.pending)
        add("pending.rss", "client RSS growth per pending future (a floor)", resident, "B",
            s.pending)
    return out


def pending_cost(url: str, client: redisengines.Client, f: Any, n: int) -> tuple[float, float]:
    """Bytes of client memory per pending future: ``n`` calls submitted while every engine
    is held in a gate (so none runs, none completes), measured by tracemalloc (Python
    allocations, in a pass of their own) and by the RSS delta of this process."""
    tag = uuid.uuid4().hex[:8]
    inside, release = f"bench:{{gate{tag}}}:in", f"bench:{{gate{tag}}}:out"
    code = GATE.format(url=url, inside=inside, release=release)
    with redis.Redis.from_url(url) as r:
        def held(measure: Any) -> float:
            gate = client.execute(code, block=False)
            futures: list[Any] = []
            try:
                for _ in range(ENGINES):  # every engine is in: none takes a call
                    if r.blpop([inside], timeout=WAIT_TIMEOUT) is None:
                        raise TimeoutError("the engines did not enter the gate")
                gc.collect()
                before = measure()
                futures = [f.remote() for _ in range(n)]
                gc.collect()
                grown = (measure() - before) / n
            finally:
                r.rpush(release, *[1] * ENGINES)
                redisengines.get(futures, timeout=WAIT_TIMEOUT)
                gate.result(WAIT_TIMEOUT)
            return grown

        resident = held(lambda: rss_mb(os.getpid()) * MB)
        tracemalloc.start()
        try:
            traced = held(lambda: tracemalloc.get_traced_memory()[0])
        finally:
            tracemalloc.stop()
    return traced, resident


# --------------------------------------------------------------------------- peers
def available_peers() -> list[str]:
    return [name for name, module in MODULES.items() if importlib.util.find_spec(module)]


def run_peer(name: str, quick: bool, only: list[str], emit: Any) -> None:
    """The peer's workloads in its own process (``python -m benchmarks.peers``), each figure
    to ``emit`` as it comes; if the process fails, what it did not measure is ``failed``."""
    args = [sys.executable, "-m", "benchmarks.peers", name, "--only", ",".join(only)]
    proc = start_process(args + (["--quick"] if quick else []), stdout=subprocess.PIPE,
                         text=True)
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        proc.terminate()  # it stops its cluster, then exits
    watchdog = threading.Timer(PEER_TIMEOUT[quick], kill)
    watchdog.start()
    seen = set()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{"):
                result = Result.from_record(json.loads(line))
                seen.add(result.workload)
                emit(result)
        proc.wait()
    finally:
        watchdog.cancel()
        stop_process(proc, grace=60.0)  # Ctrl-C here: SIGTERM, and it stops its cluster
    if proc.returncode != 0:
        why = f"its process exited with code {proc.returncode} (its stderr is above)"
        if timed_out.is_set():
            why += f", stopped after {PEER_TIMEOUT[quick]:g} s"
        for w in only:
            if w not in seen:
                emit(failed(w, name, why))


# --------------------------------------------------------------------------- output
def machine(quick: bool) -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), "")
    except OSError:
        pass
    out = subprocess.run([find_server_binary(), "--version"], capture_output=True,
                         text=True).stdout
    valkey = next((w[2:] for w in out.split() if w.startswith("v=")), out.strip())
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "cpu": cpu,
            "python": platform.python_version(), "platform": platform.platform(),
            "valkey": valkey, "redis_py": redis.__version__, "redisengines": VERSION,
            "sizes": "quick" if quick else "full"}


def header(m: dict[str, Any], s: Sizes) -> list[str]:
    return [
        f"python -m benchmarks ({m['sizes']} sizes), {m['date']}: {m['cpus']} CPUs "
        f"({m['cpu']}), Python {m['python']}, Valkey {m['valkey']}, redis-py {m['redis_py']}, "
        f"redisengines {m['redisengines']}, {m['platform']}",
        f"W1 {s.samples} round trips after {s.warmup} warm-up; W2 {s.calls:,} calls; W3 "
        f"{s.nbytes / MB:g} MB; W4 {s.elements:,} float64; W5 {s.starts} starts; W6 "
        f"{s.sleeps} x sleep({s.sleep}); memory: soak {s.soak:,} calls, {s.pending:,} pending; "
        f"W2-W4, W6: median of {s.runs} run(s)",
        f"ours: tcp = Cluster(n={ENGINES}, url=<TCP URL of an EmbeddedServer>), unix = "
        f"Cluster(n={ENGINES}) (embedded default, unix socket); peers: their own local "
        f"cluster of {ENGINES} workers on 127.0.0.1",
        "ours/this: our figure named in 'vs' divided by this row's: below 1 is better for "
        "times and MB, above 1 for calls/s, GB/s and efficiency",
    ]


def rank(r: Result) -> int:
    return 0 if r.system == OURS else 1 if r.system in (RAW, MACHINE) else 2


def rows(results: list[Result]) -> Iterator[tuple[str, list[list[str]]]]:
    """The table: per workload, one row per figure (ours, the baselines, the peers)."""
    ours = {(r.workload, r.metric): r for r in results if r.system == OURS}
    for w, title in WORKLOADS.items():
        figs = sorted((r for r in results if r.workload == w), key=rank)
        if not figs:
            continue
        out = []
        for r in figs:
            system = r.system if r.system in (OURS, RAW, MACHINE) or not r.version else \
                f"{r.system} {r.version}"
            if r.value is None:
                out.append([system, r.label, "failed", "", "", r.error or ""])
                continue
            ratio = ""
            mine = ours.get((w, r.vs)) if r.vs else None
            if mine is not None and mine.value and r.value:
                ratio = f"{mine.value / r.value:.2f}x vs {mine.metric}"
            out.append([system, r.label, fmt(r.value, r.unit),
                        fmt(r.p99, r.unit) if r.p99 is not None else "",
                        str(r.n) if r.n else "", ratio])
        yield title, out


COLUMNS = ["system", "what", "median", "p99", "n", "ours/this"]


def text_table(results: list[Result], head: list[str], notes: list[str]) -> str:
    tables = list(rows(results))
    every = [COLUMNS] + [row for _, body in tables for row in body]
    widths = [max(len(row[i]) for row in every) for i in range(len(COLUMNS))]
    right = {2, 3, 4}

    def line(row: list[str]) -> str:
        return "  " + "  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                                for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
    out = head[:]
    for title, body in tables:
        out += ["", title, line(COLUMNS).rstrip()] + [line(row).rstrip() for row in body]
    return "\n".join(out + [""] + notes) + "\n"


def markdown_table(results: list[Result], head: list[str], notes: list[str]) -> str:
    out = [f"{line}  " for line in head]
    for title, body in rows(results):
        out += ["", f"**{title}**", "", "| " + " | ".join(COLUMNS) + " |",
                "|" + "---|" * len(COLUMNS)]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(out + [""] + [f"{n}  " for n in notes]) + "\n"


def targets(results: list[Result]) -> list[str]:
    """The targets, each met or not, from the figures of this run (those measured)."""
    v = {(r.workload, r.system, r.metric): r.value for r in results if r.value is not None}

    def get(w: str, system: str, metric: str) -> float | None:
        return v.get((w, system, metric))

    checks: list[tuple[str, float | None, str, float]] = []  # (what, value, op, limit)

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    for name in ("execute", "actor"):
        checks.append((f"W1 tcp: {name} / raw ping-pong",
                       ratio(get("W1", OURS, f"{name}.tcp"), get("W1", RAW, "pingpong.tcp")),
                       "<=", 1.25))
    checks.append(("W1 unix: actor call / Ray's actor call",
                   ratio(get("W1", OURS, "actor.unix"), get("W1", "ray", "actor")), "<=", 0.5))
    for t in ("tcp", "unix"):
        for name in ("function", "actor"):
            checks.append((f"W2 {t}: {name} calls/s", get("W2", OURS, f"{name}.{t}"), ">=",
                           10_000))
    for t in ("tcp", "unix"):
        sets = [x for (w, system, m), x in v.items() if w == "W3" and system == RAW
                and m.startswith("set.") and m.endswith(f".{t}")]
        best = max(sets) if sets else None
        push = get("W3", OURS, f"push.{t}")
        checks += [
            (f"W3 {t}: push GB/s / best raw SET GB/s", ratio(push, best), ">=", 0.9),
            (f"W3 {t}: pull GB/s / best raw SET GB/s", ratio(get("W3", OURS, f"pull.{t}"), best),
             ">=", 0.7),
            (f"W3 {t}: push to 2 engines / push to 1 (time)",
             ratio(push, get("W3", OURS, f"push2.{t}")), "<=", 1.3),
        ]
    checks += [
        ("W4: scatter, sum, gather (s)", get("W4", OURS, "scatter_sum"), "<=", 0.1),
        ("W5: start (s)", get("W5", OURS, "start"), "<=", 0.5),
        ("W6: efficiency", get("W6", OURS, "efficiency"), ">=", 0.95),
        ("memory: idle cluster (MB)", get("memory", OURS, "idle.total"), "<=", 150),
    ]
    out = []
    for what, value, op, limit in checks:
        if value is None:
            continue
        met = value <= limit if op == "<=" else value >= limit
        shown = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
        out.append(f"{what}: {shown} (target {op} {limit:,}): {'met' if met else 'NOT met'}")
    return out


def plot(results: list[Result], path: str, title: str) -> None:
    """A PNG bar chart per workload (its main unit), ours vs baselines vs peers."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress(f"--plot: matplotlib is not installed, {path} not written "
                 "(pip install matplotlib, or -r benchmarks/requirements-peers.txt)")
        return
    units = {"W1": "s", "W2": "calls/s", "W3": "GB/s", "W4": "s", "W5": "s", "W6": "fraction",
             "memory": "MB"}
    panels = []
    for w in WORKLOADS:
        figs = sorted((r for r in results if r.workload == w and r.value is not None
                       and r.unit == units[w] and not r.metric.startswith("soak.growth")),
                      key=rank)
        if figs:
            panels.append((w, figs))
    if not panels:
        progress("--plot: no figure to plot")
        return
    colors = {0: "tab:red", 1: "tab:gray", 2: "tab:blue"}
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(11, 1.2 + sum(0.3 * len(f) + 0.8 for _, f in panels)),
                             gridspec_kw={"height_ratios": [len(f) + 1 for _, f in panels]})
    for ax, (w, figs) in zip(axes[:, 0], panels, strict=True):
        scale = 1e3 if units[w] == "s" else 1.0
        ax.barh([f"{r.system}: {r.label}"[:70] for r in figs],
                [(r.value or 0.0) * scale for r in figs],
                color=[colors[rank(r)] for r in figs])
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(WORKLOADS[w], fontsize=9, loc="left")
        ax.set_xlabel("ms" if units[w] == "s" else units[w], fontsize=8)
    fig.suptitle(textwrap.fill(title, 150), fontsize=9)
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 0.99))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    progress(f"plot written to {path}")


# ------------------------------------------------------------------------------ main
def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds, for tests)")
    parser.add_argument("--only", metavar="W1,W3",
                        help=f"the workloads to run, of {','.join(WORKLOADS)} (default: all)")
    parser.add_argument("--peers", metavar="NAMES",
                        help=f"the peers to try, of {','.join(PEERS)}, or 'none' "
                             "(default: every one importable)")
    parser.add_argument("--json", metavar="PATH", help="one JSON line per figure")
    parser.add_argument("--markdown", metavar="PATH", help="the table as Markdown")
    parser.add_argument("--plot", metavar="PATH", help="a PNG bar chart (needs matplotlib)")
    args = parser.parse_args(argv)
    names = {w.lower(): w for w in WORKLOADS}
    chosen = [w.strip().lower() for w in args.only.split(",")] if args.only else list(names)
    unknown = [w for w in chosen if w not in names]
    if unknown:
        parser.error(f"--only: unknown workload(s) {unknown}; choose among {list(WORKLOADS)}")
    args.only = [w for w in WORKLOADS if w.lower() in chosen]
    if args.peers is None:
        args.peers = available_peers()
    else:
        args.peers = [] if args.peers == "none" else [p.strip() for p in args.peers.split(",")]
        unknown = [p for p in args.peers if p not in PEERS]
        if unknown:
            parser.error(f"--peers: unknown peer(s) {unknown}; choose among {list(PEERS)}")
    return args


def run_ours(s: Sizes, only: list[str], emit: Any) -> None:
    def section(w: str, fn: Any, *a: Any) -> None:
        progress(f"redisengines: {WORKLOADS[w]}{' over ' + a[0].transport if a else ''}")
        for r in fn(*a, s):
            if r.system != MACHINE:
                r.version = r.version or (VERSION if r.system == OURS else redis.__version__)
            emit(r)

    # First, in a process that has measured nothing yet: memory, then starts and stops.
    if "memory" in only:
        section("memory", memory)
    if "W5" in only:
        section("W5", w5)
    for transport, workloads in (("tcp", ["W1", "W2", "W3"]),
                                 ("unix", ["W1", "W2", "W3", "W4", "W6"])):
        todo = [w for w in workloads if w in only]
        if todo:
            with setup(transport) as st:
                for w in todo:
                    section(w, {"W1": w1, "W2": w2, "W3": w3, "W4": w4, "W6": w6}[w], st)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    s = QUICK if args.quick else FULL
    m = machine(args.quick)
    head = header(m, s)
    for line in head:
        progress(line)
    results: list[Result] = []
    stack = ExitStack()
    json_file: IO[str] | None = stack.enter_context(open(args.json, "w")) if args.json else None

    def emit(r: Result) -> None:
        results.append(r)
        if json_file is not None:  # at once: an interrupted run keeps what it measured
            json_file.write(json.dumps(r.record() | {"machine": m}) + "\n")
            json_file.flush()
        shown = "failed: " + (r.error or "") if r.value is None else fmt(r.value, r.unit)
        progress(f"  {r.system}: {r.label}: {shown}")

    with stack:  # the JSON lines are closed at the end, also on Ctrl-C
        try:
            run_ours(s, args.only, emit)
            for name in args.peers:
                if importlib.util.find_spec(MODULES[name]) is None:
                    for w in args.only:
                        emit(failed(w, name, f"{MODULES[name]} is not installed"))
                    continue
                run_peer(name, args.quick, args.only, emit)
        except KeyboardInterrupt:
            progress("interrupted: everything started was stopped")
            return 130
    missing = [p for p in PEERS if p not in args.peers]
    notes = []
    if missing:
        notes.append(f"Peers not run: {', '.join(missing)} (not installed, or not chosen with "
                     "--peers; pip install -r benchmarks/requirements-peers.txt)")
    checks = targets(results)
    if checks:
        notes += ["Targets:"] + [f"- {c}" for c in checks]
    print()
    print(text_table(results, head, notes), end="")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown_table(results, head, notes))
    if args.plot:
        plot(results, args.plot, head[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
