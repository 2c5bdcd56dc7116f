"""The Lua scripts, one atomic operation per file in ``redisengines/lua/``, registered once.

Each script's header lists its KEYS, ARGV and return value. ``redis.commands.core.Script``
sends EVALSHA and falls back to loading the script on NOSCRIPT.
"""

from __future__ import annotations

from importlib import resources

import redis
from redis.commands.core import Script

NAMES = ("register", "heartbeat", "complete", "retire", "clear_queue", "release_object",
         "cancel", "submit", "take", "give_back")


def source(name: str) -> str:
    return resources.files(__package__).joinpath("lua", f"{name}.lua").read_text()


class Scripts:
    """The registered scripts for one Redis client."""

    register: Script
    heartbeat: Script
    complete: Script
    retire: Script
    clear_queue: Script
    release_object: Script
    cancel: Script
    submit: Script
    take: Script
    give_back: Script

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        for name in NAMES:
            setattr(self, name, r.register_script(source(name)))

    def load(self, *names: str) -> None:
        """Load scripts now (before pipelining EVALSHAs, which cannot fall back to EVAL)."""
        for name in names or NAMES:
            self.r.script_load(getattr(self, name).script)
