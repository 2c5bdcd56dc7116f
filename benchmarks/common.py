"""What the benchmark scripts, the runner (``python -m benchmarks``) and its peer adapters share.

Standard library only (numpy is imported where an array is made), so that a peer's process
(``python -m benchmarks.peers``) carries no redis-py or redisengines in its memory figures.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

MB = 10**6
OURS = "redisengines"
ENGINES = 2  # engines (workers) of every cluster measured
WAIT_TIMEOUT = 300.0  # seconds; only reached when something is broken

# The workloads of ``python -m benchmarks``, in the order of its table.
WORKLOADS = {
    "W1": "W1 latency: round trip of a no-op on one engine",
    "W2": "W2 throughput: tiny calls submitted at once, then all waited for",
    "W3": "W3 bandwidth: push then pull of a float64 array (GB/s = payload bytes / time)",
    "W4": f"W4 scatter a float64 array over {ENGINES} engines, sum on each, gather the sums",
    "W5": f"W5 start a local {ENGINES}-engine cluster until ready, and stop it",
    "W6": f"W6 time.sleep calls load-balanced over {ENGINES} engines",
    "memory": f"Memory: RSS of a local {ENGINES}-engine cluster (all its processes)",
}


# ----------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Sizes:
    """Sizes of the runner's workloads (``python -m benchmarks``)."""

    samples: int  # W1 round trips per figure, after `warmup` untimed ones
    warmup: int
    calls: int  # W2 calls per run
    runs: int  # runs of each W2, W3, W4 and W6 figure (their median is reported)
    nbytes: int  # W3 array
    elements: int  # W4 float64 elements
    starts: int  # W5 start/stop cycles
    sleeps: int  # W6 calls
    sleep: float  # W6 seconds per call
    soak: int  # memory: calls between the two RSS readings
    pending: int  # memory: futures held pending
    reclaim_wait: float  # W3: seconds between freeing memory and touching fresh memory again

    @property
    def ideal_sleep_wall(self) -> float:
        """W6's wall time with no overhead: the sleeps shared by the engines."""
        return self.sleeps * self.sleep / ENGINES


FULL = Sizes(samples=300, warmup=30, calls=5000, runs=3, nbytes=100 * MB, elements=10_000_000,
             starts=5, sleeps=400, sleep=0.01, soak=100_000, pending=10_000,
             reclaim_wait=3.0)
QUICK = Sizes(samples=20, warmup=3, calls=200, runs=1, nbytes=1 * MB, elements=100_000,
              starts=1, sleeps=20, sleep=0.01, soak=500, pending=200, reclaim_wait=0.0)


# --------------------------------------------------------------------------- results
@dataclass
class Result:
    """One figure of the runner: a median (or a single derived value) of one system."""

    workload: str  # a key of WORKLOADS
    system: str  # "redisengines", "redis-py" (raw baseline), "machine", or a peer's name
    metric: str  # stable id within the workload, e.g. "execute.tcp"
    label: str  # what a human reads in the table
    value: float | None  # None: failed
    unit: str  # "s", "calls/s", "GB/s", "MB", "B" or "fraction"
    n: int = 0  # samples or runs behind the median
    p99: float | None = None
    vs: str | None = None  # the metric of ours this row is compared with (ours / this)
    version: str | None = None
    error: str | None = None  # why it failed

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Result:
        fields = {k: v for k, v in record.items() if k in cls.__dataclass_fields__}
        fields.setdefault("value", None)  # a failed figure has none
        return cls(**fields)


def latency(workload: str, system: str, metric: str, label: str, samples: list[float],
            vs: str | None = None, version: str | None = None) -> Result:
    """Median and p99 of round-trip times."""
    return Result(workload, system, metric, label, statistics.median(samples), "s",
                  n=len(samples), p99=percentile(samples, 99), vs=vs, version=version)


def median(workload: str, system: str, metric: str, label: str, values: list[float],
           unit: str, vs: str | None = None, version: str | None = None) -> Result:
    """Median of runs."""
    return Result(workload, system, metric, label, statistics.median(values), unit,
                  n=len(values), vs=vs, version=version)


def failed(workload: str, system: str, error: BaseException | str,
           metric: str = "failed") -> Result:
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return Result(workload, system, metric, "failed", None, "", error=text.strip()[:300])


def percentile(samples: list[float], q: int) -> float:
    if len(samples) < 2:
        return samples[0]
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]


def fmt(value: float, unit: str) -> str:
    if unit == "s":
        if value < 1e-3:
            return f"{value * 1e6:.0f} µs"
        if value < 1.0:
            return f"{value * 1e3:.2f} ms"
        return f"{value:.3f} s"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "calls/s":
        return f"{value:,.0f}/s"
    if unit == "MB":
        return f"{value:,.1f} MB"
    if unit == "B":
        return f"{value:,.0f} B"
    if unit == "fraction":
        return f"{value:.3f}"
    return f"{value:.3f} {unit}"


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -------------------------------------------------------------------------- timing
def sample(fn: Callable[[], Any], n: int, warmup: int) -> list[float]:
    """Round-trip times of ``n`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def make_array(nbytes: int) -> Any:
    import numpy as np
    return np.random.default_rng(0).random(nbytes // 8)


# --------------------------------------------------- workloads measured alike everywhere
# Each takes the system's own primitive; a peer's figure is compared with ours of its metric.
def _vs(system: str, metric: str) -> str | None:
    return None if system == OURS else metric


def start_stop(system: str, version: str, s: Sizes, up: Callable[[], Any],
               down: Callable[[Any], None]) -> list[Result]:
    """W5: seconds of ``up()`` (from nothing to every worker ready) and of ``down(up())``."""
    starts, stops = [], []
    for _ in range(s.starts):
        t0 = time.perf_counter()
        handle = up()
        t1 = time.perf_counter()
        down(handle)
        starts.append(t1 - t0)
        stops.append(time.perf_counter() - t1)
    return [median("W5", system, "start", "start, until every engine is ready", starts, "s",
                   vs=_vs(system, "start"), version=version),
            median("W5", system, "stop", "stop", stops, "s", vs=_vs(system, "stop"),
                   version=version)]


def scatter_sum(system: str, version: str, s: Sizes, label: str,
                once: Callable[[Any], float]) -> list[Result]:
    """W4: seconds of ``once(arr)``, which scatters ``arr`` over the engines, sums each part
    there and returns the sum of the sums (checked once, after an untimed warm-up)."""
    arr = make_array(s.elements * 8)
    expected = float(arr.sum())
    got = once(arr)
    if abs(got - expected) > 1e-6 * abs(expected):
        raise AssertionError(f"the sum of the parts is {got}, not {expected}")
    times = [timed(lambda: once(arr)) for _ in range(s.runs)]
    return [median("W4", system, "scatter_sum", label, times, "s",
                   vs=_vs(system, "scatter_sum"), version=version)]


def sleeps(system: str, version: str, s: Sizes, label: str,
           batch: Callable[[int, float], Any]) -> list[Result]:
    """W6: wall time of ``batch(n, seconds)`` (n sleeps submitted at once, all waited for)
    and the efficiency: the ideal wall time (the sleeps shared by the engines) / wall."""
    batch(ENGINES, s.sleep)  # warm-up
    walls = [timed(lambda: batch(s.sleeps, s.sleep)) for _ in range(s.runs)]
    ideal = s.ideal_sleep_wall
    return [median("W6", system, "wall", label, walls, "s", vs=_vs(system, "wall"),
                   version=version),
            median("W6", system, "efficiency", f"efficiency ({ideal:g} s / wall)",
                   [ideal / w for w in walls], "fraction", vs=_vs(system, "efficiency"),
                   version=version)]


# -------------------------------------------------------------------------- memory
def rss_mb(pid: int) -> float:
    """Resident memory of a process (VmRSS of /proc/<pid>/status), in MB (10^6 bytes)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / MB
    return 0.0  # a zombie has no VmRSS


def process_tree(root: int) -> list[int]:
    """``root`` and every process descended from it (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # ended meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def total_rss_mb(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += rss_mb(pid)
        except OSError:  # ended meanwhile
            pass
    return total
