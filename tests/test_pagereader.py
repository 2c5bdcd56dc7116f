"""Values read straight into their destination (pagereader), on the session's server."""

import os
import uuid
from collections.abc import Iterator

import pytest
import redis

from redisengines.connection import bulk_client, connect
from redisengines.pagereader import HUGE_MIN, MISSING, allocate, read_values


@pytest.fixture
def bulk(server_url: str) -> Iterator[redis.Redis]:
    main = connect(server_url, retries=2)
    client = bulk_client(main)
    yield client
    client.close()
    main.close()


@pytest.fixture
def names() -> list[str]:
    base = "pr:" + uuid.uuid4().hex[:8]
    return [f"{base}:{i}" for i in range(6)]


def read(bulk: redis.Redis, keys: list[str], dests: list[memoryview], **kw: int) -> list[int]:
    conn = bulk.connection_pool.get_connection()
    try:
        return read_values(conn, keys, dests, **kw)
    finally:
        bulk.connection_pool.release(conn)


@pytest.mark.parametrize("ahead", [1, 2, 8])
def test_values_land_in_their_buffers(bulk: redis.Redis, names: list[str], ahead: int) -> None:
    # Sizes around the scratch buffer (64 KiB) and the empty string.
    values = [os.urandom(n) for n in (0, 1, 65_530, 65_536, 200_001, 3 * 1024 * 1024)]
    for k, v in zip(names, values, strict=True):
        bulk.set(k, v, px=60_000)
    buf = allocate(sum(len(v) for v in values))
    view = memoryview(buf)
    dests, pos = [], 0
    for v in values:
        dests.append(view[pos:pos + len(v)])
        pos += len(v)
    assert read(bulk, names, dests, ahead=ahead) == [len(v) for v in values]
    assert bytes(view) == b"".join(values)
    assert bulk.ping()  # the connection is still in step with its replies


def test_missing_and_wrong_sized_values_are_reported_not_written(
        bulk: redis.Redis, names: list[str]) -> None:
    bulk.set(names[0], b"a" * 10)
    bulk.set(names[1], b"b" * 100_000)  # longer than its destination: read and dropped
    bulk.set(names[3], b"d" * 10)
    dests = [memoryview(bytearray(10)), memoryview(bytearray(10)), memoryview(bytearray(10)),
             memoryview(bytearray(10))]
    assert read(bulk, names[:4], dests) == [10, 100_000, MISSING, 10]
    assert bytes(dests[0]) == b"a" * 10 and bytes(dests[1]) == bytes(10)
    assert bytes(dests[3]) == b"d" * 10


def test_error_reply_raises_after_reading_the_rest(bulk: redis.Redis, names: list[str]) -> None:
    bulk.rpush(names[0], 1)  # GET on a list: WRONGTYPE
    bulk.set(names[1], b"x" * 5)
    dests = [memoryview(bytearray(5)), memoryview(bytearray(5))]
    conn = bulk.connection_pool.get_connection()
    try:
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            read_values(conn, names[:2], dests)
        assert bytes(dests[1]) == b"x" * 5
        conn.send_command("PING")
        assert conn.read_response() in (b"PONG", "PONG")  # no reply was left unread
    finally:
        bulk.connection_pool.release(conn)


def test_dropped_connection_is_retried(bulk: redis.Redis, names: list[str],
                                       r: redis.Redis) -> None:
    data = os.urandom(1024 * 1024)
    for k in names:
        bulk.set(k, data, px=60_000)
    conn = bulk.connection_pool.get_connection()
    try:
        conn.send_command("CLIENT", "ID")
        victim = conn.read_response()
        r.client_kill_filter(_id=victim)  # the server closes it; the reader finds out on use
        dests = [memoryview(allocate(len(data))) for _ in names]
        assert read_values(conn, names, dests, ahead=2) == [len(data)] * len(names)
        assert all(bytes(d) == data for d in dests)
        conn.send_command("CLIENT", "ID")
        assert conn.read_response() != victim  # read on a new connection
    finally:
        bulk.connection_pool.release(conn)


def test_large_buffers_are_writable_mappings() -> None:
    small, large = allocate(100), allocate(HUGE_MIN)
    assert isinstance(small, bytearray) and len(small) == 100
    view = memoryview(large)
    assert not view.readonly and view.nbytes == HUGE_MIN
    view[-3:] = b"end"
    assert bytes(view[-3:]) == b"end"
