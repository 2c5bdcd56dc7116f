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
