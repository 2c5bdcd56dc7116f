"""Benchmark of the Ray-style layer: remote functions, actors and futures, next to baselines.

Run from the repository root::

    python -m benchmarks.bench_remote            # full sizes (a minute or two)
    python -m benchmarks.bench_remote --quick    # tiny sizes, seconds (used by the tests)
    python -m benchmarks.bench_remote --json out.jsonl

Every figure is measured in this run on this machine, next to its baseline:

* Round trip of one remote-function call and of one actor-method call (``get(f.remote())``)
  against ``client.apply(noop, targets=0)`` of the multiengine API.
* ``get`` of a future that is already done.
* Throughput: 5,000 tiny remote-function calls submitted at once over 2 engines, and
  5,000 calls to one actor submitted one after the other, then ``get`` of all; against
  5,000 ``apply(noop, block=False)`` alternating over the 2 engines.
* Peer: rq (the Redis job queue), if installed, on the same TCP server.

Each section runs over TCP and over the embedded default (unix socket), as in
``bench_core``, whose table, JSON lines, timing and rq helpers this script imports.
Everything started here is stopped here, also on Ctrl-C. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import redisengines
from benchmarks.bench_core import (
    ENGINES,
    WAIT_TIMEOUT,
    Figure,
    Report,
    apply_throughput,
    drive,
    machine,
    measure_rq,
    noop,
    sample,
)


def tiny() -> None:
    """The remote function: does nothing, returns None."""
    return None


class Accumulator:
    """The actor: adds to its state, returns None."""

    def __init__(self) -> None:
        self.n = 0

    def add(self, k: int = 1) -> None:
        self.n += k

    def total(self) -> int:
        return self.n


# ----------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Sizes:
    samples: int  # round-trip samples per figure (after warm-up)
    warmup: int
    get_samples: int  # samples of get() of a ready future
    calls: int  # calls per throughput run (functions, actor, apply, rq jobs)
    runs: int  # throughput runs (their median is reported)


FULL = Sizes(samples=300, warmup=30, get_samples=10_000, calls=5000, runs=3)
QUICK = Sizes(samples=20, warmup=3, get_samples=200, calls=100, runs=1)


# ------------------------------------------------------------------------- measures
def function_throughput(f: redisengines.RemoteFunction[Any], calls: int) -> tuple[float, float]:
    """``(calls/s, submits/s)`` of ``calls`` calls of ``f`` submitted at once, then got."""
    t0 = time.perf_counter()
    futures = [f.remote() for _ in range(calls)]
    t1 = time.perf_counter()
    redisengines.get(futures, timeout=WAIT_TIMEOUT)
    t2 = time.perf_counter()
    return calls / (t2 - t0), calls / (t1 - t0)


def actor_throughput(actor: redisengines.ActorHandle, calls: int) -> tuple[float, float]:
    """``(calls/s, submits/s)`` of ``calls`` calls to one actor sent in turn, then got."""
    t0 = time.perf_counter()
    futures = [actor.add.remote() for _ in range(calls)]
    t1 = time.perf_counter()
    redisengines.get(futures, timeout=WAIT_TIMEOUT)
    t2 = time.perf_counter()
    return calls / (t2 - t0), calls / (t1 - t0)


def rate(report: Report, name: str, label: str, runs: list[float]) -> Figure:
    return report.add(Figure(name, label, statistics.median(runs), "calls/s", n=len(runs)))


# ------------------------------------------------------------------------- sections
def round_trips(report: Report, t: str, client: redisengines.Client,
                f: redisengines.RemoteFunction[Any], actor: redisengines.ActorHandle,
                sizes: Sizes) -> dict[str, Figure]:
    report.section(f"Round trip over {t}: one call, then get() of its future")
    target = client.ids[0]
    apply = report.latency(f"remote.{t}.apply_round_trip",
                           f"{t}: client.apply(noop, targets=0) (baseline)",
                           sample(lambda: client.apply(noop, targets=target),
                                  sizes.samples, sizes.warmup))
    fn = report.latency(f"remote.{t}.function_round_trip", f"{t}: get(f.remote())",
                        sample(lambda: redisengines.get(f.remote()), sizes.samples,
                               sizes.warmup))
    act = report.latency(f"remote.{t}.actor_round_trip",
                         f"{t}: get(actor.add.remote()), actor on engine 0",
                         sample(lambda: redisengines.get(actor.add.remote()), sizes.samples,
                                sizes.warmup))
    report.ratio(f"remote.{t}.function_round_trip_over_apply",
                 f"{t}: remote function / apply round trip", fn, apply)
    report.ratio(f"remote.{t}.actor_round_trip_over_apply",
                 f"{t}: actor call / apply round trip", act, apply)

    done = f.remote()
    done.result(WAIT_TIMEOUT)
    ready = report.latency(f"remote.{t}.get_ready", f"{t}: get(f) of a future already done",
                           sample(lambda: redisengines.get(done), sizes.get_samples,
                                  sizes.warmup))
    report.note(f"{t}: get(f) of a done future: median {ready.value * 1e6:.2f} µs, "
                f"p90 {(ready.p90 or 0) * 1e6:.2f} µs")
    return {"function_round_trip": fn}


def throughputs(report: Report, t: str, client: redisengines.Client,
                f: redisengines.RemoteFunction[Any], actor: redisengines.ActorHandle,
                sizes: Sizes) -> dict[str, Figure]:
    n = sizes.calls
    report.section(f"Throughput over {t}: {n} calls submitted without waiting, then get all "
                   f"(calls/s from the first submit to the last result)")
    ids = client.ids[:ENGINES]
    warm = min(n, 100)
    apply_throughput(client, ids, warm)
    apply = rate(report, f"remote.{t}.apply_throughput",
                 f"{t}: {n} apply(noop, block=False), targets 0/1 alternating (baseline)",
                 [apply_throughput(client, ids, n) for _ in range(sizes.runs)])

    function_throughput(f, warm)
    runs = [function_throughput(f, n) for _ in range(sizes.runs)]
    fn = rate(report, f"remote.{t}.function_throughput",
              f"{t}: {n} f.remote() load-balanced over {ENGINES} engines",
              [r[0] for r in runs])
    rate(report, f"remote.{t}.function_submit", f"{t}: f.remote() submits alone",
         [r[1] for r in runs])

    actor_throughput(actor, warm)
    runs = [actor_throughput(actor, n) for _ in range(sizes.runs)]
    act = rate(report, f"remote.{t}.actor_throughput", f"{t}: {n} actor.add.remote(), one actor",
               [r[0] for r in runs])
    rate(report, f"remote.{t}.actor_submit", f"{t}: actor.add.remote() submits alone",
         [r[1] for r in runs])
    report.ratio(f"remote.{t}.function_throughput_over_apply",
                 f"{t}: remote function / apply calls/s", fn, apply)
    report.ratio(f"remote.{t}.actor_throughput_over_apply",
                 f"{t}: actor / apply calls/s", act, apply)
    return {"function_throughput": fn}


def run_transport(report: Report, t: str, cluster: redisengines.Cluster, url: str,
                  sizes: Sizes) -> dict[str, Figure]:
    client = cluster.client()
    if len(client.ids) < ENGINES:
        raise RuntimeError(f"expected {ENGINES} engines, found {client.ids}")
    f = redisengines.remote(tiny).options(client=client)
    actor = redisengines.remote(Accumulator).options(engine=client.ids[0], client=client).remote()
    redisengines.get(actor.add.remote(), timeout=WAIT_TIMEOUT)  # created, class unpickled
    ours = round_trips(report, t, client, f, actor, sizes)
    ours |= throughputs(report, t, client, f, actor, sizes)
    expected = sizes.samples + sizes.warmup + 1 + min(sizes.calls, 100) + sizes.runs * sizes.calls
    total = redisengines.get(actor.total.remote(), timeout=WAIT_TIMEOUT)
    if total != expected:  # every call ran, once
        raise AssertionError(f"the actor counted {total} calls, expected {expected}")
    return ours


def peer_rq(report: Report, url: str, sizes: Sizes, ours: dict[str, Figure]) -> None:
    rq_figures = measure_rq(report, url, "remote.rq", sizes.samples, sizes.warmup, sizes.calls,
                            sizes.runs)
    if rq_figures is None:
        return
    lat, thr = rq_figures
    report.ratio("remote.rq.function_round_trip_over_rq",
                 "tcp: remote function round trip / rq round trip",
                 ours["function_round_trip"], lat)
    report.ratio("remote.rq.function_throughput_over_rq",
                 "tcp: remote function calls/s / rq jobs/s", ours["function_throughput"], thr)


# ------------------------------------------------------------------------------ main
def header(server_url: str, sizes: Sizes, quick: bool) -> list[str]:
    return [
        *machine(server_url, "remote-layer benchmark", quick),
        f"sizes: {sizes.samples} round-trip samples after {sizes.warmup} warm-up, "
        f"{sizes.get_samples} get() samples, {sizes.calls} calls per throughput run, "
        f"median of {sizes.runs} runs",
        f"tcp = Cluster(n={ENGINES}, url=<TCP url of an EmbeddedServer>); "
        f"unix = Cluster(n={ENGINES}) (embedded default, unix socket: what init(n=2) starts)",
    ]


def main(argv: list[str] | None = None) -> int:
    if __name__ != "__main__":  # imported: send tiny and Accumulator by value all the same
        import cloudpickle
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return drive(argv, prog="python -m benchmarks.bench_remote", doc=__doc__ or "",
                 sizes=(QUICK, FULL), header=header, transport=run_transport, peer=peer_rq)


if __name__ == "__main__":
    sys.exit(main())
