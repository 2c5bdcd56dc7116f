"""A local cluster: the embedded server (or a given URL) plus N engine processes."""

from __future__ import annotations

import atexit
import secrets
import subprocess
from typing import Any

from . import launcher, registry
from .config import Settings
from .connection import connect as redis_connect
from .coordinator import Client
from .server import EmbeddedServer

REGISTER_TIMEOUT = 60.0


class Cluster:
    """Server plus ``n`` local engines, stopped together.

    With no ``url`` a private server is started on a free loopback port; with one, the
    engines join that server. Engines are tied to this process: they exit when it exits,
    even if it is killed. Use as a context manager::

        with redisengines.Cluster(n=2) as cluster:
            client = cluster.client()
    """

    def __init__(self, n: int = 2, *, url: str | None = None, cluster: str | None = None,
                 settings: Settings | None = None) -> None:
        if n < 0:
            raise ValueError("n must be >= 0")
        self.n = n
        base = settings or Settings.from_env()
        if cluster:
            base = base.replace(cluster=cluster)
        if base.key is None:  # a cluster started here signs everything, with a fresh key
            base = base.replace(key=secrets.token_hex(32))
        self.settings = base
        self._url = url or self.settings.redis_url
        self.server: EmbeddedServer | None = None
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self._clients: list[Client] = []
        self._started = False

    @property
    def url(self) -> str:
        """The server's URL, for redis-cli and for engines on other machines."""
        if self.server is not None:
            return self.server.url
        if self._url is None:
            raise RuntimeError("the cluster is not started")
        return self._url

    @property
    def local_url(self) -> str:
        return self.server.local_url if self.server is not None else self.url

    @property
    def name(self) -> str:
        return self.settings.cluster

    @property
    def key(self) -> str | None:
        """The cluster's signing key (hex): what another process needs besides the URL to
        join it (``connect(url, cluster=..., key=...)`` or ``REDISENGINES_KEY``)."""
        return self.settings.key

    def start(self) -> Cluster:
        if self._started:
            return self
        self._started = True
        atexit.register(self.stop)
        try:
            if self._url is None:
                self.server = EmbeddedServer(self.settings.server_bin).start()
            self.start_engines(self.n)
        except BaseException:
            self.stop()
            raise
        return self

    def start_engines(self, n: int, timeout: float = REGISTER_TIMEOUT) -> list[int]:
        """Start ``n`` more local engines and wait until they are registered; their ids."""
        if n == 0:
            return []
        settings = self.settings.replace(redis_url=self.local_url)
        r = redis_connect(self.local_url, retries=self.settings.retries, tls=self.settings.tls)
        try:
            from .keys import Keys
            keys = Keys(self.name)
            since = registry.last_event_id(r, keys)
            procs = launcher.spawn_engines(n, settings)
            try:
                found = launcher.wait_registered(r, keys, procs, since, timeout)
            except BaseException:
                launcher.stop_processes(procs)
                raise
        finally:
            r.close()
        by_pid = {p.pid: p for p in procs}
        for eid, pid in found.items():
            self.processes[eid] = by_pid[pid]
        for c in self._clients:  # "all" includes them from now on, not a moment later
            c.get_ids()
        return sorted(found)

    def client(self, **kwargs: Any) -> Client:
        """A client of this cluster (closed when the cluster stops)."""
        c = Client(self.url, cluster=self.name, settings=self.settings,
                   transport_url=self.local_url, **kwargs)
        self._clients.append(c)
        return c

    def stop(self) -> None:
        """Stop the engines, close the clients, stop the embedded server. Idempotent."""
        for c in self._clients:
            c.close()
        self._clients.clear()
        launcher.stop_processes(list(self.processes.values()))
        self.processes.clear()
        if self.server is not None:
            self.server.stop()
            self.server = None
        atexit.unregister(self.stop)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.server.url if self.server else self._url
        return f"<Cluster {self.name!r} at {where} engines={sorted(self.processes)}>"
