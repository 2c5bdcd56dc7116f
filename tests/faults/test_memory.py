"""FAULTS #24: Redis at maxmemory with noeviction."""

from __future__ import annotations

import numpy as np
import pytest

import redisengines

from ..helpers import wait_until


def test_fault_24_out_of_memory_is_a_clear_error_and_work_resumes(client, r) -> None:
    client.execute("a = 1")
    used = r.info("memory")["used_memory"]
    r.config_set("maxmemory", used + 256 * 1024)
    try:
        with pytest.raises(redisengines.ServerOutOfMemoryError, match="out of memory"):
            client.push({"big": np.zeros(4_000_000)}, targets=0)  # 32 MB of pages
        with pytest.raises(redisengines.ServerOutOfMemoryError):
            for _ in range(10_000):  # small commands too, once the server is full
                client.execute("b = 2", targets=0, block=False)
    finally:
        r.config_set("maxmemory", 0)
    # engines kept their leases and serve again; nothing was half-written
    assert client.ids == [0, 1]
    assert client.pull("a") == {0: 1, 1: 1}
    assert "big" not in client.keys(targets=0)


def test_fault_24_engine_keeps_a_result_until_memory_is_freed(client, r) -> None:
    """The engine cannot store its result at maxmemory: it keeps it and retries; no loss."""
    f = client.execute("import time; time.sleep(0.3); print('done')", targets=0, block=False)
    wait_until(lambda: client.queue_status(targets=0)["running"] == 1, what="engine 0 busy")
    r.config_set("maxmemory", r.info("memory")["used_memory"] // 2)  # certainly over
    try:
        assert not f.wait(1.0), "a result was stored although Redis was full"
        assert client.ids == [0, 1]  # leases held: PEXPIRE is allowed at maxmemory
    finally:
        r.config_set("maxmemory", 0)
    assert f.result(timeout=10) is None
    assert f.stdout == "done\n"
