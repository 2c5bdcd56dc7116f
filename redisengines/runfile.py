"""Background clusters: the connection file, and the supervisor process that owns a cluster.

``redisengines start`` runs :func:`supervise` in a detached process (its own session, so it
outlives the command). The supervisor starts a :class:`~redisengines.Cluster` — the engines,
and the embedded server when no URL is given — writes the cluster's *connection file*, and
stays until SIGTERM (``redisengines stop``). The engines and the server are tied to the
supervisor: if it dies, they go too.

The connection file is ``<home>/<cluster>.json``, mode 0600, where home is
``REDISENGINES_HOME`` or ``~/.redisengines``::

    {"url": "redis://127.0.0.1:43127/0", "cluster": "default", "pid": 4242, "started": 1.7e9}

``pid`` is the supervisor's. :func:`redisengines.connect` falls back to this file when it is
given no URL. The supervisor's stderr (and its engines') goes to ``<home>/<cluster>.log``;
the engines run in the directory ``start`` was run from. POSIX only (sessions, signals).
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import Settings

log = logging.getLogger(__name__)

HOME_ENV = "REDISENGINES_HOME"
READY_TIMEOUT = 90.0
STOP_TIMEOUT = 15.0


class AlreadyRunningError(RuntimeError):
    """Raised when a cluster of that name is already running from a connection file."""


@dataclass(frozen=True, kw_only=True)
class RunInfo:
    """The content of a connection file."""

    url: str = field(repr=False)
    cluster: str
    pid: int
    started: float
    key: str | None = field(default=None, repr=False)  # the cluster's signing key


def home() -> Path:
    """The directory of connection files: ``REDISENGINES_HOME`` or ``~/.redisengines``."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".redisengines")


def path(cluster: str) -> Path:
    """The connection file of ``cluster``."""
    if not cluster or cluster.startswith(".") or any(c in cluster for c in "/\\\0"):
        raise ValueError(f"invalid cluster name {cluster!r} for a connection file")
    return home() / f"{cluster}.json"


def log_path(cluster: str) -> Path:
    """Where the supervisor of ``cluster`` and its engines write their logs."""
    return path(cluster).with_suffix(".log")


def read(cluster: str) -> RunInfo | None:
    """The connection file of ``cluster``, running or not; None if there is none."""
    try:
        data = json.loads(path(cluster).read_text())
        return RunInfo(url=str(data["url"]), cluster=str(data["cluster"]), pid=int(data["pid"]),
                       started=float(data["started"]), key=data.get("key"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable connection file %s: %s", path(cluster), exc)
        return None


def live(cluster: str) -> RunInfo | None:
    """The connection file of ``cluster`` if its supervisor is running, else None."""
    info = read(cluster)
    return info if info is not None and is_running(info.pid) else None


def is_running(pid: int) -> bool:
    """Whether ``pid`` is a live redisengines process of this user (not a reused pid)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # Linux: a zombie or an unrelated process that got the pid is not ours
        return b"redisengines" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def remove(cluster: str, pid: int | None = None) -> None:
    """Remove the connection file (only if it names ``pid``, when given)."""
    info = read(cluster)
    if pid is None or (info is not None and info.pid == pid):
        path(cluster).unlink(missing_ok=True)


def _write(info: RunInfo) -> None:
    """Write the connection file, mode 0600; raises FileExistsError if there is one."""
    target = path(info.cluster)
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(info), f)
    try:
        os.link(tmp, target)  # atomic, and fails if another supervisor won
    finally:
        tmp.unlink()


def start_background(n: int, settings: Settings, *, verbose: bool = False,
                     timeout: float = READY_TIMEOUT) -> RunInfo:
    """Start a supervisor for ``n`` engines and wait until they are registered.

    Raises :class:`AlreadyRunningError` if that cluster runs already, RuntimeError if the
    supervisor failed (with the end of its log), TimeoutError if it was not ready in time.
    """
    found = read(settings.cluster)
    if found is not None and is_running(found.pid):
        raise AlreadyRunningError(
            f"cluster {settings.cluster!r} is already running (supervisor pid {found.pid}); "
            f"stop it with `redisengines stop --cluster {settings.cluster}`")
    if found is not None:
        remove(settings.cluster, found.pid)  # stale: its supervisor is gone
    logfile = log_path(settings.cluster)
    logfile.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    offset = os.fstat(fd).st_size  # show only what this run logs
    args = [sys.executable, "-m", "redisengines.runfile", str(n)] + (["-v"] if verbose else [])
    env = {**os.environ, **settings.to_env()}
    try:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=fd, env=env, start_new_session=True)
    finally:
        os.close(fd)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else b""
    proc.stdout.close()
    if line:
        with warnings.catch_warnings():  # it outlives this process on purpose
            warnings.simplefilter("ignore", ResourceWarning)
            del proc
        return RunInfo(**json.loads(line))
    if not ready:
        proc.terminate()
    try:
        code = proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    with open(logfile, "rb") as f:
        f.seek(offset)
        tail = b"".join(f.read().splitlines(keepends=True)[-15:]).decode(errors="replace")
    what = f"was not ready within {timeout} s" if not ready else f"exited with code {code}"
    raise (TimeoutError if not ready else RuntimeError)(
        f"the supervisor of cluster {settings.cluster!r} {what}; end of {logfile}:\n{tail}")


def stop_background(cluster: str, timeout: float = STOP_TIMEOUT) -> RunInfo | None:
    """SIGTERM the supervisor of ``cluster``, wait until it is gone, remove the file.

    Returns the connection file's content, or None if the cluster was not running (a stale
    file is removed). Raises TimeoutError if the supervisor outlives ``timeout``.
    """
    info = read(cluster)
    if info is None or not is_running(info.pid):
        remove(cluster)
        return None
    os.kill(info.pid, signal.SIGTERM)
    if not _wait_gone(info.pid, timeout):
        raise TimeoutError(f"the supervisor (pid {info.pid}) of cluster {cluster!r} did not "
                           f"exit within {timeout} s; kill it with `kill -9 {info.pid}`")
    remove(cluster, info.pid)
    return info


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    if hasattr(os, "pidfd_open"):  # Linux: block until the process exits
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return not is_running(pid)
        try:
            select.select([pidfd], [], [], timeout)
        finally:
            os.close(pidfd)
    delay = 0.01
    while is_running(pid):  # elsewhere (or a zombie being reaped): short checks
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    return True


def supervise(n: int, settings: Settings) -> int:
    """The supervisor: start the cluster, write the connection file, stay until SIGTERM.

    Announces readiness by writing the connection file's JSON as one line to stdout.
    """
    import redis

    from .cluster import Cluster
    from .errors import RedisEnginesError

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    announce = os.fdopen(os.dup(1), "w")  # not inherited: engines get /dev/null
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    cluster = Cluster(n, url=settings.redis_url, settings=settings)
    try:
        cluster.start()
    except (RedisEnginesError, redis.RedisError, OSError, TimeoutError) as exc:
        log.error("cluster %r did not start: %s: %s", settings.cluster, type(exc).__name__, exc)
        return 1
    info = RunInfo(url=cluster.url, cluster=cluster.name, pid=os.getpid(), started=time.time(),
                   key=cluster.key)
    try:
        try:
            _write(info)
        except FileExistsError:
            log.error("cluster %r: another supervisor wrote %s first", info.cluster,
                      path(info.cluster))
            return 1
        if cluster.server is not None and cluster.server.proc is not None:
            server = cluster.server.proc
            threading.Thread(target=lambda: (server.wait(), stop.set()), daemon=True).start()
        log.info("cluster %r: %d engines running", info.cluster, n)
        announce.write(json.dumps(asdict(info)) + "\n")
        announce.close()
        stop.wait()
        if cluster.server is not None and cluster.server.proc is not None \
                and cluster.server.proc.poll() is not None:
            log.error("cluster %r: the server exited; stopping", info.cluster)
            return 1
        return 0
    finally:
        cluster.stop()
        remove(info.cluster, os.getpid())
        log.info("cluster %r stopped", info.cluster)


def main(argv: list[str] | None = None) -> int:
    """``python -m redisengines.runfile N [-v]``: the supervisor (settings from the env)."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO if "-v" in args else logging.WARNING,
                        format="%(asctime)s supervisor[%(process)d] %(levelname)s %(message)s")
    return supervise(int(args[0]), Settings.from_env())


if __name__ == "__main__":
    sys.exit(main())
