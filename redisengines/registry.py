"""The engine registry ``P:engines``: who is alive, and retiring those who are not."""

from __future__ import annotations

import json
from typing import Any

import redis

from .config import Settings
from .keys import Keys
from .scripts import Scripts


def retire(r: redis.Redis, keys: Keys, engine_id: int, mode: str, settings: Settings,
           scripts: Scripts | None = None) -> int:
    """Run ``retire.lua``: fail what the engine holds and take it out of service.

    ``mode`` is ``reap`` (acts only if the lease expired, and not within
    :func:`restart_grace` of a server restart; returns -1 otherwise), ``kill`` or
    ``shutdown``. Returns the number of commands failed.
    """
    scripts = scripts or Scripts(r)
    return int(scripts.retire(
        keys=[keys.engines, keys.events, keys.inbox(engine_id), keys.heartbeat(engine_id),
              keys.ctl(engine_id), keys.tasks, keys.fenced(engine_id), keys.server,
              keys.dead, keys.output(engine_id), keys.namespace(engine_id),
              keys.done(engine_id)],
        args=[engine_id, mode, keys.prefix, int(settings.result_ttl * 1000),
              int(restart_grace(settings) * 1000)]))


def restart_grace(settings: Settings) -> float:
    """Seconds a restarted server gives engines to renew the leases its downtime lapsed:
    a heartbeat interval plus the longest reconnection backoff step, plus slack."""
    return settings.heartbeat_ttl + settings.heartbeat_interval + 2.0


def last_event_id(r: redis.Redis, keys: Keys) -> str:
    """Id of the newest entry of ``P:events`` (read from there to miss nothing after now)."""
    last = r.xrevrange(keys.events, count=1)
    return last[0][0].decode() if last else "0-0"


def engines(r: redis.Redis, keys: Keys) -> dict[int, dict[str, Any]]:
    """Every registered engine's info, dead ones included, by id."""
    out = {}
    for field, raw in r.hgetall(keys.engines).items():
        try:
            out[int(field)] = json.loads(raw)
        except ValueError:
            continue
    return dict(sorted(out.items()))


def live_ids(r: redis.Redis, keys: Keys, settings: Settings,
             scripts: Scripts | None = None, reap: bool = True) -> list[int]:
    """Ids of engines that hold a lease; engines whose lease expired are reaped on the way.

    Without ``reap`` (just after the server stalled, when a lapsed lease is no
    proof of death) registered engines count as live."""
    candidates = [eid for eid, info in engines(r, keys).items() if info.get("state") != "dead"]
    if not candidates:
        return []
    pipe = r.pipeline(transaction=False)
    for eid in candidates:
        pipe.exists(keys.heartbeat(eid))
    alive = []
    for eid, exists in zip(candidates, pipe.execute(), strict=True):
        if exists or not reap:
            alive.append(eid)
        elif retire(r, keys, eid, "reap", settings, scripts) == -1:
            alive.append(eid)  # its lease was renewed meanwhile (e.g. after a pause)
    return alive
