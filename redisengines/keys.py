"""Every Redis key name redisengines uses, under one prefix ``re:<cluster>`` (P below).

Keys one engine touches together share the hash tag ``{e<id>}`` so that they stay on one
slot under Redis Cluster; an object's pages share ``{o<oid>}``.

=========================  =============  =======  ======================================
key                        type           TTL      what an operator reads there
=========================  =============  =======  ======================================
``P:engines``              hash           none     engine id -> JSON (host, pid, state…)
``P:next_id``              string (int)   none     the next engine id (never reused)
``P:events``               stream, capped none     registrations, exits, deaths
``P:{e<id>}:inbox``        stream         none     queued commands; group ``engine``;
                                                   XLEN = queued + running,
                                                   XPENDING = running
``P:{e<id>}:ctl``          stream, capped none     out-of-band control (kill)
``P:{e<id>}:hb``           string         lease    heartbeat; missing = presumed dead
``P:{e<id>}:fenced``       string         result   set when the engine was retired: its
                                                   late writes are refused
``P:epoch``                string         none     random token of this cluster's state
``P:server``               string         none     ``<run id> <ms>``: the server run on
                                                   which a lease was first found lapsed
``P:{e<id>}:ns``           hash           none     namespace index: name -> type, size
``P:{e<id>}:out``          stream, capped result*   output of its commands, and its log
                                                   (*a TTL once the engine is gone)
``P:{e<id>}:done``         stream, capped none     completed commands; entry ``<n>-0``
                                                   is the n-th command
``P:{r<cmd>}``             hash           result   a result: status, value or object ref,
                                                   error, stdout, timings
``P:{c<client>}:replies``  stream         result   completion notices for one client
``P:tasks``                stream         none     load-balanced calls; group ``engine``;
                                                   XLEN = queued + running
``P:actors``               hash           none     actor name -> JSON (actor id, engine, class)
``P:dead``                 stream, capped none     dead letters: poison load-balanced calls
``P:{o<oid>}``             hash           result   manifest of a paged object
``P:{o<oid>}:<n>``         string         result   page n of that object
=========================  =============  =======  ======================================

Engines write their own keys, results, notices and the registry; clients write inboxes,
control entries and pushed objects; anyone may run ``retire.lua`` on an expired lease.
"""

from __future__ import annotations

from dataclasses import dataclass

ENGINE_GROUP = "engine"


@dataclass(frozen=True)
class Keys:
    """Key names for one cluster."""

    cluster: str = "default"

    @property
    def prefix(self) -> str:
        return f"re:{self.cluster}"

    @property
    def engines(self) -> str:
        return f"{self.prefix}:engines"

    @property
    def next_id(self) -> str:
        return f"{self.prefix}:next_id"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"

    @property
    def tasks(self) -> str:
        return f"{self.prefix}:tasks"

    @property
    def actors(self) -> str:
        return f"{self.prefix}:actors"

    def inbox(self, engine_id: int) -> str:
        return f"{self.prefix}:{{e{engine_id}}}:inbox"

    def ctl(self, engine_id: int) -> str:
        return f"{self.prefix}:{{e{engine_id}}}:ctl"

    def heartbeat(self, engine_id: int) -> str:
        return f"{self.prefix}:{{e{engine_id}}}:hb"

    def fenced(self, engine_id: int) -> str:
        return f"{self.prefix}:{{e{engine_id}}}:fenced"

    @property
    def epoch(self) -> str:
        return f"{self.prefix}:epoch"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def server(self) -> str:
        return f"{self.prefix}:server"

    def namespace(self, engine_id: int) -> str:
        return f"{self.prefix}:{{e{engine_id}}}:ns"

    def output(self, engine_id: int) -> str:
        return f"{self.prefix}:{{e{engine_id}}}:out"

    def done(self, engine_id: int) -> str:
        return f"{self.prefix}:{{e{engine_id}}}:done"

    def result(self, cmd_id: str) -> str:
        return f"{self.prefix}:{{r{cmd_id}}}"

    def replies(self, client_id: str) -> str:
        return f"{self.prefix}:{{c{client_id}}}:replies"

    def manifest(self, oid: str) -> str:
        return f"{self.prefix}:{{o{oid}}}"

    def page(self, oid: str, n: int) -> str:
        return f"{self.prefix}:{{o{oid}}}:{n}"

    def engine_keys(self, engine_id: int) -> list[str]:
        """Every per-engine key, for cleanup."""
        return [
            self.inbox(engine_id),
            self.ctl(engine_id),
            self.heartbeat(engine_id),
            self.namespace(engine_id),
            self.done(engine_id),
        ]
