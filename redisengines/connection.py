"""Redis connections: one place that turns a URL into a client with retries and timeouts.

Every connection retries connection-class errors with exponential backoff and jitter
(redis-py's ``Retry``) and has a socket timeout longer than any blocking read issued on
it (``BLOCK_SECONDS``), so that a half-open socket is noticed instead of hanging.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.connection import Encoder, PythonRespSerializer, SSLConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, OutOfMemoryError, ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from .config import TLS, check_tls_url
from .errors import ConnectionLostError, RedisPermissionError, ServerOutOfMemoryError

# Longest block of any XREAD/XREADGROUP we issue; socket timeouts stay above it.
BLOCK_SECONDS = 2.0
SOCKET_TIMEOUT = BLOCK_SECONDS + 8.0
SENTINEL_SCHEME = "redis+sentinel://"


def connect(url: str, *, retries: int = 8, name: str | None = None,
            pool_size: int | None = None, tls: TLS | None = None) -> redis.Redis:
    """A client for ``url`` (``redis://``, ``rediss://``, ``unix://``, ``redis+sentinel://``)
    with retry and timeouts.

    ``retries`` connection-class failures are retried with exponential backoff and jitter
    (from 50 ms, capped at 2 s: 8 retries wait about 7 s in all) before the error is raised.
    ``tls`` (``Settings.tls``) gives the CA, certificate and key files of a ``rediss://`` URL;
    a failed TLS verification is not retried: it raises :class:`TLSVerificationError`.
    """
    kwargs = dict(
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=5.0,
        retry=_Retry(ExponentialWithJitterBackoff(base=0.05, cap=2.0), retries, tls),
        retry_on_error=[RedisConnectionError, RedisTimeoutError, ConnectionResetError],
        health_check_interval=0,
        client_name=name,
        command_packer=_Packer(),
    )
    if not url.startswith("unix://"):
        kwargs["socket_keepalive"] = True
        kwargs["socket_keepalive_options"] = _keepalive_options()
    if pool_size is not None:
        kwargs["max_connections"] = pool_size
    kwargs.update(_tls_kwargs(url, tls))
    if url.startswith(SENTINEL_SCHEME):
        return _sentinel_client(url, kwargs)
    return redis.Redis.from_url(url, **kwargs)


class _Packer:
    """redis-py's hiredis packer without its Python pass over every argument.

    hiredis packs ``str``, ``int``, ``float`` and ``bytes`` itself, to the same bytes and about
    three times faster for the 20 to 30 arguments of our script calls; anything else
    (memoryviews, a first argument of several words such as ``"CLIENT SETNAME"``) goes
    through redis-py's Python packer, which also raises its errors (``DataError``).
    """

    def __init__(self) -> None:
        self._fallback = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)

    def pack(self, *args: Any) -> list[bytes]:
        if not (isinstance(args[0], str) and " " in args[0]):
            try:
                return [hiredis.pack_command(args)]
            except TypeError:
                pass
        return self._fallback.pack(*args)


def bulk_client(r: redis.Redis) -> redis.Redis:
    """A client like ``r`` whose connections pack commands with redis-py's Python packer.

    The hiredis packer copies every argument (twice for a memoryview); the Python one
    sends large memoryviews as they are, which makes paged writes several times faster.
    Small commands are better served by hiredis, so only page writes use this client (page
    reads use its connections too, see ``pagereader``). Its pool is unbounded, as the main
    client's: a thread never fails for want of a connection.
    """
    source = r.connection_pool
    kwargs = dict(source.connection_kwargs)
    encoder = Encoder(kwargs.get("encoding", "utf-8"), kwargs.get("encoding_errors", "strict"),
                      False)
    kwargs["command_packer"] = PythonRespSerializer(6000, encoder.encode)
    pool: redis.ConnectionPool
    if isinstance(source, SentinelConnectionPool):
        # Its own sentinel-managed pool: page writes follow the master across a failover too.
        kwargs.pop("connection_pool", None)  # (the source pool's proxy; the new pool sets its own)
        pool = SentinelConnectionPool(source.service_name, source.sentinel_manager,
                                      connection_class=source.connection_class, **kwargs)
    else:
        pool = redis.ConnectionPool(connection_class=source.connection_class, **kwargs)
    return redis.Redis(connection_pool=pool)


def _sentinel_client(url: str, kwargs: dict[str, Any]) -> redis.Redis:
    """The master of a Sentinel-managed service, from
    ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db][?db=N]``.

    The password (and user) in the URL are the master's; ``sentinel_password`` (and
    ``sentinel_username``) in the query authenticate to the sentinels. Every connection asks
    the sentinels where the master is, and a connection to a demoted master (READONLY) is
    dropped and counted as lost: with the retries of ``connect`` the client follows the master
    across a failover (see :func:`follow_master`, which notices it before any error does).
    """
    parts = urlsplit(url)
    hosts = []
    netloc = parts.netloc.rpartition("@")[2]
    for item in filter(None, netloc.split(",")):
        if item.startswith("["):  # [IPv6]:port
            host, _, port = item[1:].partition("]")
            port = port.lstrip(":")
        else:
            host, _, port = item.partition(":")
        hosts.append((host or "localhost", int(port or 26379)))
    path = [p for p in parts.path.split("/") if p]
    query = parse_qs(parts.query)
    if not hosts or not path:
        raise ValueError(f"a sentinel URL names its sentinels and service: "
                         f"redis+sentinel://host:26379[,host:port...]/<service>[/db], not {url!r}")
    service = unquote(path[0])
    db = int(path[1]) if len(path) > 1 else int(query.get("db", ["0"])[0])
    sentinel_kwargs: dict[str, Any] = {
        # A sentinel that does not answer must not hold up the next one for long.
        "socket_timeout": 1.0, "socket_connect_timeout": 1.0, "health_check_interval": 0,
    }
    for key in ("username", "password"):
        if f"sentinel_{key}" in query:
            sentinel_kwargs[key] = query[f"sentinel_{key}"][0]
    if parts.username:
        kwargs["username"] = unquote(parts.username)
    if parts.password:
        kwargs["password"] = unquote(parts.password)
    sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs)
    return sentinel.master_for(service, redis_class=_SentinelMaster, db=db, **kwargs)


class _SentinelMaster(redis.Redis):
    """The master's client; closing it closes its connections to the sentinels too."""

    def close(self) -> None:
        try:
            super().close()
        finally:
            pool = getattr(self, "connection_pool", None)
            if isinstance(pool, SentinelConnectionPool):
                pool.sentinel_manager.close()


def follow_master(*clients: redis.Redis | None) -> bool:
    """For Sentinel-managed clients: ask the sentinels (once) where the master is now and, if
    it moved, drop each client's idle connections to the old one (busy ones are dropped when
    released, so a blocked read ends on the old master). True if it moved. Meant to be called
    every heartbeat; a no-op for other clients.

    Without this a client leaves a demoted master only on an error, and a master that a
    planned failover (``SENTINEL FAILOVER``) replaced keeps accepting writes, which the
    failover then discards, until the sentinels reconfigure it (about 10 s later).
    """
    pools = [c.connection_pool for c in clients
             if c is not None and isinstance(c.connection_pool, SentinelConnectionPool)]
    if not pools:
        return False
    try:
        now = pools[0].sentinel_manager.discover_master(pools[0].service_name)
    except (RedisConnectionError, RedisTimeoutError):  # mid-election, or no sentinel answers
        return False
    moved = False
    for pool in pools:
        before = pool.proxy.master_address
        if before is not None and before != now:
            # what the pool's own get_master_address() does when a new connection finds
            # the master moved: idle connections go, the next command connects to it
            pool.proxy.master_address = now
            pool.disconnect(inuse_connections=False)
            moved = True
    return moved


def exchange(conn: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
    """Send ``commands`` on ``conn`` in one write and return their replies, an error reply
    as its exception (a pipeline without redis-py's per-command work: no command stack, no
    response callbacks; replies are as the parser gives them).

    A lost connection is retried with the connection's own retries, all commands sent again
    (so only for commands that may run twice: reads, and our scripts, idempotent per
    command id); the reconnection goes to where a sentinel URL's master is now.
    """
    def attempt() -> list[Any]:
        conn.connect()
        conn.send_packed_command(conn.pack_commands(commands), check_health=False)
        return read_replies(conn, len(commands))

    try:
        return conn.retry.call_with_retry(attempt, lambda *_: conn.disconnect())
    except BaseException:
        conn.disconnect()  # (replies may be left unread on it)
        raise


def read_replies(conn: Any, n: int) -> list[Any]:
    """The next ``n`` replies on ``conn``; an error reply comes back as its exception."""
    replies: list[Any] = []
    for _ in range(n):
        try:
            replies.append(conn.read_response())
        except ResponseError as exc:
            replies.append(exc)
    return replies


def send_batch(r: redis.Redis, commands: list[tuple[Any, ...]]) -> list[Any]:
    """:func:`exchange` on a connection of ``r``'s pool."""
    pool = r.connection_pool
    conn = pool.get_connection()
    try:
        return exchange(conn, commands)
    finally:
        pool.release(conn)


def stream_entries(reply: Any) -> list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]:
    """An XREAD reply as the parser gives it (RESP2: a list of ``[stream, entries]``; RESP3:
    a map; nil when the block timed out) as ``(stream, [(entry id, fields)])``. An entry
    deleted meanwhile (no fields) is left out."""
    if not reply:
        return []
    streams = reply.items() if isinstance(reply, dict) else reply
    return [(stream, [(entry_id, dict(zip(flat[::2], flat[1::2], strict=True)))
                      for entry_id, flat in entries if flat is not None])
            for stream, entries in streams]


def lost_master(exc: BaseException) -> bool:
    """True for the errors of a server that stopped being the master under a client: a write
    refused by a replica (READONLY, for a client that does not follow a sentinel), a blocked
    command ended by the demotion (UNBLOCKED), a replica cut off from its master (MASTERDOWN).
    They mean what a lost connection means: retry, on the new master if there is one."""
    if isinstance(exc, ReadOnlyError):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(("UNBLOCKED", "MASTERDOWN"))


def master_address(r: redis.Redis) -> tuple[str, int] | None:
    """The master address a Sentinel-managed client uses now; None for other clients (or
    before its first connection)."""
    pool = r.connection_pool
    return pool.master_address if isinstance(pool, SentinelConnectionPool) else None


def _keepalive_options() -> dict[int, int]:
    opts = {}
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            opts[getattr(socket, name)] = value
    return opts


class TLSVerificationError(ConnectionLostError, RedisConnectionError):
    """Raised when TLS verification failed: the server's certificate does not verify against
    the CA file, or the server refused this client's certificate. Not retried (it would fail
    the same way). Also a redis-py ``ConnectionError``, like the errors it replaces."""


# Why OpenSSL says the server ended the handshake: it refused this side's certificate (or,
# HANDSHAKE_FAILURE, the TLS 1.2 answer to a missing one: also no cipher in common).
_REFUSED_CERTIFICATE = frozenset({
    "TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_BAD_CERTIFICATE", "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_CERTIFICATE_REVOKED", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    "SSLV3_ALERT_HANDSHAKE_FAILURE",
})


class _Retry(Retry):
    """redis-py's ``Retry``, except that it gives up at once when TLS verification fails."""

    def __init__(self, backoff: Any, retries: int, tls: TLS | None = None) -> None:
        super().__init__(backoff, retries)
        self.tls = tls

    def call_with_retry(self, do: Any, fail: Any, *args: Any, **kwargs: Any) -> Any:
        def fail_unless_tls(error: Exception, *rest: Any) -> None:
            fail(error, *rest)  # disconnects
            refused = _tls_refusal(error, self.tls)
            if refused is not None:
                raise refused

        return super().call_with_retry(do, fail_unless_tls, *args, **kwargs)


def _tls_refusal(error: BaseException, tls: TLS | None) -> TLSVerificationError | None:
    """The :class:`TLSVerificationError` that ``error`` stands for, if its causes show that
    TLS verification failed (redis-py wraps the ``ssl`` error in its ``ConnectionError``)."""
    exc: BaseException | None = error
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, TLSVerificationError):
            return exc
        if isinstance(exc, ssl.SSLCertVerificationError):
            ca = (f"the CA file {tls.ca_file} (tls_ca_file, REDISENGINES_TLS_CA_FILE)"
                  if tls is not None and tls.ca_file else
                  "the system's CAs (set REDISENGINES_TLS_CA_FILE to the CA that signed it)")
            problem = f"the server's certificate does not verify against {ca}"
        elif isinstance(exc, ssl.SSLError) and exc.reason in _REFUSED_CERTIFICATE:
            mine = (f"tls_cert_file={tls.cert_file}, tls_key_file={tls.key_file}"
                    if tls is not None and tls.cert_file else
                    "none was given: set REDISENGINES_TLS_CERT_FILE and _KEY_FILE")
            problem = f"the server refused this client's certificate ({mine})"
            if exc.reason == "SSLV3_ALERT_HANDSHAKE_FAILURE":
                problem = (f"the server refused the handshake: it lacks or refuses this "
                           f"client's certificate ({mine}), or no cipher is in common")
        else:
            exc = exc.__cause__ or exc.__context__
            continue
        refused = TLSVerificationError(f"TLS verification failed: {problem}: {error}")
        refused.__cause__ = error
        return refused
    return None


class _SSLConnection(SSLConnection):
    """redis-py's TLS connection, except that a failed write reports the server's alert.

    With TLS 1.3 the client is done with the handshake before the server has checked its
    certificate; a server that refuses it sends an alert and closes, and the first write may
    then fail with a bare EOF (retried, and silent about the certificate). The alert is still
    there to read: the socket's ``sendall`` raises it instead.
    """

    def _connect(self) -> Any:
        sock = super()._connect()
        sock.__class__ = _SSLSocket  # same layout, one method more
        return sock


class _SSLSocket(ssl.SSLSocket):
    def sendall(self, data: Any, flags: int = 0) -> None:
        try:
            super().sendall(data, flags)
        except OSError:
            timeout = self.gettimeout()
            try:
                self.settimeout(0)
                self.recv(4096)  # raises the alert (ssl.SSLError) if the server sent one
            except ssl.SSLError as exc:
                if exc.reason in _REFUSED_CERTIFICATE:
                    raise
            except OSError:
                pass
            finally:
                self.settimeout(timeout)
            raise


def _tls_kwargs(url: str, tls: TLS | None) -> dict[str, Any]:
    """redis-py's arguments for a ``rediss://`` URL and ``tls``, once the URL is checked to be
    ``rediss://`` and the files to load: a missing or malformed file is an error here, not a
    connection retried for seconds."""
    if tls is None:
        return {"connection_class": _SSLConnection} if url.startswith("rediss://") else {}
    check_tls_url(url)
    files = {"tls_ca_file": tls.ca_file, "tls_cert_file": tls.cert_file,
             "tls_key_file": tls.key_file}
    for setting, path in files.items():
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(
                errno.ENOENT, f"no such TLS file ({setting}, REDISENGINES_{setting.upper()})",
                path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        if tls.ca_file:
            context.load_verify_locations(cafile=tls.ca_file)
        if tls.cert_file:
            context.load_cert_chain(tls.cert_file, tls.key_file)
    except (ssl.SSLError, OSError) as exc:
        given = ", ".join(f"{k}={v}" for k, v in files.items() if v)
        raise ValueError(f"cannot load the TLS files ({given}); PEM expected: {exc}") from exc
    return {"connection_class": _SSLConnection, "ssl_ca_certs": tls.ca_file,
            "ssl_certfile": tls.cert_file, "ssl_keyfile": tls.key_file,
            "ssl_cert_reqs": "required"}


@contextmanager
def translate_errors(what: str) -> Iterator[None]:
    """Turn redis-py errors a user can act on into ours (the one boundary)."""
    try:
        yield
    except TLSVerificationError:  # already ours, and not a lost connection
        raise
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
    except ResponseError as exc:
        if not lost_master(exc):
            raise
        # (only where no sentinel finds the new master: a sentinel URL retries these)
        raise ConnectionLostError(
            f"{what}: the Redis server is no master now (demoted to a replica?): {exc}") from exc
