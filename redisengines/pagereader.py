"""Large values read straight into their destination buffer.

redis-py turns every reply into a ``bytes`` object, and a paged object then copies each
page into its own buffer: for a 100 MB array that is two extra passes over the data, and
100 MB of short-lived allocations. :func:`read_values` sends ``GET``s on one connection and
reads each bulk reply's payload with ``socket.recv_into`` into the caller's buffer; only the
few bytes around each payload (its ``$<length>`` header and the next one) go through a
small scratch buffer.

:func:`allocate` gives the buffers to read into. Fresh memory costs a page fault per 4 KiB
page on first touch, which on a virtual machine costs more than copying the data: large
buffers are anonymous mappings advised to use transparent huge pages (one fault per 2 MiB).
"""

from __future__ import annotations

import mmap
import socket
from collections.abc import Sequence
from typing import Any

from redis.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

# A value that is not there (a nil reply).
MISSING = -1
# GETs in flight at once: one reply written while the next GET waits. More is slower: the
# server copies the replies it cannot write yet into its output buffers (100 MB in 4 MiB
# pages read here at about 2.4 GB/s one or two ahead, 1.7 GB/s four ahead).
AHEAD = 2
# Scratch buffer for reply headers; a payload's first bytes may land in it too.
SCRATCH = 64 * 1024
# Buffers this large are huge-page mappings (below it, bytearray is as fast).
HUGE_MIN = 2 * 1024 * 1024
_HUGE = hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_ANONYMOUS")


def allocate(n: int) -> Any:
    """A writable buffer of ``n`` bytes (contents undefined for large ones: all are overwritten
    by the caller)."""
    if n < HUGE_MIN or not _HUGE:
        return bytearray(n)
    buf = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # no transparent huge pages here: the mapping still works
        pass
    return buf


def read_values(conn: AbstractConnection, keys: Sequence[str | bytes],
                dests: Sequence[memoryview], *, ahead: int = AHEAD) -> list[int]:
    """``GET`` each key into the destination of the same index, with ``ahead`` requests in
    flight; returns each value's length, or :data:`MISSING`.

    A value whose length is not its destination's is read and dropped: the caller sees the
    length and decides. Errors: a server error reply raises ``ResponseError`` (after the
    other replies are read, so the connection stays usable); a connection that fails or times
    out mid-way is closed and the reads are retried with the connection's own ``Retry``.
    """
    if len(keys) != len(dests):
        raise ValueError("read_values needs one destination per key")
    if not keys:
        return []

    def attempt() -> list[int]:
        return _Reader(conn).read(keys, dests, ahead)

    def failed(_error: Exception) -> None:
        conn.disconnect()

    return conn.retry.call_with_retry(attempt, failed)


class _Reader:
    """One pass of reads on a connected socket: RESP bulk replies, nothing else."""

    def __init__(self, conn: AbstractConnection) -> None:
        if conn._sock is None:
            conn.connect()
        self.conn = conn
        self.sock: socket.socket = conn._sock
        self.scratch = bytearray(SCRATCH)
        self.view = memoryview(self.scratch)
        self.start = 0  # unread bytes are scratch[start:end]
        self.end = 0

    def read(self, keys: Sequence[str | bytes], dests: Sequence[memoryview],
             ahead: int) -> list[int]:
        sent = 0
        lengths: list[int] = []
        error: ResponseError | None = None
        try:
            for i in range(len(keys)):
                if sent < min(i + ahead, len(keys)):
                    upto = min(i + ahead, len(keys))
                    self.conn.send_packed_command(
                        self.conn.pack_commands([("GET", k) for k in keys[sent:upto]]),
                        check_health=False)
                    sent = upto
                try:
                    lengths.append(self._reply(dests[i]))
                except ResponseError as exc:
                    error = error or exc
                    lengths.append(MISSING)
        except BaseException:
            # Whatever was left unread would be taken for the next command's reply.
            self.conn.disconnect()
            raise
        if error is not None:
            raise error
        return lengths

    def _reply(self, dest: memoryview) -> int:
        line = self._line()
        kind = line[:1]
        if kind == b"-":
            raise ResponseError(line[1:].decode(errors="replace"))
        if kind == b"_":  # RESP3 null
            return MISSING
        if kind != b"$":
            raise RedisConnectionError(f"unexpected reply to GET: {bytes(line[:40])!r}")
        n = int(line[1:])
        if n < 0:
            return MISSING
        if n == dest.nbytes:
            self._payload(dest)
        else:
            self._discard(n)
        if self._take(2) != b"\r\n":
            raise RedisConnectionError("bulk reply not terminated by CRLF")
        return n

    def _payload(self, dest: memoryview) -> None:
        have = min(self.end - self.start, dest.nbytes)
        dest[:have] = self.view[self.start:self.start + have]
        self.start += have
        while have < dest.nbytes:
            have += self._recv_into(dest[have:])

    def _discard(self, n: int) -> None:
        while n:
            if self.start == self.end:
                self._fill()
            k = min(n, self.end - self.start)
            self.start += k
            n -= k

    def _line(self) -> bytes:
        while True:
            pos = self.scratch.find(b"\r\n", self.start, self.end)
            if pos >= 0:
                line = bytes(self.view[self.start:pos])
                self.start = pos + 2
                return line
            if self.end - self.start >= SCRATCH - 1:
                raise RedisConnectionError("reply header too long")
            self._fill()

    def _take(self, n: int) -> bytes:
        while self.end - self.start < n:
            self._fill()
        out = bytes(self.view[self.start:self.start + n])
        self.start += n
        return out

    def _fill(self) -> None:
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == SCRATCH:  # keep the unread tail, make room behind it
            tail = self.end - self.start
            self.view[:tail] = self.view[self.start:self.end]
            self.start, self.end = 0, tail
        self.end += self._recv_into(self.view[self.end:])

    def _recv_into(self, target: memoryview) -> int:
        try:
            got = self.sock.recv_into(target)
        except TimeoutError as exc:
            raise RedisTimeoutError(f"timeout reading a value: {exc}") from exc
        except OSError as exc:
            raise RedisConnectionError(f"error reading a value: {exc}") from exc
        if got == 0:
            raise RedisConnectionError("connection closed by the server while reading a value")
        return got
