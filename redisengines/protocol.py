"""Commands on the wire: the fields of an inbox entry, readable in ``redis-cli XRANGE``.

Every entry has ``op``, ``id`` (the command id, which names its result key ``P:{r<id>}``)
and ``client`` (whose reply stream hears of completion), plus per op:

==================  ======================================================================
op                  fields
==================  ======================================================================
execute             ``code`` (clear text)
apply               ``fn`` (the function's name, for humans), ``value``/``obj``: (f, args, kwargs)
push                ``names`` (JSON), ``value``/``obj``: {name: value}
push_serialized     ``names`` (JSON), ``value``/``obj``: {name: pickle bytes}
pull                ``names`` (JSON), ``single`` (1: return the value, not a list)
pull_serialized     ``names`` (JSON), ``single``
pull_namespace      ``names`` (JSON list, or absent for all)
keys, reset         nothing more
call                ``fn``, ``retries`` (re-queues left if the engine dies; in ``P:tasks``),
                    ``value``/``obj``: (f, args, kwargs)
actor_new           ``actor`` (id), ``cls``, ``value``/``obj``: (cls, args, kwargs)
actor_call          ``actor``, ``method``, ``value``/``obj``: (args, kwargs)
actor_del           ``actor``
==================  ======================================================================

Arguments of ``call``, ``actor_new`` and ``actor_call`` may be :class:`FutureRef`: the
engine replaces each top-level one by the value stored at ``P:{r<cmd_id>}``.

``size`` gives the byte size of a payload for a human reader; ``tl`` (any op that runs
user code) a time limit in seconds. Control entries (``P:{e<id>}:ctl``) use the same shape
with ``op`` = ``kill`` (stop the engine) or ``interrupt`` (``id`` names the command to
interrupt, running or still queued).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ProtocolError

VERSION = "1"
OPS = frozenset({
    "execute", "apply", "push", "push_serialized", "pull", "pull_serialized",
    "pull_namespace", "keys", "reset", "call", "actor_new", "actor_call", "actor_del",
})


@dataclass(frozen=True)
class FutureRef:
    """A reference to the result of command ``cmd_id``, resolved by the engine from Redis."""

    cmd_id: str


@dataclass(frozen=True)
class Command:
    """One decoded inbox entry."""

    entry_id: str
    op: str
    id: str
    client: str | None
    fields: dict[bytes, bytes] = field(repr=False)

    @classmethod
    def decode(cls, entry_id: str, fields: dict[bytes, bytes]) -> Command:
        """Validate an entry; raises :class:`ProtocolError` for anything that is not a command."""
        try:
            op = fields[b"op"].decode()
            cmd_id = fields[b"id"].decode()
        except (KeyError, UnicodeDecodeError):
            raise ProtocolError(
                f"entry {entry_id} is not a command (fields: {sorted(_show(k) for k in fields)})"
            ) from None
        if op not in OPS:
            raise ProtocolError(f"entry {entry_id}: unknown op {op!r}")
        if not cmd_id or len(cmd_id) > 200 or any(c in cmd_id for c in "{}"):
            raise ProtocolError(f"entry {entry_id}: invalid command id {cmd_id!r}")
        client = fields.get(b"client")
        return cls(entry_id, op, cmd_id, client.decode() if client else None, fields)

    def text(self, name: str) -> str:
        raw = self.fields.get(name.encode())
        if raw is None:
            raise ProtocolError(f"{self.op} command {self.id} lacks the {name!r} field")
        return raw.decode()

    def names(self) -> list[str] | None:
        raw = self.fields.get(b"names")
        if raw is None:
            return None
        names = json.loads(raw)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ProtocolError(f"{self.op} command {self.id}: names must be a list of strings")
        return names

    def flag(self, name: str) -> bool:
        return self.fields.get(name.encode()) == b"1"


def identify(fields: dict[bytes, bytes]) -> tuple[str | None, str | None]:
    """Best effort ``(command id, client)`` of an entry that failed to decode."""
    def get(key: bytes) -> str | None:
        raw = fields.get(key)
        try:
            text = raw.decode() if raw else None
        except UnicodeDecodeError:
            return None
        return text if text and len(text) <= 200 and "{" not in text and "}" not in text else None
    return get(b"id"), get(b"client")


def entry(op: str, cmd_id: str, client: str, **extra: Any) -> dict[str, Any]:
    """The fields of an inbox entry (the client side of :meth:`Command.decode`)."""
    fields: dict[str, Any] = {"op": op, "id": cmd_id, "client": client, "v": VERSION}
    for key, value in extra.items():
        if value is None:
            continue
        if key == "names":
            value = json.dumps(value)
        elif isinstance(value, bool):
            value = "1" if value else "0"
        fields[key] = value
    return fields


def _show(key: bytes) -> str:
    return key.decode("utf-8", "replace")[:40]


def limit_field(time_limit: float | None) -> dict[str, str]:
    """The ``tl`` field of a command with a time limit (seconds), checked; {} without."""
    if time_limit is None:
        return {}
    if isinstance(time_limit, bool) or not isinstance(time_limit, (int, float)) \
            or not math.isfinite(time_limit) or time_limit <= 0:
        raise ValueError(f"time_limit must be a positive number of seconds, not {time_limit!r}")
    return {"tl": repr(float(time_limit))}
