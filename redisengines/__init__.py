"""redisengines: long-lived Python engines driven through futures, with Redis as the control plane.

    import redisengines

    with redisengines.Cluster(n=2) as cluster:
        client = cluster.client()
        client.execute("a = 10")
        client.pull("a", targets=0)        # 10
"""

from __future__ import annotations

__version__ = "0.1.0"

from concurrent.futures import CancelledError

from .api import cancel, get, get_actor, init, kill, put, remote, shutdown, wait
from .cluster import Cluster
from .config import Settings
from .connection import TLSVerificationError
from .coordinator import Client, Result
from .errors import (
    ActorDiedError,
    ClusterStateLostError,
    CommandLostError,
    CompositeError,
    ConnectionLostError,
    DeserializationError,
    EngineDiedError,
    EngineShutdownError,
    InvalidTargetError,
    ObjectIntegrityError,
    ObjectLostError,
    ObjectTooBigError,
    PoisonCommandError,
    ProtocolError,
    QueueFullError,
    RedisEnginesError,
    RedisPermissionError,
    RemoteError,
    SerializationError,
    ServerOutOfMemoryError,
    ServerStartError,
    TimeLimitExceeded,
)
from .executor import Executor
from .futures import PendingResult
from .remote import ActorClass, ActorHandle, RemoteFunction


def connect(url: str | None = None, cluster: str | None = None, **settings: object) -> Client:
    """A client of an existing cluster.

    Args:
        url: the server's URL (``redis://host:port/db``, ``rediss://…``, ``unix://…``);
            default ``REDISENGINES_REDIS_URL``, else the connection file that
            ``redisengines start`` wrote for this cluster.
        cluster: the cluster name (keys live under ``re:<cluster>:``); default
            ``REDISENGINES_CLUSTER`` or ``"default"``.
        **settings: any other :class:`Settings` field, overriding the environment; above
            all ``key``, the cluster's signing key (``cluster.key``, ``REDISENGINES_KEY``, or
            the connection file of ``redisengines start``).
    """
    s = Settings.from_env(redis_url=url, cluster=cluster, **settings)
    if not s.redis_url:
        from . import runfile

        running = runfile.live(s.cluster)
        if running is not None:
            s = s.replace(redis_url=running.url, key=s.key or running.key)
    if not s.redis_url:
        raise ValueError("no server URL: pass url=..., set REDISENGINES_REDIS_URL, run "
                         "`redisengines start`, or use redisengines.Cluster() to start one")
    return Client(s.redis_url, cluster=s.cluster, settings=s)


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext redisengines``: the ``%px`` magics (IPython is imported only here)."""
    from .magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: object) -> None:
    """``%unload_ext redisengines``."""
    from .magics import unload_ipython_extension as unload

    unload(ipython)


__all__ = [
    "ActorClass",
    "ActorDiedError",
    "ActorHandle",
    "CancelledError",
    "Client",
    "Cluster",
    "ClusterStateLostError",
    "CommandLostError",
    "CompositeError",
    "ConnectionLostError",
    "DeserializationError",
    "EngineDiedError",
    "EngineShutdownError",
    "Executor",
    "InvalidTargetError",
    "ObjectIntegrityError",
    "ObjectLostError",
    "ObjectTooBigError",
    "PendingResult",
    "PoisonCommandError",
    "ProtocolError",
    "QueueFullError",
    "RedisEnginesError",
    "RedisPermissionError",
    "RemoteError",
    "RemoteFunction",
    "Result",
    "SerializationError",
    "ServerOutOfMemoryError",
    "ServerStartError",
    "Settings",
    "TLSVerificationError",
    "TimeLimitExceeded",
    "__version__",
    "cancel",
    "connect",
    "get",
    "get_actor",
    "init",
    "kill",
    "put",
    "remote",
    "shutdown",
    "wait",
]
