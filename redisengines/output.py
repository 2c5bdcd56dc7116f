"""Engine output: what commands print, kept for their results and streamed while they run.

On an engine, :class:`Capture` is ``sys.stdout``/``sys.stderr`` during a command: it keeps
the text (capped) for the result and hands each write to the :class:`Pump`, a daemon thread
with its own connection that appends it to the engine's capped stream ``P:{e<id>}:out`` a
few tens of milliseconds later, several writes to one ``XADD`` and several ``XADD`` to one
round trip. The engine's log records go there too (``fd`` ``log``). Streaming is best
effort: the result always carries the whole (capped) text; if Redis is briefly unreachable,
chunks are dropped and the stream says so.

An entry of ``P:{e<id>}:out`` has the fields ``cmd`` (the command id; empty for log lines
outside a command), ``fd`` (``stdout``, ``stderr`` or ``log``), ``off`` (where ``text``
starts in that command's text of that fd) and ``text``. :func:`follow` reads them back,
for ``redisengines logs --follow`` and ``%px``: ``off`` lets a reader print the rest of a
result's output without repeating what it already showed.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import redis

from .keys import Keys

log = logging.getLogger(__name__)

STREAM_MAXLEN = 10_000  # entries kept per engine (approximate trimming)
FLUSH_DELAY = 0.03  # seconds a chunk may wait for more to go with it
TEXT_MAX = 1 << 20  # characters kept (and streamed) per command and fd
_CHUNK_MAX = 64 * 1024  # characters per stream entry


@dataclass(frozen=True)
class Chunk:
    """One entry of an engine's output stream."""

    engine: int
    entry_id: str
    cmd: str
    fd: str
    off: int
    text: str

    @property
    def label(self) -> str:
        return f"[{self.fd}:{self.engine}]"


class Pump(threading.Thread):
    """Appends output chunks to a stream, batched; never blocks the writer."""

    def __init__(self, connect: Callable[[], redis.Redis]) -> None:
        super().__init__(name="re-output", daemon=True)
        self._connect = connect
        self._queue: deque[tuple[str, str, str, int, str]] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._dropped = 0

    def put(self, stream: str, cmd: str, fd: str, off: int, text: str) -> None:
        self._queue.append((stream, cmd, fd, off, text))
        self._wake.set()

    def stop(self, timeout: float = 1.0) -> None:
        """Flush what is queued (within ``timeout``) and end the thread."""
        self._stopping = True
        self._wake.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        r = self._connect()
        try:
            while True:
                self._wake.wait()
                if not self._stopping:
                    time.sleep(FLUSH_DELAY)  # let the writes of a burst go together
                self._wake.clear()
                batch = []
                while self._queue:
                    batch.append(self._queue.popleft())
                if batch:
                    self._send(r, batch)
                if self._stopping and not self._queue:
                    return
        finally:
            r.close()

    def _send(self, r: redis.Redis, batch: list[tuple[str, str, str, int, str]]) -> None:
        pipe = r.pipeline(transaction=False)
        if self._dropped:
            stream = batch[0][0]
            pipe.xadd(stream, {"cmd": "", "fd": "log", "off": 0,
                               "text": f"[{self._dropped} output chunks were lost: Redis was "
                                       "unreachable]\n"},
                      maxlen=STREAM_MAXLEN, approximate=True)
        for stream, cmd, fd, off, text in _merge(batch):
            pipe.xadd(stream, {"cmd": cmd, "fd": fd, "off": off, "text": text},
                      maxlen=STREAM_MAXLEN, approximate=True)
        try:
            pipe.execute()
            self._dropped = 0
        except redis.RedisError as exc:
            if not self._dropped:
                log.warning("output stream: %s; dropping output until Redis is back", exc)
            self._dropped += len(batch)


def _merge(batch: Iterable[tuple[str, str, str, int, str]]
           ) -> list[tuple[str, str, str, int, str]]:
    """Consecutive chunks of one command and fd become one entry (up to ``_CHUNK_MAX``)."""
    out: list[tuple[str, str, str, int, str]] = []
    for item in batch:
        if out:
            stream, cmd, fd, off, text = out[-1]
            if (stream, cmd, fd) == item[:3] and off + len(text) == item[3] \
                    and len(text) + len(item[4]) <= _CHUNK_MAX:
                out[-1] = (stream, cmd, fd, off, text + item[4])
                continue
        out.append(item)
    return out


class Capture(io.TextIOBase):
    """``sys.stdout`` or ``sys.stderr`` of one command: kept (up to ``TEXT_MAX``) and
    streamed. Safe to write from the command's own threads."""

    def __init__(self, fd: str, cmd: str, stream: str, pump: Pump | None) -> None:
        self.fd, self.cmd, self.stream, self.pump = fd, cmd, stream, pump
        self._parts: list[str] = []
        self._size = 0
        self._over = 0
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        if not s:
            return 0
        with self._lock:
            room = TEXT_MAX - self._size
            kept = s if len(s) <= room else s[:room]
            self._over += len(s) - len(kept)
            if kept:
                off = self._size
                self._parts.append(kept)
                self._size += len(kept)
                if self.pump is not None:
                    self.pump.put(self.stream, self.cmd, self.fd, off, kept)
        return len(s)

    def getvalue(self) -> str:
        with self._lock:
            text = "".join(self._parts)
            if self._over:
                text += f"\n[... {self._over} more characters dropped]\n"
            return text


class PumpHandler(logging.Handler):
    """Sends an engine's log records to its output stream (fd ``log``)."""

    def __init__(self, pump: Pump, stream: Callable[[], str | None],
                 cmd: Callable[[], str]) -> None:
        super().__init__(logging.INFO)
        self.pump, self._stream, self._cmd = pump, stream, cmd
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        stream = self._stream()
        if stream is None:
            return
        try:
            self.pump.put(stream, self._cmd(), "log", 0, self.format(record) + "\n")
        except Exception:  # never let logging break the engine
            self.handleError(record)


# ---------------------------------------------------------------------------- readers
def read(r: redis.Redis, keys: Keys, engine_id: int, count: int = 100) -> list[Chunk]:
    """The last ``count`` chunks of an engine's output, oldest first."""
    entries = r.xrevrange(keys.output(engine_id), count=count)
    return [_chunk(engine_id, eid, f) for eid, f in reversed(entries)]


def positions(r: redis.Redis, keys: Keys, engine_ids: Iterable[int]) -> dict[int, str]:
    """Where each engine's output stream ends now: give it to :func:`follow` as ``since`` to
    get exactly what is written from here on (taken before sending a command, say)."""
    ids = list(engine_ids)
    pipe = r.pipeline(transaction=False)
    for e in ids:
        pipe.xrevrange(keys.output(e), count=1)
    out = {}
    for e, last in zip(ids, pipe.execute(), strict=True):
        raw = last[0][0] if last else b"0-0"
        out[e] = raw.decode() if isinstance(raw, bytes) else str(raw)
    return out


def follow(r: redis.Redis, keys: Keys, engine_ids: Iterable[int], *,
           since: str | dict[int, str] = "$", stop: threading.Event | None = None,
           block: float = 0.2, cmds: set[str] | None = None) -> Iterator[Chunk]:
    """Chunks appended to these engines' output streams after ``since`` — an entry id for
    all, ``{engine: id}`` from :func:`positions`, or ``$``: from this call on — until
    ``stop`` is set; only those of ``cmds`` if given. Blocks (XREAD) between them."""
    ids = list(engine_ids)
    start = positions(r, keys, ids) if since == "$" else since  # resolved now, not lazily
    cursors: dict[str, Any] = {
        keys.output(e): start.get(e, "0-0") if isinstance(start, dict) else start for e in ids}
    return _follow(r, cursors, {keys.output(e): e for e in ids}, stop, block, cmds)


def _follow(r: redis.Redis, cursors: dict[str, Any], engine_of: dict[str, int],
            stop: threading.Event | None, block: float, cmds: set[str] | None
            ) -> Iterator[Chunk]:
    while stop is None or not stop.is_set():
        resp = r.xread(cursors, count=256, block=max(1, int(block * 1000)))
        for raw, entries in resp or []:
            stream = raw.decode() if isinstance(raw, bytes) else raw
            for entry_id, fields in entries:
                cursors[stream] = entry_id
                chunk = _chunk(engine_of[stream], entry_id, fields)
                if cmds is None or chunk.cmd in cmds:
                    yield chunk


def _chunk(engine_id: int, entry_id: Any, fields: dict[bytes, bytes]) -> Chunk:
    def text(name: bytes) -> str:
        return fields.get(name, b"").decode("utf-8", "replace")

    try:
        off = int(fields.get(b"off", b"0"))
    except ValueError:
        off = 0
    eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return Chunk(engine_id, eid, text(b"cmd"), text(b"fd") or "stdout", off, text(b"text"))
