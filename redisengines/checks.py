"""Startup checks that warn about a setup that would break the guarantees.

* The server must not evict keys (``maxmemory-policy noeviction``): an evicted lease kills
  an engine, an evicted stream loses commands. Any other policy is warned about.
* Clients and engines should run the same Python (major.minor) and cloudpickle: functions
  pickled by value do not load across Python versions.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import cloudpickle
import redis

log = logging.getLogger(__name__)


def runtime() -> dict[str, str]:
    """What an engine advertises in ``P:engines`` and a client compares with its own."""
    return {"python": ".".join(map(str, sys.version_info[:2])),
            "cloudpickle": cloudpickle.__version__}


def eviction_policy(r: redis.Redis) -> str | None:
    """Warn unless the server's ``maxmemory-policy`` is ``noeviction``; returns the policy
    (None when the server does not let us read it, e.g. an ACL user without CONFIG)."""
    try:
        policy = r.config_get("maxmemory-policy").get("maxmemory-policy")
    except redis.RedisError:
        return None
    if policy is not None and policy != "noeviction":
        log.warning("the Redis server's maxmemory-policy is %r: it may evict leases, queues "
                    "and results, which kills engines and loses commands; set it to "
                    "'noeviction' (CONFIG SET maxmemory-policy noeviction)", policy)
    return policy


def mismatches(engines: dict[int, dict[str, Any]]) -> dict[int, dict[str, str]]:
    """Live engines whose runtime differs from this process's, with a warning each."""
    mine = runtime()
    found = {}
    for eid, info in engines.items():
        if info.get("state") == "dead":
            continue
        theirs = {k: str(info[k]) for k in mine if k in info}
        if "python" in theirs:
            theirs["python"] = ".".join(theirs["python"].split(".")[:2])
        diff = {k: v for k, v in theirs.items() if v != mine[k]}
        if diff:
            found[eid] = diff
            log.warning("engine %d runs %s, this process %s: objects pickled by value may "
                        "not load across them", eid,
                        ", ".join(f"{k} {v}" for k, v in diff.items()),
                        ", ".join(f"{k} {mine[k]}" for k in diff))
    return found
