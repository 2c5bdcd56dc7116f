"""Redis connections: one place that turns a URL into a client with retries and timeouts.

Every connection retries connection-class errors with exponential backoff and jitter
(redis-py's ``Retry``) and has a socket timeout longer than any blocking read issued on
it (``BLOCK_SECONDS``), so that a half-open socket is noticed instead of hanging.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.connection import Encoder, PythonRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, OutOfMemoryError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from .errors import ConnectionLostError, RedisPermissionError, ServerOutOfMemoryError

# Longest block of any XREAD/XREADGROUP we issue; socket timeouts stay above it.
BLOCK_SECONDS = 2.0
SOCKET_TIMEOUT = BLOCK_SECONDS + 8.0


def connect(url: str, *, retries: int = 8, name: str | None = None,
            pool_size: int | None = None) -> redis.Redis:
    """A client for ``url`` (``redis://``, ``rediss://``, ``unix://``) with retry and timeouts.

    ``retries`` connection-class failures are retried with exponential backoff and jitter
    (from 50 ms, capped at 2 s: 8 retries wait about 7 s in all) before the error is raised.
    """
    kwargs = dict(
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=5.0,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=2.0), retries),
        retry_on_error=[RedisConnectionError, RedisTimeoutError, ConnectionResetError],
        health_check_interval=0,
        client_name=name,
    )
    if not url.startswith("unix://"):
        kwargs["socket_keepalive"] = True
        kwargs["socket_keepalive_options"] = _keepalive_options()
    if pool_size is not None:
        kwargs["max_connections"] = pool_size
    return redis.Redis.from_url(url, **kwargs)


def bulk_client(r: redis.Redis) -> redis.Redis:
    """A client like ``r`` whose connections pack commands with redis-py's Python packer.

    The hiredis packer copies every argument (twice for a memoryview); the Python one
    sends large memoryviews as they are, which makes paged writes several times faster.
    Small commands are better served by hiredis, so only page writes use this client.
    """
    kwargs = dict(r.connection_pool.connection_kwargs)
    encoder = Encoder(kwargs.get("encoding", "utf-8"), kwargs.get("encoding_errors", "strict"),
                      False)
    kwargs["command_packer"] = PythonRespSerializer(6000, encoder.encode)
    pool = redis.ConnectionPool(connection_class=r.connection_pool.connection_class,
                                max_connections=4, **kwargs)
    return redis.Redis(connection_pool=pool)


def _keepalive_options() -> dict[int, int]:
    opts = {}
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            opts[getattr(socket, name)] = value
    return opts


@contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Turn redis-py errors a user can act on into ours (the one boundary)."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise ConnectionLostError(f"{what}: lost the connection to Redis: {exc}") from exc
    except NoPermissionError as exc:
        raise RedisPermissionError(
            f"{what}: Redis refused it (NOPERM: {exc}): the ACL user lacks a permission; "
            "it needs the keys re:<cluster>:* and the commands listed in the README") from exc
    except OutOfMemoryError as exc:
        raise ServerOutOfMemoryError(
            f"{what}: Redis is out of memory (maxmemory reached) and refused the write; "
            "free memory or raise maxmemory, then retry") from exc
