"""Paged objects: page plans (pure), and reading/writing pages on the session's server."""

import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import redis

from redisengines.config import Settings
from redisengines.errors import ObjectIntegrityError, ObjectLostError
from redisengines.keys import Keys
from redisengines.scripts import Scripts
from redisengines.serialization import serialize
from redisengines.store import ObjectStore, plan_pages


def test_plan_pages_never_straddles_segments() -> None:
    assert plan_pages([10, 0, 25], 10) == [(0, 0, 10), (2, 0, 10), (2, 10, 20), (2, 20, 25)]
    assert plan_pages([], 10) == []
    assert plan_pages([3], 10) == [(0, 0, 3)]


@pytest.fixture
def store(r: redis.Redis) -> Iterator[ObjectStore]:
    settings = Settings(page_size=4096, inline_max=1024)
    store = ObjectStore(r, Keys("u" + uuid.uuid4().hex[:8]), settings, Scripts(r))
    yield store
    store.close()


def test_small_values_go_inline(store: ObjectStore) -> None:
    fields = store.encode([1, 2, 3])
    assert set(fields) == {"value"}
    assert store.decode({b"value": fields["value"]}) == [1, 2, 3]


def test_large_values_are_paged_and_read_back(store: ObjectStore) -> None:
    arr = np.random.default_rng(0).random(100_000)
    fields = store.encode({"arr": arr, "tag": "t"})
    oid = fields["obj"]
    pages = store.r.keys(f"{store.keys.prefix}:{{o{oid}}}:*")
    assert len(pages) == -(-arr.nbytes // 4096) + 1  # + the pickle stream's page
    back = store.decode({b"obj": oid.encode()})
    assert np.array_equal(back["arr"], arr) and back["tag"] == "t"
    assert back["arr"].flags.writeable


def test_missing_or_truncated_page_is_detected(store: ObjectStore) -> None:
    oid = store.put(serialize(np.zeros(50_000)))
    store.r.delete(store.keys.page(oid, 3))
    with pytest.raises(ObjectLostError, match="page 3 is missing"):
        store.get(oid)
    store.r.set(store.keys.page(oid, 3), b"short")
    with pytest.raises(ObjectIntegrityError, match="page 3 does not match"):
        store.get(oid)


def test_swapped_pages_are_detected(store: ObjectStore) -> None:
    oid = store.put(serialize(np.arange(50_000, dtype=np.float64)))
    p2, p3 = store.keys.page(oid, 2), store.keys.page(oid, 3)
    a, b = store.r.get(p2), store.r.get(p3)
    assert len(a) == len(b)
    store.r.set(p2, b)
    store.r.set(p3, a)
    with pytest.raises(ObjectIntegrityError, match="page 2 does not match"):
        store.get(oid)


def test_uncommitted_object_is_invisible(store: ObjectStore) -> None:
    oid = store.put(serialize(np.zeros(50_000)))
    store.r.delete(store.keys.manifest(oid))
    with pytest.raises(ObjectLostError, match="gone"):
        store.get(oid)
    with pytest.raises(KeyError):  # ObjectLostError is a KeyError too
        store.get(oid)


def test_pages_carry_the_ttl(store: ObjectStore) -> None:
    oid = store.put(serialize(np.zeros(50_000)))
    assert 0 < store.r.pttl(store.keys.page(oid, 0)) <= store.settings.result_ttl * 1000
    assert 0 < store.r.pttl(store.keys.manifest(oid))


def test_many_threads_read_and_write_large_values_at_once(store: ObjectStore) -> None:
    """Page reads and writes share a pool of connections: more threads than it holds idle
    still all get theirs (none fails with "Too many connections")."""
    import concurrent.futures

    arr = np.arange(50_000, dtype=np.float64)
    oid = store.put(serialize(arr))

    def one(i: int) -> bool:
        back = store.get(oid)
        store.put(serialize(arr + i))
        return bool(np.array_equal(back, arr))

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        assert all(pool.map(one, range(48)))
