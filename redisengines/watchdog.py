"""One thread that calls a function when its deadline passes, for many deadlines.

The engine arms one per command with a time limit, and one per interrupt (its grace
period). Arming and disarming are O(log n) and wake the thread only when the earliest
deadline changes; an idle watchdog sleeps on a condition variable.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable

log = logging.getLogger(__name__)


class Watchdog(threading.Thread):
    """``arm(token, delay, fn)``: call ``fn()`` in ``delay`` seconds unless ``disarm(token)``
    comes first. Functions run on the watchdog's thread, one at a time."""

    def __init__(self, name: str = "re-watchdog") -> None:
        super().__init__(name=name, daemon=True)
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Hashable]] = []
        self._armed: dict[Hashable, tuple[int, Callable[[], None]]] = {}
        self._seq = itertools.count()
        self._stopped = False

    def arm(self, token: Hashable, delay: float, fn: Callable[[], None]) -> None:
        with self._cond:
            n = next(self._seq)
            self._armed[token] = (n, fn)
            at = time.monotonic() + delay
            heapq.heappush(self._heap, (at, n, token))
            if self._heap[0][1] == n:
                self._cond.notify()
        if not self.is_alive() and not self._stopped:
            try:
                self.start()
            except RuntimeError:  # started by another thread meanwhile
                pass

    def disarm(self, token: Hashable) -> None:
        with self._cond:
            self._armed.pop(token, None)  # its heap entry is skipped when it comes up

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._armed.clear()
            self._cond.notify()

    def run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    while self._heap and self._armed.get(self._heap[0][2], (None,))[0] \
                            != self._heap[0][1]:
                        heapq.heappop(self._heap)  # disarmed or re-armed: stale
                    wait = self._heap[0][0] - time.monotonic() if self._heap else None
                    if wait is not None and wait <= 0:
                        _, _, token = heapq.heappop(self._heap)
                        _, fn = self._armed.pop(token)
                        break
                    self._cond.wait(wait)
                else:
                    return
            try:
                fn()
            except Exception:
                log.exception("watchdog: %s failed", token)
