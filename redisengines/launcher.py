"""Starting and stopping local engine processes, tied to the life of the process that owns them."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import redis

from . import registry
from .config import Settings
from .errors import RedisEnginesError
from .keys import Keys

log = logging.getLogger(__name__)


def set_parent_death_signal() -> None:
    """Linux: have the kernel send SIGTERM to this process when its parent dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # best effort: engines also watch their parent pid
        pass


def spawn_engines(n: int, settings: Settings, *, tie_to_parent: bool = True,
                  verbose: bool = False) -> list[subprocess.Popen[bytes]]:
    """Start ``n`` engine processes for ``settings`` (which must carry a Redis URL)."""
    env = {**os.environ, **settings.to_env()}
    args = [sys.executable, "-m", "redisengines.actor"]
    if tie_to_parent:
        args += ["--parent-pid", str(os.getpid())]
    if verbose:
        args.append("--verbose")
    return [subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
            for _ in range(n)]


def wait_registered(r: redis.Redis, keys: Keys, procs: list[subprocess.Popen[bytes]],
                    since: str, timeout: float) -> dict[int, int]:
    """Block until each process has registered; returns ``{engine_id: pid}``.

    Reads the cluster's event stream from ``since`` (taken before the processes started).
    """
    pids = {p.pid for p in procs}
    found: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    last = since
    while len(found) < len(procs):
        for p in procs:
            if p.poll() is not None and p.pid not in found.values():
                raise RedisEnginesError(f"engine process {p.pid} exited with code {p.returncode} "
                                        "before registering (see its stderr above)")
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{len(procs) - len(found)} (of {len(procs)}) engines did not "
                               f"register within {timeout} s")
        resp = r.xread({keys.events: last}, count=100, block=max(1, int(min(left, 0.25) * 1000)))
        for _stream, entries in resp or []:
            for entry_id, fields in entries:
                last = entry_id
                if fields.get(b"event") != b"registered":
                    continue
                eid = int(fields[b"engine"])
                info = registry.engines(r, keys).get(eid, {})
                if info.get("pid") in pids:
                    found[eid] = info["pid"]
    return found


def stop_processes(procs: list[subprocess.Popen[bytes]], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what is left after ``grace`` seconds; reaps every process."""
    for p in procs:
        if p.poll() is None:
            try:
                p.terminate()
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
