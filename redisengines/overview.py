"""The operator's view of a cluster, read from Redis alone: what ``redisengines status`` shows.

:func:`gather` reads every engine's registry entry, lease and inbox, the load-balanced queue,
the named actors, the dead letters and the result keys, in two pipelined round trips (plus a
bounded ``SCAN`` when the keyspace is large), and returns plain data: ``status --json``
prints exactly that dict and the table is drawn from it. It only reads: an engine whose lease
expired shows ``alive: false`` until a client reaps it (then its ``state`` is ``dead``).

Ages are taken on the Redis clock (``TIME``), never this host's: an engine publishes
``running_for`` and ``uptime`` as of ``beat``, the Redis time of its last heartbeat, so an
age now is that value plus ``TIME - beat``, right whatever the skew between hosts.

:func:`chunk_lines` turns chunks of an engine's output stream ``P:{e<id>}:out`` into the
labelled lines of ``redisengines logs``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import redis

from .keys import ENGINE_GROUP, Keys
from .output import Chunk

SCAN_COUNT = 1000  # COUNT of each SCAN for result keys
SCAN_CALLS = 10  # SCAN calls at most: past that the result count is a lower bound
ACTORS_SHOWN = 100  # named actors listed (all are counted)


def redis_time(reply: Any) -> float:
    """``TIME``'s reply as float seconds."""
    seconds, micros = reply
    return int(seconds) + int(micros) / 1e6


def running_for(info: dict[str, Any], clock: float) -> float:
    """How long a busy engine has run its command, at Redis time ``clock``: what it said
    at its last heartbeat (``running_for`` at ``beat``) plus the time since."""
    try:
        return float(info.get("running_for", 0)) + max(0.0, clock - float(info["beat"]))
    except (KeyError, TypeError, ValueError):
        return float(info.get("running_for", 0) or 0)


def age_text(seconds: float) -> str:
    """A short human age: ``3s``, ``2m05s``, ``1h02m``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"


def gather(r: redis.Redis, keys: Keys, *, url: str | None = None,
           scan_count: int = SCAN_COUNT, scan_calls: int = SCAN_CALLS) -> dict[str, Any]:
    """Everything ``redisengines status`` shows, as JSON-ready data.

    ``{"cluster", "url", "time", "engines": [{"id", "state", "alive", ...}], "tasks",
    "actors", "dead_letters", "results", "next_id"}``; see the README ("Operating with
    redis-cli") for the keys each value comes from.
    """
    first = r.pipeline(transaction=False)
    first.time()
    first.hgetall(keys.engines)
    first.get(keys.next_id)
    first.xlen(keys.tasks)
    first.xpending(keys.tasks, ENGINE_GROUP)
    first.hlen(keys.actors)
    first.hscan(keys.actors, 0, count=ACTORS_SHOWN)
    first.xlen(keys.dead)
    first.scan(0, match=_result_pattern(keys), count=scan_count)
    (now, registered, next_id, tasks_len, tasks_pending, n_actors, actors_scan, dead,
     scan) = first.execute(raise_on_error=False)
    for reply in (now, registered, next_id, tasks_len, n_actors, actors_scan, dead, scan):
        if isinstance(reply, Exception):
            raise reply
    clock = redis_time(now)
    held = _by_consumer(tasks_pending)  # load-balanced calls each engine has taken
    rows = _engine_rows(r, keys, clock, registered, held)
    running = sum(min(1, n) for n in held.values())  # (the others taken are queued there)
    count, capped = _count_results(r, keys, scan, scan_count, scan_calls)
    live = {e["id"] for e in rows if e["alive"] and e["state"] != "dead"}
    return {
        "cluster": keys.cluster,
        "url": url,
        "time": clock,
        "engines": rows,
        "tasks": {"length": _int(tasks_len), "running": running,
                  "queued": max(0, _int(tasks_len) - running),
                  "by_engine": {str(k): v for k, v in sorted(held.items())}},
        "actors": _actors(actors_scan, _int(n_actors), live),
        "dead_letters": _int(dead),
        "results": {"count": count, "capped": capped},
        "next_id": _int(next_id),
    }


def engines(r: redis.Redis, keys: Keys) -> list[dict[str, Any]]:
    """The engine rows of :func:`gather` alone (two round trips): each registered engine's
    info plus ``alive``, ``queued``, ``running_for`` and ages at the Redis time."""
    pipe = r.pipeline(transaction=False)
    pipe.time()
    pipe.hgetall(keys.engines)
    now, registered = pipe.execute()
    return _engine_rows(r, keys, redis_time(now), registered, {})


def _engine_rows(r: redis.Redis, keys: Keys, clock: float, registered: dict[bytes, bytes],
                 held: dict[int, int]) -> list[dict[str, Any]]:
    infos = _registered(registered)
    pipe = r.pipeline(transaction=False)
    for eid in infos:
        pipe.xlen(keys.inbox(eid))
        pipe.xpending(keys.inbox(eid), ENGINE_GROUP)
        pipe.exists(keys.heartbeat(eid))
    replies = pipe.execute(raise_on_error=False) if infos else []
    rows = []
    for i, (eid, info) in enumerate(infos.items()):
        inbox, pending, lease = replies[3 * i:3 * i + 3]
        rows.append(_engine_row(eid, info, clock, _int(inbox), _pending_count(pending),
                                _int(lease) > 0, held.get(eid, 0)))
    return rows


def _registered(raw: dict[bytes, bytes]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for field, value in raw.items():
        try:
            info = json.loads(value)
            out[int(field)] = info if isinstance(info, dict) else {}
        except ValueError:
            continue
    return dict(sorted(out.items()))


def _engine_row(eid: int, info: dict[str, Any], clock: float, inbox: int, pending: int,
                lease: bool, tasks: int) -> dict[str, Any]:
    """One engine: its registry JSON, plus what only Redis knows now."""
    row = {**info, "id": eid}
    state = str(info.get("state", "?"))
    alive = lease and state != "dead"
    beat = _float(info.get("beat"))
    # (a dead engine's figures stay as of its last heartbeat: nothing runs there any more)
    since_beat = max(0.0, clock - beat) if beat is not None else None
    row.update(
        state=state, alive=alive,
        beat_age=round(since_beat, 3) if since_beat is not None else None,
        inbox=inbox, pending=pending, tasks=tasks,
        # accepted, not yet started (as queue_status says: one delivered entry runs)
        queued=max(0, inbox - min(1, pending)),
    )
    uptime = _float(info.get("uptime"))
    if uptime is not None:
        row["uptime"] = round(uptime + ((since_beat or 0.0) if alive else 0.0), 3)
    if state == "busy" and info.get("running"):
        ran = running_for(info, clock) if alive else _float(info.get("running_for"))
        row["running_for"] = round(ran or 0.0, 3)
    else:
        for name in ("running", "op", "since", "running_for"):
            row.pop(name, None)
    return row


def _pending_count(reply: Any) -> int:
    """The count of an ``XPENDING`` summary (0 for a missing stream or group)."""
    if isinstance(reply, dict):
        return _int(reply.get("pending"))
    return 0


def _by_consumer(reply: Any) -> dict[int, int]:
    """``{engine id: entries it holds}`` from an ``XPENDING`` summary of ``P:tasks``
    (engines read it as consumer ``e<id>``)."""
    out: dict[int, int] = {}
    if not isinstance(reply, dict):
        return out
    for consumer in reply.get("consumers") or []:
        name = consumer.get("name", b"")
        name = name.decode() if isinstance(name, bytes) else str(name)
        if name.startswith("e") and name[1:].isdigit():
            out[int(name[1:])] = _int(consumer.get("pending"))
    return out


def _actors(scan: Any, total: int, live: set[int]) -> dict[str, Any]:
    """Named actors from one ``HSCAN`` of ``P:actors`` (name -> JSON: actor, engine, cls)."""
    _, fields = scan
    items = []
    for raw_name, raw in sorted(fields.items()):
        name = raw_name.decode("utf-8", "replace")
        try:
            record = json.loads(raw)
        except ValueError:
            record = {}
        if not isinstance(record, dict):
            record = {}
        engine = record.get("engine")
        items.append({"name": name, "actor": record.get("actor"), "engine": engine,
                      "cls": record.get("cls"), "engine_alive": engine in live})
    return {"count": max(total, len(items)), "items": items[:ACTORS_SHOWN],
            "truncated": max(total, len(items)) > min(len(items), ACTORS_SHOWN)}


def _result_pattern(keys: Keys) -> str:
    return f"{keys.prefix}:{{r*"


def _count_results(r: redis.Redis, keys: Keys, first: Any, count: int,
                   calls: int) -> tuple[int, bool]:
    """Result keys ``P:{r<cmd>}`` counted by ``SCAN`` (``first`` is its first reply), in at
    most ``calls`` calls; ``(n, True)`` when it stopped early: at least n then."""
    cursor, found = first
    n, made = len(found), 1
    pattern = _result_pattern(keys)
    while int(cursor) != 0 and made < calls:
        cursor, found = r.scan(cursor, match=pattern, count=count)
        n += len(found)
        made += 1
    return n, int(cursor) != 0


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# -------------------------------------------------------------------------------- text
def size_text(n: Any) -> str:
    """Bytes in binary units: ``512 B``, ``1.5 KiB``, ``230 MiB``, ``2.0 GiB``."""
    try:
        size = float(n)
    except (TypeError, ValueError):
        return ""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            if unit == "B":
                return f"{size:.0f} B"
            return f"{size:.1f} {unit}" if size < 10 else f"{size:.0f} {unit}"
        size /= 1024
    return ""  # (not reached)


def chunk_lines(chunks: Iterable[Chunk], *, cmd_ids: bool = False) -> list[str]:
    """Output chunks as labelled lines: ``[stdout:3] text`` (``[stdout:3 <cmd>] text`` with
    ``cmd_ids``). A chunk that ends mid-line ends its line here (the next chunk of that
    command continues on a line of its own)."""
    lines = []
    for chunk in chunks:
        label = chunk.label
        if cmd_ids and chunk.cmd:
            label = f"{label[:-1]} {chunk.cmd}]"
        for line in chunk.text.splitlines() or [""]:
            lines.append(f"{label} {line}" if line else label)
    return lines
