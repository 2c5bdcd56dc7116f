"""IPython magics for the engines: ``%load_ext redisengines``.

::

    In [1]: import redisengines; redisengines.init(n=2)   # or init(url=..., cluster=...)
    In [2]: %load_ext redisengines
    In [3]: %px import os; print(os.getpid())
    [stdout:0] 4211
    [stdout:1] 4212

The magics use the default client (the one :func:`redisengines.init` made); without one
they say so (a ``UsageError``).

``%px CODE``
    Run one line on the targets. No options (the line is code; IPython's ``$x``/``{x}``
    expansion is off); use ``%%px`` or ``%pxconfig`` to choose.
``%%px [options]``
    Run the cell. ``-t/--targets``: ``all``, an engine id (``1``), a list (``0,2`` or
    ``[0, 2]``), or a slice of the live ids taken when the cell runs (``::2``, ``1:``,
    ``--targets=-1:``: a value that starts with ``-`` needs the ``=``); ``-b/--block`` or
    ``-a/--noblock``; ``--group-outputs=order|engine`` (``-r``, ``-e``); ``--time-limit
    SECONDS`` (``none`` for no limit): the run is interrupted on its engine after that and
    fails with ``TimeLimitExceeded``; ``-o/--out NAME`` stores the ``PendingResult`` in the
    user namespace as ``NAME``.
``%autopx``
    Toggle: every following cell runs on the engines, as a ``%%px`` with the defaults of
    ``%pxconfig``, until ``%autopx`` again. Cells that start with one of these magics
    (``%autopx``, ``%px``, ``%%px``, ``%pxresult``, ``%pxconfig``) still run locally.
``%pxresult [--group-outputs=...]``
    Show the output, and raise the error, of the last ``%px`` (blocking or not), waiting for
    it if it still runs (streaming its output meanwhile, with ``order``). Ctrl-C stops the
    wait only: the command runs on.
``%pxconfig [-t T] [--block|--noblock] [--group-outputs=G] [--time-limit S|none]``
    Set the defaults of ``%px``, ``%%px`` and ``%autopx``; with no option, print them.

Defaults: all engines, blocking, ``--group-outputs=order``, no time limit. ``order`` is the
default because ipyparallel's blocking ``%px`` streams output as it arrives by default
(its ``--stream``): waiting on a long cell shows its progress.

Output. Each engine writes every chunk of a command's stdout and stderr to its stream
``P:{e<id>}:out`` (see :mod:`redisengines.output`). With ``order``, a blocking ``%px``
follows those streams while the command runs and prints each chunk as it arrives, every
line labelled ``[stdout:<id>]`` (to the local stdout) or ``[stderr:<id>]`` (to the local
stderr). When the command is done, the rest of each engine's text is printed from the
result (``PendingResult.stdout``/``.stderr``): the chunks' offsets say how much was shown,
so nothing is printed twice and the tail is never lost (streaming is best effort; the result
holds the whole text, up to ``output.TEXT_MAX`` per command). With ``engine``, nothing is
shown until the command is done; then each engine's output comes as a block, engine by
engine: ``[stdout:0]`` then its text. ``--noblock`` shows nothing: the ``PendingResult`` is
the cell's value, and ``%pxresult`` shows it.

Errors. If the code raised on an engine, the outputs are printed and then the cell fails
with the very error the client raises (a ``RemoteError`` that is also an instance of the
original class for one engine, a ``CompositeError`` for several), so ``run_cell(...)``
reports it in ``error_in_exec`` and ``except ZeroDivisionError`` works around
``run_line_magic``. IPython shows it through ``_render_traceback_``: one header per failed
engine, ``[0:execute]: ZeroDivisionError: division by zero``, followed by the remote
traceback (the user's frames, none of the client's); past ``TB_LIMIT`` engines, the header
only. A mistake found before anything is sent (an unknown engine, a bad option) is a
``UsageError``.

Ctrl-C. While a blocking ``%px`` waits, Ctrl-C interrupts the command on its engines
(:meth:`Client.abort`, as ipyparallel relays the interrupt to its engines): the running
code gets ``KeyboardInterrupt`` raised in it and its engine serves on; a part still queued
is dropped. The magic waits for the aborted results (for at most the engines'
``interrupt_grace`` plus ``ABORT_MARGIN`` seconds; a second Ctrl-C stops that wait), prints
their output and each engine's remote ``KeyboardInterrupt`` traceback, and the cell then
fails with a local ``KeyboardInterrupt``, as a local cell would.

Not supported: the value of an expression statement is not shown (ipyparallel's
``Out[0:3]: value`` needs a display hook on the engine; ``execute`` returns ``None``), so
print it, or ``client.pull`` it. Rich display (``display()``, plots) of engine code is not
relayed; engine log lines (``fd`` ``log``) are not shown (``redisengines logs`` shows them).
Engine code is plain Python: IPython syntax (``%magic``, ``!cmd``) in a ``%px`` cell or an
``%autopx`` cell fails there with a ``SyntaxError``. ``%px --local`` is not provided.
"""

from __future__ import annotations

import logging
import queue
import re
import sys
import threading
import time
from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import Any

import redis
from IPython.core import magic_arguments
from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class, no_var_expand

from . import api, output
from .coordinator import Client
from .errors import CompositeError, InvalidTargetError, RemoteError
from .futures import PendingResult
from .output import Chunk, follow

log = logging.getLogger(__name__)

GROUPS = ("order", "engine")
FDS = ("stdout", "stderr")
TB_LIMIT = 8  # failed engines whose whole remote traceback is shown
ABORT_MARGIN = 2.0  # seconds waited for aborted results beyond the engines' interrupt_grace
_POLL = 0.5  # longest a wait sleeps without checking (it wakes at once when done)
_DONE = object()
_LOCAL = re.compile(r"\s*%{1,2}(?:autopx|pxresult|pxconfig|px)\b")
_LINE = re.compile(r"[^\n]*\n|[^\n]+")

Spec = str | int | list[int] | slice  # "all", an id, ids, or a slice of the live ids


# --------------------------------------------------------------------------- targets
def parse_targets(text: str) -> Spec:
    """``all``, ``1``, ``0,2``, ``[0, 2]`` or a slice ``::2`` of the live ids."""
    s = text.strip().strip("'\"").strip()
    if s == "all":
        return "all"
    try:
        if ":" in s:
            parts = s.split(":")
            if len(parts) > 3:
                raise ValueError
            sl = slice(*(int(p) if p.strip() else None for p in parts))
            if sl.step == 0:
                raise ValueError
            return sl
        listed = "," in s or (s.startswith("[") and s.endswith("]"))
        ids = [int(p) for p in s.strip("[]").split(",") if p.strip()]
    except ValueError:
        ids = []
        listed = True
    if not ids:
        raise UsageError(f"--targets {text!r}: give 'all', an engine id, a list of ids "
                         "(0,2) or a slice of the live ids (::2)")
    return ids if listed else ids[0]


def _resolve(spec: Spec, client: Client) -> tuple[list[int], bool]:
    """``(engine ids, single)`` for a target spec; UsageError for an engine that is not live."""
    if isinstance(spec, slice):
        ids = client.ids[spec]
        if not ids:
            raise UsageError(f"--targets {_show_spec(spec)}: no live engine in that slice of "
                             f"{client.ids}")
        return ids, False
    try:
        return client.verify_targets(spec), isinstance(spec, int)  # type: ignore[arg-type]
    except InvalidTargetError as exc:
        raise UsageError(str(exc)) from None


def _show_spec(spec: Spec) -> str:
    if isinstance(spec, slice):
        return ":".join("" if v is None else str(v) for v in (spec.start, spec.stop, spec.step))
    return str(spec)


def _time_limit(text: str | None) -> float | None:
    if text is None or text.strip().lower() in ("none", ""):
        return None
    try:
        limit = float(text)
    except ValueError:
        raise UsageError(f"--time-limit {text!r}: give seconds, or 'none'") from None
    if not limit > 0 or limit == float("inf"):
        raise UsageError(f"--time-limit {text!r}: give a positive number of seconds")
    return limit


def _client() -> Client:
    try:
        return api.default_client()
    except RuntimeError:
        raise UsageError("%px uses the default client and there is none: call "
                         "redisengines.init(url=..., cluster=...) first") from None


# ---------------------------------------------------------------------------- output
@dataclass
class _Run:
    """One %px: its client, its PendingResult, and where its output streams stood before
    it was sent (None: not taken)."""

    client: Client
    pending: PendingResult
    since: dict[int, str] | None


def _cursor(client: Client, eids: list[int]) -> dict[int, str] | None:
    """Where each target's output stream ends before the command is sent."""
    try:
        return output.positions(client.r, client.schema, eids)
    except redis.RedisError:
        return None


def _texts(pending: PendingResult) -> dict[int, dict[str, str]]:
    """``{engine_id: {"stdout": text, "stderr": text}}`` of a (done) command."""
    out: dict[int, dict[str, str]] = {eid: {} for eid in pending.engine_ids}
    for fd in FDS:
        value = getattr(pending, fd)
        per = value if isinstance(value, dict) else {pending.engine_ids[0]: value}
        for eid in out:
            out[eid][fd] = per.get(eid, "") or ""
    return out


class _Printer:
    """Engine output on the local stdout/stderr, each line labelled ``[stdout:<id>] ``.

    Remembers how much of each engine's text it showed (the chunks' offsets), so that the
    tail printed from the result never repeats what the stream showed. A chunk that does
    not follow what was shown (a lost chunk) ends live printing for that engine and fd;
    the tail fills the gap.
    """

    def __init__(self) -> None:
        self.shown: dict[tuple[int, str], int] = {}
        self._gapped: set[tuple[int, str]] = set()
        self._open: dict[str, tuple[int, str] | None] = {}  # fd -> key of an unended line

    def chunk(self, c: Chunk) -> None:
        key = (c.engine, c.fd)
        if c.fd not in FDS or key in self._gapped:
            return
        shown = self.shown.get(key, 0)
        end = c.off + len(c.text)
        if end <= shown:
            return
        if c.off > shown:
            self._gapped.add(key)
            return
        self.shown[key] = end
        self._write(key, c.text[shown - c.off:])

    def tail(self, eid: int, fd: str, text: str) -> None:
        key = (eid, fd)
        shown = self.shown.get(key, 0)
        if len(text) > shown:
            self.shown[key] = len(text)
            self._write(key, text[shown:])

    def _write(self, key: tuple[int, str], text: str) -> None:
        eid, fd = key
        unended = self._open.get(fd)
        parts = []
        if unended is not None and unended != key:  # another engine's line was left open
            parts.append("\n")
            unended = None
        for line in _LINE.findall(text):
            if unended is None:
                parts.append(f"[{fd}:{eid}] ")
            parts.append(line)
            unended = None if line.endswith("\n") else key
        self._open[fd] = unended
        _emit(fd, "".join(parts))

    def close(self) -> None:
        for fd, unended in self._open.items():
            if unended is not None:
                _emit(fd, "\n")
        self._open.clear()


def _emit(fd: str, text: str) -> None:
    stream = sys.stderr if fd == "stderr" else sys.stdout
    stream.write(text)
    stream.flush()


def _print_by_engine(texts: dict[int, dict[str, str]]) -> None:
    for eid, fds in texts.items():
        for fd in FDS:
            text = fds[fd]
            if not text:
                continue
            body = text if text.endswith("\n") else text + "\n"
            sep = " " if body.count("\n") == 1 else "\n"
            _emit(fd, f"[{fd}:{eid}]{sep}{body}")


def _follow(run: _Run, stop: threading.Event, q: queue.SimpleQueue[Any]) -> None:
    client = run.client
    try:
        for chunk in follow(client.r, client.schema, run.pending.engine_ids, since=run.since
                            or "$", stop=stop, cmds=set(run.pending.cmd_ids.values()),
                            block=0.1):
            q.put(chunk)
    except Exception:  # best effort: the tail printed from the result has it all
        log.debug("px: following the output streams failed", exc_info=True)


def _wait(run: _Run, printer: _Printer | None, deadline: float | None = None) -> bool:
    """Wait for the command, showing its chunks as they arrive if ``printer``; True if done.

    Output is printed from the calling thread (as Jupyter needs); a side thread only
    reads the streams. KeyboardInterrupt reaches the caller.
    """
    pending = run.pending
    q: queue.SimpleQueue[Any] = queue.SimpleQueue()
    pending.add_done_callback(lambda _: q.put(_DONE))
    stop = threading.Event()
    if printer is not None and not pending.done():
        threading.Thread(target=_follow, args=(run, stop, q), name="re-px-output",
                         daemon=True).start()
    try:
        while True:
            wait = _POLL if deadline is None else min(_POLL, deadline - time.monotonic())
            if wait <= 0:
                return pending.done()
            try:
                item = q.get(timeout=wait)
            except queue.Empty:
                continue
            if item is _DONE:
                return True
            if printer is not None:
                printer.chunk(item)
    finally:
        stop.set()


def _print_outputs(run: _Run, group: str, printer: _Printer | None) -> None:
    texts = _texts(run.pending)
    if group == "engine":
        _print_by_engine(texts)
        return
    printer = printer or _Printer()
    for eid, fds in texts.items():
        for fd in FDS:
            printer.tail(eid, fd, fds[fd])
    printer.close()


# ---------------------------------------------------------------------------- errors
def _error_lines(exc: BaseException) -> list[str]:
    """What IPython shows for a failed %px: per engine a header and the remote traceback."""
    if isinstance(exc, CompositeError):
        lines: list[str] = []
        for i, (eid, err) in enumerate(exc.errors.items()):
            lines += _engine_error(eid, err, full=i < TB_LIMIT)
        if len(exc.errors) > TB_LIMIT:
            lines.append(f"({len(exc.errors) - TB_LIMIT} more tracebacks not shown: they are "
                         "in the error's .errors)")
        lines.append(f"CompositeError: {str(exc).splitlines()[0].rstrip(':')}")
        return lines
    return _engine_error(getattr(exc, "engine_id", None), exc, full=True)


def _engine_error(eid: int | None, err: BaseException, *, full: bool) -> list[str]:
    if isinstance(err, RemoteError):
        name, message = err.remote_type, err.message
    else:
        name, message = type(err).__name__, str(err)
    op = getattr(err, "op", "") or "execute"
    head = f"{name}: {message}" if message else name
    lines = [f"[{eid}:{op}]: {head}" if eid is not None else head]
    tb = getattr(err, "traceback", "")
    if full and isinstance(tb, str) and tb.strip():
        lines += tb.rstrip("\n").split("\n")
    return lines


def _rendered(exc: BaseException, lines: list[str]) -> BaseException:
    """``exc``, shown by IPython as ``lines`` instead of a local traceback."""
    try:
        exc._render_traceback_ = lambda: list(lines)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):  # an exception without a __dict__
        pass
    return exc


def _failure(pending: PendingResult) -> BaseException | None:
    """The error of a done command, ready to raise, or None if it succeeded."""
    if pending.cancelled():
        exc: BaseException = CancelledError(f"{pending.op} was cancelled before it started")
    else:
        found = pending.exception(timeout=0)
        if found is None:
            return None
        exc = found
    return _rendered(exc, _error_lines(exc))


def _engines(ids: list[int]) -> str:
    return f"engine {ids[0]}" if len(ids) == 1 else f"engines {', '.join(map(str, ids))}"


# ---------------------------------------------------------------------------- %autopx
class _AutoPx:
    """An input transformer: a cell becomes a call that runs it on the engines."""

    # IPython's check_complete (is a typed cell finished?) skips transformers with side
    # effects: the terminal then judges the cell as typed, not as its one-line call.
    has_side_effects = True

    def __call__(self, lines: list[str]) -> list[str]:
        first = next((line for line in lines if line.strip()), None)
        if first is None or _LOCAL.match(first):
            return lines
        cell = "".join(lines)
        return [f"get_ipython().magics_manager.registry[{_NAME!r}]._autopx_cell({cell!r})\n"]


# ---------------------------------------------------------------------------- magics
def _exec_args(f: Any) -> Any:
    """Options of %%px and %pxconfig (applied bottom-up: listed in help order)."""
    for arg in reversed([
        magic_arguments.argument("-t", "--targets", metavar="TARGETS",
                                 help="'all', an engine id, ids '0,2', or a slice '::2' of the "
                                      "live ids"),
        magic_arguments.argument("-b", "--block", action="store_const", const=True,
                                 dest="block", help="wait for the result (the default)"),
        magic_arguments.argument("-a", "--noblock", action="store_const", const=False,
                                 dest="block", help="return the PendingResult at once"),
        magic_arguments.argument("--time-limit", metavar="SECONDS", dest="time_limit",
                                 help="interrupt the code on its engine after SECONDS "
                                      "('none': no limit)"),
    ]):
        f = arg(f)
    return f


def _output_args(f: Any) -> Any:
    """Options of %%px, %pxresult and %pxconfig."""
    for arg in reversed([
        magic_arguments.argument("--group-outputs", dest="group", choices=GROUPS,
                                 help="order: as it arrives, streamed (the default); engine: "
                                      "engine by engine, once done"),
        magic_arguments.argument("-r", dest="group", action="store_const", const="order",
                                 help="--group-outputs=order"),
        magic_arguments.argument("-e", dest="group", action="store_const", const="engine",
                                 help="--group-outputs=engine"),
    ]):
        f = arg(f)
    return f


@magics_class
class RedisEnginesMagics(Magics):
    """``%px``, ``%%px``, ``%autopx``, ``%pxresult`` and ``%pxconfig`` (see the module)."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.targets: Spec = "all"
        self.block = True
        self.group = "order"
        self.time_limit: float | None = None
        self.last: _Run | None = None
        self._autopx: _AutoPx | None = None

    # ------------------------------------------------------------------ the magics
    @no_var_expand
    @line_magic("px")
    def px(self, line: str = "") -> PendingResult | None:
        """Run one line of code on the engines: ``%px a = 1``. Output is labelled
        ``[stdout:<id>]``; defaults from ``%pxconfig``; ``%%px`` takes options."""
        if not line.strip():
            raise UsageError("%px runs the code that follows it, as in: %px a = 1")
        return self._execute(line, self.targets, self.block, self.group, self.time_limit)

    @magic_arguments.magic_arguments("px")
    @_exec_args
    @_output_args
    @magic_arguments.argument("-o", "--out", dest="save_name", metavar="NAME",
                              help="store the PendingResult as NAME in the user namespace")
    @cell_magic("px")
    def cell_px(self, line: str = "", cell: str = "") -> PendingResult | None:
        """Run the cell on the engines."""
        args = magic_arguments.parse_argstring(self.cell_px, line)
        targets = self.targets if args.targets is None else parse_targets(args.targets)
        block = self.block if args.block is None else args.block
        limit = self.time_limit if args.time_limit is None else _time_limit(args.time_limit)
        return self._execute(cell, targets, block, args.group or self.group, limit,
                             save_name=args.save_name)

    @line_magic("autopx")
    def autopx(self, line: str = "") -> None:
        """Toggle running every cell on the engines (as ``%%px`` with the ``%pxconfig``
        defaults) until ``%autopx`` again."""
        if self._autopx is None:
            self._autopx = _AutoPx()
            self.shell.input_transformers_cleanup.append(self._autopx)
            print("%autopx enabled: cells run on the engines until %autopx")
        else:
            self._disable_autopx()
            print("%autopx disabled")

    @magic_arguments.magic_arguments()
    @_output_args
    @line_magic("pxresult")
    def pxresult(self, line: str = "") -> None:
        """Show the output, and raise the error, of the last %px; waits for it if it still
        runs (Ctrl-C stops waiting, not the command)."""
        args = magic_arguments.parse_argstring(self.pxresult, line)
        if self.last is None:
            raise UsageError("%pxresult shows the result of the last %px, and none ran yet")
        run, group = self.last, args.group or self.group
        printer = _Printer() if group == "order" else None
        try:
            _wait(run, printer if run.since is not None else None)
        except KeyboardInterrupt:
            if printer is not None:
                printer.close()
            msg = (f"stopped waiting; {run.pending.op} runs on (%pxresult waits again, "
                   "PendingResult.abort() interrupts it)")
            raise _rendered(KeyboardInterrupt(msg), [f"KeyboardInterrupt: {msg}"]) from None
        _print_outputs(run, group, printer)
        exc = _failure(run.pending)
        if exc is not None:
            raise exc

    @magic_arguments.magic_arguments()
    @_exec_args
    @_output_args
    @line_magic("pxconfig")
    def pxconfig(self, line: str = "") -> None:
        """Set the defaults of %px, %%px and %autopx; with no option, print them."""
        args = magic_arguments.parse_argstring(self.pxconfig, line)
        changed = False
        if args.targets is not None:
            self.targets, changed = parse_targets(args.targets), True
        if args.block is not None:
            self.block, changed = args.block, True
        if args.group is not None:
            self.group, changed = args.group, True
        if args.time_limit is not None:
            self.time_limit, changed = _time_limit(args.time_limit), True
        if not changed:
            limit = "none" if self.time_limit is None else f"{self.time_limit:g}"
            print(f"%pxconfig --targets {_show_spec(self.targets)} "
                  f"--{'block' if self.block else 'noblock'} --group-outputs={self.group} "
                  f"--time-limit {limit}")

    # -------------------------------------------------------------- implementation
    def _execute(self, code: str, targets: Spec, block: bool, group: str,
                 time_limit: float | None, save_name: str | None = None
                 ) -> PendingResult | None:
        client = _client()
        eids, single = _resolve(targets, client)
        since = _cursor(client, eids) if group == "order" or not block else None
        try:
            pending = client.execute(code, targets=eids[0] if single else eids, block=False,
                                     time_limit=time_limit)
        except InvalidTargetError as exc:  # an engine left since _resolve
            raise UsageError(str(exc)) from None
        run = _Run(client, pending, since)
        self.last = run
        if save_name:
            self.shell.user_ns[save_name] = pending
        if not block:
            return pending
        printer = _Printer() if group == "order" else None
        try:
            _wait(run, printer)
        except KeyboardInterrupt:
            self._interrupted(run, group, printer)
        _print_outputs(run, group, printer)
        exc = _failure(pending)
        if exc is not None:
            raise exc
        return None

    def _interrupted(self, run: _Run, group: str, printer: _Printer | None) -> None:
        """Ctrl-C while a blocking %px waits: abort the command on its engines, show how
        it ended, and raise KeyboardInterrupt."""
        pending = run.pending
        eids = pending.engine_ids
        if printer is not None:
            printer.close()
        print(f"Ctrl-C: interrupting {pending.op} on {_engines(eids)}", file=sys.stderr)
        done = pending.done()
        try:
            run.client.abort(pending)
            grace = run.client.settings.interrupt_grace
            done = _wait(run, printer, deadline=time.monotonic() + grace + ABORT_MARGIN)
        except KeyboardInterrupt:  # a second Ctrl-C: stop waiting
            done = pending.done()
        _print_outputs(run, group, printer)
        lines: list[str] = []
        if done:
            exc = _failure(pending)
            if exc is not None:
                lines = _error_lines(exc)
            msg = f"%px interrupted on {_engines(eids)}"
        else:
            msg = (f"%px interrupted; {pending.op} may still run on {_engines(eids)} "
                   "(%pxresult waits for it)")
        raise _rendered(KeyboardInterrupt(msg), [*lines, f"KeyboardInterrupt: {msg}"]) from None

    def _autopx_cell(self, cell: str) -> None:
        """Run a cell typed under %autopx (the cell's value stays None, even --noblock)."""
        self._execute(cell, self.targets, self.block, self.group, self.time_limit)

    def _disable_autopx(self) -> None:
        if self._autopx is not None:
            transformers = self.shell.input_transformers_cleanup
            if self._autopx in transformers:
                transformers.remove(self._autopx)
            self._autopx = None


_NAME = RedisEnginesMagics.__name__  # its key in IPython's magics registry


def load_ipython_extension(ipython: Any) -> None:
    """Register the magics on ``ipython`` (``%load_ext redisengines``)."""
    ipython.register_magics(RedisEnginesMagics(ipython))


def unload_ipython_extension(ipython: Any) -> None:
    """Turn ``%autopx`` off and remove the magics (``%unload_ext redisengines``)."""
    manager = ipython.magics_manager
    magics = manager.registry.pop(_NAME, None)
    if isinstance(magics, RedisEnginesMagics):
        magics._disable_autopx()
        for kind, names in magics.magics.items():
            for name in names:  # unless another extension took the name since
                if getattr(manager.magics[kind].get(name), "__self__", None) is magics:
                    del manager.magics[kind][name]
