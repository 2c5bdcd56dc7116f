"""Connections: a dead Redis fails calls and pending futures with ConnectionLostError (never
a hang); commands pack every argument type."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis

import redisengines
from redisengines.connection import connect
from redisengines.coordinator import Client
from redisengines.server import EmbeddedServer

from .helpers import interactive


@contextmanager
def doomed_server(cluster: str, retries: int) -> Iterator[tuple[EmbeddedServer, Client]]:
    """A server of its own (the test stops it) and a client of a 1-engine cluster on it."""
    server = EmbeddedServer().start()
    engines = redisengines.Cluster(1, url=server.url, settings=redisengines.Settings(
        cluster=cluster, retries=retries)).start()
    try:
        yield server, engines.client()
    finally:
        engines.stop()
        server.stop()


def test_dead_redis_fails_calls_and_pending_futures() -> None:
    with doomed_server("gone", retries=2) as (server, client):
        pending = client.execute("import time; time.sleep(60)", targets=0, block=False)
        server.stop()
        t0 = time.monotonic()
        with pytest.raises(redisengines.ConnectionLostError) as err:
            client.execute("a = 1", targets=0)
        assert isinstance(err.value, ConnectionError)
        with pytest.raises(redisengines.ConnectionLostError):
            pending.result(timeout=30)
        assert time.monotonic() - t0 < 30


@interactive
def _one() -> int:
    return 1


def test_dead_redis_fails_remote_calls_alone_or_in_a_burst() -> None:
    """A lone call is sent by its caller, a burst by the sender thread: with Redis gone,
    both give futures that fail with ConnectionLostError (``.remote()`` itself raises
    nothing). Only the first call waits out the client's retries: once a send failed,
    calls go to the sender, whose one batch waits for all of them."""
    with doomed_server("gone-remote", retries=4) as (server, client):
        f = redisengines.remote(_one).options(client=client)
        assert f.remote().result(timeout=30) == 1
        server.stop()
        t0 = time.monotonic()
        alone = f.remote()
        once = time.monotonic() - t0  # (the caller sent it: it waited out the retries)
        with pytest.raises(redisengines.ConnectionLostError):
            alone.result(timeout=0)
        t1 = time.monotonic()
        burst = [f.remote() for _ in range(20)]
        made = time.monotonic() - t1
        assert made < once  # (not 20 more waits: the sender's one batch waits for them)
        for future in burst:
            with pytest.raises(redisengines.ConnectionLostError):
                future.result(timeout=30)
        assert time.monotonic() - t0 < 30


def test_connect_to_nothing_is_a_clear_error() -> None:
    from redisengines.server import free_port
    with pytest.raises(redisengines.ConnectionLostError, match="lost the connection"):
        redisengines.connect(f"redis://127.0.0.1:{free_port()}/0", cluster="none", retries=1)


def test_connect_needs_a_url() -> None:
    with pytest.raises(ValueError, match="REDISENGINES_REDIS_URL"):
        redisengines.connect()


def test_commands_pack_every_argument_type(server_url: str) -> None:
    r = connect(server_url, retries=0, name="packer")
    try:
        key = f"pack:{uuid.uuid4().hex}"
        r.hset(key, mapping={"s": "é", "i": -7, "f": 0.1, "b": b"\x00\xff",
                             "ba": bytearray(b"ab"), "mv": memoryview(b"cd")})
        assert r.hgetall(key) == {b"s": "é".encode(), b"i": b"-7", b"f": b"0.1",
                                  b"b": b"\x00\xff", b"ba": b"ab", b"mv": b"cd"}
        assert r.execute_command("CLIENT GETNAME") in (b"packer", "packer")  # two words
        with pytest.raises(redis.DataError):
            r.set(key, True)
        r.delete(key)
    finally:
        r.close()
