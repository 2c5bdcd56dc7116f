"""Objects to bytes and back: cloudpickle, pickle protocol 5, out-of-band buffers.

A serialized object is a list of *segments*: the pickle stream first, then each large
contiguous buffer (a numpy array's data, a bytearray…) as it lies in memory, not copied.
Small objects travel as one *frame* (:func:`pack`); large ones as pages (``store.py``).

Frame layout: ``b"RE1"``, the segment count (u32), each segment's length (u64), then the
segments back to back.
"""

from __future__ import annotations

import functools
import pickle
import struct
from dataclasses import dataclass
from typing import Any

import cloudpickle

from .errors import DeserializationError, ObjectTooBigError, SerializationError

MAGIC = b"RE1"
_COUNT = struct.Struct("<I")
_LEN = struct.Struct("<Q")
# Buffers smaller than this stay inside the pickle stream: one segment is cheaper.
OUT_OF_BAND_MIN = 64 * 1024
# Values made only of these (in small tuples, lists and dicts) pickle the same with the
# standard pickler, which costs a fraction of cloudpickle's per call.
_SCALARS = frozenset({type(None), bool, int, float, complex, str, bytes})
_PLAIN_ITEMS = 64  # items looked at in all: past that, cloudpickle without looking further


def _plain(obj: Any) -> bool:
    todo, budget = [obj], _PLAIN_ITEMS
    while todo:
        item = todo.pop()
        kind = type(item)
        if kind in _SCALARS:
            continue
        if kind is not tuple and kind is not list and kind is not dict:
            return False
        budget -= len(item)  # (before looking inside: a long list costs nothing to refuse)
        if budget < 0:
            return False
        if kind is dict:
            if not all(type(k) is str for k in item):
                return False
            todo.extend(item.values())
        else:
            todo.extend(item)
    return True


@dataclass(frozen=True)
class Serialized:
    """An object as segments: the pickle stream, then its out-of-band buffers."""

    segments: list[memoryview]

    @functools.cached_property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.segments)


def serialize(obj: Any, *, what: str = "object") -> Serialized:
    """Serialize ``obj``; raises :class:`SerializationError` naming ``what`` on failure."""
    buffers: list[memoryview] = []

    def out_of_band(buf: pickle.PickleBuffer) -> bool:
        try:
            raw = buf.raw()
        except BufferError:  # not contiguous: let pickle copy it in-band
            return True
        if raw.nbytes < OUT_OF_BAND_MIN:
            return True
        buffers.append(raw)
        return False

    try:
        dumps = pickle.dumps if _plain(obj) else cloudpickle.dumps
        data = dumps(obj, protocol=5, buffer_callback=out_of_band)
    except Exception as exc:
        raise SerializationError(
            f"cannot serialize {what} of type {type(obj).__name__}: {type(exc).__name__}: {exc}"
        ) from exc
    return Serialized([memoryview(data), *buffers])


def check_size(ser: Serialized, limit: int, *, what: str = "object") -> None:
    """Raise :class:`ObjectTooBigError` if ``ser`` is larger than ``limit`` bytes."""
    size = ser.nbytes
    if size > limit:
        raise ObjectTooBigError(
            f"{what} is {size:,} bytes serialized, over the limit of {limit:,} bytes "
            "(REDISENGINES_MAX_OBJECT_SIZE)", size=size, limit=limit)


def deserialize(segments: list[Any], *, what: str = "object") -> Any:
    """Rebuild an object from its segments (the first is the pickle stream).

    Buffers must be writable (a ``bytearray`` or a view of one) so that arrays built on
    them are writable too.
    """
    try:
        return pickle.loads(segments[0], buffers=segments[1:])
    except Exception as exc:
        raise DeserializationError(
            f"cannot deserialize {what}: {type(exc).__name__}: {exc}") from exc


def pack(ser: Serialized) -> bytes:
    """One frame holding every segment (copies; for small objects)."""
    segs = ser.segments
    head = MAGIC + _COUNT.pack(len(segs)) + b"".join(_LEN.pack(s.nbytes) for s in segs)
    return b"".join([head, *segs])


def unpack_segments(frame: bytes | memoryview) -> list[Any]:
    """Split a frame into segments; buffers come back as writable bytearrays."""
    view = memoryview(frame)
    if view[:3] != MAGIC:
        raise DeserializationError("not a redisengines frame (bad magic)")
    try:
        (count,) = _COUNT.unpack_from(view, 3)
        pos = 3 + _COUNT.size
        lengths = [_LEN.unpack_from(view, pos + i * _LEN.size)[0] for i in range(count)]
    except struct.error as exc:
        raise DeserializationError(f"truncated frame header: {exc}") from exc
    pos += count * _LEN.size
    if pos + sum(lengths) != view.nbytes:
        raise DeserializationError(
            f"frame length mismatch: header says {pos + sum(lengths)}, got {view.nbytes}")
    segments: list[Any] = []
    for i, n in enumerate(lengths):
        chunk = view[pos:pos + n]
        segments.append(chunk if i == 0 else bytearray(chunk))
        pos += n
    return segments


def unpack(frame: bytes | memoryview, *, what: str = "object") -> Any:
    """The object held in one frame."""
    return deserialize(unpack_segments(frame), what=what)


def dumps(obj: Any, *, what: str = "object") -> bytes:
    """Serialize ``obj`` into one frame."""
    return pack(serialize(obj, what=what))


def to_pickle(obj: Any, *, what: str = "object") -> bytes:
    """Self-contained pickle bytes (buffers in-band) that plain ``pickle.loads`` reads."""
    try:
        return cloudpickle.dumps(obj, protocol=5)
    except Exception as exc:
        raise SerializationError(
            f"cannot serialize {what} of type {type(obj).__name__}: {type(exc).__name__}: {exc}"
        ) from exc
