"""Fixtures: one real server per session, and fresh clusters (own name, real engines) per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

import redisengines
from redisengines.server import EmbeddedServer

from .helpers import Gate

# Short leases so that death detection tests take seconds, not the default 6 s.
FAST = {"heartbeat_interval": 0.25, "heartbeat_ttl": 1.5}


# The signing key the tests' clusters share, given to every process through the
# environment as a deployment would (a Cluster without one makes its own).
TEST_KEY = "5e" * 32


@pytest.fixture(autouse=True)
def _clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No REDISENGINES_* setting of the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("REDISENGINES_") and name != "REDISENGINES_TEST_REDIS_URL":
            monkeypatch.delenv(name)
    monkeypatch.setenv("REDISENGINES_KEY", TEST_KEY)


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """URL of the session's server: REDISENGINES_TEST_REDIS_URL, else an embedded one."""
    url = os.environ.get("REDISENGINES_TEST_REDIS_URL")
    if url:
        yield url
        return
    with EmbeddedServer() as server:
        yield server.url


@pytest.fixture
def r(server_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(server_url)
    yield client
    client.close()


@pytest.fixture
def cluster_name() -> str:
    return "t" + uuid.uuid4().hex[:10]


ClusterFactory = Callable[..., redisengines.Cluster]


@pytest.fixture
def make_cluster(server_url: str, cluster_name: str) -> Iterator[ClusterFactory]:
    """Start clusters of real engine processes on the session server; stopped after the test.

    The first cluster a test makes is named ``cluster_name``; later ones get their own names.
    """
    made: list[redisengines.Cluster] = []

    def make(n: int = 2, **settings: object) -> redisengines.Cluster:
        name = cluster_name if not made else "t" + uuid.uuid4().hex[:10]
        s = redisengines.Settings.from_env(redis_url=server_url, cluster=name, **settings)
        cluster = redisengines.Cluster(n, url=server_url, settings=s).start()
        made.append(cluster)
        return cluster

    yield make
    for c in made:
        c.stop()


@pytest.fixture
def cluster(make_cluster: ClusterFactory) -> redisengines.Cluster:
    """Two engines with short heartbeat leases."""
    return make_cluster(2, **FAST)


@pytest.fixture
def client(cluster: redisengines.Cluster) -> redisengines.Client:
    return cluster.client()


@pytest.fixture
def gates(r: redis.Redis, server_url: str,
          make_cluster: ClusterFactory) -> Iterator[Callable[[], Gate]]:
    """A factory of :class:`Gate`; every gate is opened at teardown so engines stop quickly.

    Depends on ``make_cluster`` so that gates open before the clusters are stopped.
    """
    made: list[Gate] = []

    def make() -> Gate:
        gate = Gate(r, server_url)
        made.append(gate)
        return gate

    yield make
    for gate in made:
        gate.open()
