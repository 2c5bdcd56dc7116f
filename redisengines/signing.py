"""HMAC signatures: nothing is unpickled unless someone holding the cluster's key wrote it.

The key is per cluster and never goes into Redis: ``Cluster`` makes one and hands it to its
engines; ``redisengines start`` writes it to the connection file (mode 0600); other
processes get it from ``REDISENGINES_KEY``.

* Commands (inbox, ``P:tasks``, control entries) carry ``ts`` (milliseconds, on the Redis
  clock) and ``sig`` = HMAC-SHA256 over the destination stream and every field but the
  re-queue counter. An engine verifies before it decodes anything; a copy into another
  stream fails (the destination is signed), a replay is refused by its result's status
  (already run) or by its age (older than the result TTL).
* Results and object manifests are signed the same way, bound to their key. The pages of
  an object's pickle stream (what could carry code) are tagged with a keyed BLAKE2b; pages
  of raw buffers (array data) carry an XXH3 hash in the signed manifest, which catches
  accidents but not a deliberate forger: altering them changes values, never what runs.
* Records written by Lua scripts (errors of dead engines, cancellations) are not signed:
  they carry JSON only, and a reader never unpickles a field of an unsigned record.

What the key does not protect: anyone with write access to Redis can still delete or delay
messages (denial of service), read payloads (use TLS and ACLs), or stop engines.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from typing import Any

from .errors import ProtocolError

SIG = "sig"
TS = "ts"
# Fields left out of a signature: the ones the system itself changes after signing (the
# re-queue counters of a task, the reference count of an object) or adds (a notice's id).
COMMAND = frozenset({b"sig", b"retries", b"died"})
RESULT = frozenset({b"sig", b"id", b"entry", b"stream"})  # the last two: submit.lua's
MANIFEST = frozenset({b"sig", b"refs"})
# Fields that are unpickled by a reader: never trusted without a valid signature.
PICKLED = frozenset({b"value", b"obj", b"exc"})


class SignatureError(ProtocolError):
    """Raised when a message's signature is missing, wrong, or it is stale or replayed."""


def _bytes(value: Any) -> bytes:
    # The same encoding redis-py applies, so both ends hash the same bytes.
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value).encode()
    raise TypeError(f"cannot sign a field of type {type(value).__name__}")


# A field's name as bytes, and its length-prefixed form, by the name as given (str or bytes):
# the same few names are signed over and over.
_HEADS: dict[Any, tuple[bytes, bytes]] = {}


def _head(name: Any) -> tuple[bytes, bytes]:
    raw = _bytes(name)
    head = _HEADS[name] = (raw, len(raw).to_bytes(4, "big") + raw)
    if len(_HEADS) > 4096:  # (only if callers sign ever-new names)
        _HEADS.clear()
    return head


def _by_name(item: tuple[tuple[bytes, bytes], bytes]) -> bytes:
    return item[0][0]


class Signer:
    """Signs and verifies with one cluster key."""

    def __init__(self, key: str | bytes) -> None:
        raw = bytes.fromhex(key) if isinstance(key, str) else key
        if len(raw) < 16:
            raise ValueError("the cluster key must be at least 16 bytes (32 hex digits)")
        self._key = raw
        self.clock_offset = 0.0  # Redis time minus local time, in seconds

    def now_ms(self) -> int:
        return int((time.time() + self.clock_offset) * 1000)

    def tag(self, fields: Mapping[Any, Any], dst: str, skip: frozenset[bytes] = COMMAND) -> str:
        """HMAC over ``dst`` and the fields not in ``skip``, sorted by name, each as its
        name and its value, both prefixed by their length (4 and 8 bytes, big-endian)."""
        signed = []
        for k, v in fields.items():
            head = _HEADS.get(k) or _head(k)
            if head[0] not in skip:
                signed.append((head, v if type(v) is bytes else _bytes(v)))
        signed.sort(key=_by_name)
        parts = [dst.encode()]
        for (_, prefixed), data in signed:
            parts += (prefixed, len(data).to_bytes(8, "big"), data)
        return hmac.digest(self._key, b"".join(parts), "sha256").hex()

    def sign(self, fields: dict[str, Any], dst: str, *, stamp: bool = True,
             skip: frozenset[bytes] = COMMAND) -> dict[str, Any]:
        """``fields`` with ``ts`` (if ``stamp``) and ``sig`` added for destination ``dst``."""
        if stamp:
            fields[TS] = self.now_ms()
        fields[SIG] = self.tag(fields, dst, skip)
        return fields

    def verify(self, fields: Mapping[bytes, bytes], dst: str, *, max_age: float | None = None,
               skip: frozenset[bytes] = COMMAND) -> None:
        """Raise :class:`SignatureError` unless ``fields`` were signed for ``dst`` (and, with
        ``max_age`` seconds, stamped recently on the Redis clock)."""
        sig = fields.get(b"sig")
        if sig is None:
            raise SignatureError(f"unsigned message for {dst} (this cluster requires its key: "
                                 "REDISENGINES_KEY or the connection file)")
        if not hmac.compare_digest(sig, self.tag(fields, dst, skip).encode()):
            raise SignatureError(f"bad signature on a message for {dst}: forged, altered, or "
                                 "copied from elsewhere")
        if max_age is not None:
            try:
                ts = int(fields[b"ts"]) / 1000
            except (KeyError, ValueError):
                raise SignatureError(f"message for {dst} carries no timestamp") from None
            age = time.time() + self.clock_offset - ts
            if age > max_age or age < -60:
                raise SignatureError(f"message for {dst} is {age:.0f} s old: stale or replayed")

    def page_tag(self, data: Any) -> str:
        """Keyed BLAKE2b of one page (a MAC)."""
        return hashlib.blake2b(data, key=self._key[:64], digest_size=16).hexdigest()


def needs_signature(fields: Mapping[bytes, bytes]) -> bool:
    """True if a reader would unpickle something from these fields."""
    return any(k in fields for k in PICKLED)
