"""The benchmark script runs end to end (tiny sizes) and writes its figures; no timing checks."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

EXPECTED = [
    f"w1.{t}.{name}" for t in ("tcp", "unix")
    for name in ("redis_ping", "raw_pingpong", "execute", "apply",
                 "execute_over_raw_pingpong", "apply_over_raw_pingpong")
] + [
    f"throughput.{t}.apply" for t in ("tcp", "unix")
] + [
    f"bandwidth.{t}.{name}.{unit}" for t in ("tcp", "unix")
    for name in ("push", "pull", "push_all", "raw_set", "raw_get")
    for unit in ("seconds", "gbps")
]

RQ_FIGURES = ["peer.rq.round_trip", "peer.rq.throughput", "peer.rq.apply_latency_over_rq",
              "peer.rq.apply_throughput_over_rq"]


def rq_installed() -> bool:
    try:
        import rq  # noqa: F401
    except ImportError:
        return False
    return True


def run_quick(module: str, tmp_path: Path, timeout: float) -> tuple[str, dict[str, dict]]:
    """Run ``python -m <module> --quick --json``; its stdout and figures by name, each checked
    to be a positive finite number (and p90 where given)."""
    out = tmp_path / "figures.jsonl"
    proc = subprocess.run([sys.executable, "-m", module, "--quick", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    figures = {}
    for line in out.read_text().splitlines():
        record = json.loads(line)
        figures[record["name"]] = record
    for record in figures.values():
        value = record["value"]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, record
        if "p90" in record:
            assert record["p90"] > 0, record
    if not rq_installed():
        assert "rq: not installed" in proc.stdout
    return proc.stdout, figures


@pytest.mark.timeout(240)
def test_quick_benchmark_writes_every_figure(tmp_path: Path) -> None:
    stdout, figures = run_quick("benchmarks.bench_core", tmp_path, 180)
    expected = EXPECTED + (RQ_FIGURES if rq_installed() else [])
    assert not [n for n in expected if n not in figures], f"missing: {set(expected) - set(figures)}"
    assert "W1 latency over tcp" in stdout


REMOTE_EXPECTED = [
    f"remote.{t}.{name}" for t in ("tcp", "unix")
    for name in ("apply_round_trip", "function_round_trip", "actor_round_trip",
                 "function_round_trip_over_apply", "actor_round_trip_over_apply", "get_ready",
                 "apply_throughput", "function_throughput", "function_submit",
                 "actor_throughput", "actor_submit", "function_throughput_over_apply",
                 "actor_throughput_over_apply")
]
REMOTE_RQ_FIGURES = ["remote.rq.round_trip", "remote.rq.throughput",
                     "remote.rq.function_round_trip_over_rq",
                     "remote.rq.function_throughput_over_rq"]


@pytest.mark.timeout(120)
def test_quick_remote_benchmark_writes_every_figure(tmp_path: Path) -> None:
    stdout, figures = run_quick("benchmarks.bench_remote", tmp_path, 100)
    expected = REMOTE_EXPECTED + (REMOTE_RQ_FIGURES if rq_installed() else [])
    assert not [n for n in expected if n not in figures], f"missing: {set(expected) - set(figures)}"
    assert "Throughput over unix" in stdout


# ------------------------------------------------------------ python -m benchmarks (runner)
RUNNER_EXPECTED = {
    "W1": [f"{m}.{t}" for t in ("tcp", "unix")
           for m in ("execute", "apply", "actor", "function", "ping", "pingpong")],
    "W2": [f"{m}.{t}" for t in ("tcp", "unix") for m in ("function", "actor", "xadd")],
    "W3": [f"{m}.{t}" for t in ("tcp", "unix")
           for m in ("push", "pull", "push2", "set.python", "get")]
    + ["fresh.soon", "fresh.later"],  # the machine's own, once
    "W4": ["scatter_sum"],
    "W5": ["start", "stop"],
    "W6": ["wall", "efficiency"],
    "memory": ["idle.server", "idle.engines", "idle.client", "idle.total",
               "pending.tracemalloc", "pending.rss", "soak.before", "soak.after",
               "soak.growth.server", "soak.growth.engines", "soak.growth.client"],
}


def run_runner(tmp_path: Path, *args: str, timeout: float) -> tuple[str, list[dict]]:
    """``python -m benchmarks --quick --json ... *args``: its stdout and JSON records, each
    checked to carry its fields and the machine's."""
    out = tmp_path / "figures.jsonl"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--json", str(out),
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    for r in records:
        assert {"workload", "system", "metric", "label", "unit", "n", "machine"} <= set(r), r
        assert {"cpus", "python", "valkey"} <= set(r["machine"]), r
        if r["system"] in ("redisengines", "redis-py", "machine"):
            assert "error" not in r, r
            assert isinstance(r["value"], (int, float)) and math.isfinite(r["value"]), r
            if not r["metric"].startswith(("soak.growth", "pending.rss")):  # may be <= 0
                assert r["value"] > 0, r
    return proc.stdout + proc.stderr, records


@pytest.mark.timeout(300)
def test_runner_quick_runs_every_workload(tmp_path: Path) -> None:
    peers = "rq" if rq_installed() else "none"
    md, png = tmp_path / "table.md", tmp_path / "plot.png"
    output, records = run_runner(tmp_path, "--peers", peers, "--markdown", str(md),
                                 "--plot", str(png), timeout=280)
    ours = {(r["workload"], r["metric"]) for r in records if r["system"] != peers}
    missing = [(w, m) for w, metrics in RUNNER_EXPECTED.items() for m in metrics
               if (w, m) not in ours]
    assert not missing, missing
    if rq_installed():  # the rq adapter: every workload it has an equivalent for, none failed
        got = {(r["workload"], r["metric"]) for r in records if r["system"] == "rq"}
        assert {("W1", "enqueue"), ("W2", "enqueue"), ("W5", "start"), ("W6", "efficiency"),
                ("memory", "idle.total")} <= got
        assert not [r for r in records if r["system"] == "rq" and "error" in r]
    table = md.read_text()
    assert "| system | what | median | p99 | n | ours/this |" in table
    for title in ("W1 latency", "W3 bandwidth", "Memory: RSS"):
        assert title in table and title in output
    assert "Targets:" in table
    assert png.exists() or "matplotlib is not installed" in output


@pytest.mark.timeout(120)
def test_runner_only_selects_workloads(tmp_path: Path) -> None:
    _, records = run_runner(tmp_path, "--only", "W5,w1", "--peers", "none", timeout=100)
    assert {r["workload"] for r in records} == {"W1", "W5"}
