"""Helpers shared by the tests: waiting on conditions, holding an engine busy, interactive code.

The ``gates`` fixture (a factory of :class:`Gate`) is in ``conftest.py``.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import redis

import redisengines

T = TypeVar("T")

# Longest an engine stays held if a test never opens its gate (teardown always opens it).
HOLD_LIMIT = 30
WAIT = 10.0  # generous bound for anything that should happen at once


def wait_until(condition: Callable[[], T], timeout: float = 10.0, what: str = "condition") -> T:
    """Return the first truthy value of ``condition()``; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def interactive(obj: T) -> T:
    """Mark a function or class as defined interactively (in ``__main__``, as in a notebook).

    cloudpickle then sends it by value, and ``apply`` runs such functions with the engine's
    namespace as their globals. A function of this (importable) test module would otherwise
    be pickled by reference, which an engine cannot import. A class's methods are marked
    too: cloudpickle would otherwise send them by reference to this module.
    """
    obj.__module__ = "__main__"
    if isinstance(obj, type):
        for value in vars(obj).values():
            inner = getattr(value, "__func__", value)
            if hasattr(inner, "__module__") and callable(inner):
                try:
                    inner.__module__ = "__main__"
                except (AttributeError, TypeError):
                    pass
    return obj


def default_sigint() -> None:
    """A ``preexec_fn`` that gives the child the default SIGINT: a process started from a
    background job inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    (tests that press Ctrl-C in a child would fail for how the suite was started)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def delay_sender(client: redisengines.Client, monkeypatch: Any, seconds: float) -> None:
    """Make ``client``'s sender thread (what sends ``.remote()`` calls that do not come
    alone) wait ``seconds`` before each batch, as on a loaded machine: such a call is then
    still unsent for a while. A caller sending its own call is not delayed."""
    dispatcher = client._dispatcher
    send = dispatcher._send

    def late_send(batch: Any) -> None:
        if threading.current_thread() is dispatcher._sender:
            time.sleep(seconds)
        send(batch)
    monkeypatch.setattr(dispatcher, "_send", late_send)


class Gate:
    """A command that keeps an engine busy until the test opens the gate.

    The engine announces that the command has started by pushing to a Redis list, and then
    blocks on another list: the test waits on the first with BLPOP (no polling, no sleeps)
    and ends the command with :meth:`open`.
    """

    def __init__(self, r: redis.Redis, url: str, *, sticky: bool = False) -> None:
        """``url``: the server the gate lives in (it may differ from the cluster's).
        ``sticky``: once open it stays open, so a command wrongly run again does not block."""
        tag = uuid.uuid4().hex
        self.r = r
        self.started_key = f"test:gate:{tag}:started"
        self.open_key = f"test:gate:{tag}:open"
        # No socket timeout: redis-py's default (5 s) would end the hold early.
        connect = f"__import__('redis').Redis.from_url({url!r}, socket_timeout=None)"
        # No names are left in the engine's namespace.
        self.code = (f"{connect}.rpush({self.started_key!r}, 1)\n"
                     f"{connect}.blpop([{self.open_key!r}], {HOLD_LIMIT})\n")
        if sticky:
            self.code += f"{connect}.rpush({self.open_key!r}, 1)\n"

    def hold(self, client: redisengines.Client, target: int,
             code: str = "") -> redisengines.PendingResult:
        """Run ``code`` then the held command on ``target``; returns once it is running."""
        future = client.execute(code + self.code, targets=target, block=False)
        self.wait_started()
        return future

    def wait_started(self, timeout: float = WAIT) -> None:
        assert self.r.blpop([self.started_key], timeout=timeout) is not None, \
            "the held command did not start on its engine"

    def open(self) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.rpush(self.open_key, 1)
        pipe.expire(self.open_key, HOLD_LIMIT)
        pipe.delete(self.started_key)
        pipe.execute()


def inbox_last_id(r: redis.Redis, cluster_name: str, engine_id: int) -> bytes | None:
    """Id of the last entry ever added to an engine's inbox (None if the stream is empty)."""
    key = f"re:{cluster_name}:{{e{engine_id}}}:inbox"
    if not r.exists(key):
        return None
    return r.xinfo_stream(key)["last-generated-id"]
