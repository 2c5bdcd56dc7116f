"""A dead Redis: calls and pending futures fail with ConnectionLostError, never hang."""

from __future__ import annotations

import time

import pytest

import redisengines
from redisengines.server import EmbeddedServer


def test_dead_redis_fails_calls_and_pending_futures() -> None:
    server = EmbeddedServer().start()
    cluster = redisengines.Cluster(1, url=server.url, settings=redisengines.Settings(
        cluster="gone", retries=2)).start()
    try:
        client = cluster.client()
        pending = client.execute("import time; time.sleep(60)", targets=0, block=False)
        server.stop()
        t0 = time.monotonic()
        with pytest.raises(redisengines.ConnectionLostError) as err:
            client.execute("a = 1", targets=0)
        assert isinstance(err.value, ConnectionError)
        with pytest.raises(redisengines.ConnectionLostError):
            pending.result(timeout=30)
        assert time.monotonic() - t0 < 30
    finally:
        cluster.stop()
        server.stop()


def test_connect_to_nothing_is_a_clear_error() -> None:
    from redisengines.server import free_port
    with pytest.raises(redisengines.ConnectionLostError, match="lost the connection"):
        redisengines.connect(f"redis://127.0.0.1:{free_port()}/0", cluster="none", retries=1)


def test_connect_needs_a_url() -> None:
    with pytest.raises(ValueError, match="REDISENGINES_REDIS_URL"):
        redisengines.connect()
