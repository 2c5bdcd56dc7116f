"""Values in Redis: small ones inline in a message, large ones as paged objects.

A message field set carries a value either as ``value`` (one frame, see
``serialization.pack``) or as ``obj`` (the id of a paged object). A paged object is a
manifest hash ``P:{o<oid>}`` (segment lengths, page size, page count, size and, for
objects read by several engines, a reference count) plus pages ``P:{o<oid>}:<n>`` of at
most ``page_size`` bytes each. Pages never straddle segments, so a numpy buffer is sent
as slices of its own memory and read back into one writable buffer.

Pages are written first and the manifest last, in one pipeline: a writer that dies half
way leaves only pages, which are invisible and expire.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import redis
from xxhash import xxh3_64_intdigest

from .config import Settings
from .connection import bulk_client
from .errors import DeserializationError, ObjectIntegrityError, ObjectLostError
from .keys import Keys
from .pagereader import MISSING, allocate, read_values
from .scripts import Scripts
from .serialization import Serialized, check_size, deserialize, pack, serialize, unpack
from .signing import MANIFEST, SignatureError, Signer


def plan_pages(lengths: list[int], page_size: int) -> list[tuple[int, int, int]]:
    """Pages as ``(segment, start, end)`` for segments of these lengths."""
    pages = []
    for seg, n in enumerate(lengths):
        if n == 0:
            continue
        for start in range(0, n, page_size):
            pages.append((seg, start, min(start + page_size, n)))
    return pages


# The frame of ``None``.
_NONE_FRAME = pack(serialize(None))


class ObjectStore:
    """Reads and writes values for one cluster."""

    def __init__(self, r: redis.Redis, keys: Keys, settings: Settings, scripts: Scripts) -> None:
        self.r = r
        self._bulk: redis.Redis | None = None
        self.signer = Signer(settings.key) if settings.key else None
        self.keys = keys
        self.settings = settings
        self.scripts = scripts

    # ----------------------------------------------------------------- whole values

    def close(self) -> None:
        """Close the connections of page writes (the main connection is the owner's)."""
        if self._bulk is not None:
            self._bulk.close()
            self._bulk.connection_pool.disconnect()
            self._bulk = None

    def bulk(self) -> redis.Redis:
        """The client of page reads and writes (its own connections, see ``bulk_client``)."""
        if self._bulk is None:
            self._bulk = bulk_client(self.r)
        return self._bulk

    def encode(self, obj: Any, *, what: str = "object", refs: int | None = None) -> dict[str, Any]:
        """Serialize ``obj``, check its size, and return the message fields that carry it."""
        if obj is None:  # what most commands return: its frame never changes
            return {"value": _NONE_FRAME}
        ser = serialize(obj, what=what)
        check_size(ser, self.settings.max_object_size, what=what)
        return self.fields_for(ser, refs=refs)

    def fields_for(self, ser: Serialized, *, refs: int | None = None) -> dict[str, Any]:
        """``{"value": frame}`` for a small object, else ``{"obj": oid}`` after writing pages."""
        if ser.nbytes <= self.settings.inline_max:
            return {"value": pack(ser)}
        return {"obj": self.put(ser, refs=refs)}

    def decode(self, fields: dict[bytes, Any], *, what: str = "object",
               release: bool = False) -> Any:
        """The value carried by message fields (``value`` or ``obj``)."""
        frame = fields.get(b"value")
        if frame is not None:
            return unpack(frame, what=what)
        oid = fields.get(b"obj")
        if oid is None:
            raise DeserializationError(f"{what}: message carries no value")
        oid = oid.decode() if isinstance(oid, bytes) else oid
        segments = self.get_segments(oid)
        if release:
            self.release(oid)
        return deserialize(segments, what=what)

    # ----------------------------------------------------------------- paged objects
    def put(self, ser: Serialized, *, refs: int | None = None, oid: str | None = None) -> str:
        """Write ``ser`` as a paged object; returns its id."""
        oid = oid or uuid.uuid4().hex
        lengths = [s.nbytes for s in ser.segments]
        pages = plan_pages(lengths, self.settings.page_size)
        ttl_ms = int(self.settings.result_ttl * 1000)
        views = [ser.segments[seg][start:end] for seg, start, end in pages]
        manifest: dict[str, Any] = {
            "segments": json.dumps(lengths),
            "page_size": self.settings.page_size,
            "pages": len(pages),
            "size": sum(lengths),
        }
        # XXH3 of each page (tens of GB/s): a swapped, cut or altered page is caught.
        manifest["xxh3"] = json.dumps([xxh3_64_intdigest(v) for v in views])
        if self.signer is not None:
            # The pickle stream (segment 0) is what could carry code: its pages get a keyed
            # BLAKE2b, and the manifest is signed. Raw buffers (array data) keep the XXH3:
            # altering them changes values, never what runs.
            manifest["mac"] = json.dumps([self.signer.page_tag(v) if seg == 0 else None
                                          for v, (seg, _, _) in zip(views, pages, strict=True)])
            self.signer.sign(manifest, self.keys.manifest(oid), stamp=False, skip=MANIFEST)
        if refs is not None:
            manifest["refs"] = refs
        pipe = self.bulk().pipeline(transaction=False)
        for n, view in enumerate(views):
            pipe.set(self.keys.page(oid, n), view, px=ttl_ms)
        mkey = self.keys.manifest(oid)
        pipe.hset(mkey, mapping=manifest)
        pipe.pexpire(mkey, ttl_ms)
        pipe.execute()
        return oid

    def manifest(self, oid: str) -> dict[str, Any]:
        raw = self.r.hgetall(self.keys.manifest(oid))
        if not raw:
            raise ObjectLostError(f"object {oid} is gone (expired, released or never committed)")
        if self.signer is not None:
            try:
                self.signer.verify(raw, self.keys.manifest(oid), skip=MANIFEST)
            except SignatureError as exc:
                raise ObjectIntegrityError(f"object {oid}: {exc}") from None
        return {
            "segments": json.loads(raw[b"segments"]),
            "page_size": int(raw[b"page_size"]),
            "pages": int(raw[b"pages"]),
            "xxh3": json.loads(raw[b"xxh3"]) if b"xxh3" in raw else None,
            "mac": json.loads(raw[b"mac"]) if b"mac" in raw else None,
        }

    def get_segments(self, oid: str) -> list[Any]:
        """Read a paged object into one writable buffer per segment.

        Pages are read with :func:`pagereader.read_values`, straight into the buffers that the
        object is then rebuilt on: no page exists twice in memory.
        """
        man = self.manifest(oid)
        lengths: list[int] = man["segments"]
        pages = plan_pages(lengths, man["page_size"])
        if len(pages) != man["pages"]:
            raise ObjectLostError(f"object {oid}: manifest and page plan disagree")
        hashes: list[int] | None = man["xxh3"]
        macs: list[str | None] | None = None
        if self.signer is not None:
            macs = man["mac"]
            if macs is None or len(macs) != len(pages):
                raise ObjectIntegrityError(f"object {oid}: its manifest carries no page tags")
        buffers = [allocate(n) for n in lengths]
        views = [memoryview(b) for b in buffers]
        dests = [views[seg][start:end] for seg, start, end in pages]
        pool = self.bulk().connection_pool
        conn = pool.get_connection()
        try:
            got = read_values(conn, [self.keys.page(oid, n) for n in range(len(pages))], dests)
        finally:
            pool.release(conn)
        for n, (size, dest) in enumerate(zip(got, dests, strict=True)):
            if size == MISSING:
                raise ObjectLostError(f"object {oid}: page {n} is missing (expired or deleted)")
            if size != dest.nbytes \
                    or (hashes is not None and xxh3_64_intdigest(dest) != hashes[n]) \
                    or (macs is not None and macs[n] is not None
                        and self.signer.page_tag(dest) != macs[n]):
                raise ObjectIntegrityError(
                    f"object {oid}: page {n} does not match the manifest ({size} bytes, "
                    f"expected {dest.nbytes} with its checksum): swapped, cut or altered")
        return [views[0], *buffers[1:]]

    def get(self, oid: str, *, what: str = "object") -> Any:
        return deserialize(self.get_segments(oid), what=what)

    def release(self, oid: str) -> None:
        """Drop one reference; the last one deletes the object."""
        self.release_many([oid])

    def release_many(self, oids: list[str]) -> None:
        """Drop one reference to each object (two round trips for any number)."""
        pipe = self.r.pipeline(transaction=False)
        for oid in oids:
            pipe.hget(self.keys.manifest(oid), "pages")
        counts = pipe.execute()
        pipe = self.r.pipeline(transaction=False)
        for oid, pages in zip(oids, counts, strict=True):
            if pages is None:
                continue  # already gone
            keys = [self.keys.manifest(oid), *(self.keys.page(oid, n) for n in range(int(pages)))]
            pipe.evalsha(self.scripts.release_object.sha, len(keys), *keys)
        try:
            pipe.execute()
        except redis.exceptions.NoScriptError:
            self.r.script_load(self.scripts.release_object.script)
            self.release_many(oids)

    def delete(self, oid: str) -> None:
        try:
            man = self.manifest(oid)
        except ObjectLostError:
            return
        pages = (self.keys.page(oid, n) for n in range(man["pages"]))
        self.r.delete(self.keys.manifest(oid), *pages)

