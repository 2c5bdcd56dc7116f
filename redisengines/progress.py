"""Progress of a long wait: a bar of done/total, elapsed time and what each engine is doing.

Drawn with rich, which renders in a terminal and in Jupyter alike. The bar moves when a
future completes (a done callback wakes the waiter; nothing polls the futures) and the
engine line is refreshed from ``P:engines`` a few times a second.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING

from .overview import age_text, engines

if TYPE_CHECKING:
    from rich.console import Console

    from .coordinator import Client

REFRESH = 0.25  # seconds between two looks at the engines


def wait_with_progress(futures: Sequence[Future], *, timeout: float | None = None,  # type: ignore[type-arg]
                       client: Client | None = None, what: str = "results",
                       console: Console | None = None,
                       stop: threading.Event | None = None) -> bool:
    """Wait for ``futures`` while showing a progress bar; True if all are done. A set
    ``stop`` ends the wait early (a barrier stops at the first failure).

    With a ``client``, a line beside the bar tells each engine's state (idle, or busy with
    which command for how long) and how many commands wait in its queue.
    """
    futures = list(futures)

    def subscribe(wake: Callable[[], None]) -> None:
        for f in futures:
            f.add_done_callback(lambda _: wake())

    return show_progress(len(futures), lambda: sum(f.done() for f in futures), subscribe,
                         timeout=timeout, client=client, what=what, console=console,
                         stop=stop)


def show_progress(total: int, done: Callable[[], int],
                  subscribe: Callable[[Callable[[], None]], None], *,
                  timeout: float | None = None, client: Client | None = None,
                  what: str = "results", console: Console | None = None,
                  stop: threading.Event | None = None) -> bool:
    """Show ``done()`` of ``total`` until they are all done or ``timeout``; ``subscribe``
    registers the callback that wakes the bar when one more is done. True if all are."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    changed = threading.Event()
    subscribe(changed.set)  # (a ``stop`` is set by a done callback, which wakes us too)
    deadline = None if timeout is None else time.monotonic() + timeout
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("{task.fields[engines]}")]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(what, total=total, engines="")
        while True:
            n = done()
            busy = client is not None and n < total  # (when all are done, nothing to tell)
            bar.update(task, completed=n, engines=_engines_line(client) if busy else "")
            if n >= total:
                return True
            if stop is not None and stop.is_set():
                return False
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            changed.wait(REFRESH if left is None else min(REFRESH, left))
            changed.clear()


def _engines_line(client: Client) -> str:
    """``0 busy execute 3s (2 queued) · 1 idle`` for the live engines (the rows of
    ``redisengines status``)."""
    try:
        rows = engines(client.r, client.schema)
    except Exception:  # the bar must not break a wait: Redis may be briefly away
        return ""
    parts = []
    for row in rows:
        if not row["alive"]:
            continue
        text = f"{row['id']} {row['state']}"
        if "running_for" in row:
            text += f" {row.get('op', '')} {age_text(row['running_for'])}"
        if row["queued"]:
            text += f" ({row['queued']} queued)"
        parts.append(text)
    return " · ".join(parts)
